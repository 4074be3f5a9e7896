"""How long the serving thread waits for the GIL under many test heads, log off and on.

    .venv/bin/python bench/gil_waits.py [--rounds 3] [--seconds 3] [--clients 8]
        [--compare-tree ../main] [--out FILE]

Why: a thread of the agent that holds the GIL when a request arrives delays that answer until
it lets go. Latency tails on a shared 2-core box are mostly other processes' doing; the time
the serving thread spends blocked on the GIL's futex is the agent's own, and the kernel counts
it whatever the load. (The prediction log's writer, when it was a thread of the agent, held
the GIL ~0.5 ms every 0.2 s pass: issue 15's 8-client p99.9.)

Agents (`edgefleet agent serve`, the 512-feature bench autoencoder): `off` (log off), `on`
(this checkout, log on at its defaults) and, with --compare-tree, `ref_on` (another checkout,
e.g. the main branch, log on). Each round, for each agent in turn: --clients connections from
one epoll process (bench/agent_bench.py's), binary single rows, unpinned, for --seconds, while
`strace -T -e trace=futex` follows the agent's serving thread (its busiest); the figure is the
total time in FUTEX_WAIT calls and how many lasted over 0.2 ms, per round, beside the clients'
p99.9 (strace slows every futex call a little, alike for all). Needs strace; ~1 min.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from agent_bench import epoll_clients, free_port, pct  # noqa: E402
from predlog_bench import _messages, _start, _thread_cpu_ns  # noqa: E402

_WAIT = re.compile(r"FUTEX_WAIT\S*.*<([0-9.]+)>")


def _serving_thread(pid: int, sock: str, frames: list[bytes], clients: int) -> int:
    """The thread that gains the most CPU while clients are served."""
    before = _thread_cpu_ns(pid)
    epoll_clients(sock, frames, clients, 0.3)
    after = _thread_cpu_ns(pid)
    return max(after, key=lambda t: after[t] - before.get(t, 0))


def _traced(pid: int, sock: str, frames: list[bytes], clients: int, seconds: float,
            out: Path) -> dict:
    tid = _serving_thread(pid, sock, frames, clients)
    st = subprocess.Popen(["strace", "-T", "-e", "trace=futex", "-o", str(out), "-p",
                           str(tid)], stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)  # attached
        lat, rate = epoll_clients(sock, frames, clients, seconds)
    finally:
        st.terminate()
        st.wait()
    waits = [float(x) for x in _WAIT.findall(out.read_text())]
    return {"futex_wait_ms": sum(waits) * 1e3, "waits_over_0_2ms": sum(w > 2e-4 for w in waits),
            "answers_per_s": rate, "p999_us": pct(lat)["p999_us"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--compare-tree", type=Path, default=None,
                    help="another checkout (e.g. the main branch): its agent, log on, too")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "gil_waits.json")
    args = ap.parse_args()
    if shutil.which("strace") is None:
        print("strace is not installed", file=sys.stderr)
        return 2
    import ae_model

    tmp = Path(tempfile.mkdtemp(prefix="ef-gil-", dir="/tmp"))
    procs: list[subprocess.Popen] = []
    try:
        m = ae_model.build(tmp / "model")
        frames = _messages(m.normal[:512].copy())["binary"]
        runs = [("off", "off", REPO), ("on", "on", REPO)]
        if args.compare_tree is not None:
            runs.append(("ref_on", "on", args.compare_tree))
        agents = {}
        for name, mode, tree in runs:
            d = tmp / name
            d.mkdir()
            store = shutil.copytree(m.store, d / "store", symlinks=True)
            env = dict(os.environ, PYTHONPATH=str(tree), EDGEFLEET_AGENT_PREDLOG=mode,
                       EDGEFLEET_AGENT_PREDLOG_DIR=str(d / "predlog"))
            proc = _start(store, m.keyring, d / "agent.sock", free_port(), env,
                          d / "agent.log", tree)
            procs.append(proc)
            agents[name] = (str(d / "agent.sock"), proc.pid)
        load_start = os.getloadavg()
        res: dict = {n: [] for n in agents}
        for r in range(args.rounds):
            names = list(agents)
            for n in names[r % len(names):] + names[:r % len(names)]:
                sock, pid = agents[n]
                res[n].append(_traced(pid, sock, frames, args.clients, args.seconds,
                                      tmp / f"strace-{n}-{r}.txt"))
        out = {"clients": args.clients, "seconds": args.seconds, "rounds": res,
               "loadavg_start": load_start, "loadavg_end": os.getloadavg(),
               "compare_tree": None if args.compare_tree is None else str(args.compare_tree)}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2) + "\n")
        print(f"{args.clients} clients, {args.seconds:g} s a run, load average "
              f"{load_start[0]:.2f} -> {out['loadavg_end'][0]:.2f}; per round:")
        for n, rounds in res.items():
            print(f"  {n:7s} GIL (futex) wait ms " + " ".join(
                f"{x['futex_wait_ms']:6.1f}" for x in rounds) + " | waits > 0.2 ms " + " ".join(
                f"{x['waits_over_0_2ms']:3d}" for x in rounds) + " | p99.9 us " + " ".join(
                f"{x['p999_us']:,.0f}" for x in rounds))
        print(f"written to {args.out}")
        return 0
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
