"""One complete message in, one answer out: the agent's request handling without sockets.

`Dispatcher.json_line(line)` and `Dispatcher.frame(buffer, offset, header)` return the answer
bytes for a JSON line or a binary PREDICT frame; they never raise for anything a client sends
(a bug inside becomes an INTERNAL error answer and a log line). The connection loop in
agent/server.py only moves bytes. See docs/protocol.md for the formats.
"""

from __future__ import annotations

import json
import logging
import math
import struct
import time
from typing import Any

import numpy as np

from agent.calibration import DEFAULT_CONTEXT
from agent.labels import answer_label_json
from agent.metrics import AgentMetrics
from agent.predictor import Predictor
from agent.protocol import (
    DECISION_LABELS,
    HEADER_SIZE,
    JSON_PARSER,
    PROTOCOL_VERSION,
    Decision,
    ErrorCode,
    ProtocolError,
    Source,
    check_ids,
    encode_error_frame,
    encode_json,
    encode_one_result,
    encode_result,
    error_json,
    frame_tester,
    json_id,
    params_text_is_numeric,
    parse_json_line,
    parse_params,
    parse_tester,
    request_op,
    row_error,
)
from agent.runtime import Runtime

log = logging.getLogger("edgefleet.agent")
_perf = time.perf_counter
_frombuffer = np.frombuffer
_F4 = np.dtype("<f4")
_U64 = struct.Struct("<Q").unpack_from
MIN_GATHERED = 2
"""Single-row frames gathered from this many connections or more go to the model as one batch."""


