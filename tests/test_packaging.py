"""The install and the CLI contract: light device install, one CLI, exit codes, help texts."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Run code in a fresh interpreter where importing torch (or the other optimizer-only
# libraries) fails loudly, as it would on a device that does not have them installed.
_BLOCK_HEAVY = """
import importlib.abc, sys
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {'torch', 'onnx', 'sklearn', 'skl2onnx', 'matplotlib'}:
            raise ImportError(f'{name} must not be imported by the device install')
sys.meta_path.insert(0, _Block())
"""


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", _BLOCK_HEAVY + code], capture_output=True, text=True, cwd=REPO
    )


def test_base_dependencies_do_not_include_torch():
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    base = " ".join(meta["dependencies"]).lower()
    for heavy in ("torch", "onnx>", "onnx=", "scikit", "skl2onnx"):
        assert heavy not in base
    assert any(d.startswith("paho-mqtt>=2") for d in meta["dependencies"])
    assert "torch==2.13.0" in meta["optional-dependencies"]["optimize"]


def test_agent_and_fleet_import_without_torch():
    r = _run(
        "import pkgutil, importlib, agent, fleet\n"
        "for pkg in (agent, fleet):\n"
        "    for m in pkgutil.iter_modules(pkg.__path__, pkg.__name__ + '.'):\n"
        "        importlib.import_module(m.name)\n"
        "assert 'torch' not in sys.modules\n"
        "print('ok')\n"
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"


def test_the_blocker_really_blocks():
    r = _run("import torch")
    assert r.returncode != 0 and "must not be imported" in r.stderr


@pytest.mark.parametrize("group", ["keys", "bundle", "optimize", "agent", "fleet"])
def test_every_group_has_help_without_heavy_imports(group: str):
    r = _run(f"from edgefleet.cli import main\nmain(['{group}', '--help'])")
    assert r.returncode == 0, r.stderr
    assert f"Usage: edgefleet {group}" in r.stdout


def test_exit_codes_and_one_line_errors(tmp_path: Path):
    cli = [sys.executable, "-m", "edgefleet"]
    ok = subprocess.run([*cli, "--help"], capture_output=True, text=True)
    assert ok.returncode == 0
    usage = subprocess.run([*cli, "keys", "generate"], capture_output=True, text=True)
    assert usage.returncode == 2 and "--out" in usage.stderr
    missing = tmp_path / "nope.efb"
    ring = tmp_path / "ring"
    ring.mkdir()
    failed = subprocess.run(
        [*cli, "bundle", "verify", str(missing), "--keyring", str(ring)],
        capture_output=True, text=True,
    )
    assert failed.returncode == 1
    lines = failed.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgefleet: error: cannot read bundle")
    assert "Traceback" not in failed.stderr


def test_sign_verify_inspect_round_trip_through_the_cli(tmp_path: Path):
    import json

    from tests.conftest import manifest_fields

    cli = [sys.executable, "-m", "edgefleet"]
    run = lambda *a: subprocess.run([*cli, *map(str, a)], capture_output=True, text=True)  # noqa: E731
    assert run("keys", "generate", "--out", tmp_path / "k", "--name", "release").returncode == 0
    assert run("keys", "trust", tmp_path / "k" / "release.pub", "--keyring", tmp_path / "ring",
               "--role", "release").returncode == 0
    src = tmp_path / "src"
    src.mkdir()
    (src / "manifest.json").write_text(json.dumps(manifest_fields()))
    (src / "model.onnx").write_bytes(b"model")
    signed = run("bundle", "sign", src, "--key", tmp_path / "k" / "release.key",
                 "--out", tmp_path / "m.efb")
    assert signed.returncode == 0, signed.stderr
    verified = run("bundle", "verify", tmp_path / "m.efb", "--keyring", tmp_path / "ring")
    assert verified.returncode == 0 and verified.stdout.startswith("OK ")
    inspected = run("bundle", "inspect", tmp_path / "m.efb", "-o", "json")
    assert json.loads(inspected.stdout)["verified"] is False
    downgrade = run("bundle", "verify", tmp_path / "m.efb", "--keyring", tmp_path / "ring",
                    "--min-sequence", "5")
    assert downgrade.returncode == 1 and "below the minimum allowed 5" in downgrade.stderr
