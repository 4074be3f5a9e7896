"""The prediction log's tap, timed where it runs: in the serving loop of a real agent.

    .venv/bin/python bench/tap_clock.py [TREE ...] [--rounds 8] [--requests 3000]
        [--pin-cpu 0] [--out FILE]

Why: the tap (agent/predlog_tap.py `Tap.record`) costs ~1 us in a tight loop, where its code,
its objects and the buffer's tail stay in cache, and 2 to 4 us in the serving loop, where they
do not; the serving thread's CPU per answer (bench/predlog_bench.py) carries it, but beside a
noise of a few percent between two identical agents on a shared box. This times each call in
place: one agent per checkout (TREE, default this one; e.g. this one and the main branch's),
log on, its tap wrapped in two `perf_counter_ns` calls; interleaved rounds of single-row binary
frames then JSON lines (the 512-feature bench model, 3% fails, `--requests` after 200 warm-up
ones per turn), the order rotating, agents and client pinned to one CPU as predlog_bench.py
does. Per tree and encoding: mean, median, p90 and p99 ns per call, the wrapper's own cost
included (~0.5 to 0.6 us cold: time an empty tap to see it).

The first 200 calls per encoding and agent (the first turn's warm-up) are left out. Printed
and written to JSON (--out).
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
_WARMUP = 200


def _serve_timed(out: str, argv: list[str]) -> None:
    """(In the agent's process.) `edgefleet agent serve ARGV` with the log's tap timed;
    the times (ns per call, per encoding) are written to `out` on SIGUSR1."""
    import agent.predlog_proc as proc

    times: dict[str, list[int]] = {"binary": [], "json": [], "json_batch": []}
    init = proc.WriterProcess.__init__
    kinds = {0x7B: times["json"], 0x5B: times["json_batch"]}

    def timed_init(self, *a, **k) -> None:
        init(self, *a, **k)
        record, clock = self.tapper.record, time.perf_counter_ns

        def tap(buf, start, end, answer) -> None:
            t0 = clock()
            record(buf, start, end, answer)
            kinds.get(answer[0], times["binary"]).append(clock() - t0)

        self.tap = tap

    proc.WriterProcess.__init__ = timed_init

    def dump(*_) -> None:
        Path(out).write_text(json.dumps(times))
        os._exit(0)

    signal.signal(signal.SIGUSR1, dump)

    def execv(_exe, args) -> None:  # `agent serve` execs agent.daemon: run it here instead
        sys.argv = ["agent.daemon", *args[3:]]
        runpy.run_module("agent.daemon", run_name="__main__")
        sys.exit(0)

    os.execv = execv
    sys.argv = ["edgefleet", *argv]
    runpy.run_module("edgefleet", run_name="__main__")


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--serve-timed":  # an agent this bench started
        _serve_timed(sys.argv[2], sys.argv[3:])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("trees", nargs="*", type=Path, default=[REPO],
                    help="checkouts whose agents to time (default: this one)")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--pin-cpu", type=int, default=0, help="CPU for agents and client; -1: none")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "tap_clock.json")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO / "bench"))
    import ae_model
    from agent_bench import binary_loop, free_port, json_loop
    from predlog_bench import _messages, _start, pin_tree

    tmp = Path(tempfile.mkdtemp(prefix="ef-tapclock-", dir="/tmp"))
    agents: dict[str, tuple[subprocess.Popen, str, Path]] = {}
    try:
        m = ae_model.build(tmp / "model")
        dies = m.normal[:512].copy()
        rng = np.random.default_rng(5)  # as predlog_bench.py: 3% fails, every one captured
        bad = rng.random(len(dies)) < 0.03
        dies[bad] += rng.normal(scale=0.3, size=(int(bad.sum()), dies.shape[1])).astype(
            np.float32)
        messages = _messages(dies)
        for i, tree in enumerate(args.trees):
            d = tmp / f"agent{i}"
            d.mkdir()
            store = shutil.copytree(m.store, d / "store", symlinks=True)
            env = dict(os.environ, PYTHONPATH=str(tree.resolve()), PYTHONUNBUFFERED="1",
                       EDGEFLEET_AGENT_PREDLOG="on", EDGEFLEET_AGENT_PREDLOG_DIR=str(d / "log"))
            proc = _start(store, m.keyring, d / "agent.sock", free_port(), env,
                          d / "agent.log", tree.resolve(),
                          (str(Path(__file__).resolve()), "--serve-timed", str(d / "tap.json")))
            agents[f"{i}:{tree}"] = (proc, str(d / "agent.sock"), d)
        if args.pin_cpu >= 0:
            for proc, _, _ in agents.values():
                pin_tree(proc.pid, {args.pin_cpu})
            os.sched_setaffinity(0, {args.pin_cpu})
        load_start = os.getloadavg()
        names = list(agents)
        for r in range(args.rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            for enc, loop in (("binary", binary_loop), ("json", json_loop)):
                for n in order:
                    loop(agents[n][1], messages[enc], args.requests, _WARMUP)
                time.sleep(0.3)  # the writer's pass
        res: dict = {"rounds": args.rounds, "requests": args.requests,
                     "loadavg_start": load_start, "loadavg_end": os.getloadavg(), "taps": {}}
        for n, (proc, _, d) in agents.items():
            proc.send_signal(signal.SIGUSR1)
            proc.wait(30)
            times = json.loads((d / "tap.json").read_text())
            res["taps"][n] = {}
            for enc in ("binary", "json"):
                a = np.asarray(times[enc][_WARMUP:], float)  # the first turn's warm-up
                res["taps"][n][enc] = {"calls": len(a), "mean_ns": float(a.mean()),
                                       "median_ns": float(np.median(a)),
                                       "p90_ns": float(np.percentile(a, 90)),
                                       "p99_ns": float(np.percentile(a, 99))}
    finally:
        for proc, _, _ in agents.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"load average start {res['loadavg_start'][0]:.2f} end {res['loadavg_end'][0]:.2f}; "
          f"{args.rounds} interleaved rounds x {args.requests} requests per encoding and agent")
    for n, v in res["taps"].items():
        for enc, f in v.items():
            print(f"{n:30s} {enc:6s} tap ns per call: mean {f['mean_ns']:,.0f} median "
                  f"{f['median_ns']:,.0f} p90 {f['p90_ns']:,.0f} p99 {f['p99_ns']:,.0f} "
                  f"({f['calls']:,} calls)")
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