class Dispatcher:
    def __init__(self, runtime: Runtime, metrics: AgentMetrics) -> None:
        self.runtime = runtime
        self.metrics = metrics
        # agent.shadow.ShadowScorer, when the fleet link runs: rows the model answered are
        # copied to it (bounded, never waited on) for a candidate to score off the hot path
        self.shadow: Any = None
        # agent.labels.LabelInbox, when the prediction log runs: the `label` op's receiver
        self.labels: Any = None
        # (answer, row, decision) of the last single-row JSON answer: the log's tap reads the
        # decision and copies the parsed row from here rather than searching the answer's text
        # and copying the request line (agent/predlog_tap.py, JSON_ROW)
        self.parsed: tuple[bytes | None, np.ndarray | None, Any] = (None, None, 0)
        # With `note_batches` (set when the log runs: agent/predlog.py plug_in), a JSON
        # batch's too: (answer, the rows it scored, their decisions); the tap copies the
        # sampled rows from there, not the line, and drops the note
        self.note_batches = False

    # ------------------------------------------------------------------ binary

    def frame(self, buf: bytearray | bytes, offset: int, tag: int, rows: int, columns: int,
              t0: float) -> bytes:
        """Answer a PREDICT frame whose header (at `offset` in `buf`) was checked
        (`agent.protocol.parse_header`) and whose payload is complete in `buf`."""
        try:
            return self._frame(buf, offset, tag, rows, columns, t0)
        except Exception:
            log.exception("internal error answering a binary frame")
            self.metrics.record_error(ErrorCode.INTERNAL)
            return encode_error_frame(ProtocolError(ErrorCode.INTERNAL, "internal error"), tag)

    def frames(self, held: list[tuple]) -> list[bytes]:
        """Answer single-row PREDICT frames of several connections, `(buf, offset, tag,
        columns, t0)` each, in one model run when there are `MIN_GATHERED` or more of the
        model's width (the same answers as `frame` gives one by one)."""
        if len(held) < MIN_GATHERED:
            return [self.frame(b, o, tag, 1, cols, t0) for b, o, tag, cols, t0 in held]
        try:
            return self._frames(held)
        except Exception:
            log.exception("internal error answering binary frames")
            self.metrics.record_error(ErrorCode.INTERNAL)
            return [encode_error_frame(ProtocolError(ErrorCode.INTERNAL, "internal error"), h[2])
                    for h in held]

    def _frames(self, held: list[tuple]) -> list[bytes]:
        p = self.runtime.active()
        n = p.n_features
        if not p.available or any(h[3] != n for h in held):  # errors: answered one by one
            return [self.frame(b, o, tag, 1, cols, t0) for b, o, tag, cols, t0 in held]
        x = np.empty((len(held), n), dtype=np.float32)
        die_ids = []
        for i, (buf, offset, *_) in enumerate(held):
            start = offset + HEADER_SIZE
            die_ids.append(_U64(buf, start)[0])
            x[i] = _frombuffer(buf, _F4, n, start + 8)
        testers = [frame_tester(h[0], h[1]) for h in held]
        tester = testers[0] if len(set(testers)) == 1 else testers
        scored = p.score_rows(x, die_ids, tester)
        if scored is None:  # a row the model alone cannot answer: the general path
            return self._frames_batch(p, held, x, np.array(die_ids, dtype=np.uint64), tester)
        rows, t_inf, scores = scored
        now = _perf()
        latency = [now - h[4] for h in held]
        self.metrics.record_rows(rows, "binary", latency, t_inf)
        if self.shadow is not None and self.shadow.active:
            self.shadow.offer(x, scores, p.manifest)
        one = p.one_result.frame
        return [one(h[2], int(lat * 1e9), r) for r, h, lat in zip(rows, held, latency, strict=True)]

    def _frames_batch(self, p: Predictor, held: list[tuple], x: np.ndarray,
                      die_ids: np.ndarray, tester: str | list[str]) -> list[bytes]:
        """Gathered single rows through `score_batch` (fallback rules, refusals)."""
        records, t_inf, fallback = p.score_batch(x, die_ids, tester)
        now = _perf()
        latency = np.array([now - h[4] for h in held])
        self.metrics.record_batch(records, "binary", latency, t_inf, fallback)
        if self.shadow is not None and self.shadow.active:
            self._shadow_batch(p, x, records)
        body, size = records.tobytes(), records.dtype.itemsize
        k, seq, vpad, vlen = p.k, p.sequence_u64, p.version_padded, len(p.version_bytes)
        return [encode_one_result(body[i * size:(i + 1) * size], k, h[2], int(lat * 1e9), seq,
                                  vpad, vlen)
                for i, (h, lat) in enumerate(zip(held, latency.tolist(), strict=True))]

    def _frame(self, buf, offset: int, tag: int, rows: int, columns: int, t0: float) -> bytes:
        p = self.runtime.active()
        if not p.available:
            return self._frame_error(ErrorCode.UNAVAILABLE, row_error(ErrorCode.UNAVAILABLE, -1,
                                                                      0, 0, 0).message, tag)
        n = p.n_features
        if columns != n:
            return self._frame_error(
                ErrorCode.BAD_WIDTH, f"columns: expected {n} float32 values per row, found "
                f"{columns}{_model_note(p)}", tag)
        start = offset + HEADER_SIZE
        if rows == 1:
            die_id = _U64(buf, start)[0]
            v = _frombuffer(buf, _F4, n, start + 8)
            if not v.flags.aligned:  # after a JSON line of odd length; rare
                v = v.copy()
            tester = buf[offset + 6] | buf[offset + 7] << 8  # frame_tester, inline
            row, t_inf, reason = p.score_one(v, die_id, str(tester) if tester else
                                             DEFAULT_CONTEXT)
            latency = _perf() - t0
            self.metrics.record_row(row, "binary", latency, t_inf, reason)
            sh = self.shadow
            if sh is not None and sh.active and row[2] == Source.MODEL:
                sh.offer_one(v, row[6], p.manifest)
            return p.one_result.frame(tag, int(latency * 1e9), row)
        die_ids = np.frombuffer(buf, dtype="<u8", count=rows, offset=start)
        x = np.frombuffer(buf, dtype="<f4", count=rows * n, offset=start + 8 * rows)
        x = x.reshape(rows, n)
        if not x.flags.aligned:
            x = x.copy()
        records, t_inf, fallback = p.score_batch(x, die_ids, frame_tester(buf, offset))
        latency = _perf() - t0
        self.metrics.record_batch(records, "binary", latency, t_inf, fallback)
        if self.shadow is not None and self.shadow.active:
            self._shadow_batch(p, x, records)
        return encode_result(records, p.k, tag, int(latency * 1e9), p.sequence_u64,
                             p.version_bytes)

    def _frame_error(self, code: ErrorCode, message: str, tag: int) -> bytes:
        self.metrics.record_error(code)
        return encode_error_frame(ProtocolError(code, message), tag)

    # ------------------------------------------------------------------ JSON

    def json_line(self, line: bytes | bytearray | memoryview, t0: float) -> bytes:
        """Answer one JSON line (without its newline)."""
        try:
            return self._json(line, t0)
        except Exception:
            log.exception("internal error answering a JSON line")
            self.metrics.record_error(ErrorCode.INTERNAL)
            return encode_json(error_json(ProtocolError(ErrorCode.INTERNAL, "internal error")))

    def _json(self, line, t0: float) -> bytes:
        line = bytes(line)  # the text checks below need bytes, not the server's memoryview
        try:
            obj = parse_json_line(line)
        except ProtocolError as e:
            self.metrics.record_error(e.code)
            return encode_json(error_json(e))
        try:
            op = request_op(obj)
        except ProtocolError as e:
            self.metrics.record_error(e.code)
            return encode_json(error_json(e, json_id(obj, "id")))
        p = self.runtime.active()
        if isinstance(obj, list):
            return self._json_batch(p, obj, t0, params_text_is_numeric(line))
        rid, die_id = obj.get("id"), obj.get("die_id")
        if type(rid) not in _PLAIN_ID or type(die_id) not in _PLAIN_ID:  # else both are fine
            rid, die_id = json_id(obj, "id"), json_id(obj, "die_id")
            try:
                check_ids(obj)
            except ProtocolError as e:
                self.metrics.record_error(e.code)
                return encode_json(error_json(e, rid, die_id))
        if op == "health":
            return encode_json(self._health(obj))
        if op == "info":
            return encode_json(self._info(obj))
        if op == "label":
            return encode_json(answer_label_json(self.labels, obj))
        if not p.available:
            return encode_json(self._json_unavailable(rid, die_id))
        try:
            x = parse_params(obj, p.n_features, numeric=params_text_is_numeric(line))
            tester = parse_tester(obj)
        except ProtocolError as e:
            _note_model(e, p)
            self.metrics.record_error(e.code)
            return encode_json(error_json(e, rid, die_id))
        return self._json_one(p, x, rid, die_id, t0, tester)

    def _json_one(self, p: Predictor, x: np.ndarray, rid: Any, die_id: Any, t0: float,
                  tester: str) -> bytes:
        row, t_inf, reason = p.score_one(x, die_id, tester)
        latency = _perf() - t0
        self.metrics.record_row(row, "json", latency, t_inf, reason)
        sh = self.shadow
        if sh is not None and sh.active and row[2] == Source.MODEL:
            sh.offer_one(x, row[6], p.manifest)
        answer = (self._row_text(p, row, rid, latency) + "\n").encode("utf-8")
        self.parsed = (answer, x, row[1])  # for the prediction log's tap
        return answer

    def _json_batch(self, p: Predictor, items: list, t0: float, numeric: bool) -> bytes:
        """Answer a batch; `numeric`: every params list is known to hold numbers and nulls
        only (`params_text_is_numeric`)."""
        answers: list[str] = [""] * len(items)
        ok_rows, ok_pos, testers = [], [], []
        for i, item in enumerate(items):
            try:
                if type(item) is dict:
                    check_ids(item, f"[{i}].")
                if not p.available:
                    answers[i] = _dumps(self._json_unavailable(json_id(item, "id"),
                                                               json_id(item, "die_id")))
                    continue
                row = parse_params(item, p.n_features, f"[{i}].", numeric=numeric)
                testers.append(parse_tester(item, f"[{i}]."))
                ok_rows.append(row)
                ok_pos.append(i)
            except ProtocolError as e:
                _note_model(e, p)
                self.metrics.record_error(e.code)
                answers[i] = _dumps(error_json(e, json_id(item, "id"), json_id(item, "die_id")))
        x = np.stack(ok_rows) if ok_rows else None
        if x is not None and len(x):
            one = len(set(testers)) == 1  # the usual case: one tester per batch
            records, t_inf, fallback = p.score_batch(x, np.zeros(len(x), dtype=np.uint64),
                                                     testers[0] if one else testers)
            latency = _perf() - t0
            self.metrics.record_batch(records, "json", latency, t_inf, fallback)
            if self.shadow is not None and self.shadow.active:
                self._shadow_batch(p, x, records)
            for pos, rec in zip(ok_pos, records.tolist(), strict=True):
                item = items[pos]
                row = (json_id(item, "die_id"), *rec[1:9], rec[9].tolist(), rec[10].tolist())
                answers[pos] = self._row_text(p, row, json_id(item, "id"), latency)
        answer = ("[" + ",".join(answers) + "]\n").encode("utf-8")
        if self.note_batches and x is not None and len(x):
            self.parsed = (answer, x, records["decision"])
        return answer

    def _shadow_batch(self, p: Predictor, x: np.ndarray, records: np.ndarray) -> None:
        """Hand the rows the model answered (not the fallback's, not refused ones) to the
        shadow candidate."""
        model = records["source"] == Source.MODEL
        if model.all():
            self.shadow.offer(x, records["score"], p.manifest)
        elif model.any():
            self.shadow.offer(x[model], records["score"][model], p.manifest)

    def _row_text(self, p: Predictor, row: tuple, rid: Any, latency: float) -> str:
        """One answer object as JSON text, formatted directly (a third of json.dumps's cost on
        the per-request path): every value is a number, a fixed word, or pre-escaped."""
        decision = row[1]
        if decision == Decision.ERROR:
            err = row_error(row[3], row[5], row[4], p.n_features, p.max_missing)
            return _dumps(error_json(err, rid, row[0]))
        top = "[]"
        if decision == Decision.FAIL:
            names = p.feature_names_json
            top = "[" + ",".join(
                f'{{"index":{i},"name":{names[i] if names else "null"},"contribution":{_num(c)}}}'
                for i, c in zip(row[9], row[10], strict=True) if i >= 0) + "]"
        model = row[2] == Source.MODEL
        return (f'{{"id":{_scalar(rid)},"die_id":{_scalar(row[0])},'
                f'"decision":"{DECISION_LABELS[decision]}","score":{_num(row[6])},'
                f'"threshold":{_threshold_text(p, row) if model else "0.0"},'
                f'"confidence":{round(float(row[8]), 6)!r},'
                f'"source":"{"model" if model else "fallback"}",'
                f'{p.model_json},"imputed":{row[4]},"top":{top},'
                f'"latency_us":{latency * 1e6:.1f}}}')

    def _json_unavailable(self, rid: Any, die_id: Any) -> dict[str, Any]:
        self.metrics.record_error(ErrorCode.UNAVAILABLE)
        return error_json(row_error(ErrorCode.UNAVAILABLE, -1, 0, 0, 0), rid, die_id)

    def _health(self, obj: dict) -> dict[str, Any]:
        p = self.runtime.active()
        return {"id": json_id(obj, "id"), "ok": p.available, "status": _status(p),
                "fallback_reason": p.fallback_reason(), "model_version": p.version,
                "model_sequence": p.sequence, "model_digest": p.bundle_digest,
                "uptime_s": round(self.runtime.uptime(), 3)}

    def _info(self, obj: dict) -> dict[str, Any]:
        """What serves now; consistent with health: without a model or rules (`unavailable`)
        there is no width, top-k or fallback to describe, so those are null."""
        p = self.runtime.active()
        m = p.manifest
        up = p.available
        reason = p.fallback_reason()
        out: dict[str, Any] = {
            "id": json_id(obj, "id"),
            "protocol": PROTOCOL_VERSION,
            "json_parser": JSON_PARSER,
            "status": _status(p),
            "model": None if m is None else {
                "name": m.name, "version": m.version, "sequence": m.sequence,
                "digest": p.bundle_digest, "model_sha256": m.model_digest,
                "created": m.head.get("created"),
            },
            "n_features": p.n_features if up else None,
            "threshold": p.threshold if m is not None else None,
            "confidence_scale": m.confidence_scale if m is not None else None,
            "top_k": p.k if up else None,
            "max_missing": p.max_missing if up else None,
            "fallback": {
                "active": up and reason is not None,
                "reason": reason,
                "rules": p.rules.count if p.rules is not None else 0,
                "rules_version": p.rules.version if p.rules is not None else None,
            },
            "uptime_s": round(self.runtime.uptime(), 3),
            "ready": up,
        }
        if obj.get("feature_names") is True:
            out["feature_names"] = list(p.feature_names) if p.feature_names else None
        return out


