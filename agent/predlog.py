"""The prediction log: every answer the agent gave, on disk, off the hot path.

    log = PredictionLog(PredLogConfig(directory=...), runtime)
    server.tap = log.tap            # agent/server.py calls it after each answer is sent
    log.start(); ...; log.stop()

What is recorded, per answered die (refused rows are not decisions and are not logged): time,
die id, the model (an index into `models.json`: bundle digest, ONNX digest, name, version,
sequence), decision, source (model / fallback rules), score, threshold, confidence and the top
contributions. A configurable sample of the full input rows goes to a second ring, the capture
(`capture_rate`, default 1%, plus every fail). Formats: `encode_prediction`/`decode_prediction`,
`encode_capture`/`decode_capture` below; rings: agent/segring.py; retention, fsync policy and
what a crash loses: docs/operations.md, "Prediction log, capture and labels".

Never on the hot path:
- `tap(buf, start, end, answer)` runs in the serving loop *after* the answer was sent.
  It keeps a reference to the answer bytes (immutable), copies the input row only when the row
  is sampled (a fail, or the random draw), and appends one tuple to a deque: about a microsecond.
- The queue is bounded (`queue_size` messages): when it is full the message is dropped and
  counted (`edgefleet_predlog_dropped_total{reason="queue_full"}`), never waited on.
- One writer thread wakes every `flush_interval_s`, decodes the queued answers, appends the
  records, fsyncs every `fsync_interval_s`, joins pending labels (agent/labels.py) and keeps
  the per-model proxy metrics. A full disk drops and counts (`reason="disk_full"`).

Crash: `kill -9` loses the messages still in the queue (normally the last `flush_interval_s`
of answers; the writer runs at idle priority, so under a CPU kept busy by serving it lags, and
the bound is `queue_size`); a power cut also loses what was written since the last fsync (at
most `fsync_interval_s`). A torn last record is cut off at the next start (agent/segring.py).
"""

from __future__ import annotations

import bisect
import functools
import json
import logging
import random
import struct
import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from agent.dieindex import DieIndex, die_key, die_text
from agent.fsio import atomic_write
from agent.protocol import (
    DECISION_LABELS,
    HEADER,
    MAGIC_BYTE,
    RESULT_BLOCK,
    Decision,
    FrameType,
    ProtocolError,
    Source,
    parse_json_line,
    record_dtype,
    row_struct,
)
from agent.segring import RingConfig, RingFull, SegmentRing

log = logging.getLogger("edgefleet.agent")

# The writer hands the GIL to the serving threads every this many answers (about 50 us of
# work): a request that arrives while the writer runs waits at most that long, not a whole
# switch interval.
_YIELD_EVERY = 8
# What a queued message is (the writer decodes each kind its own way)
_BINARY_ONE, _BINARY_BATCH, _JSON_ONE, _JSON_BATCH = 1, 2, 3, 4
NO_MODEL = 0xFFFFFFFF  # model index when nothing but a standalone rules file answered
_F4 = np.dtype("<f4")
_FAIL_TEXT = b'"decision":"fail"'
_DECISION_TEXT = b'"decision"'
_RESULT = int(FrameType.RESULT)
_FAIL = int(Decision.FAIL)
_RESULT_OFF = HEADER.size + RESULT_BLOCK.size  # 48: the model version starts here

