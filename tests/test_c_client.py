"""The C client example (examples/c/ef_client.c), built with the system's cc and run against a
real agent: binary frames and JSON lines on one connection, and a model swap to another width
in the middle of its run, which it follows by reading info again."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.agent_support import build_model, make_keys, running_agent

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO / "examples" / "c" / "ef_client.c"
N = 16


@pytest.fixture(scope="module")
def ef_client(tmp_path_factory) -> Path:
    cc = shutil.which("cc") or shutil.which("gcc")
    assert cc, "no C compiler: run `bash scripts/system-deps.sh gcc` (make test does)"
    out = tmp_path_factory.mktemp("c") / "ef_client"
    subprocess.run([cc, "-std=c11", "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(out),
                    str(SOURCE), "-lm"], check=True, capture_output=True, text=True)
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    keys = make_keys(d)
    return (build_model(d / "v1", *keys, n_features=N),
            build_model(d / "v2", *keys, n_features=N + 4, version="2.0.0", sequence=2))


def test_the_c_client_screens_dies_and_follows_a_model_swap(ef_client, models):
    v1, v2 = models
    with running_agent(v1) as agent:
        proc = subprocess.Popen([str(ef_client), str(agent.path), "40", "2"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        lines = []
        for line in proc.stdout:
            lines.append(line.strip())
            if len(lines) == 20:  # mid-run: a rollout lands a model with another width
                agent.runtime.swap(v2.engine(), v2.manifest)
        assert proc.wait(timeout=60) == 0, (proc.stderr.read(), lines[-5:])
    assert lines[0] == f"info n_features={N}" and lines[-1] == "done failures=0"
    assert f"info n_features={N + 4}" in lines
    answers = [ln for ln in lines if ln.startswith(("binary seq", "json seq"))]
    assert any(a.startswith("binary seq=1 version=1.0.0") for a in answers)
    assert any(a.startswith("binary seq=2 version=2.0.0") for a in answers)
    assert any(a.startswith("json seq=1 ") for a in answers)
    assert any(a.startswith("json seq=2 ") for a in answers)
    assert all("decision=pass" in a or "decision=fail" in a for a in answers)
    # after the swap, at most the one request in flight used the old width
    assert sum(1 for ln in lines if "error" in ln) <= 1
