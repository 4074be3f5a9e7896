"""The agent's end of the prediction log: the tap on the serving thread, and a writer process.

    plog = WriterProcess(PredLogConfig(directory=...), runtime, LabelConfig(...))
    server.tap = plog.tap; server.dispatch.labels = plog.labels     # agent/predlog.py plug_in
    plog.start(); ...; plog.stop()

Why a process: a writer thread in the serving process held the GIL ~0.5 ms every pass (decoding
answers, JSON, numpy, checksums), and a request arriving then waited for it - the 8-client
p99.9 of issue 15 and most of the log's p99 cost (issue 17). Now the serving process keeps only
the tap (agent/predlog_tap.py: ~1 us a request into a bytearray) and one forwarding thread that
wakes every `flush_interval_s`, swaps the bytearray out under a lock and writes it to the
writer's stdin pipe (the write releases the GIL); the writer (agent/predlog_child.py) runs
agent/predlog.py's `PredictionLog` in its own interpreter, at a lower CPU priority.

What stays the same for the rest of the agent: `tap`, `labels` (a `LabelInbox` whose labels go
down the same pipe, after the answers before them), `flush()` (a round trip: the writer has
written everything tapped before it returns), `snapshot()` for the metrics (asked of the writer
at each scrape; its last answer if it does not reply within 2 s), and read-only views of the
rings and the model table for the data feed (agent/datafeed.py).

The writer process is restarted if it dies (answers handed to it and not yet written are lost:
those the agent knows of are counted, `edgefleet_predlog_dropped_total{reason="writer_lost"}`,
and `edgefleet_predlog_writer_restarts_total` counts the restarts). Crash bounds:
docs/operations.md, "Prediction log, capture and labels".
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import select
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import orjson
from prometheus_client.metrics_core import CounterMetricFamily, Metric

from agent.labels import LabelConfig, LabelInbox
from agent.predformat import block_count
from agent.predlog import PredLogConfig
from agent.predlog_metrics import snapshot_families
from agent.predlog_models import ModelTable
from agent.predlog_tap import FLUSH, SNAPSHOT, TAP_MODES, U32, Tap, labels_message, message
from agent.segring import RingView

log = logging.getLogger("edgefleet.agent")

PIPE_BYTES = 1 << 20  # the stdin pipe's capacity (the Linux default is 64 kB)
STALL_S = 10.0  # a writer that reads nothing for this long while we write is restarted
SNAPSHOT_WAIT_S = 2.0
RESPAWN_S = 30.0  # at most 3 writer processes started within this long
_TRIM_BYTES = 1 << 20

__all__ = ["WriterProcess"]


class WriterProcess:
    """See the module docstring."""

    def __init__(self, config: PredLogConfig, runtime: Any,
                 labels: LabelConfig | None = None, *, log_level: str = "warning") -> None:
        self.config = config
        self.dir = Path(config.directory)
        self.tapper = Tap(runtime, capture_rate=config.capture_rate,
                        capture_fails=config.capture_fails, queue_size=config.queue_size,
                        queue_bytes=config.queue_bytes, compiled=TAP_MODES[config.tap])
        self.tap = self.tapper.record
        self.labels = None if labels is None else LabelForwarder(self.tapper, self.dir)
        self.predictions = RingView(self.dir / "predictions", block_count)
        self.capture = RingView(self.dir / "capture")
        self.trimmer: Any = None  # agent.memory.Trimmer: told after a big hand-over
        self._argv = [sys.executable, "-m", "agent.predlog_child", orjson.dumps(
            {"log": _jsonable(config), "labels": None if labels is None else _jsonable(labels),
             "log_level": log_level}).decode()]
        self._proc: subprocess.Popen | None = None
        self._spawns: deque[float] = deque(maxlen=3)
        self._write_lock = threading.Lock()  # the pipe to the writer
        self._request_lock = threading.Lock()  # one request (flush, snapshot) at a time
        self._replies = bytearray()
        self._request_id = 0
        self._stop = threading.Event()
        self._wake = threading.Event()  # the tap: a big buffer is waiting
        self.tapper.wake = self._wake.set
        self._thread: threading.Thread | None = None
        self._last: dict[str, Any] | None = None  # the writer's last snapshot
        self._model_rows: list[dict[str, Any]] = []  # models.json, as last read
        self.lost = 0  # answers handed to a writer that died before writing them (known ones)
        self.restarts = 0

    @property
    def models(self) -> ModelTable:
        """The model table as the writer last wrote it."""
        return ModelTable(self.dir / "models.json")

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> WriterProcess:
        self._spawn()
        self._thread = threading.Thread(target=self._run, name="predlog-forward", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Hand over the rest, close the pipe (the writer writes everything and exits)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.forward()
        proc = self._proc
        if proc is None:
            return
        with contextlib.suppress(OSError):
            proc.stdin.close()  # type: ignore[union-attr]
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            log.warning("prediction log: the writer did not finish in 60 s; killed")
            proc.kill()
            proc.wait()
        with contextlib.suppress(OSError):
            proc.stdout.close()  # type: ignore[union-attr]

    def _spawn(self) -> None:
        self._spawns.append(time.monotonic())
        self._proc = subprocess.Popen(self._argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      bufsize=0)
        fd = self._proc.stdin.fileno()  # type: ignore[union-attr]
        with contextlib.suppress(OSError):  # a bigger pipe: fewer wake-ups, room for bursts
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
        os.set_blocking(fd, False)
        self._replies.clear()
        announced = list(self.tapper.announced.values())  # a restarted writer learns the models
        if announced and not self._write(announced, restart=False):
            log.warning("prediction log: the new writer process did not take its models")

    def _restart(self) -> None:
        """(Under the write lock.) The writer died or stalled: a new one, but not a fourth
        within RESPAWN_S (a writer that cannot start must not become a fork loop; meanwhile
        what is handed over is lost, and counted)."""
        spawns = self._spawns
        if len(spawns) == spawns.maxlen and time.monotonic() - spawns[0] < RESPAWN_S:
            if self._proc is not None and self._proc.poll() is None:
                self._proc.kill()  # stalled: gone, so writes fail fast until the next one
            return
        proc = self._proc
        if proc is not None:
            with contextlib.suppress(OSError):
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
            for f in (proc.stdin, proc.stdout):
                with contextlib.suppress(OSError):
                    f.close()  # type: ignore[union-attr]
            log.warning("prediction log: the writer process (pid %d) exited with %s; "
                        "restarting it", proc.pid, proc.returncode)
        self.restarts += 1
        self._spawn()

    # ------------------------------------------------------------------ handing over

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.config.flush_interval_s)
            self._wake.clear()
            try:
                self.forward()
            except Exception:
                log.exception("prediction log: hand-over failed")

    def forward(self, extra: list[bytes] | None = None) -> bool:
        """Hand everything tapped so far (then `extra`) to the writer; False if it was lost.
        Taking and writing under one lock: two hand-overs never swap their order."""
        with self._write_lock:
            parts, n = self.tapper.take()
            if extra:
                parts += extra
            if not parts:
                return True
            size = sum(map(len, parts))
            self.tapper.backlog = size  # counted against the tap's byte cap until written
            try:
                if self._proc is None or self._proc.poll() is not None:
                    self._restart()
                ok = self._write(parts)
            finally:
                self.tapper.backlog = 0
        if not ok:
            self.lost += n
        if size >= _TRIM_BYTES and self.trimmer is not None:
            self.trimmer.note()
        return ok

    def _write(self, parts: list, restart: bool = True) -> bool:
        """(Under the write lock.) Write `parts` to the writer's pipe; on a dead or stalled
        writer, restart it and return False (what it had not written is lost)."""
        if self._proc is None or self._proc.stdin.closed:  # type: ignore[union-attr]
            return False
        fd = self._proc.stdin.fileno()  # type: ignore[union-attr]
        for part in parts:
            view = memoryview(part)
            idle_since = time.monotonic()
            while view:
                try:
                    n = os.write(fd, view)
                except BlockingIOError:
                    n = 0
                except OSError:  # EPIPE: the writer is gone
                    if restart:
                        self._restart()
                    return False
                if n:
                    view, idle_since = view[n:], time.monotonic()
                elif time.monotonic() - idle_since > STALL_S:
                    log.warning("prediction log: the writer read nothing for %.0f s", STALL_S)
                    if restart:
                        self._restart()
                    return False
                else:
                    select.select([], [fd], [], 0.5)
        return True

    # ------------------------------------------------------------------ requests

    def _request(self, kind: int, timeout: float) -> dict[str, Any] | None:
        """Send a FLUSH or SNAPSHOT (FLUSH: behind everything tapped so far) and wait for the
        writer's reply; None if it does not come within `timeout`."""
        with self._request_lock:
            self._request_id += 1
            rid = self._request_id
            msg = message(kind, rid, b"")
            if kind == FLUSH:
                if not self.forward([msg]):
                    return None
            else:
                with self._write_lock:
                    if not self._write([msg]):
                        return None
            deadline = time.monotonic() + timeout
            while (left := deadline - time.monotonic()) > 0:
                reply = self._read_reply(left)
                if reply is None:
                    return None
                if reply.get("id") == rid:
                    self._last = reply["snapshot"]
                    return self._last
            return None

    def _read_reply(self, timeout: float) -> dict[str, Any] | None:
        proc = self._proc
        if proc is None:
            return None
        fd = proc.stdout.fileno()  # type: ignore[union-attr]
        deadline = time.monotonic() + timeout
        buf = self._replies
        while True:
            if len(buf) >= 4:
                (n,) = U32.unpack_from(buf)
                if len(buf) >= 4 + n:
                    reply = orjson.loads(bytes(buf[4:4 + n]))
                    del buf[:4 + n]
                    return reply
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            data = os.read(fd, 1 << 16)
            if not data:  # the writer exited
                return None
            buf += data

    def flush(self, timeout: float = 60.0) -> bool:
        """Have the writer write everything tapped so far; True once it has."""
        return self._request(FLUSH, timeout) is not None

    def snapshot(self) -> dict[str, Any]:
        """The log's figures for the metrics (`agent.predlog.snapshot_families`), with the
        agent's own drops."""
        snap = self._request(SNAPSHOT, SNAPSHOT_WAIT_S) or self._last or _EMPTY
        snap = {**snap, "dropped": {**snap["dropped"]}, "models": self._models(snap["models"])}
        snap["dropped"]["queue_full"] = snap["dropped"].get("queue_full", 0) + self.tapper.dropped
        snap["dropped"]["writer_lost"] = self.lost
        if self.labels is not None and snap.get("labels") is not None:
            snap["labels"] = self.labels.merged(snap["labels"])
        return snap

    def _models(self, count: int | list) -> list[dict[str, Any]]:
        """The model table's entries (the writer's snapshot gives their count): models.json,
        read again only when the count grew."""
        if isinstance(count, list):
            return count
        if len(self._model_rows) < count:
            self._model_rows = [m.to_json() for m in self.models.models]
        return self._model_rows[:count]

    def collect(self) -> Iterable[Metric]:
        yield from snapshot_families(self.snapshot())
        yield CounterMetricFamily("edgefleet_predlog_writer_restarts",
                                  "Times the prediction log's writer process was restarted.",
                                  value=self.restarts)


