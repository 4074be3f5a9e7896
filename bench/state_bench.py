"""State-store benchmark: the rollout database's write pattern on SQLite and on PostgreSQL
(a throwaway local cluster, tests/postgres_support.py, on a unix socket), measured in one run.

    .venv/bin/python bench/state_bench.py [--devices 1000,10000] [--batch 50]
                                          [--backends sqlite,postgresql]
                                          [--out bench/results/state.json]

Per backend and fleet size N:
  create      one rollout with N targets and N pending steps (one transaction)
  steps       what drivers write: every step through sending, sent and done, `--batch` rows per
              transaction, each transaction fenced (owner and epoch checked, row locked) as the
              driver's are: transactions and rows per second
  heartbeat   a lease renewal (`beat`), median milliseconds
  snapshot    `rollout status`'s read of the whole rollout, milliseconds

The PostgreSQL cluster runs with fsync off (as in the tests), SQLite with its production
settings (WAL, synchronous=FULL): compare the shapes, not the absolute durability cost. The
machine's load average is printed next to the figures.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fleet.inventory import Device, Inventory  # noqa: E402
from fleet.rollout import Bundle, NewRollout, Plan, create, snapshot  # noqa: E402
from fleet.state import StateDB  # noqa: E402
from tests.postgres_support import throwaway_cluster  # noqa: E402

OWNER = "bench:1:a"


def run_one(target: str, n: int, batch: int) -> dict[str, float]:
    db = StateDB(target)
    inv = Inventory(Device.from_state({"device_id": f"box-{i:05d}", "online": True,
                                       "health": {"status": "ok"}}) for i in range(n))
    t = time.perf_counter()
    rid = create(db, Plan(canary="1%", waves=(10, 50, 100), shadow=False),
                 NewRollout(Bundle("ab" * 32, 10, "http://x", 2, "m", "2"), inv, "bench"))
    out = {"create_s": time.perf_counter() - t}
    assert db.acquire(rid, OWNER) is None
    epoch = db.rollout(rid).epoch
    steps = db.steps(rid)
    t, txs = time.perf_counter(), 0
    for status in ("sending", "sent", "done"):
        for i in range(0, len(steps), batch):
            chunk = steps[i:i + batch]
            for s in chunk:
                s.status = status
            with db.tx() as c:
                db.fence(c, rid, OWNER, epoch)
                db.save_steps(chunk, c)
            txs += 1
    wall = time.perf_counter() - t
    out |= {"tx_per_s": txs / wall, "rows_per_s": 3 * len(steps) / wall}
    beats = []
    for _ in range(50):
        t = time.perf_counter()
        db.beat(OWNER)
        beats.append(time.perf_counter() - t)
    out["heartbeat_ms"] = statistics.median(beats) * 1000
    t = time.perf_counter()
    snapshot(db, rid)
    out["snapshot_ms"] = (time.perf_counter() - t) * 1000
    db.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", default="1000,10000", help="fleet sizes, comma-separated")
    ap.add_argument("--batch", type=int, default=50, help="step rows per transaction")
    ap.add_argument("--backends", default="sqlite,postgresql")
    ap.add_argument("--out", type=Path, default=None, help="write the figures as JSON")
    args = ap.parse_args()
    sizes = [int(x) for x in args.devices.split(",")]
    backends = args.backends.split(",")
    results: list[dict] = []
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        pg = stack.enter_context(throwaway_cluster()) if "postgresql" in backends else None
        for n in sizes:
            for backend in backends:
                target = str(tmp / f"r{n}.db") if backend == "sqlite" \
                    else pg.new_store()  # type: ignore[union-attr]
                fig = run_one(target, n, args.batch)
                results.append({"backend": backend, "devices": n, **fig})
                print(f"{backend:10s} {n:6d} devices: create {fig['create_s']:.2f} s, "
                      f"{fig['tx_per_s']:.0f} tx/s, {fig['rows_per_s']:.0f} step rows/s, "
                      f"heartbeat {fig['heartbeat_ms']:.2f} ms, snapshot "
                      f"{fig['snapshot_ms']:.0f} ms", flush=True)
    load = os.getloadavg()
    print(f"load average: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"batch": args.batch, "load": load,
                                        "results": results}, indent=2))


if __name__ == "__main__":
    main()
