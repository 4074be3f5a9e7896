"""A small blocking client for the agent's socket (one connection, one request at a time).

    from agent.client import Client
    with Client("/run/edgefleet/agent.sock") as c:
        r = c.predict(values, die_id=17)            # binary frame, one die -> Result
        batch = c.predict_batch(matrix, die_ids)    # binary frame, many dies -> BatchResult
        obj = c.predict_json(values, die_id="W3-12-07")  # JSON line -> dict
        c.health(), c.info()
        c.label([17, 18], ["pass", "fail"])         # final test: binary LABEL frame
        c.described()["n_features"]                 # info, cached; re-read on a model change

Models change on a live connection (a rollout lands): every answer names the model's sequence,
and when it differs from the last one seen, the client reads `info` again (`described()`), so
n_features and top_k stay current. A `bad_width` answer also drops the cached info.

Not thread-safe: give each thread its own `Client`.
"""

from __future__ import annotations

import json
import math
import socket
import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from agent.errors import EdgefleetError
from agent.protocol import (
    DECISION_LABELS,
    HEADER,
    HEADER_SIZE,
    MAGIC,
    NO_SEQUENCE,
    PROTOCOL_VERSION,
    RESULT_PREFIX,
    SOURCE_LABELS,
    Decision,
    ErrorCode,
    FrameType,
    ProtocolError,
    decode_answer_frame,
    encode_predict,
    json_values,
    row_error,
    row_struct,
)

_ONE_HEAD = struct.Struct("<4sBBHIIIIQ")  # a one-row PREDICT's header and die id
_RESULT_PREFIX = RESULT_PREFIX.unpack_from  # a RESULT frame's header and result block
_RESULT_PREFIX_SIZE = RESULT_PREFIX.size
_LENGTH = struct.Struct("<I").unpack_from  # a header's payload length, at offset 20
_PASS, _FAIL, _ERROR = int(Decision.PASS), int(Decision.FAIL), int(Decision.ERROR)
_PREDICT, _RESULT = int(FrameType.PREDICT), int(FrameType.RESULT)
_F4 = np.dtype("<f4")
_new_tuple = tuple.__new__


class AgentError(EdgefleetError):
    """The agent refused a request (`code` is the protocol's error code label)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


class AgentUnreachable(EdgefleetError):
    """No agent answers on the socket, or the connection broke."""


class Result(NamedTuple):
    """One die's answer (a named tuple: cheap to make, on the one-die path)."""

    die_id: Any
    decision: str  # pass, fail, or error
    score: float
    threshold: float
    confidence: float
    source: str | None  # model, fallback (None for errors)
    model_version: str | None
    imputed: int
    top: tuple[tuple[int, float], ...]  # (parameter index, contribution), fails only
    latency_us: float
    error: str | None = None  # error code label when decision == "error"
    message: str | None = None


@dataclass(frozen=True)
class BatchResult:
    """The answer to a batch, as numpy arrays over the raw records (no Python object per die):
    `decision` (0 pass, 1 fail, 2 error), `source`, `score`, `die_id`, `error_code`, ... are
    views into `records`; `results()` builds a `Result` per die when they are wanted."""

    records: np.ndarray  # agent.protocol.record_dtype(k): the raw answer rows
    model_version: str | None
    model_sequence: int | None
    latency_us: float  # server-side, for the whole batch

    def __len__(self) -> int:
        return len(self.records)

    def __getattr__(self, name: str) -> np.ndarray:
        """A field of every record: die_id, decision, source, error_code, imputed,
        error_column, score, threshold, confidence, top_index, top_contribution."""
        records = self.__dict__.get("records")
        if records is None or name not in records.dtype.names:
            raise AttributeError(name)
        return records[name]

    def counts(self) -> dict[str, int]:
        """Dies by decision (pass, fail, error) and how many the fallback rules answered."""
        by = np.bincount(self.records["decision"], minlength=3)
        return {"pass": int(by[0]), "fail": int(by[1]), "error": int(by[2]),
                "fallback": int(np.count_nonzero(self.records["source"] == 1))}

    def results(self) -> list[Result]:
        return [_result(r, self.model_version, self.latency_us) for r in self.records.tolist()]


