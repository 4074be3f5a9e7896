"""The shipped alert rules, as an on-call engineer meets them: promtool's unit tests (each alert
fires on its fault and stays silent on a healthy demo-like fleet) pass; every alert's
`runbook_url` opens its own section of docs/runbook.md; every `edgefleet` command an annotation
or the runbook names exists, with the options it is given (its `--help` runs and lists them).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import pytest
import yaml

from tests.conftest import REPO

PROM = REPO / "k3s" / "prometheus"
RULES = PROM / "rules" / "edgefleet.rules.yml"
RUNBOOK = REPO / "docs" / "runbook.md"
_COMMAND = re.compile(r"`(edgefleet [^`]+)`")


def _alerts() -> list[dict]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]
            if "alert" in r]


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, spaces to dashes, punctuation dropped."""
    return {re.sub(r"[^a-z0-9 _-]", "", h.strip().lower()).replace(" ", "-")
            for h in re.findall(r"^#+ (.+)$", markdown, re.M)}


def test_promtool_unit_tests_pass():
    promtool = shutil.which("promtool")
    if not promtool:
        pytest.fail("promtool is not installed (apt-get install prometheus)", pytrace=False)
    run = subprocess.run([promtool, "test", "rules", *sorted((PROM / "tests").glob("*.yml"))],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr


def test_every_alert_has_its_own_runbook_section():
    alerts = _alerts()
    assert len(alerts) >= 8
    anchors = _anchors(RUNBOOK.read_text())
    urls = {}
    for a in alerts:
        url = a["annotations"].get("runbook_url", "")
        path, _, anchor = url.partition("#")
        assert path == "docs/runbook.md", (a["alert"], url)
        assert anchor == a["alert"].lower() and anchor in anchors, (a["alert"], url)
        urls[a["alert"]] = url
    assert len(set(urls.values())) == len(alerts)  # one section each


def _documented_commands() -> set[str]:
    texts = [RUNBOOK.read_text()]
    texts += [v for a in _alerts() for v in a["annotations"].values()]
    found = set()
    for text in texts:
        for cmd in _COMMAND.findall(" ".join(text.split())):  # annotations wrap lines
            found.add(re.sub(r"\{\{[^}]*\}\}", "DEVICE", cmd))
    return found


def test_every_command_named_exists():
    import typer

    from edgefleet.cli import app

    root = typer.main.get_command(app)
    commands = _documented_commands()
    assert any(c.startswith("edgefleet fleet devices") for c in commands), commands
    for text in sorted(commands):
        words = text.split()[1:]
        cmd, path = root, ["edgefleet"]
        while words and hasattr(cmd, "commands") and words[0] in cmd.commands:
            cmd = cmd.commands[words[0]]
            path.append(words.pop(0))
        assert not hasattr(cmd, "commands"), f"{text!r}: {' '.join(path)} is a group"
        run = subprocess.run([sys.executable, "-m", "edgefleet", *path[1:], "--help"],
                             capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, (text, run.stderr)
        for flag in (w.split("=")[0] for w in words if w.startswith("-")):
            assert flag in run.stdout, f"{text!r}: {' '.join(path)} has no {flag}"
