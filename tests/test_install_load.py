"""Swap under load: 50 installs and rollbacks while a client sends 5,000 requests per second.

The agent (server, runtime, installer) runs in this process, exactly as `edgefleet agent serve`
wires it (`on_commit=runtime.swap`); the client is its own process (tests/load_client.py), so
it does not share the agent's GIL. Every answer must come from a model: no error, no fallback.
Every version installed serves requests: after each swap the test waits until the agent has
answered more requests than there are connections (so at least one was taken after the swap),
not for a time. No engine, and no ONNX Runtime session, outlives its use.

How fast the client went, the latency around swaps and the memory per swap depend on the
machine and its load: they are printed here and measured against baselines of the same run
in bench/install_bench.py, not asserted.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time
import weakref
from pathlib import Path

import numpy as np

from agent.config import AgentConfig
from agent.install import Installer
from agent.server import AgentServer
from tests.agent_support import running_agent, wait_for
from tests.conftest import REPO
from tests.install_helpers import make_keys, real_bundle

RATE = 5000
OPS = 50
N_FEATURES = 16
CONNECTIONS = 1  # the client's; each has one request in flight at most
WARM = 200  # requests answered before the first swap and after the last one


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _answered(server: AgentServer) -> int:
    """Requests the agent has answered so far (its request-latency histogram's counts)."""
    return sum(server.metrics.totals()[2])


def _wait_answers(server: AgentServer, n: int) -> None:
    """Until the agent answered `n` more requests. More than CONNECTIONS after a swap means at
    least one request was taken after it: each connection has one request in flight at most."""
    start = _answered(server)
    wait_for(lambda: _answered(server) >= start + n, timeout=60)


def test_swap_under_load_drops_no_request_and_leaks_no_session(tmp_path: Path):
    switch = sys.getswitchinterval()
    sys.setswitchinterval(AgentConfig().switch_interval_s)  # as agent.server.run does
    try:
        _swap_under_load(tmp_path)
    finally:
        sys.setswitchinterval(switch)


def _swap_under_load(tmp_path: Path) -> None:
    key, ring = make_keys(tmp_path)
    bundles = []
    for seq in range(1, OPS // 2 + 3):
        bundles.append(tmp_path / f"b{seq}.efb")
        real_bundle(bundles[-1], key, n=N_FEATURES, sequence=seq, seed=seq)
    with running_agent() as server:
        runtime = server.runtime
        engines: weakref.WeakSet = weakref.WeakSet()
        sessions: weakref.WeakSet = weakref.WeakSet()
        swaps: list[float] = []

        def swap(engine, manifest):
            engines.add(engine)
            sessions.add(engine.session)
            runtime.swap(engine, manifest)
            swaps.append(time.perf_counter())

        inst = Installer.open(tmp_path / "store", ring, on_commit=swap,
                              on_fallback=runtime.enter_fallback)
        inst.install(bundles[0])
        inst.install(bundles[1])
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        client = subprocess.Popen(
            [sys.executable, "-m", "tests.load_client", str(server.path), str(RATE),
             str(N_FEATURES), str(CONNECTIONS)], cwd=REPO, env=env, stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, text=True)
        try:
            assert client.stdout.readline().strip() == "ready"
            _wait_answers(server, WARM)  # under load before the first swap
            rss = []
            t0 = time.perf_counter()
            for i in range(OPS):
                if i % 2 == 0:
                    inst.install(bundles[2 + i // 2])
                else:
                    inst.rollback()
                _wait_answers(server, CONNECTIONS + 1)  # the new version served requests
                if i in (9, OPS - 1):
                    gc.collect()
                    rss.append(_rss_bytes())
            ops_s = time.perf_counter() - t0
            _wait_answers(server, WARM)  # and after the last one
            out, _ = client.communicate("", timeout=60)
        finally:
            client.kill()
            inst.close()
        summary = json.loads(out)
    assert summary["errors"] == 0, summary["first_errors"]
    assert summary["fallback"] == 0
    assert len(swaps) == OPS + 2
    # the version active when the load began, then each of the OPS / 2 installed ones
    assert len(set(summary["versions"])) == OPS // 2 + 1, sorted(set(summary["versions"]))
    in_window = sum(swaps[2] <= t <= swaps[-1] for t in summary["t"])
    between, _ = np.histogram(summary["t"], bins=swaps[2:])
    assert between.min() >= 1, "a swap followed another with no request in between"
    print(f"\n{summary['requests']} requests at {summary['rate']:.0f}/s, {in_window} during "
          f"{OPS} swaps in {ops_s:.2f} s; p50 {summary['p50_us']:.0f} us, "
          f"p99 {summary['p99_us']:.0f} us; RSS {rss[0] / 2**20:.1f} -> {rss[1] / 2**20:.1f} MiB")
    gc.collect()
    assert len(engines) <= 2, f"{len(engines)} engines still alive after {OPS + 2} swaps"
    assert len(sessions) <= 2, f"{len(sessions)} ONNX Runtime sessions still alive"