def _result(r: tuple, model_version: str | None, latency_us: float) -> Result:
    """A `Result` from one record as a tuple (record field order)."""
    decision = r[1]
    top = (tuple((int(i), float(c)) for i, c in zip(r[9], r[10], strict=True) if i >= 0)
           if decision == _FAIL else ())
    err = row_error(r[3], r[5], r[4], 0, 0) if decision == _ERROR else None
    return Result(r[0], DECISION_LABELS[decision], r[6], r[7], r[8], SOURCE_LABELS[r[2]],
                  model_version, r[4], top, latency_us, err.code.label if err else None,
                  err.message if err else None)


class Client:
    def __init__(self, path: str | Path, timeout: float | None = 10.0) -> None:
        self.path = Path(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(str(self.path))
        except OSError as e:
            self.sock.close()
            raise AgentUnreachable(f"cannot connect to the agent at {self.path}: {e.strerror}",
                                   hint="is `edgefleet agent serve` running?") from None
        # The timeout as socket options on a blocking socket: a Python-level timeout costs a
        # poll() before every send and receive (a third of a one-die round trip).
        self.sock.settimeout(None)
        if timeout:
            us = max(int(timeout * 1e6), 1)
            tv = struct.pack("ll", us // 1_000_000, us % 1_000_000)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
        self._buf = bytearray(1 << 16)
        self._left = 0  # bytes of the next answer already in _buf (pipelined batches)
        self._tag = 0
        self.model_sequence: int | None = None  # of the model that gave the last answer
        self._info: dict[str, Any] | None = None
        self._version: tuple[bytes, str | None] = (b"", None)  # the last answer's, raw and read
        # predict's request buffer and a float32 view of its values, for the last width sent
        self._one: tuple[bytearray, np.ndarray] = (bytearray(), np.empty(0, _F4))
        self._record: tuple[int, Any] = (-1, None)  # (top-k, its record's unpack_from)

    def described(self) -> dict[str, Any]:
        """The agent's `info`, read once and again after the model changed."""
        if self._info is None:
            self._info = self.info()
        return self._info

    def _saw(self, sequence: int | None) -> None:
        """Note the model sequence of an answer; a new model means info must be read again."""
        if sequence != self.model_sequence:
            self.model_sequence = sequence
            if self._info is not None:
                self._info = self.info()

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- JSON

    def request(self, obj: Any) -> Any:
        """Send one JSON request (object or array) and return the decoded answer line."""
        return json.loads(self.request_raw(json.dumps(obj, allow_nan=False).encode() + b"\n"))

    def request_raw(self, line: bytes) -> bytes:
        """Send raw bytes (one line) and return the answer line, newline included."""
        try:
            self.sock.sendall(line)
            chunks = []
            while True:
                chunk = self.sock.recv(1 << 16)
                if not chunk:
                    raise AgentUnreachable(f"agent at {self.path} closed the connection")
                chunks.append(chunk)
                if chunk.endswith(b"\n"):
                    return b"".join(chunks)
        except OSError as e:
            raise AgentUnreachable(f"agent at {self.path}: {e}") from None

    def health(self) -> dict[str, Any]:
        return self.request({"op": "health"})

    def info(self, feature_names: bool = False) -> dict[str, Any]:
        return self.request({"op": "info", "feature_names": feature_names})

    def predict_json(self, params: Sequence[float | None] | np.ndarray, die_id: Any = None,
                     request_id: Any = None, tester: str | int | None = None) -> dict[str, Any]:
        """One die over JSON; NaN (or None) is sent as null; `tester` names the tester that
        measured it (the agent calibrates its threshold per tester). Returns the answer object
        (which holds `error` instead of a decision when the agent refused it)."""
        if isinstance(params, np.ndarray):
            values = json_values(params)
        else:
            values = [None if v is None or (isinstance(v, float) and math.isnan(v)) else v
                      for v in params]
        request = {"id": request_id, "die_id": die_id, "params": values}
        if tester is not None:
            request["tester"] = tester
        answer = self.request(request)
        error = answer.get("error")
        if error is None:
            self._saw(answer.get("model_sequence"))
        elif error.get("code") == "bad_width":
            self._info = None
        return answer

    # -- binary

    def label(self, die_ids: Iterable[int], labels: Iterable[int | str],
              times: Iterable[float] | None = None) -> tuple[int, int]:
        """Final-test outcomes of dies in one LABEL frame (docs/protocol.md, "label"): each
        label `"pass"`/`"fail"` or 0/1 (1 = fail), `times` when each final test ran (Unix
        seconds; None: unknown, the agent takes when it received them). Returns (accepted,
        dropped): dropped labels did not fit the agent's queue; send them again. Raises
        `AgentError` when the agent refuses the frame (`bad_value`, `unavailable`)."""
        from agent.labels import LABELED_BLOCK, encode_label_frame

        values = [{"pass": 0, "fail": 1}.get(v, v) if isinstance(v, str) else int(v)
                  for v in labels]
        if any(v not in (0, 1) for v in values):
            raise ValueError("labels: expected \"pass\"/\"fail\" or 0/1")
        self._tag = (self._tag + 1) & 0xFFFFFFFF
        header, payload = self._exchange(encode_label_frame(
            [int(d) for d in die_ids], values, None if times is None else list(times), self._tag))
        if header[5] == FrameType.LABELED:
            accepted, dropped = LABELED_BLOCK.unpack_from(payload)
            return accepted, dropped
        self._answer(header, payload)  # an ERROR frame raises AgentError
        raise AgentError("bad_frame", f"expected a LABELED frame, found type {header[5]}")

    def predict(self, params: Sequence[float] | np.ndarray, die_id: int = 0,
                tester: int = 0) -> Result:
        """One die over a binary frame; NaN = not measured. Raises `AgentError` if refused.
        `tester` (1..65535, 0 = none) names the tester for the agent's per-tester calibration.
        The lean path: one pack for the request, the answer read in place (one unpack of its
        prefix, one of the record), no numpy views, no copies."""
        x = params if type(params) is np.ndarray and params.dtype == _F4 else \
            np.asarray(params, dtype=_F4)
        n = x.size
        frame, row = self._one
        if len(row) != n:  # the request buffer for this width: header, die id, values
            frame = bytearray(_ONE_HEAD.size + 4 * n)
            self._one = frame, row = frame, np.frombuffer(frame, _F4, n, _ONE_HEAD.size)
        self._tag = tag = (self._tag + 1) & 0xFFFFFFFF
        _ONE_HEAD.pack_into(frame, 0, MAGIC, PROTOCOL_VERSION, _PREDICT, tester, tag, 1, n,
                            8 + 4 * n, die_id)
        row[:] = x if x.ndim == 1 else x.reshape(n)
        buf = self._buf
        try:
            self.sock.sendall(frame)
            got = 0 if self._left else self.sock.recv_into(buf)
            if got >= HEADER_SIZE and got == HEADER_SIZE + _LENGTH(buf, 20)[0]:
                need = self._left = got  # the usual case: the whole answer in one read
            else:
                self._left += got
                need = self._recv()
                buf = self._buf
        except OSError as e:
            raise AgentUnreachable(f"agent at {self.path}: {e}") from None
        (_m, _v, ftype, _f, _t, rows, k, _n, lat, seq, vlen) = _RESULT_PREFIX(buf)
        if ftype != _RESULT or rows != 1 or need < _RESULT_PREFIX_SIZE:
            header, payload = bytes(buf[:HEADER_SIZE]), bytes(buf[HEADER_SIZE:need])
            self._consume(need)
            self._answer(header, payload)  # raises for an ERROR frame
            raise AgentError("bad_frame", f"expected a one-row RESULT frame, found type "
                             f"{ftype} with {rows} rows")
        version = self._version
        if vlen != len(version[0]) or not buf.startswith(version[0], _RESULT_PREFIX_SIZE):
            raw = bytes(buf[_RESULT_PREFIX_SIZE:_RESULT_PREFIX_SIZE + vlen])
            self._version = version = (raw, raw.decode("ascii") or None)
        record = self._record
        if record[0] != k:
            self._record = record = (k, row_struct(k).unpack_from)
        row = record[1](buf, _RESULT_PREFIX_SIZE + vlen + (-vlen % 8))
        self._left = left = self._left - need  # _consume, inline
        if left:
            buf[:left] = buf[need:need + left]
        if seq != self.model_sequence:
            self._saw(None if seq == NO_SEQUENCE else seq)
        if row[1] == _PASS:  # the common answer: no top list, no error (a tuple made as
            # Result's own __new__ makes it, without its Python-level call)
            return _new_tuple(Result, (row[0], "pass", row[6], row[7], row[8],
                                       SOURCE_LABELS[row[2]], version[1], row[4], (), lat / 1e3,
                                       None, None))
        r = _result((*row[:9], row[9:9 + k], row[9 + k:]), version[1], lat / 1e3)
        if r.error:
            raise AgentError(r.error, r.message or "")
        return r

    def predict_batch(self, params: np.ndarray, die_ids: np.ndarray | None = None
                      ) -> BatchResult:
        """Many dies in one binary frame (rows refused individually come back as error rows).
        Raises `AgentError` when the agent refuses the whole frame."""
        return self._answer(*self._exchange(self._frame(params, die_ids)))

    def predict_stream(self, batches: Iterable[tuple[np.ndarray, np.ndarray | None]]
                       ) -> Iterator[BatchResult]:
        """Answers to (params, die_ids) batches, in order, with the next batch sent before the
        previous answer is read: the agent scores one batch while this process prepares the
        next (reading a file, say)."""
        pending = 0
        try:
            for params, die_ids in batches:
                self.sock.sendall(self._frame(params, die_ids))
                pending += 1
                if pending == 2:
                    pending -= 1
                    yield self._answer(*self._recv_frame())
            while pending:
                pending -= 1
                yield self._answer(*self._recv_frame())
        except OSError as e:
            raise AgentUnreachable(f"agent at {self.path}: {e}") from None

    def _frame(self, params: np.ndarray, die_ids: np.ndarray | None) -> bytes:
        self._tag = (self._tag + 1) & 0xFFFFFFFF
        return encode_predict(params, die_ids, tag=self._tag)

    def _exchange(self, frame: bytes) -> tuple[bytes, bytes]:
        try:
            self.sock.sendall(frame)
            return self._recv_frame()
        except OSError as e:
            raise AgentUnreachable(f"agent at {self.path}: {e}") from None

    def _answer(self, header: bytes, payload: bytes) -> BatchResult:
        try:
            answer = decode_answer_frame(header, payload)
        except ProtocolError as e:
            if e.code == ErrorCode.BAD_WIDTH:
                self._info = None
            raise AgentError(e.code.label, e.message) from None
        self._saw(answer.model_sequence)
        return BatchResult(answer.records, answer.model_version, answer.model_sequence,
                           answer.latency_ns / 1e3)

    def _recv_frame(self) -> tuple[bytes, bytes]:
        """One answer frame: (header, payload), copied out of the receive buffer."""
        need = self._recv()
        buf = self._buf
        header, payload = bytes(buf[:HEADER_SIZE]), bytes(buf[HEADER_SIZE:need])
        self._consume(need)
        return header, payload

    def _recv(self) -> int:
        """Read until one whole answer frame is at the start of the receive buffer; its size.
        Bytes read past it (the next pipelined answer's) follow it; `_consume` keeps them."""
        buf, got, need = self._buf, self._left, 0
        while True:
            if not need and got >= HEADER_SIZE:
                need = HEADER_SIZE + HEADER.unpack_from(buf)[7]
                if need > len(buf):
                    bigger = bytearray(need)
                    bigger[:got] = buf[:got]
                    self._buf = buf = bigger
            if need and got >= need:
                self._left = got
                return need
            n = self.sock.recv_into(memoryview(buf)[got:] if got else buf)
            if not n:
                raise AgentUnreachable(f"agent at {self.path} closed the connection")
            got += n

    def _consume(self, need: int) -> None:
        """Drop the answer frame of `need` bytes at the buffer's start, keeping what follows."""
        got = self._left
        self._left = left = got - need
        if left:
            self._buf[:left] = self._buf[need:got]
