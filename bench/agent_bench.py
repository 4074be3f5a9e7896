"""Agent benchmark: every figure of the serving targets, measured in one run, with its baseline.

    .venv/bin/python bench/agent_bench.py [--requests 20000] [--out bench/results/agent.json]

Measured, on the same 512-feature autoencoder (bench/ae_model.py, or --bundle FILE, e.g. an
optimizer's build/model.efb, with --keyring), with a Python client in this process and the
servers in their own processes:

  floor   ONNX Runtime in-process, one row, called the way the agent calls it
          (agent.engine `Engine.predict_one`: the row copied into an IO binding's preallocated
          input, the outputs read in place, the agent's session options), so the ratios do not
          shrink because the floor calls ONNX Runtime a slower way; `InferenceSession.run` (a
          few microseconds more a row) is reported beside it, not used
  floor   Unix-socket round trip with no work (bench/echo_server.py), the binary request's size
          in and out (plain echo), and request size in / answer size out
  agent   binary frame, one row; JSON line, one row, params as the shortest float32 text and
          as 17-digit text (how many C and Python programs print a float); binary batches of
          --batch rows on one connection (throughput), and JSON batches of 64 (not a target);
          1, --clients (8) and 32 connections driven by one epoll process (binary, one row
          each, one request in flight per connection: cheap clients, so the agent keeps its
          CPUs; with --baseline-tree, the same against another checkout's agent, before and
          after this one's): answers/s, the --clients/1 and 32/1 ratios, and tails (the
          agent answers single rows that arrive together from several connections in one
          model run; docs/protocol.md, "Serving many test heads"); --baseline-tree's agent
          also gets the pinned single-row binary and JSON figures, right after this one's
  client  agent.client.Client.predict, one row, beside the raw binary round trip; and
          `edgefleet agent predict --file` on a CSV of --file-dies dies beside Client.predict_batch
          on the same rows (batches of 256)
  agent   resident memory after all of the above (> 100k predictions), at rest: read once the
          agent has been idle long enough for its trimmer to give freed buffers back (the RSS
          unchanged over 2 s, at most 15 s after the last request; the value 1.5 s after it is
          kept too); and the PSS of the agent and its prediction-log writer process together
          (the device's memory; shared library pages counted once); process start to /readyz
  base    the reference design: FastAPI + uvicorn on a Unix socket, same model, JSON
  info    the least a Python server does per single-row request (bench/echo_server.py with a
          model: read the frame, `Engine.predict_one`, send a fixed-size answer; no checks,
          metrics or log), pinned like the others: how much of the gap to the floor is Python
          itself

The single-row figures (floors, agent, FastAPI) are measured with the client and every server
pinned to one CPU (--pin-cpu): in this VM a wake-up across CPUs costs 15-40 us and comes and
goes from run to run, which would swamp a 10 us transport floor. The same figures unpinned are
reported beside them. Throughput and the concurrent clients run unpinned on all CPUs.

Every figure is printed with its target and ratio, and written to the JSON report.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from agent.protocol import HEADER_SIZE, encode_predict, json_values  # noqa: E402

PY = sys.executable
_HDR_LEN = struct.Struct("<I")


# ---------------------------------------------------------------------------- client loops


def _recv_frame(sock: socket.socket, buf: bytearray) -> int:
    view = memoryview(buf)
    got, need = 0, HEADER_SIZE
    while got < need:
        n = sock.recv_into(view[got:])
        if not n:
            raise ConnectionError("closed")
        got += n
        if need == HEADER_SIZE and got >= HEADER_SIZE:
            need = HEADER_SIZE + _HDR_LEN.unpack_from(buf, 20)[0]
    return got


def _recv_exact(sock: socket.socket, buf: bytearray, size: int) -> None:
    view, got = memoryview(buf), 0
    while got < size:
        n = sock.recv_into(view[got:size])
        if not n:
            raise ConnectionError("closed")
        got += n


def _recv_line(sock: socket.socket, buf: bytearray) -> int:
    view, got = memoryview(buf), 0
    while True:
        n = sock.recv_into(view[got:])
        if not n:
            raise ConnectionError("closed")
        got += n
        if buf[got - 1] == 10:
            return got


def _round_trips(path: str, messages: list[bytes], n: int, receive, warmup: int) -> np.ndarray:
    """Latencies (ns) of n request/answer round trips on one connection, messages cycling;
    `receive(sock, buf)` reads one whole answer."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    buf = bytearray(1 << 22)
    out = np.empty(n, dtype=np.int64)
    perf, m = time.perf_counter_ns, len(messages)
    for i in range(warmup + n):
        message = messages[i % m]
        t0 = perf()
        s.sendall(message)
        receive(s, buf)
        if i >= warmup:
            out[i - warmup] = perf() - t0
    s.close()
    return out


def binary_loop(path: str, frames: list[bytes], n: int, warmup: int = 500) -> np.ndarray:
    return _round_trips(path, frames, n, _recv_frame, warmup)


def json_loop(path: str, lines: list[bytes], n: int, warmup: int = 500) -> np.ndarray:
    return _round_trips(path, lines, n, _recv_line, warmup)


def echo_loop(path: str, message: bytes, answer: int, n: int, warmup: int = 500) -> np.ndarray:
    return _round_trips(path, [message], n, functools.partial(_recv_exact, size=answer), warmup)


