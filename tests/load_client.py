"""A paced load client in its own process (its own GIL), for swap-under-load tests and the
install benchmark:

    python -m tests.load_client SOCKET RATE N_FEATURES [CONNECTIONS]

Prints `ready` once the first answer came back, then sends RATE single-die binary requests per
second in total (open loop: a late request is sent at once, never skipped) over CONNECTIONS
connections until its stdin closes, and prints one JSON summary line: counts of requests,
errors and fallback answers, the model versions seen, latency percentiles, the achieved rate,
and each request's send time (`time.perf_counter()`, which is CLOCK_MONOTONIC and so comparable
with the parent's) and latency in microseconds, for "latency around a swap" figures.
"""

from __future__ import annotations

import json
import sys
import threading
import time

import numpy as np

from agent.client import AgentError, AgentUnreachable, Client


def _worker(path: str, rate: float, n: int, stop: threading.Event, out: dict) -> None:
    x = np.random.default_rng().normal(size=n).astype(np.float32)
    times, lat = out["t"], out["lat"]
    with Client(path) as c:
        interval = 1.0 / rate
        nxt = time.perf_counter()
        while not stop.is_set():
            now = time.perf_counter()
            if now < nxt:
                time.sleep(max(0.0, nxt - now - 50e-6))
                while time.perf_counter() < nxt:
                    pass
            nxt += interval
            t0 = time.perf_counter()
            try:
                r = c.predict(x, die_id=len(times))
            except (AgentError, AgentUnreachable) as e:
                out["errors"].append(str(e))
                if isinstance(e, AgentUnreachable):
                    return
                continue
            finally:
                t1 = time.perf_counter()
                times.append(t0)
                lat.append(t1 - t0)
            if r.source != "model":
                out["fallback"] += 1
            out["versions"].add(r.model_version)


def main(argv: list[str]) -> int:
    path, rate, n = argv[0], float(argv[1]), int(argv[2])
    conns = int(argv[3]) if len(argv) > 3 else 1
    with Client(path) as c:
        c.predict(np.zeros(n, dtype=np.float32))
    print("ready", flush=True)
    stop = threading.Event()
    outs = [{"t": [], "lat": [], "errors": [], "fallback": 0, "versions": set()}
            for _ in range(conns)]
    threads = [threading.Thread(target=_worker, args=(path, rate / conns, n, stop, o))
               for o in outs]
    start = time.perf_counter()
    for t in threads:
        t.start()
    sys.stdin.read()  # until the parent closes our stdin
    stop.set()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    t_all = np.concatenate([np.array(o["t"]) for o in outs])
    lat = np.concatenate([np.array(o["lat"]) for o in outs])
    summary = {
        "requests": len(lat),
        "errors": sum(len(o["errors"]) for o in outs),
        "first_errors": [e for o in outs for e in o["errors"]][:5],
        "fallback": sum(o["fallback"] for o in outs),
        "versions": sorted(v for o in outs for v in o["versions"] if v),
        "rate": len(lat) / elapsed,
        "p50_us": float(np.percentile(lat, 50) * 1e6) if len(lat) else None,
        "p99_us": float(np.percentile(lat, 99) * 1e6) if len(lat) else None,
        "max_us": float(lat.max() * 1e6) if len(lat) else None,
        "t": t_all.round(7).tolist(),  # time.perf_counter(): CLOCK_MONOTONIC, shared by processes
        "lat": (lat * 1e6).round(1).tolist(),
    }
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