def _status(p: Predictor) -> str:
    """`ok` (the model answers), `fallback` (the rules do) or `unavailable` (nothing can)."""
    return "unavailable" if not p.available else "fallback" if p.fallback_reason() else "ok"


def _model_note(p: Predictor) -> str:
    """What a bad_width message adds: which model now answers. Models change on a live
    connection (a rollout), and a width that was right a moment ago is then wrong."""
    if p.sequence is None:
        return ""
    return (f" (the model answering now is {p.version}, sequence {p.sequence}: if it changed "
            "since you read info, read it again)")


def _note_model(e: ProtocolError, p: Predictor) -> None:
    if e.code == ErrorCode.BAD_WIDTH:
        e.message += _model_note(p)


def _threshold_text(p: Predictor, row: tuple) -> str:
    """The die's threshold: the model's fixed one, or its tester's (agent.calibration)."""
    return p.threshold_json if p.calibration is None else _num(row[7])


def _num(v: float) -> str:
    """A float32 value as JSON: the shortest decimal that reads back as the same float32."""
    if not math.isfinite(v):
        return "null"
    return str(np.float32(v))


def _scalar(v: Any) -> str:
    """An echoed id (a JSON scalar) as JSON text. A string of printable ASCII without a quote
    or backslash needs no escape (the usual die id): quoted as is, the encoder's own text."""
    t = type(v)
    if v is None:
        return "null"
    if t is int:
        return str(v)
    if t is str and v.isascii() and v.isprintable() and '"' not in v and "\\" not in v:
        return f'"{v}"'
    return _dumps(v)


_PLAIN_ID = frozenset((int, str, type(None)))
"""Types of an `id` or `die_id` that `check_ids` accepts and `json_id` echoes as they are."""
_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
