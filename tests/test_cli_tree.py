"""The `edgefleet` command tree as a kubectl user meets it: every command's --help has
Examples that name real commands and options; read commands take `-o text|wide|json|yaml|name`
and write commands `-o text|json`; `--version`; shell completion; usage errors in one line.
"""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest
import typer

from agent import __version__
from tests.conftest import REPO

READ = {"keys list", "bundle verify", "bundle inspect", "agent health", "agent info",
        "agent models", "fleet devices", "fleet artifacts", "fleet rollout status",
        "fleet rollout list", "fleet quality"}
WRITE = {"keys generate", "keys trust", "keys revoke", "bundle sign", "agent install",
         "agent rollback", "fleet publish", "fleet apply",
         *(f"fleet rollout {a}" for a in ("start", "pause", "resume", "abort", "rollback",
                                          "promote", "retry")),
         "fleet certs init", "fleet certs issue", "fleet certs site", "fleet collect",
         "optimize make-data", "optimize build"}
# Without the READ/WRITE formats, on purpose:
# - `agent serve`, `fleet controller`, `fleet serve-artifacts` run until stopped: they serve,
#   they print no result to format (their state is read with `agent health`, `fleet rollout
#   status`, `fleet artifacts`, which take -o);
# - `agent predict` streams one answer per die: -o text|json, json being one document per line
#   (JSON Lines), so a file of dies can be piped; checked below.
EXEMPT = {"agent serve", "fleet controller", "fleet serve-artifacts", "agent predict"}


def _tree() -> dict[str, tuple[Any, str]]:
    """{"edgefleet group cmd": (command, plain help text)} for every command."""
    from edgefleet.cli import app

    out: dict[str, tuple[Any, str]] = {}

    def walk(cmd: Any, path: list[str], parent: Any) -> None:
        ctx = cmd.context_class(cmd, info_name=path[-1], parent=parent, terminal_width=200,
                                max_content_width=200)
        cmd.rich_markup_mode = None  # the words, without rich's boxes
        out[" ".join(path)] = (cmd, cmd.get_help(ctx))
        for name, sub in sorted(getattr(cmd, "commands", {}).items()):
            walk(sub, [*path, name], ctx)

    walk(typer.main.get_command(app), ["edgefleet"], None)
    return out


def _examples(help_text: str) -> list[str]:
    if "Examples:" not in help_text:
        return []
    tail = help_text.split("Examples:", 1)[1]
    return [ln.strip() for ln in tail.splitlines() if ln.strip().startswith("edgefleet ")]


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgefleet", *args], capture_output=True,
                          text=True, cwd=REPO, env=env, timeout=60)


def test_every_command_has_examples_that_name_real_commands_and_options():
    tree = _tree()
    leaves = {p: v for p, v in tree.items() if not hasattr(v[0], "commands")}
    assert len(leaves) >= 20
    missing = sorted(p for p, (_, h) in leaves.items()
                     if not _examples(h))
    assert missing == [], "add Examples: to the --help of these commands"
    checked = 0
    for path, (_, text) in leaves.items():
        for example in _examples(text):
            words = example.split("|")[0].split()
            assert " ".join(words[:len(path.split())]) == path, (path, example)
            cmd = leaves[path][0]
            options = {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)}
            for w in words[len(path.split()):]:
                if w.startswith("-"):
                    assert w.split("=")[0] in options, f"{path}: {example}: no {w}"
            checked += 1
    assert checked >= 30


def test_read_and_write_commands_take_output_formats():
    tree = _tree()
    leaves = {p.removeprefix("edgefleet ") for p, (c, _) in tree.items()
              if not hasattr(c, "commands")}
    assert leaves - (READ | WRITE | EXEMPT) == set(), "a new command: READ, WRITE or EXEMPT?"
    assert not (READ & WRITE or (READ | WRITE) & EXEMPT)
    (predict_opt,) = [p for p in tree["edgefleet agent predict"][0].params
                      if "--output" in p.opts]
    assert "-o" in predict_opt.opts and "text or json" in predict_opt.help
    for path in READ | WRITE:
        cmd, _ = tree[f"edgefleet {path}"]
        (opt,) = [p for p in cmd.params if "--output" in p.opts]
        assert "-o" in opt.opts
        want = ("text", "wide", "json", "yaml", "name") if path in READ else ("text", "json")
        assert all(f in opt.help for f in want), (path, opt.help)


