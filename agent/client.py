"""A small blocking client for the agent's socket (one connection, one request at a time).

    from agent.client import Client
    with Client("/run/edgefleet/agent.sock") as c:
        r = c.predict(values, die_id=17)            # binary frame, one die -> Result
        batch = c.predict_batch(matrix, die_ids)    # binary frame, many dies -> BatchResult
        obj = c.predict_json(values, die_id="W3-12-07")  # JSON line -> dict
        c.health(), c.info()
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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agent.errors import EdgefleetError
from agent.protocol import (
    DECISION_LABELS,
    HEADER,
    HEADER_SIZE,
    SOURCE_LABELS,
    Decision,
    ErrorCode,
    ProtocolError,
    decode_answer_frame,
    encode_predict,
    json_values,
    row_error,
)


class AgentError(EdgefleetError):
    """The agent refused a request (`code` is the protocol's error code label)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


class AgentUnreachable(EdgefleetError):
    """No agent answers on the socket, or the connection broke."""


@dataclass(frozen=True)
class Result:
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
    records: np.ndarray  # agent.protocol.record_dtype(k): the raw answer rows
    model_version: str | None
    model_sequence: int | None
    latency_us: float  # server-side, for the whole batch

    def results(self) -> list[Result]:
        out = []
        for r in self.records.tolist():
            decision = r[1]
            top = tuple((int(i), float(c)) for i, c in zip(r[9].tolist(), r[10].tolist(),
                                                            strict=True) if i >= 0)
            err = row_error(r[3], r[5], r[4], 0, 0) if decision == Decision.ERROR else None
            out.append(Result(r[0], DECISION_LABELS[decision], r[6], r[7], r[8],
                              SOURCE_LABELS[r[2]], self.model_version, r[4], top,
                              self.latency_us, err.code.label if err else None,
                              err.message if err else None))
        return out


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
        self._buf = bytearray(1 << 16)
        self._tag = 0
        self.model_sequence: int | None = None  # of the model that gave the last answer
        self._info: dict[str, Any] | None = None

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
                     request_id: Any = None) -> dict[str, Any]:
        """One die over JSON; NaN (or None) is sent as null. Returns the answer object (which
        holds `error` instead of a decision when the agent refused it)."""
        if isinstance(params, np.ndarray):
            values = json_values(params)
        else:
            values = [None if v is None or (isinstance(v, float) and math.isnan(v)) else v
                      for v in params]
        answer = self.request({"id": request_id, "die_id": die_id, "params": values})
        error = answer.get("error")
        if error is None:
            self._saw(answer.get("model_sequence"))
        elif error.get("code") == "bad_width":
            self._info = None
        return answer

    # -- binary

    def predict(self, params: Sequence[float] | np.ndarray, die_id: int = 0) -> Result:
        """One die over a binary frame; NaN = not measured. Raises `AgentError` if refused."""
        batch = self.predict_batch(np.asarray(params, dtype=np.float32).reshape(1, -1),
                                   np.array([die_id], dtype=np.uint64))
        result = batch.results()[0]
        if result.error:
            raise AgentError(result.error, result.message or "")
        return result

    def predict_batch(self, params: np.ndarray, die_ids: np.ndarray | None = None
                      ) -> BatchResult:
        """Many dies in one binary frame (rows refused individually come back as error rows).
        Raises `AgentError` when the agent refuses the whole frame."""
        self._tag = (self._tag + 1) & 0xFFFFFFFF
        frame = encode_predict(params, die_ids, tag=self._tag)
        try:
            self.sock.sendall(frame)
            header, payload = self._recv_frame()
        except OSError as e:
            raise AgentUnreachable(f"agent at {self.path}: {e}") from None
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
        buf, got, need = self._buf, 0, HEADER_SIZE
        while got < need:
            n = self.sock.recv_into(memoryview(buf)[got:])
            if not n:
                raise AgentUnreachable(f"agent at {self.path} closed the connection")
            got += n
            if need == HEADER_SIZE and got >= HEADER_SIZE:
                need = HEADER_SIZE + HEADER.unpack_from(buf)[7]
                if need > len(buf):
                    bigger = bytearray(need)
                    bigger[:got] = buf[:got]
                    self._buf = buf = bigger
        return bytes(buf[:HEADER_SIZE]), bytes(buf[HEADER_SIZE:need])