__all__ = ["PredLogConfig", "PredictionLog", "decode_capture", "decode_prediction",
           "die_key", "encode_capture", "encode_prediction"]


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
    flush_interval_s: float = 0.2
    fsync_interval_s: float = 1.0
    index_rows: int = 1 << 18  # die index rows kept in memory before they go to a sidecar

    def ring(self, which: str) -> RingConfig:
        size = self.capture_max_bytes if which == "capture" else self.max_bytes
        return RingConfig(max_bytes=size, max_age_s=self.max_age_s,
                          segment_bytes=min(self.segment_bytes, max(size // 4, 4096)),
                          min_free_bytes=self.min_free_bytes)


_row_struct = functools.lru_cache(maxsize=8)(row_struct)


def _yield_gil() -> None:
    time.sleep(0)  # releases the GIL; a waiting serving thread takes it


# ---------------------------------------------------------------------------- record formats

# time, model index, decision, source, n top, die id length, score, threshold, confidence;
# then the die id (UTF-8), n top int32 indices, n top float32 contributions
_PRED = struct.Struct("<dIBBBBfff")
# time, model index, prediction seq, decision, reason (1 sample, 2 fail), score, die id length,
# n values; then the die id, then n float32 values (NaN = not measured)
_CAP = struct.Struct("<dIQBBfHI")
CAPTURE_SAMPLE, CAPTURE_FAIL = 1, 2


def _index_rows(ring: SegmentRing, cursor: int):
    """(die id, seq, time, model, decision, source, score) of every record from `cursor`."""
    cursor = max(cursor, ring.first_seq())
    while True:
        batch = ring.read(cursor, max_records=50_000, max_bytes=16 << 20)
        if not batch.records:
            return
        for seq, payload in batch.records:
            t, model, decision, source, _n, idlen, score, _, _ = _PRED.unpack_from(payload)
            die = payload[_PRED.size:_PRED.size + idlen].decode("utf-8", "replace")
            yield die, seq, t, model, decision, source, score
        cursor = batch.next_cursor


def _id_bytes(text: str) -> bytes:
    return text.encode("utf-8")[:255]


def encode_prediction(t: float, model: int, die_id: str, decision: int, source: int,
                      score: float, threshold: float, confidence: float,
                      top_index: Iterable[int] = (), top_contribution: Iterable[float] = ()
                      ) -> bytes:
    raw = _id_bytes(die_id)
    if decision != _FAIL:  # a pass has no top contributions: the common, short record
        return _PRED.pack(t, model, decision, source, 0, len(raw), score, threshold,
                          confidence) + raw
    idx = [int(i) for i in top_index if i >= 0]
    con = list(top_contribution)[:len(idx)]
    return (_PRED.pack(t, model, decision, source, len(idx), len(raw), score, threshold,
                       confidence) + raw + struct.pack(f"<{len(idx)}i{len(idx)}f", *idx, *con))


def decode_prediction(payload: bytes) -> dict[str, Any]:
    t, model, decision, source, ntop, idlen, score, thr, conf = _PRED.unpack_from(payload)
    pos = _PRED.size
    die = payload[pos:pos + idlen].decode("utf-8", "replace")
    vals = struct.unpack_from(f"<{ntop}i{ntop}f", payload, pos + idlen)
    return {"time": t, "model": model, "die_id": die, "decision": DECISION_LABELS[decision],
            "source": "model" if source == Source.MODEL else "fallback", "score": score,
            "threshold": thr, "confidence": conf,
            "top": [{"index": i, "contribution": c} for i, c in zip(vals[:ntop], vals[ntop:],
                                                                     strict=True)]}


def encode_capture(t: float, model: int, pred_seq: int, die_id: str, decision: int,
                   reason: int, score: float, row: np.ndarray) -> bytes:
    raw = _id_bytes(die_id)
    values = np.ascontiguousarray(row, dtype=_F4)
    return (_CAP.pack(t, model, pred_seq, decision, reason, score, len(raw), values.size) + raw
            + values.tobytes())


def decode_capture(payload: bytes) -> tuple[dict[str, Any], np.ndarray]:
    t, model, seq, decision, reason, score, idlen, n = _CAP.unpack_from(payload)
    pos = _CAP.size
    die = payload[pos:pos + idlen].decode("utf-8", "replace")
    row = np.frombuffer(payload, _F4, n, pos + idlen).copy()
    return ({"time": t, "model": model, "prediction_seq": seq, "die_id": die,
             "decision": DECISION_LABELS[decision],
             "reason": "fail" if reason == CAPTURE_FAIL else "sample", "score": score}, row)


# ---------------------------------------------------------------------------- model table


@dataclass
class ModelInfo:
    index: int
    digest: str  # the bundle's sha256, as devices report it and rollouts name it
    model_sha256: str
    name: str
    version: str
    sequence: int
    threshold: float
    confidence_scale: float
    reference: dict[str, Any] | None = None  # score-margin reference of the build, if shipped
    feature_names: list[str] | None = None  # for a dataset built from captured rows

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


class ModelTable:
    """`models.json` in the log directory: index -> model. A model gets its index (written
    durably) before the first record that names it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.models: list[ModelInfo] = []
        self._by_engine: dict[int, int] = {}
        if path.exists():
            for m in json.loads(path.read_text()):
                self.models.append(ModelInfo(**m))

    def index_of(self, p: Any) -> int:
        """The index of predictor `p`'s model (adds it on first sight); NO_MODEL without one."""
        m = p.manifest
        if m is None:
            return NO_MODEL
        key = id(m)
        idx = self._by_engine.get(key)
        if idx is not None:
            return idx
        digest = _bundle_digest(p) or m.model_digest
        for info in self.models:
            if info.digest == digest:
                self._by_engine[key] = info.index
                return info.index
        info = ModelInfo(len(self.models), digest, m.model_digest, m.name, m.version,
                         m.sequence, float(m.threshold), float(m.confidence_scale),
                         _score_reference(m), list(m.input.feature_names or ()) or None)
        self.models.append(info)
        atomic_write(self.path, json.dumps([i.to_json() for i in self.models]).encode())
        self._by_engine[key] = info.index
        return info.index

    def get(self, index: int) -> ModelInfo | None:
        return self.models[index] if 0 <= index < len(self.models) else None


def _bundle_digest(p: Any) -> str | None:
    """The bundle digest of the loaded model (from its unpacked directory), None if unknown."""
    engine = p.engine
    path = getattr(engine, "model_path", None)
    if path is None:
        return None
    try:
        from agent.link import bundle_digest

        return bundle_digest(Path(path).parent)
    except (OSError, ValueError, KeyError) as e:
        log.warning("prediction log: no bundle digest for %s: %s", path, e)
        return None


def _score_reference(m: Any) -> dict[str, Any] | None:
    """`evaluation.score_margin_reference` ({"edges": [...], "proportions": [...]}), when the
    build ships the validation passes' margin distribution; else None."""
    ref = (m.evaluation or {}).get("score_margin_reference")
    if isinstance(ref, dict) and isinstance(ref.get("edges"), list) and isinstance(
            ref.get("proportions"), list) and len(ref["proportions"]) == len(ref["edges"]) + 1:
        return ref
    return None


# ---------------------------------------------------------------------------- proxy metrics

# margin = (score - threshold) / confidence_scale, the same buckets as shadow scoring
MARGIN_EDGES = (-8.0, -4.0, -2.0, -1.0, -0.5, -0.25, 0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
CONFIDENCE_EDGES = (0.1, 0.25, 0.5, 0.75, 0.9, 0.99)


@dataclass
class ModelStats:
    """Per model, what the device knows before any label: decisions by source, the margin
    and confidence distributions of model answers."""

    decisions: list[int] = field(default_factory=lambda: [0] * 4)  # decision * 2 + source
    margin: list[int] = field(default_factory=lambda: [0] * (len(MARGIN_EDGES) + 1))
    confidence: list[int] = field(default_factory=lambda: [0] * (len(CONFIDENCE_EDGES) + 1))


def psi(counts: Iterable[int], proportions: Iterable[float], floor: float = 1e-4) -> float:
    """Population stability index of observed bucket counts against reference proportions."""
    counts = np.asarray(list(counts), dtype=np.float64)
    p = np.maximum(np.asarray(list(proportions), dtype=np.float64), floor)
    total = counts.sum()
    if not total:
        return 0.0
    q = np.maximum(counts / total, floor)
    return float(((q - p) * np.log(q / p)).sum())


# ---------------------------------------------------------------------------- the log


class PredictionLog:
    """See the module docstring. `labels` (agent.labels.LabelDesk) is served by the same
    writer thread when attached."""

    def __init__(self, config: PredLogConfig, runtime: Any, *, clock=time.time) -> None:
        self.config = config
        self.runtime = runtime
        self.clock = clock
        d = Path(config.directory)
        d.mkdir(parents=True, exist_ok=True)
        self.dir = d
        self.models = ModelTable(d / "models.json")
        self.predictions = SegmentRing(d / "predictions", config.ring("predictions"), clock=clock)
        self.capture = SegmentRing(d / "capture", config.ring("capture"), clock=clock)
        self.index = DieIndex(d / "index", config.index_rows)
        self.index.load(_index_rows(self.predictions, self.index.covered))
        self.labels: Any = None
        self._queue: deque = deque()
        self._cap = config.queue_size
        self._rate = config.capture_rate
        self._fails = config.capture_fails
        self._random = random.random
        self._rng = np.random.default_rng()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_sync = 0.0
        self._lock = threading.Lock()  # counters read by scrapes
        self._flush_lock = threading.Lock()  # the writer thread, or stop() and tests
        self.records = {"predictions": 0, "capture": 0}
        self.bytes_written = {"predictions": 0, "capture": 0}
        self.dropped = {"queue_full": 0, "disk_full": 0}
        self.dropped_queue = 0  # incremented by taps without the lock (GIL-atomic enough)
        self.captured = {"sample": 0, "fail": 0}
        self.stats: dict[int, ModelStats] = {}

    # ------------------------------------------------------------------ hot path

    def tap(self, buf: bytearray | bytes, start: int, end: int, answer: bytes) -> None:
        """Called after `answer` was sent for the message `buf[start:end]` (a JSON line without
        its newline, or a whole binary frame). Never raises, never blocks."""
        q = self._queue
        if len(q) >= self._cap:
            self.dropped_queue += 1
            return
        try:
            if answer[0] == MAGIC_BYTE:
                if answer[5] != _RESULT:
                    return
                rows = int.from_bytes(answer[12:16], "little")
                if rows == 1:
                    vlen = answer[40] | answer[41] << 8
                    fail = answer[_RESULT_OFF + vlen + (-vlen % 8) + 8] == _FAIL
                    row = None
                    if (fail and self._fails) or self._random() < self._rate:
                        n = int.from_bytes(buf[start + 16:start + 20], "little")
                        row = bytes(buf[start + 32:start + 32 + 4 * n])
                    q.append((self.clock(), self.runtime.active(), answer, row, _BINARY_ONE))
                else:
                    q.append((self.clock(), self.runtime.active(), answer,
                              self._sample_frame(buf, start, answer, rows), _BINARY_BATCH))
            elif _DECISION_TEXT in answer:
                if answer[0] == 0x5B:  # "[": a batch; rows are sampled by the writer
                    q.append((self.clock(), self.runtime.active(), answer,
                              bytes(buf[start:end]), _JSON_BATCH))
                else:
                    sampled = ((self._fails and _FAIL_TEXT in answer)
                               or self._random() < self._rate)
                    q.append((self.clock(), self.runtime.active(), answer,
                              bytes(buf[start:end]) if sampled else None, _JSON_ONE))
        except Exception:  # a tap must never break serving
            log.exception("prediction log: tap failed")

    def _sample_frame(self, buf, start: int, answer: bytes, rows: int):
        """(indices, rows) of a batch frame's sampled rows: every fail, and the random draw."""
        vlen = answer[40] | answer[41] << 8
        k = int.from_bytes(answer[16:20], "little")
        rec = np.frombuffer(answer, record_dtype(k), rows, _RESULT_OFF + vlen + (-vlen % 8))
        want = self._rng.random(rows) < self._rate
        if self._fails:
            want |= rec["decision"] == _FAIL
        idx = np.flatnonzero(want)
        if not len(idx):
            return None
        n = int.from_bytes(buf[start + 16:start + 20], "little")
        x = np.frombuffer(buf, _F4, rows * n, start + 24 + 8 * rows).reshape(rows, n)
        return idx, x[idx]

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
        # SCHED_IDLE (else nice +10), as the shadow scorer: a serving thread that wakes up
        # preempts the writer at once; the writer only takes CPU nobody else wants
        from agent.shadow import _lower_priority

        _lower_priority(10)
        while not self._stop.wait(self.config.flush_interval_s):
            try:
                self.flush()
            except Exception:
                log.exception("prediction log: writer pass failed")

    def flush(self) -> None:
        """One writer pass: drain the queue, append, maybe fsync, join labels, enforce caps."""
        with self._flush_lock:
            self._flush()

    def _flush(self) -> None:
        preds: list[tuple] = []  # (payload, die id, time, model, decision, source, score)
        caps: list[tuple[int, tuple]] = []  # (position in preds, capture fields)
        q = self._queue
        for i in range(len(q)):
            try:
                item = q.popleft()
            except IndexError:
                break
            try:
                self._decode(item, preds, caps)
            except Exception:
                log.exception("prediction log: cannot decode an answer")
            if len(preds) >= 4096:
                self._write(preds, caps)
                preds, caps = [], []
            if i % _YIELD_EVERY == _YIELD_EVERY - 1:
                _yield_gil()
        self._write(preds, caps)
        now = self.clock()
        if now - self._last_sync >= self.config.fsync_interval_s:
            self.predictions.sync()
            self.capture.sync()
            self.predictions.enforce()
            self.capture.enforce()
            self.index.prune(self.predictions.first_seq(), self.predictions.next_seq)
            self._last_sync = now
        if self.labels is not None:
            self.labels.tick(self)

    # ------------------------------------------------------------------ writer

    def _decode(self, item: tuple, preds: list, caps: list) -> None:
        t, p, answer, extra, kind = item
        model = self.models.index_of(p)
        if kind == _BINARY_ONE:  # the record as a tuple, no numpy
            vlen = answer[40] | answer[41] << 8
            k = int.from_bytes(answer[16:20], "little")
            r = _row_struct(k).unpack_from(answer, _RESULT_OFF + vlen + (-vlen % 8))
            if r[1] != Decision.ERROR:
                self._add(preds, caps, t, model, str(r[0]), r[1], r[2], r[6], r[7], r[8],
                          r[9:9 + k], r[9 + k:], None if extra is None else
                          np.frombuffer(extra, _F4))
        elif kind == _BINARY_BATCH:
            vlen = answer[40] | answer[41] << 8
            rows, k = int.from_bytes(answer[12:16], "little"), int.from_bytes(answer[16:20],
                                                                              "little")
            rec = np.frombuffer(answer, record_dtype(k), rows, _RESULT_OFF + vlen + (-vlen % 8))
            sampled: dict[int, np.ndarray] = {}
            if extra is not None:
                sampled = dict(zip(extra[0].tolist(), extra[1], strict=True))
            for i, r in enumerate(rec.tolist()):
                if r[1] == Decision.ERROR:
                    continue
                self._add(preds, caps, t, model, str(r[0]), r[1], r[2], r[6], r[7], r[8],
                          r[9], r[10], sampled.get(i))
        elif kind == _JSON_ONE:
            self._json_answer(preds, caps, t, model, json.loads(answer), extra, None)
        else:
            answers = json.loads(answer)
            requests = parse_json_line(extra) if extra is not None else None
            for i, a in enumerate(answers):
                req = requests[i] if isinstance(requests, list) and i < len(requests) else None
                self._json_answer(preds, caps, t, model, a, None, req)

    def _json_answer(self, preds, caps, t, model, a: dict, line: bytes | None, req) -> None:
        if not isinstance(a, dict) or "decision" not in a:
            return
        fail = a["decision"] == "fail"
        row = None
        if line is not None:
            req = parse_json_line(line)
        elif req is not None and not ((fail and self._fails) or self._random() < self._rate):
            req = None
        if isinstance(req, dict) and isinstance(req.get("params"), list):
            try:
                row = np.array([np.nan if v is None else v for v in req["params"]], dtype=_F4)
            except (TypeError, ValueError, ProtocolError):
                row = None
        top = a.get("top") or []
        score = a.get("score")
        self._add(preds, caps, t, model, die_text(a.get("die_id")), _FAIL if fail else 0,
                  Source.MODEL if a.get("source") == "model" else Source.FALLBACK,
                  float("nan") if score is None else score, a.get("threshold") or 0.0,
                  a.get("confidence") or 0.0, [e["index"] for e in top],
                  [e["contribution"] for e in top], row)

    def _add(self, preds, caps, t, model, die, decision, source, score, thr, conf, top_i, top_c,
             row) -> None:
        # the payload, and what the die index needs (so _write need not decode it again)
        preds.append((encode_prediction(t, model, die, decision, source, score, thr, conf,
                                        top_i, top_c), die, t, model, decision, source, score))
        if row is not None:
            reason = CAPTURE_FAIL if decision == _FAIL else CAPTURE_SAMPLE
            caps.append((len(preds) - 1, (t, model, die, decision, reason, score, row)))
        stats = self.stats.get(model)
        if stats is None:
            stats = self.stats[model] = ModelStats()
        stats.decisions[decision * 2 + (0 if source == Source.MODEL else 1)] += 1
        info = self.models.get(model)
        if source == Source.MODEL and info is not None and score == score:
            m = (score - info.threshold) / info.confidence_scale
            stats.margin[bisect.bisect_left(MARGIN_EDGES, m)] += 1
            stats.confidence[bisect.bisect_left(CONFIDENCE_EDGES, conf)] += 1

    def _write(self, preds: list[tuple], caps: list) -> None:
        if not preds:
            return
        payloads = [p[0] for p in preds]
        try:
            first = self.predictions.append(payloads)
        except RingFull as e:
            with self._lock:
                self.dropped["disk_full"] += len(preds)
            log.debug("prediction log: %s", e)
            return
        add = self.index.add
        for i, (_, die, t, model, decision, source, score) in enumerate(preds):
            if die:
                if len(die) > 63:  # as stored: at most 255 bytes of UTF-8
                    die = _id_bytes(die).decode("utf-8", "replace")
                add(die_key(die), first + i, t, model, decision, source, score)
        cap_payloads = [encode_capture(t, model, first + pos, die, decision, reason, score, row)
                        for pos, (t, model, die, decision, reason, score, row) in caps]
        cap_ok = True
        if cap_payloads:
            try:
                self.capture.append(cap_payloads)
            except RingFull as e:
                cap_ok = False
                log.debug("capture: %s", e)
        with self._lock:
            self.records["predictions"] += len(preds)
            self.bytes_written["predictions"] += sum(map(len, payloads))
            if cap_ok:
                self.records["capture"] += len(cap_payloads)
                self.bytes_written["capture"] += sum(map(len, cap_payloads))
                for c in caps:
                    self.captured["fail" if c[1][4] == CAPTURE_FAIL else "sample"] += 1
            else:
                self.dropped["disk_full"] += len(cap_payloads)

    # ------------------------------------------------------------------ metrics

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            records, written = dict(self.records), dict(self.bytes_written)
            dropped, captured = dict(self.dropped), dict(self.captured)
            stats = {k: (list(v.decisions), list(v.margin), list(v.confidence))
                     for k, v in self.stats.items()}
        dropped["queue_full"] += self.dropped_queue
        yield _by_label("edgefleet_predlog_records", "Records written to the log.", "log",
                        records)
        yield _by_label("edgefleet_predlog_written_bytes", "Bytes appended.", "log", written)
        yield _by_label("edgefleet_predlog_dropped", "Records not logged: the queue was full or "
                        "the disk was.", "reason", dropped)
        yield _by_label("edgefleet_capture_rows", "Input rows captured, by why.", "reason",
                        captured)
        fam = GaugeMetricFamily("edgefleet_predlog_disk_bytes", "Bytes the rings hold on disk.",
                                labels=["log"])
        fam.add_metric(["predictions"], self.predictions.disk_bytes())
        fam.add_metric(["capture"], self.capture.disk_bytes())
        yield fam
        yield from _model_families(self.models, stats)


def _by_label(name: str, doc: str, label: str, values: dict[str, int]) -> Metric:
    fam = CounterMetricFamily(name, doc, labels=[label])
    for k, v in values.items():
        fam.add_metric([k], v)
    return fam


def _model_families(models: ModelTable, stats: dict) -> Iterable[Metric]:
    """Per model (label `digest`, the bundle digest): proxy figures before any label."""
    dec = CounterMetricFamily("edgefleet_model_decisions",
                              "Logged decisions per model, by decision and source.",
                              labels=["digest", "decision", "source"])
    margin = CounterMetricFamily("edgefleet_model_score_margin",
                                 "Model answers per margin bucket, (score - threshold) / "
                                 "confidence_scale in (previous edge, upper].",
                                 labels=["digest", "upper"])
    confidence = CounterMetricFamily("edgefleet_model_confidence",
                                     "Model answers per confidence bucket, in (previous "
                                     "edge, upper].", labels=["digest", "upper"])
    drift = GaugeMetricFamily("edgefleet_model_score_psi",
                              "PSI of the margin distribution vs the build's reference (only "
                              "for bundles that ship one).", labels=["digest"])
    for index, (decisions, m_hist, c_hist) in stats.items():
        info = models.get(index)
        digest = info.digest if info is not None else "none"
        for d in (0, 1):
            for s in (0, 1):
                dec.add_metric([digest, DECISION_LABELS[d], "model" if s == 0 else "fallback"],
                               decisions[d * 2 + s])
        for edge, c in zip([*MARGIN_EDGES, "+Inf"], m_hist, strict=True):
            margin.add_metric([digest, str(edge)], c)
        for edge, c in zip([*CONFIDENCE_EDGES, "+Inf"], c_hist, strict=True):
            confidence.add_metric([digest, str(edge)], c)
        if info is not None and info.reference is not None and sum(m_hist):
            drift.add_metric([digest], psi(m_hist, info.reference["proportions"]))
    yield dec
    yield margin
    yield confidence
    yield drift


class PredLogCollector:
    """Registers a `PredictionLog` (and its label desk) in the agent's metrics registry."""

    def __init__(self, plog: PredictionLog) -> None:
        self.plog = plog

    def describe(self) -> list:
        return []

    def collect(self) -> Iterable[Metric]:
        yield from self.plog.collect()
        if self.plog.labels is not None:
            yield from self.plog.labels.collect(self.plog.models)


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
    server.dispatch.labels = plog.labels
    server.metrics.registry.register(PredLogCollector(plog))


def attach(agent: Any) -> PredictionLog | None:
    """Give an assembled agent (agent/app.py) its prediction log, label desk and, with
    `data_addr`, the data feed; None when the log is off or there is nowhere to keep it."""
    from agent.labels import LabelConfig, LabelDesk

    cfg = agent.config
    directory = cfg.predlog_dir or (cfg.store.parent / "predlog" if cfg.store else None)
    if cfg.predlog == "off" or directory is None:
        return None
    plog = PredictionLog(PredLogConfig(
        directory=Path(directory), max_bytes=cfg.predlog_max_mb << 20,
        max_age_s=cfg.predlog_max_age_h * 3600.0, capture_max_bytes=cfg.capture_max_mb << 20,
        capture_rate=cfg.capture_rate, capture_fails=bool(cfg.capture_fails),
        queue_size=cfg.predlog_queue, fsync_interval_s=cfg.predlog_fsync_s), agent.runtime)
    plog.labels = LabelDesk(LabelConfig(drop_dir=cfg.labels_dir), plog.dir)
    plug_in(agent.server, plog)
    agent.services.insert(0, plog)
    if cfg.data_addr:
        from agent.datafeed import DataFeed

        agent.services.append(DataFeed.from_env(plog, cfg.data_addr))
    return plog