def http_loop(path: str, bodies: list[bytes], n: int, warmup: int = 200) -> np.ndarray:
    """A minimal keep-alive HTTP/1.1 client (no client library overhead in the figure)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    reqs = [b"POST /predict HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(b), b) for b in bodies]
    out = np.empty(n, dtype=np.int64)
    perf, m = time.perf_counter_ns, len(reqs)
    for i in range(warmup + n):
        t0 = perf()
        s.sendall(reqs[i % m])
        data = b""
        while b"\r\n\r\n" not in data:
            data += s.recv(65536)
        head, _, body = data.partition(b"\r\n\r\n")
        length = int(next(h.split(b":")[1] for h in head.split(b"\r\n")
                          if h.lower().startswith(b"content-length")))
        while len(body) < length:
            body += s.recv(65536)
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(head.decode())
        if i >= warmup:
            out[i - warmup] = perf() - t0
    s.close()
    return out


def client_loop(path: str, rows: np.ndarray, n: int, warmup: int = 500) -> np.ndarray:
    """Latencies (ns) of agent.client.Client.predict, one row each."""
    from agent.client import Client

    out = np.empty(n, dtype=np.int64)
    perf = time.perf_counter_ns
    with Client(path) as c:
        for i in range(warmup + n):
            t0 = perf()
            c.predict(rows[i % len(rows)], die_id=i)
            if i >= warmup:
                out[i - warmup] = perf() - t0
    return out


def file_screening(path: str, tmp: Path, dies: np.ndarray, runs: int = 1,
                   baseline_tree: Path | None = None, light_cli: bool = False) -> dict:
    """`edgefleet agent predict --file --quiet` on a CSV of `dies` (shortest float32 text, empty
    cells for missing values), whole process, beside Client.predict_batch on the same rows
    (batches of 256); with `baseline_tree`, that checkout's CLI on the same file and agent too;
    with `light_cli`, this CLI with the base install's reader (EDGEFLEET_CSV_READER=orjson).
    Medians of `runs` rounds, each round running all of them in turn. `*_inprocess` is the
    CLI's own end-to-end rate (its summary line: from connecting to the last answer, without
    the interpreter's start and imports); `*_cpu_s` the CLI process's CPU time (user + system,
    all threads), which a busy machine changes less than the rates.

    `cli_startup_s` is this CLI on a one-die CSV (interpreter, imports, argument parsing,
    connect, info, one frame: what any file costs), and `ratio_bound` the ratio the CLI would
    reach if reading and parsing the CSV cost nothing and the agent's scoring were all that
    remained (the Client's time for the same dies): client_s / (cli_startup_s + client_s)."""
    import re
    import resource

    from agent.client import Client

    csv_path = tmp / "dies.csv"
    with open(csv_path, "w") as f:
        f.write("die_id," + ",".join(f"p{i}" for i in range(dies.shape[1])) + "\n")
        for i, row in enumerate(dies):
            cells = ("" if v is None else repr(v) for v in json_values(row))
            f.write(f"D{i}," + ",".join(cells) + "\n")
    one_path = tmp / "one_die.csv"
    with open(csv_path) as f:
        one_path.write_text(f.readline() + f.readline())
    trees = {"cli": (REPO, {})}
    if light_cli:
        trees["light_cli"] = (REPO, {"EDGEFLEET_CSV_READER": "orjson"})
    if baseline_tree:
        trees["baseline_cli"] = (baseline_tree, {})
    rates: dict[str, list[float]] = {"client": [], **{k: [] for k in trees},
                                     **{f"{k}_inprocess": [] for k in trees}}
    cpu: dict[str, list[float]] = {"client": [], **{k: [] for k in trees}}
    startup: list[float] = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run([PY, "-m", "edgefleet", "agent", "predict", "--socket", path, "--file",
                        str(one_path), "--quiet"], cwd=REPO, check=True, capture_output=True,
                       env=dict(os.environ, PYTHONPATH=str(REPO)))
        startup.append(time.perf_counter() - t0)
        with Client(path) as c:
            t0, c0 = time.perf_counter(), time.process_time()
            for i in range(0, len(dies), 256):
                c.predict_batch(dies[i:i + 256])
            rates["client"].append(len(dies) / (time.perf_counter() - t0))
            cpu["client"].append(time.process_time() - c0)
        for key, (tree, env) in trees.items():
            t0, ru = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
            run = subprocess.run([PY, "-m", "edgefleet", "agent", "predict", "--socket", path,
                                  "--file", str(csv_path), "--quiet"], cwd=tree, check=True,
                                 capture_output=True, text=True,
                                 env=dict(os.environ, PYTHONPATH=str(tree), **env))
            rates[key].append(len(dies) / (time.perf_counter() - t0))
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu[key].append(after.ru_utime + after.ru_stime - ru.ru_utime - ru.ru_stime)
            own = re.search(r"([\d,]+) dies/s end to end", run.stderr)
            rates[f"{key}_inprocess"].append(float(own[1].replace(",", "")) if own else np.nan)
    out = {"dies": len(dies), "csv_mb": csv_path.stat().st_size / 1e6, "runs": runs,
           "loadavg": os.getloadavg()[0]}
    out["cli_startup_s"] = float(np.median(startup))
    client_s = len(dies) / np.array(rates["client"])
    out["ratio_bound"] = float(np.median(client_s / (np.array(startup) + client_s)))
    for key, values in cpu.items():
        out[f"{key}_cpu_s"] = float(np.median(values))
    for key, values in rates.items():
        out[f"{key}_dies_per_s"] = float(np.median(values))
        if key != "client":  # cli -> ratio, baseline_cli_inprocess -> baseline_ratio_inprocess
            out[key.replace("cli", "ratio")] = float(np.median(
                np.array(values) / np.array(rates["client"])))
    return out


def epoll_clients(path: str, frames: list[bytes], clients: int, seconds: float
                  ) -> tuple[np.ndarray, float]:
    """`clients` connections driven by one epoll loop in this process, each with one single-row
    request in flight, flat out for `seconds`: (latencies in ns, answers per second). One
    process costs the agent's CPUs far less than one Python process per client would."""
    sel = selectors.EpollSelector()
    socks, pending, sent_at, served = [], [], [], [0]
    bufs = [bytearray(1 << 16) for _ in range(clients)]
    got = [0] * clients
    lat: list[int] = []
    perf = time.perf_counter_ns
    for i in range(clients):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(path)
        socks.append(s)
        sel.register(s, selectors.EVENT_READ, i)
        pending.append(0)
        sent_at.append(perf())
        s.sendall(frames[i % len(frames)])
    end = time.perf_counter() + seconds
    t0 = time.perf_counter()
    while time.perf_counter() < end:
        for key, _ in sel.select(1.0):
            i, s = key.data, key.fileobj
            n = s.recv_into(memoryview(bufs[i])[got[i]:])
            if not n:
                raise ConnectionError("agent closed a connection")
            got[i] += n
            if got[i] >= HEADER_SIZE and got[i] >= HEADER_SIZE + _HDR_LEN.unpack_from(
                    bufs[i], 20)[0]:
                now = perf()
                lat.append(now - sent_at[i])
                got[i] = 0
                served[0] += 1
                sent_at[i] = now
                s.sendall(frames[(served[0] + i) % len(frames)])
    elapsed = time.perf_counter() - t0
    for s in socks:
        s.close()
    return np.array(lat[clients:], dtype=np.int64), len(lat) / elapsed


def ort_floor(onnx_path: Path, rows: np.ndarray, n: int) -> tuple[dict, dict]:
    """ONNX Runtime in-process, one row at a time: (the agent's own call, `Engine.predict_one`
    through an IO binding; `InferenceSession.run` with the same session options, for
    reference). Interleaved in blocks, so a burst of load on the box hits both alike."""
    import onnxruntime as ort

    from agent.engine import OUTPUT_NAMES, Engine, session_options
    from agent.manifest import parse_manifest_bytes

    manifest = parse_manifest_bytes((onnx_path.parent / "manifest.json").read_bytes(),
                                    "manifest.json")
    engine = Engine(onnx_path, manifest)
    engine.warm_up()
    sess = ort.InferenceSession(str(onnx_path), sess_options=session_options(1),
                                providers=["CPUExecutionProvider"])
    outs, xs = list(OUTPUT_NAMES), [row.reshape(1, -1) for row in rows]
    bound, run = np.empty(n, dtype=np.int64), np.empty(n, dtype=np.int64)
    predict_one, perf, m = engine.predict_one, time.perf_counter_ns, len(rows)
    for i in range(500):
        predict_one(rows[i % m])
        sess.run(outs, {"params": xs[i % m]})
    for block in range(0, n, 1000):
        for i in range(block, min(block + 1000, n)):
            t0 = perf()
            predict_one(rows[i % m])
            bound[i] = perf() - t0
        for i in range(block, min(block + 1000, n)):
            t0 = perf()
            sess.run(outs, {"params": xs[i % m]})
            run[i] = perf() - t0
    return pct(bound), pct(run)


def _heads(path: str, frames: list[bytes], clients: int, seconds: float) -> dict:
    """answers/s and tails for 1, `clients` and 32 epoll connections (a baseline agent's)."""
    out = {}
    for n in (1, clients, 32):
        lat, rate = epoll_clients(path, frames, n, seconds)
        out[f"clients_{n}"] = {"answers_per_s": rate, **pct(lat)}
    one = out["clients_1"]["answers_per_s"]
    out["vs_one_client"] = {n: out[f"clients_{n}"]["answers_per_s"] / one for n in (clients, 32)}
    return out


def _start_baseline(tree: Path, store: Path, keyring: Path, tmp: Path,
                    procs: list[subprocess.Popen]) -> str:
    """An agent run from another checkout (e.g. the main branch, to compare serving designs in
    one run), on a copy of the store; returns its socket path once it is ready."""
    d = tmp / "baseline"
    d.mkdir()
    shutil.copytree(store, d / "store", symlinks=True)
    sock, port = str(d / "agent.sock"), free_port()
    procs.append(subprocess.Popen(
        [PY, "-m", "edgefleet", "agent", "serve", "--socket", sock, "--store", str(d / "store"),
         "--keyring", str(keyring), "--metrics-addr", f"127.0.0.1:{port}",
         "--log-level", "warning", "--max-connections-per-peer", "64"],
        cwd=tree, env=dict(os.environ, PYTHONPATH=str(tree))))
    deadline = time.monotonic() + 60
    while True:
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1).status == 200:
                return sock
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


