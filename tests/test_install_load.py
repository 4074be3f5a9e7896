"""Swap under load: 50 installs and rollbacks while a client sends 5,000 requests per second.

The agent (server, runtime, installer) runs in this process, exactly as `edgefleet agent serve`
wires it (`on_commit=runtime.swap`); the client is its own process (tests/load_client.py), so
it does not share the agent's GIL. Every answer must come from a model: no error, no fallback.
Memory must not grow with each swap: no engine (ONNX Runtime session) outlives its use.
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

from agent.config import AgentConfig
from agent.install import Installer
from tests.agent_support import running_agent
from tests.conftest import REPO
from tests.install_helpers import make_keys, real_bundle

RATE = 5000
OPS = 50


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


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
        real_bundle(bundles[-1], key, sequence=seq, seed=seq)
    with running_agent() as server:
        runtime = server.runtime
        engines: weakref.WeakSet = weakref.WeakSet()
        swaps: list[float] = []

        def swap(engine, manifest):
            engines.add(engine)
            runtime.swap(engine, manifest)
            swaps.append(time.perf_counter())

        inst = Installer.open(tmp_path / "store", ring, on_commit=swap,
                              on_fallback=runtime.enter_fallback)
        inst.install(bundles[0])
        inst.install(bundles[1])
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        client = subprocess.Popen(
            [sys.executable, "-m", "tests.load_client", str(server.path), str(RATE), "16"],
            cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert client.stdout.readline().strip() == "ready"
            time.sleep(0.2)  # load before the first swap
            rss = []
            t0 = time.perf_counter()
            for i in range(OPS):
                if i % 2 == 0:
                    inst.install(bundles[2 + i // 2])
                else:
                    inst.rollback()
                if i in (9, OPS - 1):
                    gc.collect()
                    rss.append(_rss_bytes())
            ops_s = time.perf_counter() - t0
            time.sleep(0.2)  # and after the last one
            out, _ = client.communicate("", timeout=60)
        finally:
            client.kill()
            inst.close()
        summary = json.loads(out)
    assert summary["errors"] == 0, summary["first_errors"]
    assert summary["fallback"] == 0
    assert len(swaps) == OPS + 2 and len(summary["versions"]) > OPS // 2
    in_window = sum(swaps[2] <= t <= swaps[-1] for t in summary["t"])
    print(f"\n{summary['requests']} requests at {summary['rate']:.0f}/s, {in_window} during "
          f"{OPS} swaps in {ops_s:.2f} s; p50 {summary['p50_us']:.0f} us, "
          f"p99 {summary['p99_us']:.0f} us; RSS {rss[0] / 2**20:.1f} -> {rss[1] / 2**20:.1f} MiB")
    assert summary["rate"] > 0.8 * RATE, "the client could not keep up its rate"
    gc.collect()
    assert len(engines) <= 2, f"{len(engines)} engines still alive after {OPS + 2} swaps"
    assert rss[1] - rss[0] < 16 * 2**20, "memory grew with the swaps"