def test_output_formats_for_keys(tmp_path):
    r = _cli("keys", "generate", "--out", str(tmp_path / "k"), "--name", "rel", "-o", "json")
    assert r.returncode == 0, r.stderr
    import json

    kid = json.loads(r.stdout)["key_id"]
    r = _cli("keys", "trust", str(tmp_path / "k" / "rel.pub"), "--keyring",
             str(tmp_path / "ring"), "--role", "release", "-o", "json")
    assert json.loads(r.stdout) == {"key_id": kid, "role": "release",
                                    "keyring": str(tmp_path / "ring"), "trusted": True}
    r = _cli("keys", "list", "--keyring", str(tmp_path / "ring"), "-o", "name")
    assert r.stdout.split() == [f"key/{kid}"]
    r = _cli("keys", "list", "--keyring", str(tmp_path / "ring"), "-o", "yaml")
    assert f"key_id: {kid}" in r.stdout and "role: release" in r.stdout
    r = _cli("keys", "list", "--keyring", str(tmp_path / "ring"), "-o", "xml")
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    r = _cli("keys", "revoke", kid, "--keyring", str(tmp_path / "ring"), "-o", "wide")
    assert r.returncode == 2 and "text or json" in r.stderr


def test_version_and_completion():
    r = _cli("--version")
    assert (r.returncode, r.stdout) == (0, f"edgefleet {__version__}\n")
    import os

    env = {**os.environ, "_EDGEFLEET_COMPLETE": "source_bash"}
    r = _cli(env=env)
    assert r.returncode == 0 and "_EDGEFLEET_COMPLETE=complete_bash" in r.stdout
    env = {**os.environ, "_EDGEFLEET_COMPLETE": "complete_bash",
           "COMP_WORDS": "edgefleet fleet dev", "COMP_CWORD": "2"}
    assert _cli(env=env).stdout.split() == ["devices"]
    env.update(COMP_WORDS="edgefleet fleet devices --ou", COMP_CWORD="3")
    assert _cli(env=env).stdout.split() == ["--output"]


@pytest.mark.parametrize("args, says", [
    (("keys", "generate"), "Missing option '--out'"),
    (("fleet", "devices", "--bogus"), "No such option: --bogus"),
    (("agent", "bogus"), "No such command 'bogus'"),
    (("fleet", "devices", "-o"), "requires an argument"),
])
def test_usage_errors_are_one_line(args, says):
    r = _cli(*args)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("edgefleet: error: ")
    assert says in r.stderr


def test_rollout_start_options_are_grouped():
    """`rollout start` has ~40 options: each is in a named section of --help, none in the
    catch-all block, and no section is a flat list again."""
    cmd, _ = _tree()["edgefleet fleet rollout start"]
    panels: dict[str, list[str]] = {}
    for p in cmd.params:
        if p.param_type_name == "option" and p.name != "help":
            panels.setdefault(p.rich_help_panel, []).append(p.opts[0])
    assert None not in panels, panels.get(None)
    assert {"Selection", "Stages", "Gates", "Timing", "Connection"} <= set(panels)
    assert max(len(v) for v in panels.values()) <= 10, panels


GROUP_MODULES = ("agent.cli", "agent.cli_bundle", "fleet.cli", "optimize.cli")


def _loaded_after(code: str) -> set[str]:
    """The group modules loaded in a fresh interpreter after running `code`."""
    probe = (f"import sys\n{code}\n"
             f"print('loaded:' + ','.join(m for m in {GROUP_MODULES!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         cwd=REPO, timeout=60)
    assert out.returncode == 0, out.stderr
    loaded = out.stdout.rsplit("loaded:", 1)[1].strip()
    return set(filter(None, loaded.split(",")))


def test_the_root_imports_a_group_module_only_when_that_group_is_invoked():
    """`edgefleet agent ...` loads the agent's commands alone (not the fleet's pydantic and
    database clients, nor the optimizer's): the root is lazy. Its own --help lists every
    group without importing one."""
    run = ("from edgefleet.cli import main\ntry:\n    main({})\nexcept SystemExit:\n"
           "    pass")
    assert _loaded_after("import edgefleet.cli") == set()
    assert _loaded_after(run.format(["--help"])) == set()
    assert _loaded_after(run.format(["--version"])) == set()
    assert _loaded_after(run.format(["agent", "health", "--help"])) == {"agent.cli"}
    assert _loaded_after(run.format(["keys", "--help"])) == {"agent.cli_bundle"}
    assert _loaded_after(run.format(["fleet", "--help"])) == {"fleet.cli"}


def test_the_root_help_lists_each_group_with_its_own_help():
    from edgefleet.cli import GROUPS, app, load_group

    root = typer.main.get_command(app)
    ctx = root.context_class(root, info_name="edgefleet", terminal_width=200,
                             max_content_width=200)
    root.rich_markup_mode = None
    text = root.get_help(ctx)
    for name, (_, _, help_text) in GROUPS.items():
        assert load_group(name).help == help_text
        assert any(line.split()[:1] == [name] and help_text in " ".join(line.split())
                   for line in text.splitlines()), (name, text)