def _jsonable(config: Any) -> dict[str, Any]:
    """A config dataclass as the writer process's command line carries it (paths as text)."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()}


_EMPTY: dict[str, Any] = {
    "records": {"predictions": 0, "capture": 0}, "bytes_written": {"predictions": 0,
                                                                   "capture": 0},
    "dropped": {"queue_full": 0, "disk_full": 0}, "captured": {"sample": 0, "fail": 0},
    "disk": {"predictions": 0, "capture": 0}, "stats": [], "models": [], "labels": None}


class LabelForwarder(LabelInbox):
    """The `label` op in the agent: valid labels go down the writer's pipe (behind the answers
    before them) to its `LabelDesk`; refused ones, and ones the full pipe could not take, are
    counted here and added to the desk's counts (`merged`)."""

    def __init__(self, tap: Tap, directory: Path) -> None:
        super().__init__()
        self.tapper = tap
        self.ring = RingView(directory / "labels")  # the label log, for the data feed

    def offer(self, labels: list[tuple[str, int, float | None]], source: str) -> tuple[int, int]:
        if not labels or self.tapper.send(labels_message(labels, source)):
            return len(labels), 0
        with self._lock:
            self.results[(source, "dropped")] += len(labels)
        return 0, len(labels)

    def merged(self, snap: dict[str, Any]) -> dict[str, Any]:
        """The desk's snapshot with this side's counts added."""
        with self._lock:
            mine = dict(self.results)
        results = [[s, r, n + mine.pop((s, r), 0)] for s, r, n in snap["results"]]
        results += [[s, r, n] for (s, r), n in mine.items()]
        return {**snap, "results": results}
