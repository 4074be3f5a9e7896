"""`make demo-retrain` (scripts/demo-retrain.sh), reduced: 6,000 dies of 32 parameters, 3
training epochs (both builds signed with --accept-risk: a model of that size is not a floor's),
on real agents, a real TLS broker, Prometheus, the artifact server and the rollout controller.
It must print realized false-fail before the shift, during it and once the retrained model is
live, and the figures must tell the story: up with the shift, back down after the retrain.
Every command docs/retrain.md (and the label gates section of docs/rollouts.md) shows is one
the script runs (same command, same options)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

SCRIPT = REPO / "scripts" / "demo-retrain.sh"
DOC = REPO / "docs" / "retrain.md"
FAST = ('{"train": {"epochs": 3}, "prune": {"finetune_epochs": 1}, "evaluate": '
        '{"latency_runs": 100, "latency_rounds": 1, "throughput_runs": 1, '
        '"throughput_batch": 64}}')


def _commands(text: str, prefix: str) -> list[list[str]]:
    """Every `edgefleet ...` command line of `text` (continuations joined), as words."""
    joined = re.sub(r"\\\n\s*", " ", text)
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if line.startswith(prefix):
            line = line.replace(prefix, "edgefleet", 1).split(" #")[0].split(" | ")[0]
            words = shlex.split(line.split(" > ")[0].split(" 2>")[0], posix=True)
            out.append([w for w in words if w not in ("|", ">", "&")])
    return out


def _shape(words: list[str]) -> tuple[str, frozenset[str]]:
    """(the command's subcommands, its options)."""
    sub = " ".join(w for w in words[1:4] if re.fullmatch(r"[a-z-]+", w) and not
                   w.startswith("-"))
    return sub, frozenset(w.split("=")[0] for w in words if w.startswith("--"))


def test_every_documented_command_is_run_by_the_demo():
    script = SCRIPT.read_text().replace("\"${ROLLOUT[@]}\"", " ".join(
        re.search(r"ROLLOUT=\((.*?)\)\n", SCRIPT.read_text(), re.S).group(1).split()))
    ran: dict[str, set[str]] = {}
    for words in _commands(script, '"$EF"'):
        sub, opts = _shape(words)
        ran.setdefault(sub, set()).update(opts)
    rollouts = (REPO / "docs" / "rollouts.md").read_text()
    label_gates = rollouts[rollouts.index("## Label gates"):rollouts.index("## States and")]
    documented = _commands(DOC.read_text() + label_gates, "edgefleet")
    assert len(documented) >= 8
    for words in documented:
        sub, opts = _shape(words)
        assert sub in ran, f"docs/retrain.md: `{' '.join(words)}`: the demo never runs {sub}"
        assert opts <= ran[sub] | {"--prometheus"}, (sub, sorted(opts - ran[sub]))


def test_the_demo_parses():
    r = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.slow
def test_the_retrain_loop_brings_realized_false_fail_back_down(tmp_path: Path):
    config = tmp_path / "fast.json"
    config.write_text(FAST)
    env = {**os.environ, "VENV": str(Path(sys.executable).parent.parent),
           "DEMO_OUT": str(tmp_path / "out"), "DEMO_DIES": "6000", "DEMO_PARAMS": "32",
           "DEMO_BUILD_ARGS": f"--config {config} --accept-risk ci-sized",
           "DEMO_SHADOW_DIES": "100", "DEMO_MIN_GOOD": "50", "DEMO_MAX_FFR": "0.1",
           "DEMO_DRIFT": "2.5"}  # on 32 parameters, 2.5 sigma already fails half the good dies
    r = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    figures = dict(re.findall(r"realized false-fail (before drift|during drift|retrained, "
                              r"live): +([0-9.]+)%", r.stdout))
    assert set(figures) == {"before drift", "during drift", "retrained, live"}, r.stdout[-2000:]
    before, during, after = (float(figures[k]) for k in ("before drift", "during drift",
                                                         "retrained, live"))
    assert during > 2 * before and during > 10, figures
    assert after < during / 2, figures
    assert "ALARM" in r.stdout.split("== 4.")[1].split("== 5.")[0]
    assert "succeeded" in r.stdout.split("== 6.")[1].split("== 7.")[0].lower()
