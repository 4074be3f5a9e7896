"""The prediction log's writer: every answer the agent gave, on disk, off the hot path.

    log = PredictionLog(PredLogConfig(directory=...))   # in the writer process
    log.feed(tap_bytes); log.flush(); ...; log.stop()

The agent runs it in a process of its own (agent/predlog_proc.py starts agent/predlog_child.py,
which feeds it the serving thread's tap stream, agent/predlog_tap.py): no work of the log holds
the serving process's GIL. Given a runtime, `PredictionLog` keeps its own `Tap` and takes from
it every pass instead: the log in one process (tests, tools), a writer thread beside serving.

What is recorded, per answered die (refused rows are not decisions and are not logged): time,
die id, the model (an index into `models.json`, agent/predlog_models.py), decision, source
(model / fallback rules), score, threshold, confidence and the top contributions of fails. A
configurable sample of the full input rows goes to a second ring, the capture (`capture_rate`,
default 1%, plus every fail). Formats: agent/predformat.py (answers are written in blocks, one
ring record per chunk of up to `_CHUNK_MESSAGES` messages); rings: agent/segring.py;
retention, fsync policy and what a crash loses: docs/operations.md, "Prediction log, capture
and labels".

- `feed` decodes the tap's messages into a queue, bounded by messages (`queue_size`) and bytes
  (`queue_bytes`): beyond either, the answer is dropped and counted
  (`edgefleet_predlog_dropped_total{reason="queue_full"}`).
- A pass (`flush`) works in chunks of up to `_CHUNK_MESSAGES` messages: a chunk of binary
  answers is one join of their result records and a handful of numpy operations (decode, die
  keys, per-model counts, index rows), then one block record and one `os.write`; JSON answers
  are parsed by orjson, 128 at a time, and read column by column (a sampled row comes as the
  dispatcher parsed it - a JSON batch's too, JSON_ROWS - or, for a batch the dispatcher did
  not note, from its own `params` list in the line when that is sound, `_batch_rows`). It
  fsyncs every `fsync_interval_s`, joins pending labels (agent/labels.py) and keeps the
  per-model proxy counts (`snapshot`, rendered by agent/predlog_metrics.py). A full disk drops
  and counts (`reason="disk_full"`).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from operator import itemgetter
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from agent.dieindex import INDEX_DTYPE, DieIndex, die_key, die_text
from agent.fsio import atomic_write
from agent.predformat import (
    CAPTURE_FAIL,
    CAPTURE_SAMPLE,
    MAX_ID_BYTES,
    NUMERIC_ID,
    ROW,
    Block,
    block_count,
    decode_block,
    decode_capture,
    encode_block,
    encode_capture,
    id_bytes,
    iter_predictions,
)
from agent.predlog_models import NO_MODEL, ModelInfo, ModelTable
from agent.predlog_tap import (
    BINARY_BATCH,
    BINARY_ONE,
    JSON_BATCH,
    JSON_ONE,
    JSON_ROW,
    JSON_ROWS,
    LABELS,
    MODEL,
    MSG,
    TAP_MODES,
    U32,
    Tap,
)
from agent.protocol import (
    Decision,
    ProtocolError,
    Source,
    parse_json_line,
    record_dtype,
)
from agent.segring import RingConfig, RingFull, SegmentRing
from agent.wire import MARGIN_EDGES

log = logging.getLogger("edgefleet.agent")

# One chunk, one block: up to this many messages or rows, then the writer yields the GIL.
_CHUNK_MESSAGES = 4096
_CHUNK_ROWS = 8192
_JSON_RUN = 128  # JSON answers parsed at once (more live objects at once make the GC work)
_TRIM_BYTES = 1 << 20  # a pass that drained this much has the agent's trimmer give it back
# What a queued message is (the writer decodes each kind its own way)
_BINARY_ONE, _BINARY_BATCH, _JSON_ONE, _JSON_BATCH = BINARY_ONE, BINARY_BATCH, JSON_ONE, JSON_BATCH
_JSON_ROW, _JSON_ROWS = JSON_ROW, JSON_ROWS
_JSON_BATCHES = (JSON_BATCH, JSON_ROWS)
FORMAT = "2"  # the log directory's format (agent/predformat.py); `format` file in it
_F4 = np.dtype("<f4")
_U4 = np.dtype("<u4")
_FAIL = int(Decision.FAIL)
_ERROR = int(Decision.ERROR)
_MODEL = int(Source.MODEL)
_FALLBACK = int(Source.FALLBACK)
_U64 = 1 << 64
_NUMBER_TEXT = b"-+0123456789.eEnul, \t\r\n"  # what a list of numbers and nulls is made of
# What the writer reads of a JSON answer (agent/dispatch.py writes every one of them)
_FIELD_NAMES = ("decision", "die_id", "score", "threshold", "confidence", "source")
_ANSWER_FIELDS = itemgetter(*_FIELD_NAMES)

__all__ = ["PredLogConfig", "PredictionLog", "decode_block", "decode_capture", "die_key",
           "encode_capture", "iter_predictions", "read_predictions"]


@dataclass(frozen=True)
class PredLogConfig:
    """Where and how much. The agent builds it from `AgentConfig` (EDGEFLEET_AGENT_PREDLOG_*)."""

    directory: Path
    max_bytes: int = 256 << 20  # predictions ring
    max_age_s: float = 30 * 86400.0  # labels arrive days or weeks after the decision
    segment_bytes: int = 8 << 20
    capture_max_bytes: int = 256 << 20
    capture_rate: float = 0.01  # share of answered dies whose full input row is kept
    capture_fails: bool = True  # and every fail
    min_free_bytes: int = 64 << 20
    queue_size: int = 65536  # answered messages waiting for the writer
    queue_bytes: int = 16 << 20  # and their bytes (answers, copied rows and JSON lines)
    flush_interval_s: float = 0.2
    fsync_interval_s: float = 1.0
    enforce_interval_s: float = 30.0  # age cap and old index sidecars checked this often
    tap: str = "auto"  # the serving side's tap: "c" (agent/_tapfast.c), "python", or "auto"
    writer_idle: bool = True  # the writer process at SCHED_IDLE (agent/predlog_child.py)
    index_rows: int = 1 << 16  # die index rows kept in memory (34 bytes each) before they go
    # to a sidecar

    def ring(self, which: str) -> RingConfig:
        size = self.capture_max_bytes if which == "capture" else self.max_bytes
        return RingConfig(max_bytes=size, max_age_s=self.max_age_s,
                          segment_bytes=min(self.segment_bytes, max(size // 4, 4096)),
                          min_free_bytes=self.min_free_bytes)


def _extra(kind: int, raw: bytes) -> Any:
    """A queued answer's extra from its tap message's (agent/predlog_tap.py): the sampled row's
    bytes (BINARY_ONE), (row indices, rows) (BINARY_BATCH; JSON_ROWS: places among the
    batch's decisions), the request line (JSON_ONE), (the line, the draw) (JSON_BATCH)."""
    if kind in (_BINARY_ONE, _JSON_ONE, _JSON_ROW):
        return raw
    (n,) = U32.unpack_from(raw)
    if kind in (_BINARY_BATCH, _JSON_ROWS):
        idx = np.frombuffer(raw, _U4, n, 4)
        return idx, np.frombuffer(raw, _F4, offset=4 + 4 * n).reshape(n, -1)
    line = raw[4:4 + n]
    return line, np.frombuffer(raw, np.bool_, offset=4 + n)


def _yield_gil() -> None:
    time.sleep(0)  # releases the GIL; a waiting serving thread takes it


def read_predictions(directory: Path, cursor: int = 0, max_records: int = 10_000,
                     max_bytes: int = 4 << 20):
    """(batch, [(prediction seq, answer), ...]) of a predictions ring from `cursor`: the
    ring's `Batch` (next cursor, gap) and its blocks decoded, items before `cursor` skipped."""
    from agent.segring import read_ring

    batch = read_ring(directory, cursor, max_records, max_bytes, block_count)
    return batch, list(iter_predictions(batch.records, cursor))


def _index_rows(ring: SegmentRing, cursor: int) -> Iterable[np.ndarray]:
    """The die index's rows (INDEX_DTYPE) of every block from `cursor`."""
    cursor = max(cursor, ring.first_seq())
    while True:
        batch = ring.read(cursor, max_records=1 << 20, max_bytes=16 << 20)
        if not batch.records:
            return
        for seq, payload in batch.records:
            try:
                b = Block(payload)
            except ValueError as e:
                log.warning("prediction log: block %d unreadable: %s", seq, e)
                continue
            rows = _index_of_block(b.rows, seq, b.die_ids())
            yield rows[rows["seq"] >= cursor]
        cursor = batch.next_cursor


def _index_of_block(rows: np.ndarray, first: int, texts: list[str] | None) -> np.ndarray:
    """Index rows of a block's rows (ROW) numbered from `first`; `texts`: every row's die id
    text, needed only when some id is not numeric. Rows without a die id are left out."""
    out = np.empty(len(rows), INDEX_DTYPE)
    out["key"] = rows["die_num"]
    out["seq"] = np.arange(first, first + len(rows), dtype=np.uint64)
    for name in ("time", "model", "decision", "source", "score"):
        out[name] = rows[name]
    text = rows["die_len"] != NUMERIC_ID
    if text.any():
        at = np.flatnonzero(text)
        dies = [texts[i] for i in at.tolist()] if texts is not None else [""] * len(at)
        # one assignment, not one per row (a structured array's item costs ~0.3 us)
        out["key"][at] = np.array([die_key(die) if die else 0 for die in dies], np.uint64)
        if not all(dies):  # rows without a die id are left out
            keep = np.ones(len(rows), bool)
            keep[at[[not die for die in dies]]] = False
            out = out[keep]
    return out


def _prepare(directory: Path) -> None:
    """A log directory from an older format: its rings and index are set aside (renamed,
    with a warning), never misread."""
    marker = directory / "format"
    found = marker.read_text().strip() if marker.exists() else None
    if found == FORMAT:
        return
    olds = [directory / n for n in ("predictions", "capture", "index")]
    if any(p.exists() and any(p.iterdir()) for p in olds):
        stamp = time.strftime("%Y%m%dT%H%M%S")
        for p in olds:
            if p.exists():
                p.rename(p.with_name(f"{p.name}.v{found or 1}-{stamp}"))
        log.warning("prediction log: %s held format %s; set aside as *.v%s-%s", directory,
                    found or 1, found or 1, stamp)
    atomic_write(marker, (FORMAT + "\n").encode())


# ---------------------------------------------------------------------------- proxy metrics

CONFIDENCE_EDGES = (0.1, 0.25, 0.5, 0.75, 0.9, 0.99)


@dataclass
class ModelStats:
    """Per model, what the device knows before any label: decisions by source, the margin
    and confidence distributions of model answers."""

    decisions: np.ndarray = field(default_factory=lambda: np.zeros(4, np.int64))  # d * 2 + src
    margin: np.ndarray = field(default_factory=lambda: np.zeros(len(MARGIN_EDGES) + 1, np.int64))
    confidence: np.ndarray = field(default_factory=lambda: np.zeros(len(CONFIDENCE_EDGES) + 1,
                                                                    np.int64))

    def count(self, rows: np.ndarray, info: ModelInfo | None) -> None:
        """Add a block's rows (ROW) of this model."""
        self.decisions += np.bincount(rows["decision"].astype(np.intp) * 2
                                      + (rows["source"] != _MODEL), minlength=4)[:4]
        if info is None:
            return
        m = rows[(rows["source"] == _MODEL) & ~np.isnan(rows["score"])]
        if len(m):
            margin = (m["score"].astype(np.float64) - info.threshold) / info.confidence_scale
            self.margin += np.bincount(np.searchsorted(_MARGIN, margin, side="left"),
                                       minlength=len(_MARGIN) + 1)
            self.confidence += np.bincount(np.searchsorted(
                _CONFIDENCE, m["confidence"].astype(np.float64), side="left"),
                minlength=len(_CONFIDENCE) + 1)


_MARGIN = np.array(MARGIN_EDGES)
_CONFIDENCE = np.array(CONFIDENCE_EDGES)


# ---------------------------------------------------------------------------- the log


@dataclass
class _Part:
    """Answers of one run of messages, ready for a block: rows (ROW), the fails' tops, each
    text id's bytes, every row's die id text when some is text (else None), and the captured
    rows as (position in `rows`, input row)."""

    rows: np.ndarray
    top_index: np.ndarray
    top_contribution: np.ndarray
    text: list[bytes]
    ids: list[str] | None
    caps: list[tuple[int, np.ndarray]]


class PredictionLog:
    """See the module docstring: the writer. `labels` (agent.labels.LabelDesk) is served by the
    same writer thread when attached. With `runtime`, it also keeps its own `Tap` (`tap` is
    the server's hook) and takes from it every pass: the log in the serving process (tests and
    tools); without, it is fed the tap's byte stream (`feed`) by the writer process
    (agent/predlog_child.py)."""

    def __init__(self, config: PredLogConfig, runtime: Any = None, *, clock=time.time) -> None:
        self.config = config
        self.clock = clock
        d = Path(config.directory)
        d.mkdir(parents=True, exist_ok=True)
        self.dir = d
        _prepare(d)
        self.models = ModelTable(d / "models.json")
        self.predictions = SegmentRing(d / "predictions", config.ring("predictions"),
                                       clock=clock, count=block_count)
        self.capture = SegmentRing(d / "capture", config.ring("capture"), clock=clock)
        self.index = DieIndex(d / "index", config.index_rows)
        for rows in _index_rows(self.predictions, self.index.covered):
            self.index.add(rows)
        self.labels: Any = None
        self.trimmer: Any = None  # agent.memory.Trimmer: told after a pass that freed a lot
        self.tapper = None if runtime is None else Tap(
            runtime, capture_rate=config.capture_rate, capture_fails=config.capture_fails,
            queue_size=config.queue_size, queue_bytes=config.queue_bytes, clock=clock,
            compiled=TAP_MODES[config.tap])
        self.tap = None if self.tapper is None else self.tapper.record
        self._queue: deque = deque()
        self._in_bytes = 0  # bytes ever queued (only `feed` adds)
        self._out_bytes = 0  # bytes ever taken off the queue (only the writer adds)
        self._rest = b""  # a message cut by the end of the last `feed`
        self._tokens: dict[int, int] = {}  # a MODEL message's token -> model index
        self._fails = config.capture_fails
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_sync = self._last_enforce = 0.0
        self._lock = threading.Lock()  # counters read by scrapes
        self._flush_lock = threading.Lock()  # the writer thread, or stop() and tests
        self._feed_lock = threading.Lock()  # `feed`: the queue's one producer at a time
        self.records = {"predictions": 0, "capture": 0}
        self.bytes_written = {"predictions": 0, "capture": 0}
        self.dropped = {"queue_full": 0, "disk_full": 0}
        self.captured = {"sample": 0, "fail": 0}
        self.stats: dict[int, ModelStats] = {}

    # ------------------------------------------------------------------ the tap's stream

    def queued(self) -> int:
        """Answers queued for the next pass."""
        return len(self._queue)

    def queued_bytes(self) -> int:
        return self._in_bytes - self._out_bytes

    def feed(self, data: bytes | bytearray, on_control: Any = None) -> None:
        """Queue the answers (and take the models and labels) of the tap's byte stream
        (agent/predlog_tap.py); a message cut at the end waits for the next call. Control
        messages go to `on_control(kind, request id)`, in stream order. Past `queue_size`
        messages or `queue_bytes` bytes queued, an answer is dropped and counted."""
        with self._feed_lock:
            self._feed(data, on_control)

    def _feed(self, data: bytes | bytearray, on_control: Any) -> None:
        # ~0.75 us a message, half the writer's cost of a binary answer: slices of `data`
        # (bytes, as the pipe gives them) are the answers, one copy each; the counters and
        # the last token's model stay in locals
        data = self._rest + data if self._rest else bytes(data)
        pos, end, head = 0, len(data), MSG.size
        q, unpack, tokens = self._queue, MSG.unpack_from, self._tokens
        append = q.append
        cap, cap_bytes, dropped = self.config.queue_size, self.config.queue_bytes, 0
        in_bytes = self._in_bytes
        last_token, model = None, NO_MODEL
        try:
            while end - pos >= head:
                kind, rows, token, t, alen, elen = unpack(data, pos)
                a0 = pos + head
                stop = a0 + alen + elen
                if stop > end:
                    break
                pos = stop
                if kind <= _JSON_ROWS:
                    size = alen + elen
                    if len(q) >= cap or in_bytes - self._out_bytes >= cap_bytes:
                        dropped += 1
                        continue
                    if token != last_token:
                        last_token, model = token, tokens.get(token, NO_MODEL)
                    a1 = a0 + alen
                    append((t, model, data[a0:a1], _extra(kind, data[a1:stop]) if elen else None,
                            kind, rows, size))
                    in_bytes += size
                elif kind == MODEL:
                    tokens[token] = self.models.index_of(orjson.loads(data[a0:stop]))
                    last_token = None
                elif kind == LABELS:
                    if self.labels is not None:
                        self._offer_labels(orjson.loads(data[a0:stop]))
                elif on_control is not None:
                    on_control(kind, token)
        finally:
            self._in_bytes = in_bytes
        self._rest = data[pos:] if pos < end else b""
        if dropped:
            with self._lock:
                self.dropped["queue_full"] += dropped

    def _offer_labels(self, items: list) -> None:
        by_source: dict[str, list] = {}
        for die, value, t, source in items:
            by_source.setdefault(source, []).append((die, value, t))
        for source, labels in by_source.items():
            self.labels.offer(labels, source)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> PredictionLog:
        self._thread = threading.Thread(target=self._run, name="predlog-writer", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.flush()
        self.predictions.close()
        self.capture.close()
        if self.labels is not None:
            self.labels.ring.close()

    def _run(self) -> None:
        while not self._stop.wait(self.config.flush_interval_s):
            try:
                self.flush()
            except Exception:
                log.exception("prediction log: writer pass failed")

    def flush(self) -> None:
        """One writer pass: take what the tap recorded (in-process), drain the queue, append,
        maybe fsync, join labels, enforce caps."""
        with self._flush_lock:
            if self.tapper is not None:
                for part in self.tapper.take()[0]:
                    self.feed(part)
            self._flush()

    def _flush(self) -> None:
        q = self._queue
        todo = len(q)
        drained = 0
        while todo > 0:
            chunk: list[tuple] = []
            add, pop, rows, n = chunk.append, q.popleft, 0, min(todo, _CHUNK_MESSAGES)
            while n and rows < _CHUNK_ROWS:
                item = pop()
                add(item)
                rows += item[5]
                n -= 1
            todo -= len(chunk)
            try:
                size = sum([item[6] for item in chunk])
                self._out_bytes += size
                drained += size
                self._write(self._parts(chunk))
            except Exception:
                log.exception("prediction log: cannot write %d answers", len(chunk))
            if todo > 0:
                _yield_gil()
        if self.trimmer is not None and drained >= _TRIM_BYTES:
            self.trimmer.note()  # freed queue memory goes back to the OS once serving is idle
        now = self.clock()
        if now - self._last_sync >= self.config.fsync_interval_s:
            self.predictions.sync()
            self.capture.sync()
            self._last_sync = now
        # the size caps are kept at every segment change (agent/segring.py); this is for the
        # age cap and the index's sidecars: every stat and listing hands the GIL over and back
        if now - self._last_enforce >= self.config.enforce_interval_s:
            self.predictions.enforce()
            self.capture.enforce()
            self.index.prune(self.predictions.first_seq(), self.predictions.next_seq)
            self._last_enforce = now
        if self.labels is not None:
            self.labels.tick(self)

    # ------------------------------------------------------------------ writer

    def _parts(self, chunk: list[tuple]) -> list[_Part]:
        """The chunk's answers, in order, as parts: runs of binary answers of one top-k
        width, and runs of JSON messages of up to `_JSON_RUN` answers."""
        kinds = [item[4] for item in chunk]
        if max(kinds) <= _BINARY_BATCH:  # the usual chunk: binary
            widths = {item[2][16:20] for item in chunk}  # answers of one model: one width
            if len(widths) == 1:
                return [self._binary_part(chunk, int.from_bytes(widths.pop(), "little"))]
        parts: list[_Part] = []
        run: list[tuple] = []
        run_key, run_rows = None, 0
        for item in chunk:
            key = (int.from_bytes(item[2][16:20], "little") if item[4] <= _BINARY_BATCH
                   else -1)
            if run and (key != run_key or (key < 0 and run_rows + item[5] > _JSON_RUN)):
                parts.append(self._binary_part(run, run_key) if run_key >= 0
                             else self._json_part(run))
                run, run_rows = [], 0
            run_key = key
            run.append(item)
            run_rows += item[5]
        if run:
            parts.append(self._binary_part(run, run_key) if run_key >= 0
                         else self._json_part(run))
        return parts

    @staticmethod
    def _model_indices(items: list[tuple]) -> list[int] | int:
        """Each message's model index; one int when one model answered them all."""
        first = items[0][1]
        out = [item[1] for item in items]
        return first if out.count(first) == len(out) else out

    def _binary_part(self, items: list[tuple], k: int) -> _Part:
        dt = record_dtype(k)
        size = dt.itemsize
        times, _ps, answers, extras, kinds, counts, _ = zip(*items, strict=True)
        # a RESULT frame ends with its records
        if len(answers) == counts.count(1):
            starts: Any = range(len(answers))
            lengths = set(map(len, answers))
            if len(lengths) == 1:  # one model version: the records at one offset, cut at once
                n = lengths.pop()
                rec = np.frombuffer(b"".join(answers), np.uint8).reshape(-1, n)[
                    :, n - size:].copy().view(dt).reshape(-1)  # (rows,)
            else:
                rec = np.frombuffer(b"".join([a[-size:] for a in answers]), dt)
        else:
            rec = np.frombuffer(b"".join([a[-n * size:] for a, n in zip(answers, counts,
                                                                         strict=True)]), dt)
            starts = np.cumsum((0, *counts[:-1])).tolist()
        caps: list[tuple[int, Any]] = []
        for i in [i for i, e in enumerate(extras) if e is not None]:
            extra, pos = extras[i], starts[i]
            if kinds[i] == _BINARY_ONE:
                caps.append((pos, extra))  # the row's bytes, float32 as sent
            else:  # (indices, rows): each row's bytes, sliced from one copy
                blob, width = np.ascontiguousarray(extra[1], _F4).tobytes(), 4 * extra[1].shape[1]
                caps += [(pos + j, blob[r * width:(r + 1) * width])
                         for r, j in enumerate(extra[0].tolist())]
        out = np.empty(len(rec), ROW)
        models = self._model_indices(items)
        one_each = len(rec) == len(answers)
        out["time"] = times if one_each else np.repeat(times, counts)
        out["model"] = models if one_each or isinstance(models, int) else np.repeat(models,
                                                                                  counts)
        out["die_num"] = rec["die_id"]
        for name in ("score", "threshold", "confidence", "decision", "source"):
            out[name] = rec[name]
        out["die_len"] = NUMERIC_ID
        keep = rec["decision"] != _ERROR
        if not keep.all():  # refused rows are not decisions
            at = np.cumsum(keep) - 1
            caps = [(int(at[i]), r) for i, r in caps if keep[i]]
            out, rec = out[keep], rec[keep]
        fail = rec["decision"] == _FAIL
        return _Part(out, rec["top_index"][fail], rec["top_contribution"][fail], [], None, caps)

    def _json_part(self, items: list[tuple]) -> _Part:
        answers = [it[2] for it in items]
        try:
            docs = orjson.loads(b"[" + b",".join(answers) + b"]")
        except orjson.JSONDecodeError:  # one the json module takes (see parse_json_line)
            docs = [_loads(a) for a in answers]
        indices = self._model_indices(items)
        if isinstance(indices, int):
            indices = [indices] * len(items)
        try:  # the usual run: single answers, each a whole answer object (every field in it)
            columns = list(zip(*map(_ANSWER_FIELDS, docs), strict=True))
        except (TypeError, KeyError):  # a batch, or an answer without a decision
            columns = None
        if columns and not any(item[4] in _JSON_BATCHES for item in items):
            sampled = [(i, item[3], -1 if item[4] == _JSON_ROW else None, 0)
                       for i, item in enumerate(items) if item[3] is not None]
            return self._json_rows(docs, columns, [item[0] for item in items], indices,
                                   sampled)
        # the answers (dicts with a decision), flat, with their message's time and model; the
        # sampled ones as (place in `flat`, request line, place in a batch or None, and the
        # batch's size when each of its requests was answered with a decision, else 0; the
        # place -1: not a line but the row itself, float32, JSON_ROW)
        flat: list[dict] = []
        times: list[float] = []
        models: list[int] = []
        sampled: list[tuple[int, bytes, int | None, int]] = []
        for item, doc, model in zip(items, docs, indices, strict=True):
            if item[4] not in _JSON_BATCHES:
                if type(doc) is dict and "decision" in doc:
                    if item[3] is not None:  # the row (JSON_ROW) or the request line
                        sampled.append((len(flat), item[3], -1 if item[4] == _JSON_ROW
                                        else None, 0))
                    flat.append(doc)
                    times.append(item[0])
                    models.append(model)
            elif isinstance(doc, list):
                self._json_batch_answers(item, doc, model, flat, times, models, sampled)
        columns = [[a.get(f) for a in flat] for f in _FIELD_NAMES] if flat else [()] * 6
        return self._json_rows(flat, columns, times, models, sampled)

    def _json_rows(self, flat: list[dict], columns: list, times: list[float],
                   models: list[int], sampled: list[tuple[int, bytes, int | None, int]]
                   ) -> _Part:
        """The part of JSON answers `flat` (dicts with a decision), their `_FIELD_NAMES`
        `columns` (None where absent), each one's time and model, and the sampled ones (see
        `_json_part`)."""
        decisions, dies, scores, thresholds, confidences, sources = columns
        fail = [d == "fail" for d in decisions]
        if all(type(d) is int and 0 <= d < _U64 for d in dies):  # no text id
            nums, lens, text, ids = dies, NUMERIC_ID, [], None
        else:
            nums, lens, text, ids = _json_ids(dies)
        out = np.empty(len(flat), ROW)
        out["time"] = times
        out["die_num"] = nums
        out["model"] = models
        out["score"] = scores  # None: NaN
        out["threshold"] = [t or 0.0 for t in thresholds] if None in thresholds else thresholds
        out["confidence"] = ([c or 0.0 for c in confidences] if None in confidences
                             else confidences)
        out["die_len"] = lens
        out["decision"] = fail  # pass 0, fail 1
        out["source"] = [_MODEL if s == "model" else _FALLBACK for s in sources]
        tops = [a.get("top") or [] for a, f in zip(flat, fail, strict=True) if f]
        k = max(map(len, tops), default=0)
        top_i = np.full((len(tops), k), -1, np.int32)
        top_c = np.zeros((len(tops), k), np.float32)
        for r, top in enumerate(tops):
            top_i[r, :len(top)] = [e["index"] for e in top]
            top_c[r, :len(top)] = [e["contribution"] for e in top]
        caps: list[tuple[int, np.ndarray]] = []
        rows_of: dict[int, Any] = {}  # a batch line's sampled rows, read once per line
        for pos, line, i, count in sampled:
            if i == -1:  # the dispatcher's parsed row, float32 (agent/predlog_tap.py)
                row = np.frombuffer(line, _F4)
            elif i is None:
                row = _params(_request(line))
            else:
                key = id(line)
                if key not in rows_of:
                    rows_of[key] = _batch_rows(line, count, [
                        w for _, ln, w, _ in sampled if ln is line and w is not None])
                row = rows_of[key].get(i)
            if row is not None:
                caps.append((pos, row))
        return _Part(out, top_i, top_c, text, ids, caps)

    def _json_batch_answers(self, item: tuple, doc: list, model: int, flat: list,
                            times: list, models: list, sampled: list) -> None:
        """A JSON batch's answers into the flat lists: its draw (the tap's, one per answer
        with a decision, in order) and, with `capture_fails`, its fails are sampled; or, for
        JSON_ROWS, the rows the tap took (their places among the decisions)."""
        if item[4] == _JSON_ROWS:
            self._json_rows_answers(item, doc, model, flat, times, models, sampled)
            return
        line, draw = item[3] if item[3] is not None else (None, None)
        t = item[0]
        j = 0  # the answer's place among the batch's decisions (the tap's draw)
        mine = []
        for i, a in enumerate(doc):
            if not isinstance(a, dict) or "decision" not in a:
                continue
            if line is not None and ((j < len(draw) and bool(draw[j])) or (
                    self._fails and a["decision"] == "fail")):
                mine.append((len(flat), line, i))
            j += 1
            flat.append(a)
            times.append(t)
            models.append(model)
        whole = len(doc) if j == len(doc) else 0
        sampled += [(pos, ln, i, whole) for pos, ln, i in mine]

    @staticmethod
    def _json_rows_answers(item: tuple, doc: list, model: int, flat: list, times: list,
                           models: list, sampled: list) -> None:
        """A JSON_ROWS batch's answers into the flat lists, its sampled rows (float32, as
        the dispatcher parsed them) with them."""
        base = len(flat)
        answered = [a for a in doc if isinstance(a, dict) and "decision" in a]
        flat += answered
        times += [item[0]] * len(answered)
        models += [model] * len(answered)
        if item[3] is not None:
            idx, rows = item[3]
            sampled += [(base + j, row.tobytes(), -1, 0) for j, row in zip(
                idx.tolist(), rows, strict=True) if j < len(answered)]

    def _write(self, parts: list[_Part]) -> None:
        if not parts:
            return
        if len(parts) == 1:
            part = parts[0]
            rows, top_i, top_c, caps = part.rows, part.top_index, part.top_contribution, part.caps
        else:
            rows, top_i, top_c, caps = _join_parts(parts)
        if not len(rows):
            return
        text = b"".join(t for p in parts for t in p.text)
        ids = None
        if any(p.ids is not None for p in parts):
            ids = [i for p in parts for i in (p.ids if p.ids is not None else map(
                str, p.rows["die_num"].tolist()))]
        payload = encode_block(rows, top_i, top_c, text)
        try:
            first = self.predictions.append([payload], [len(rows)])
        except RingFull as e:
            with self._lock:
                self.dropped["disk_full"] += len(rows)
            log.debug("prediction log: %s", e)
            return
        self.index.add(_index_of_block(rows, first, ids))
        self._count(rows)
        cap_payloads, reasons = [], []
        if caps:
            at = [pos for pos, _ in caps]
            for pos, (_, row), r in zip(at, caps, rows[at].tolist(), strict=True):
                t, num, model, score, _thr, _conf, _len, decision, _src = r
                reason = CAPTURE_FAIL if decision == _FAIL else CAPTURE_SAMPLE
                reasons.append(reason)
                cap_payloads.append(encode_capture(
                    t, model, first + pos, ids[pos] if ids is not None else str(num), decision,
                    reason, score, row))
        cap_ok = True
        if cap_payloads:
            try:
                self.capture.append(cap_payloads)
            except RingFull as e:
                cap_ok = False
                log.debug("capture: %s", e)
        with self._lock:
            self.records["predictions"] += len(rows)
            self.bytes_written["predictions"] += len(payload)
            if cap_ok:
                self.records["capture"] += len(cap_payloads)
                self.bytes_written["capture"] += sum(map(len, cap_payloads))
                fails = reasons.count(CAPTURE_FAIL)
                self.captured["fail"] += fails
                self.captured["sample"] += len(reasons) - fails
            else:
                self.dropped["disk_full"] += len(cap_payloads)

    def _count(self, rows: np.ndarray) -> None:
        """The proxy metrics: per model, decisions, margins and confidences."""
        models = rows["model"]
        groups = ([int(models[0])] if models.min() == models.max()
                  else np.unique(models).tolist())
        with self._lock:
            for m in groups:
                stats = self.stats.get(m)
                if stats is None:
                    stats = self.stats[m] = ModelStats()
                stats.count(rows if len(groups) == 1 else rows[models == m], self.models.get(m))

    # ------------------------------------------------------------------ metrics

    def snapshot(self, models: bool = True) -> dict[str, Any]:
        """What the metrics show, as JSON-able values (the writer process sends it to the
        agent for each scrape): counters, ring sizes, per-model proxy counts, the model table
        and the label desk's counts."""
        with self._lock:
            snap: dict[str, Any] = {
                "records": dict(self.records), "bytes_written": dict(self.bytes_written),
                "dropped": dict(self.dropped), "captured": dict(self.captured),
                "stats": [[k, v.decisions.tolist(), v.margin.tolist(), v.confidence.tolist()]
                          for k, v in self.stats.items()]}
        if self.tapper is not None:
            snap["dropped"]["queue_full"] += self.tapper.dropped
        snap["disk"] = {"predictions": self.predictions.disk_bytes(),
                        "capture": self.capture.disk_bytes()}
        # without `models`, their count: the reader has models.json (written before any
        # record names a model) and reads it again when the count grows
        snap["models"] = ([m.to_json() for m in self.models.models] if models
                          else len(self.models.models))
        snap["labels"] = None if self.labels is None else self.labels.snapshot()
        return snap

    def collect(self) -> Iterable[Any]:
        from agent.predlog_metrics import snapshot_families

        yield from snapshot_families(self.snapshot())


def _join_parts(parts: list[_Part]):
    """(rows, top indices, top contributions, captures) of several parts, in order (the tops
    padded to the widest)."""
    k = max(p.top_index.shape[1] for p in parts)
    fails = sum(len(p.top_index) for p in parts)
    top_i = np.full((fails, k), -1, np.int32)
    top_c = np.zeros((fails, k), np.float32)
    caps, at, base = [], 0, 0
    for p in parts:
        n, w = p.top_index.shape
        top_i[at:at + n, :w] = p.top_index
        top_c[at:at + n, :w] = p.top_contribution
        at += n
        caps += [(base + pos, row) for pos, row in p.caps]
        base += len(p.rows)
    return np.concatenate([p.rows for p in parts]), top_i, top_c, caps


def _json_ids(dies: list) -> tuple[list[int], list[int], list[bytes], list[str]]:
    """(die_num, die_len, text ids' bytes, every die's id text) of JSON die ids: an integer
    0..2**64-1 is numeric, anything else (a string, None, another value) text."""
    if all(type(d) is str for d in dies):  # the usual text ids: the same, list by list
        text = [d.encode("utf-8") for d in dies]  # id_bytes, inline
        lens = list(map(len, text))
        if max(lens, default=0) <= MAX_ID_BYTES:  # none cut: each id its text as it came
            return [0] * len(dies), lens, text, list(dies)
        text = [r[:MAX_ID_BYTES] for r in text]
        ids = [d if len(d) <= 63 else r.decode("utf-8", "replace")
               for d, r in zip(dies, text, strict=True)]
        return [0] * len(dies), [len(r) for r in text], text, ids
    nums, lens, text, ids = [], [], [], []
    for d in dies:
        if type(d) is int and 0 <= d < _U64:
            nums.append(d)
            lens.append(NUMERIC_ID)
            ids.append(str(d))
        else:
            die = die_text(d)
            raw = id_bytes(die)
            nums.append(0)
            lens.append(len(raw))
            text.append(raw)
            ids.append(raw.decode("utf-8", "replace") if len(die) > 63 else die)
    return nums, lens, text, ids


def _batch_rows(line: bytes, count: int, wanted: list[int]) -> dict[int, np.ndarray | None]:
    """Requests `wanted`'s input rows of a JSON batch line (`count`: its size when each of its
    requests was answered with a decision, else 0), by place in the batch. A sampled row or
    two of a 64-row batch would otherwise cost a parse of the whole line (~350 kB, as long as
    answering it took): when sound, only their `params` lists are read. Sound when each request
    was answered (so each has one top-level `params` key whose value is a list of numbers and
    nulls: its text ends at the first `]`), the text has no backslash (no escaped quote, so a
    `"params"` in it is a key or a whole string) and holds `"params"` exactly `count` times (so
    none is a value or a nested key, and the k-th is request k's); each list read must also be
    number text only. Otherwise the whole line is parsed, as the dispatcher did."""
    if count and b"\\" not in line and line.count(b'"params"') == count:
        out: dict[int, np.ndarray | None] = {}
        at, want = 0, set(wanted)
        for k in range(max(want) + 1):
            at = line.find(b'"params"', at) + 8
            if k in want:
                start = line.find(b"[", at)
                text = line[start:line.find(b"]", start) + 1]
                if text[1:-1].translate(None, _NUMBER_TEXT):
                    break  # not number text after all: the long way
                try:
                    out[k] = _params({"params": orjson.loads(text)})
                except orjson.JSONDecodeError:  # a number beyond double range: the long way
                    break
        else:
            return out
    requests = _request(line)
    return {i: _params(requests[i]) if isinstance(requests, list) and i < len(requests)
            else None for i in wanted}


def _loads(answer: bytes) -> Any:
    try:
        return json.loads(answer)
    except ValueError:
        return None


def _request(line: bytes) -> Any:
    try:
        return parse_json_line(line)
    except (ProtocolError, ValueError):
        return None


def _params(req: Any) -> np.ndarray | None:
    """A JSON request's input row (None = not measured -> NaN), None when it has none."""
    if not isinstance(req, dict) or not isinstance(req.get("params"), list):
        return None
    params = req["params"]
    try:
        return np.array(params, dtype=_F4)  # C speed when every value was measured
    except (TypeError, ValueError, OverflowError):
        pass
    try:
        return np.array([np.nan if v is None else v for v in params], dtype=_F4)
    except (TypeError, ValueError, OverflowError):
        return None


class PredLogCollector:
    """Registers a `PredictionLog` (and its label desk) in the agent's metrics registry."""

    def __init__(self, plog: PredictionLog) -> None:
        self.plog = plog

    def describe(self) -> list:
        return []

    def collect(self) -> Iterable[Any]:
        yield from self.plog.collect()


def wait_flushed(plog: PredictionLog, server: Any = None, timeout: float = 60.0) -> bool:
    """Tests and tools (the agent never waits): write everything answered so far. The server
    taps each answer before it answers the connection's next message, so after a round trip on a
    connection every earlier answer of it is queued; with `server` (an AgentServer), first wait
    until it has no open connection left, which covers every connection's last answer."""
    if server is not None:
        deadline = time.monotonic() + timeout
        while server._conns:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.005)
    plog.flush()
    return True


def plug_in(server: Any, plog: PredictionLog) -> None:
    """Connect a log (and its label desk, if any) to an AgentServer: its tap after each answer,
    the `label` op, its metrics."""
    server.tap = plog.tap
    if plog.tapper is not None:
        plog.tapper.dispatch = server.dispatch  # JSON rows as it parsed them
        server.dispatch.note_batches = True
    plog.trimmer = getattr(server, "trimmer", None)
    server.dispatch.labels = plog.labels
    server.metrics.registry.register(PredLogCollector(plog))


def attach(agent: Any) -> Any:
    """Give an assembled agent (agent/app.py) its prediction log - the tap, and the writer
    process that writes the log, the capture and the labels (agent/predlog_proc.py) - and,
    with `data_addr`, the data feed; None when the log is off or there is nowhere to keep it."""
    from agent.labels import LabelConfig
    from agent.predlog_proc import WriterProcess

    cfg = agent.config
    directory = cfg.predlog_dir or (cfg.store.parent / "predlog" if cfg.store else None)
    if cfg.predlog == "off" or directory is None:
        return None
    plog = WriterProcess(PredLogConfig(
        directory=Path(directory), max_bytes=cfg.predlog_max_mb << 20,
        max_age_s=cfg.predlog_max_age_h * 3600.0, capture_max_bytes=cfg.capture_max_mb << 20,
        capture_rate=cfg.capture_rate, capture_fails=bool(cfg.capture_fails),
        queue_size=cfg.predlog_queue, fsync_interval_s=cfg.predlog_fsync_s,
        tap=cfg.predlog_tap, writer_idle=bool(cfg.predlog_writer_idle)), agent.runtime,
        LabelConfig(drop_dir=cfg.labels_dir), log_level=cfg.log_level)
    plug_in(agent.server, plog)
    agent.services.insert(0, plog)
    if cfg.data_addr:
        from agent.datafeed import DataFeed

        agent.services.append(DataFeed.from_env(plog, cfg.data_addr))
    return plog