# ---------------------------------------------------------------------------- helpers


def pct(ns: np.ndarray) -> dict[str, float]:
    us = ns / 1e3
    return {"p50_us": float(np.percentile(us, 50)), "p99_us": float(np.percentile(us, 99)),
            "p999_us": float(np.percentile(us, 99.9)), "max_us": float(us.max()),
            "n": len(us)}


def wait_for_path(path: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(path)
        time.sleep(0.005)


def set_affinity(pid: int, cpus: set[int]) -> None:
    """Pin every thread of a process (threads started later inherit from their creator)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(int(tid), cpus)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def descendants(pid: int) -> list[int]:
    """The processes `pid` started, and theirs (the log's writer process)."""
    out = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):
            for child in Path(f"/proc/{pid}/task/{tid}/children").read_text().split():
                out += [int(child), *descendants(int(child))]
    return out


def tree_memory_mb(pid: int) -> dict[str, float]:
    """RSS of the agent and of its child processes, and the PSS of both together (shared
    library pages counted once)."""
    kids = descendants(pid)
    pss = 0.0
    for p in (pid, *kids):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    pss += int(line.split()[1]) / 1024
    return {"agent_rss_mb": rss_mb(pid), "writer_rss_mb": sum(rss_mb(k) for k in kids),
            "pss_mb": pss}


def rss_at_rest_mb(pid: int, steady_s: float = 2.0, limit_s: float = 15.0) -> tuple[float, float]:
    """(RSS, seconds waited) once the agent's resident set has not changed for `steady_s`:
    the agent gives freed batch buffers back (agent/memory.py Trimmer) 1-1.5 s after the last
    big frame, and its prediction log works off its backlog first (seconds, on a busy box), so
    a reading at a fixed delay measured either side of the trim depending on the load."""
    t0 = last_change = time.monotonic()
    last = rss_mb(pid)
    while time.monotonic() - t0 < limit_s and time.monotonic() - last_change < steady_s:
        time.sleep(0.1)
        now = rss_mb(pid)
        if now != last:
            last, last_change = now, time.monotonic()
    return last, time.monotonic() - t0


def rss_parts_mb(pid: int) -> dict[str, float]:
    """Where the resident set is (MB): file-backed pages (the libraries' code and data: ONNX
    Runtime, cryptography, libpython, numpy, ...), anonymous memory, and of the anonymous the
    malloc heap and the 1 MiB mappings (CPython's small-object arenas, mostly)."""
    status = Path(f"/proc/{pid}/status").read_text()
    out = {key: int(status.split(f"{key}:")[1].split()[0]) / 1024
           for key in ("RssFile", "RssAnon")}
    out["heap"] = out["arenas_1mib"] = 0.0
    kind = None
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split()
        if "-" in head[0] and len(head) >= 5:  # a mapping's first line
            lo, hi = (int(x, 16) for x in head[0].split("-"))
            kind = ("heap" if head[-1] == "[heap]" else
                    "arenas_1mib" if len(head) == 5 and hi - lo == 1 << 20 else None)
        elif kind and head[0] == "Rss:":
            out[kind] += int(head[1]) / 1024
    return out


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def scrape(url: str) -> dict[str, float]:
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def with_missing(x: np.ndarray, rate: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = x.copy()
    x[rng.random(x.shape) < rate] = np.nan
    return x


# ---------------------------------------------------------------------------- the run


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=20000, help="single-row requests per figure")
    ap.add_argument("--batch", type=int, default=1024, help="rows per throughput frame")
    ap.add_argument("--seconds", type=float, default=3.0, help="throughput run length")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--file-dies", type=int, default=20000, help="dies in the CSV screened by "
                    "`edgefleet agent predict --file`")
    ap.add_argument("--pin-cpu", type=int, default=0, help="CPU for the single-row figures")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "agent.json")
    ap.add_argument("--bundle", type=Path, help="a signed model bundle, e.g. an optimizer's "
                    "build/model.efb (default: build the stand-in autoencoder)")
    ap.add_argument("--keyring", type=Path, help="keyring that trusts --bundle's key")
    ap.add_argument("--baseline-tree", type=Path, help="another checkout (e.g. the main "
                    "branch): its agent is driven by the same 1/--clients/32 epoll clients, "
                    "before and after this one's, for a same-run comparison")
    args = ap.parse_args()
    import onnxruntime as ort

    tmp = Path(tempfile.mkdtemp(prefix="efbench-", dir="/tmp"))
    procs: list[subprocess.Popen] = []
    all_cpus = os.sched_getaffinity(0)
    try:
        store, keyring, dies, threshold, n, model_name = _model(args, tmp)
        sample = dies[:512]
        frames = [encode_predict(row.reshape(1, -1), np.array([i], np.uint64))
                  for i, row in enumerate(sample)]
        lines = [json.dumps({"id": i, "die_id": f"D{i}", "params": json_values(row)}).encode()
                 + b"\n" for i, row in enumerate(sample)]
        lines17 = [json.dumps({"id": i, "die_id": f"D{i}", "params": [
            None if v != v else float(f"{v:.17g}") for v in row.astype(np.float64).tolist()]
        }).encode() + b"\n" for i, row in enumerate(sample)]
        onnx_path = store / "active" / "model.onnx"
        res: dict = {"model": model_name, "n_features": n, "host": {
            "cpus": os.cpu_count(), "python": platform.python_version(),
            "onnxruntime": ort.__version__, "loadavg_start": os.getloadavg()},
            "dies": "synthetic 512-parameter dies, 0.1% of values missing (~40% of dies miss "
                    "one), 3% anomalous"}

        # -- agent process: start to ready (the CLI, loading and verifying the stored model)
        sock = str(tmp / "agent.sock")
        port = free_port()
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        t_start = time.perf_counter()
        agent = subprocess.Popen(
            [PY, "-m", "edgefleet", "agent", "serve", "--socket", sock, "--store", str(store),
             "--keyring", str(keyring), "--metrics-addr", f"127.0.0.1:{port}",
             "--log-level", "warning", "--max-connections-per-peer", "64"],  # 32 heads, 1 pid
            cwd=REPO, env=env, stderr=open(tmp / "agent.log", "w"))  # noqa: SIM115
        procs.append(agent)
        url = f"http://127.0.0.1:{port}"
        while True:
            try:
                if urllib.request.urlopen(url + "/readyz", timeout=1).status == 200:
                    break
            except OSError:
                pass
            if agent.poll() is not None:
                raise RuntimeError("agent exited: " + (tmp / "agent.log").read_text())
            time.sleep(0.002)
        res["start_to_ready_s"] = time.perf_counter() - t_start

        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.connect(sock)
        probe.sendall(frames[0])
        answer_size = _recv_frame(probe, bytearray(1 << 16))
        probe.sendall(b'{"op": "info"}\n')
        res["json_parser"] = json.loads(probe.makefile("rb").readline())["json_parser"]
        probe.close()

        # -- the other servers: echo (plain, and request-in/answer-out sizes), FastAPI
        echo_plain, echo_sized = str(tmp / "echo1.sock"), str(tmp / "echo2.sock")
        echo_procs = []
        for path, req, ans in ((echo_plain, len(frames[0]), len(frames[0])),
                               (echo_sized, len(frames[0]), answer_size)):
            echo_procs.append(subprocess.Popen(
                [PY, str(REPO / "bench" / "echo_server.py"), path, str(req), str(ans)]))
            wait_for_path(path)
        procs += echo_procs
        py_floor = str(tmp / "ortecho.sock")  # the least a Python server does (info)
        echo_procs.append(subprocess.Popen(
            [PY, str(REPO / "bench" / "echo_server.py"), py_floor, str(len(frames[0])),
             str(answer_size), str(onnx_path.parent)]))
        wait_for_path(py_floor)
        procs.append(echo_procs[-1])
        fa_sock = str(tmp / "fastapi.sock")
        fastapi = subprocess.Popen(
            [PY, "-m", "uvicorn", "fastapi_app:app", "--app-dir", str(REPO / "bench"), "--uds",
             fa_sock, "--log-level", "warning", "--no-access-log"],
            cwd=REPO, env=dict(env, MODEL=str(onnx_path), THRESHOLD=str(threshold),
                               PYTHONPATH=str(REPO)))
        procs.append(fastapi)
        wait_for_path(fa_sock)
        res["echo_request_bytes"], res["agent_answer_bytes"] = len(frames[0]), answer_size

        base_procs: list[subprocess.Popen] = []
        if args.baseline_tree:  # another checkout's agent, measured beside this one
            base_sock = _start_baseline(args.baseline_tree, store, keyring, tmp, base_procs)
            procs += base_procs

        # -- single-row latency, client and servers pinned to one CPU (see the module docstring)
        pin = {args.pin_cpu}
        res["single_row_conditions"] = f"client and servers pinned to CPU {args.pin_cpu}"
        for proc in (agent, fastapi, *echo_procs, *base_procs):
            set_affinity(proc.pid, pin)
        os.sched_setaffinity(0, pin)
        res["ort_inprocess"], res["ort_inprocess_session_run"] = ort_floor(
            onnx_path, sample, args.requests)
        res["python_floor"] = pct(echo_loop(py_floor, frames[0], answer_size, args.requests))
        res["echo_plain"] = pct(echo_loop(echo_plain, frames[0], len(frames[0]), args.requests))
        res["echo_sized"] = pct(echo_loop(echo_sized, frames[0], answer_size, args.requests))
        res["agent_binary"] = pct(binary_loop(sock, frames, args.requests))
        res["client_predict"] = pct(client_loop(sock, sample, args.requests))
        res["agent_json"] = pct(json_loop(sock, lines, args.requests))
        res["agent_json_17"] = pct(json_loop(sock, lines17, args.requests))
        if args.baseline_tree:
            res["baseline_single"] = {
                "agent_binary": pct(binary_loop(base_sock, frames, args.requests)),
                "agent_json": pct(json_loop(base_sock, lines, args.requests)),
                "agent_json_17": pct(json_loop(base_sock, lines17, args.requests)),
            }
        bodies = [line.rstrip(b"\n") for line in lines]
        res["fastapi"] = pct(http_loop(fa_sock, bodies, max(args.requests // 4, 2000)))

        # -- the same unpinned, for reference (this VM's cross-CPU wake-ups are slow)
        for proc in (agent, fastapi, *echo_procs, *base_procs):
            set_affinity(proc.pid, all_cpus)
        os.sched_setaffinity(0, all_cpus)
        res["unpinned"] = {
            "echo_plain": pct(echo_loop(echo_plain, frames[0], len(frames[0]), args.requests)),
            "agent_binary": pct(binary_loop(sock, frames, args.requests)),
            "agent_json": pct(json_loop(sock, lines, args.requests)),
            "agent_json_17": pct(json_loop(sock, lines17, args.requests)),
        }

        # -- many test heads: 1, --clients and 32 connections from one epoll process (before
        # the batch runs, whose prediction-log backlog the agent's writer thread works off
        # for seconds after: that is not what serving single rows costs)
        seconds = max(args.seconds, 0.5)
        if args.baseline_tree:  # the same figures from another checkout's agent, alternating
            res["baseline_tree"] = {"tree": str(args.baseline_tree), **_heads(
                base_sock, frames, args.clients, seconds)}
        one, one_rate = epoll_clients(sock, frames, 1, seconds)
        many, many_rate = epoll_clients(sock, frames, args.clients, seconds)
        lots, lots_rate = epoll_clients(sock, frames, 32, seconds)
        if args.baseline_tree:
            res["baseline_tree_again"] = _heads(base_sock, frames, args.clients, seconds)
        res["one_client"] = {"clients": 1, "answers_per_s": one_rate, **pct(one)}
        res["concurrent"] = {"clients": args.clients, "answers_per_s": many_rate,
                             "vs_one_client": many_rate / one_rate, **pct(many)}
        res["clients_32"] = {"clients": 32, "answers_per_s": lots_rate,
                             "vs_one_client": lots_rate / one_rate, **pct(lots)}
        res["clients_loadavg"] = os.getloadavg()[0]

        # -- batched throughput on one connection
        batch_frames = [encode_predict(dies[i:i + args.batch],
                                       np.arange(i, i + args.batch, dtype=np.uint64))
                        for i in range(0, len(dies) - args.batch + 1, args.batch)]
        binary_loop(sock, batch_frames, 5, warmup=5)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(sock)
        buf = bytearray(1 << 24)
        rows, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < args.seconds:
            for f in batch_frames:
                s.sendall(f)
                _recv_frame(s, buf)
                rows += args.batch
        elapsed = time.perf_counter() - t0
        s.close()
        res["throughput"] = {"dies_per_s": rows / elapsed, "batch": args.batch, "rows": rows}

        # -- batched JSON on one connection (not a target: what a JSON-only tester gets)
        json_batch = 64
        batch_lines = [json.dumps([{"die_id": f"D{i + j}", "params": json_values(row)}
                                   for j, row in enumerate(dies[i:i + json_batch])]).encode()
                       + b"\n" for i in range(0, 32 * json_batch, json_batch)]
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(sock)
        rows, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < args.seconds:
            for line in batch_lines:
                s.sendall(line)
                _recv_line(s, buf)
                rows += json_batch
        res["json_throughput"] = {"dies_per_s": rows / (time.perf_counter() - t0),
                                  "batch": json_batch, "rows": rows}
        s.close()
        res["agent_rss_after_batches_mb"] = rss_mb(agent.pid)  # before the idle trim

        # -- file screening: the CLI on a CSV, beside the Client's batches of the same rows
        res["file_screening"] = file_screening(sock, tmp, dies[:args.file_dies])

        # -- memory after all of it (the agent gives batch buffers back after 1 s without one)
        time.sleep(1.5)
        metrics = scrape(url + "/metrics")
        res["agent_rss_1_5s_mb"] = rss_mb(agent.pid)  # the reading before 2026-12-05
        res["agent_rss_mb"], res["agent_rss_wait_s"] = rss_at_rest_mb(agent.pid)
        res["agent_rss_parts_mb"] = rss_parts_mb(agent.pid)
        # the prediction log's writer runs in its own process (agent/predlog_proc.py): the
        # device's memory is both processes, shared library pages counted once (PSS)
        res["agent_tree_memory_mb"] = tree_memory_mb(agent.pid)
        res["agent_predictions"] = int(sum(v for k, v in metrics.items()
                                           if k.startswith("edgefleet_predictions_total")))
        res["agent_errors"] = int(sum(v for k, v in metrics.items()
                                      if k.startswith("edgefleet_errors_total")))
        res["host"]["loadavg_end"] = os.getloadavg()
    finally:
        os.sched_setaffinity(0, all_cpus)
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(tmp, ignore_errors=True)

    report = judge(res)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print_report(report)
    print(f"\nwritten to {args.out}")
    return 0 if all(t["pass"] for t in report["targets"]) else 1


def _model(args, tmp: Path):
    """(store, keyring, dies, threshold, n_features, name) for --bundle or the built stand-in."""
    rng = np.random.default_rng(3)
    if args.bundle:
        from ae_model import install_bundle

        if args.keyring is None:
            raise SystemExit("--bundle needs --keyring")
        store = install_bundle(tmp / "store", args.keyring, args.bundle)
        manifest = json.loads((store / "active" / "manifest.json").read_text())
        n = manifest["input"]["n_features"]
        golden = np.array([[np.nan if v is None else v for v in g["params"]]
                           for g in manifest["golden"]["vectors"]], dtype=np.float32)
        normal = golden[rng.integers(0, len(golden), 20000)]
        return (store, args.keyring, with_missing(normal, 0.001, 4),
                manifest["decision"]["threshold"], n,
                f"{manifest['model']['name']} {manifest['model']['version']}")
    import ae_model

    m = ae_model.build(tmp / "model")
    n = ae_model.N_FEATURES
    dies = with_missing(m.normal, 0.001, seed=4)  # ~40% of dies miss a value, as on a floor
    anomalous = rng.random(len(dies)) < 0.03
    dies[anomalous] += rng.normal(scale=0.3, size=(int(anomalous.sum()), n)).astype(np.float32)
    return m.store, m.keyring, dies, m.threshold, n, "bench autoencoder 512-128-32-128-512"


def judge(res: dict) -> dict:
    floor = res["echo_plain"]["p50_us"] + res["ort_inprocess"]["p50_us"]
    floor_sized = res["echo_sized"]["p50_us"] + res["ort_inprocess"]["p50_us"]
    floor = min(floor, floor_sized)  # the lower (stricter) of the two transport floors
    b, j, f = res["agent_binary"], res["agent_json"], res["fastapi"]
    j17 = res["agent_json_17"]
    targets = [
        ("binary single-row p50 vs floor", b["p50_us"], "us", b["p50_us"] / floor, "<=", 1.5),
        ("binary single-row p99", b["p99_us"], "us", b["p99_us"] / 300, "<=", 1.0),
        ("json single-row p50 vs floor", j["p50_us"], "us", j["p50_us"] / floor, "<=", 2.5),
        ("json 17-digit single-row p50 vs floor", j17["p50_us"], "us", j17["p50_us"] / floor,
         "<=", 2.5),
        ("fastapi p50 / agent binary p50", f["p50_us"], "us", f["p50_us"] / b["p50_us"], ">=", 8),
        ("Client.predict p50 / raw binary p50", res["client_predict"]["p50_us"], "us",
         res["client_predict"]["p50_us"] / b["p50_us"], "<=", 1.2),
        ("predict --file / Client batches", res["file_screening"]["cli_dies_per_s"], "dies/s",
         res["file_screening"]["ratio"], ">=", 0.5),
        ("batched binary throughput", res["throughput"]["dies_per_s"], "dies/s",
         res["throughput"]["dies_per_s"] / 100_000, ">=", 1.0),
        (f"{res['concurrent']['clients']} clients p99.9", res["concurrent"]["p999_us"], "us",
         res["concurrent"]["p999_us"] / 2000, "<=", 1.0),
        (f"{res['concurrent']['clients']} clients throughput vs one client",
         res["concurrent"]["answers_per_s"], "ans/s", res["concurrent"]["vs_one_client"], ">=",
         1.6),
        ("32 clients p99.9", res["clients_32"]["p999_us"], "us",
         res["clients_32"]["p999_us"] / 5000, "<=", 1.0),
        ("resident memory after predictions", res["agent_rss_mb"], "MB",
         res["agent_rss_mb"] / 100, "<=", 1.0),
        ("agent + log writer memory (PSS)", res["agent_tree_memory_mb"]["pss_mb"], "MB",
         res["agent_tree_memory_mb"]["pss_mb"] / 100, "<=", 1.0),
        ("start to ready", res["start_to_ready_s"], "s", res["start_to_ready_s"] / 1.5, "<=", 1.0),
    ]
    res["floor_us"] = floor
    res["info"] = {  # ratios worth seeing that are not targets
        "least Python server p50 / floor": res["python_floor"]["p50_us"] / floor,
        "fastapi p50 / agent json p50": f["p50_us"] / j["p50_us"],
        "json p50 / binary p50": j["p50_us"] / b["p50_us"],
        "unpinned agent binary p50 / unpinned floor": res["unpinned"]["agent_binary"]["p50_us"]
        / (res["unpinned"]["echo_plain"]["p50_us"] + res["ort_inprocess"]["p50_us"]),
        "unpinned agent json p50 / unpinned floor": res["unpinned"]["agent_json"]["p50_us"]
        / (res["unpinned"]["echo_plain"]["p50_us"] + res["ort_inprocess"]["p50_us"]),
    }
    res["targets"] = [
        {"name": name, "value": value, "unit": unit, "ratio": ratio, "target": f"{op} {limit}",
         "pass": bool(ratio <= limit if op == "<=" else ratio >= limit)}
        for name, value, unit, ratio, op, limit in targets
    ]
    return res


def print_report(r: dict) -> None:
    def row(name: str, p: dict) -> None:
        print(f"  {name:34s} p50 {p['p50_us']:8.1f}  p99 {p['p99_us']:8.1f}  "
              f"p99.9 {p['p999_us']:8.1f}  max {p['max_us']:9.1f}  (n={p['n']})")

    print(f"model: {r['model']} ({r['n_features']} features); {r['host']['cpus']} CPUs, "
          f"load {r['host']['loadavg_start'][0]:.2f} -> {r['host']['loadavg_end'][0]:.2f}")
    print("latency, microseconds (client and server pinned to one CPU):")
    row("ORT in-process (floor)", r["ort_inprocess"])
    row("ORT InferenceSession.run (info)", r["ort_inprocess_session_run"])
    row(f"echo {r['echo_request_bytes']} B both ways (floor)", r["echo_plain"])
    row(f"echo {r['echo_request_bytes']} B in, {r['agent_answer_bytes']} B out",
        r["echo_sized"])
    row("agent binary, 1 row", r["agent_binary"])
    row("Client.predict, 1 row", r["client_predict"])
    row(f"agent JSON, 1 row ({r['json_parser']})", r["agent_json"])
    row("agent JSON, 1 row, 17-digit numbers", r["agent_json_17"])
    row("agent binary, 1 client (epoll)", r["one_client"])
    row(f"agent binary, {r['concurrent']['clients']} clients (epoll)", r["concurrent"])
    row("agent binary, 32 clients (epoll)", r["clients_32"])
    row("FastAPI + uvicorn, 1 row (JSON)", r["fastapi"])
    row("least Python server, 1 row (info)", r["python_floor"])
    print(f"  floor = echo + ORT p50 = {r['floor_us']:.1f} us (ORT as the agent calls it: "
          "an IO binding)")
    print("unpinned, for reference (cross-CPU wake-ups in this VM cost 15-40 us per hop):")
    row("echo, unpinned", r["unpinned"]["echo_plain"])
    row("agent binary, 1 row, unpinned", r["unpinned"]["agent_binary"])
    row("agent JSON, 1 row, unpinned", r["unpinned"]["agent_json"])
    row("agent JSON 17-digit, unpinned", r["unpinned"]["agent_json_17"])
    print(f"single-row answers/s from one epoll process: 1 client "
          f"{r['one_client']['answers_per_s']:,.0f}, {r['concurrent']['clients']} clients "
          f"{r['concurrent']['answers_per_s']:,.0f} ({r['concurrent']['vs_one_client']:.2f}x), "
          f"32 clients {r['clients_32']['answers_per_s']:,.0f} "
          f"({r['clients_32']['vs_one_client']:.2f}x); load average {r['clients_loadavg']:.1f}")
    if "baseline_single" in r:
        print(f"baseline {r['baseline_tree']['tree']}, the same pinned single-row figures:")
        for key, name in (("agent_binary", "binary"), ("agent_json", "JSON"),
                          ("agent_json_17", "JSON 17-digit")):
            b = r["baseline_single"][key]
            print(f"  baseline {name:24s} p50 {b['p50_us']:8.1f}  p99 {b['p99_us']:8.1f}  "
                  f"(this tree {r[key]['p50_us'] / b['p50_us']:.2f}x the baseline's p50)")
    for key in ("baseline_tree", "baseline_tree_again"):
        if key in r:
            b = r[key]
            print(f"  baseline {r['baseline_tree']['tree']}: " + ", ".join(
                f"{k.split('_')[1]} clients {v['answers_per_s']:,.0f}/s p99.9 "
                f"{v['p999_us']:,.0f} us"
                for k, v in b.items() if k.startswith("clients_")) + " (" + ", ".join(
                f"{n}/1 {x:.2f}x" for n, x in b["vs_one_client"].items()) + ")")
    print(f"throughput: {r['throughput']['dies_per_s']:,.0f} dies/s "
          f"(batches of {r['throughput']['batch']}, one connection); JSON "
          f"{r['json_throughput']['dies_per_s']:,.0f} dies/s (batches of "
          f"{r['json_throughput']['batch']})")
    fs = r["file_screening"]
    print(f"file screening ({fs['dies']} dies, {fs['csv_mb']:.0f} MB CSV): predict --file "
          f"{fs['cli_dies_per_s']:,.0f} dies/s (whole process), Client batches of 256 "
          f"{fs['client_dies_per_s']:,.0f} dies/s; the CLI on a one-die file takes "
          f"{fs['cli_startup_s']:.2f} s, so with a free CSV reader the ratio would be at most "
          f"{fs['ratio_bound']:.2f}")
    print(f"agent: start to ready {r['start_to_ready_s']:.3f} s; RSS {r['agent_rss_mb']:.1f} MB "
          f"at rest ({r['agent_rss_wait_s']:.1f} s after the scrape; "
          f"{r['agent_rss_1_5s_mb']:.1f} MB 1.5 s after the last request) after "
          f"{r['agent_predictions']:,} predictions ({r['agent_errors']} errors); "
          f"{r['agent_rss_after_batches_mb']:.1f} MB right after the batch run; at rest: "
          + ", ".join(f"{k} {v:.1f}" for k, v in r["agent_rss_parts_mb"].items()))
    m = r["agent_tree_memory_mb"]
    print(f"  with the log's writer process: writer RSS {m['writer_rss_mb']:.1f} MB; PSS of "
          f"agent + writer {m['pss_mb']:.1f} MB")
    print("other ratios (not targets): " + "; ".join(f"{k} {v:.2f}" for k, v in r["info"].items()))
    print("targets:")
    for t in r["targets"]:
        print(f"  {'PASS' if t['pass'] else 'FAIL'}  {t['name']:36s} {t['value']:>12,.1f} "
              f"{t['unit']:6s} ratio {t['ratio']:6.2f} (target {t['target']})")


if __name__ == "__main__":
    sys.exit(main())
