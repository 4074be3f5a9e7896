"""The prediction log's serving-side half: what the serving thread does after each answer, and
the byte stream it hands to the log's writer.

    tap = Tap(runtime, capture_rate=0.01, ...)
    server.tap = tap.record          # agent/server.py calls it after each answer went out
    parts, messages = tap.take()     # another thread, every flush interval: bytes to write

Why a byte stream: the writer (agent/predlog.py) runs in its own process (agent/predlog_proc.py)
so that its work - decoding answers, JSON parsing, numpy, checksums, file writes - never holds
the serving process's GIL (a writer thread in the serving process held it ~0.5 ms every pass,
which a request arriving then waited for: issues 15 and 17). What stays here is `record`: read
the answer's header (binary) or the decision the dispatcher noted (JSON), draw the capture
sample, copy the answer (and the sampled input row) into one buffer that `take` swaps out. The
usual answer is recorded in C (agent/_tapfast.c: ~0.5 us of the serving thread, against ~2.6
for the same in Python, docs/operations.md), the rest here (`Tap`). Bounded:
past `queue_size` messages or `queue_bytes` bytes waiting (here and not yet handed over,
`backlog`), an answer is dropped and counted, never waited on.

A message: MSG (kind, rows, model token, time, answer length, extra length), the answer's bytes,
then the extra:
    BINARY_ONE    the sampled row's float32 bytes as the frame carried them (none: not sampled)
    BINARY_BATCH  u32 count, count u32 row indices, count rows of float32 (none: none sampled)
    JSON_ONE      the request line (none: not sampled)
    JSON_ROW      a JSON request's row as the dispatcher parsed it, float32 (`Dispatcher.parsed`:
                  no second parse of a 5 kB line in the writer, ~70 us, and 2 kB instead of 5
                  piped); JSON_ONE when that is not this answer's (another thread's answer, or
                  no dispatcher plugged in: then the decision is read from the answer's text)
    JSON_BATCH    u32 line length, the line, one byte per answer with a decision (the draw)
    JSON_ROWS     a JSON batch's sampled rows as the dispatcher parsed them (`Dispatcher.parsed`
                  for a batch: answer, rows, decisions): u32 count, count u32 places among the
                  batch's answers with a decision, count rows of float32 (none: none sampled);
                  JSON_BATCH when that is not this answer's. A 64-row line is ~350 kB: copied
                  and piped when a row of it was sampled (most batches: every fail is)
    MODEL         answer: the model's description (agent/predlog_models.py `describe`, JSON);
                  `model` is the token later messages name it by
    LABELS        answer: JSON [[die id, label, time or null, source], ...] (agent/labels.py)
    FLUSH, SNAPSHOT  control (the writer process answers them; `model` carries a request id)
A model's MODEL message comes before the first answer that names its token (`take` writes the
models first seen since the last take ahead of the answers).
"""

from __future__ import annotations

import logging
import random
import struct
import threading
import time
from types import SimpleNamespace
from typing import Any

import numpy as np
import orjson

from agent.predlog_models import describe
from agent.protocol import HEADER, MAGIC_BYTE, RESULT_BLOCK, Decision, FrameType, record_dtype

MSG = struct.Struct("<BIIdII")  # kind, rows, model token, time, answer length, extra length
_PACK = MSG.pack
U32 = struct.Struct("<I")
BINARY_ONE, BINARY_BATCH, JSON_ONE, JSON_BATCH, JSON_ROW, JSON_ROWS = 1, 2, 3, 4, 5, 6  # answers
MODEL, LABELS, FLUSH, SNAPSHOT = 8, 9, 10, 11  # the rest
_FAIL_TEXT = b'"decision":"fail"'
_DECISION_TEXT = b'"decision"'
_RESULT = int(FrameType.RESULT)
_FAIL = int(Decision.FAIL)
_RESULT_OFF = HEADER.size + RESULT_BLOCK.size  # 48: the model version starts here
_TAP_HEAD = struct.Struct("<B6xI24xH").unpack_from  # at 5: frame type, rows, version length
log = logging.getLogger("edgefleet.agent")
_F4 = np.dtype("<f4")
_U4 = np.dtype("<u4")
_NOTHING = (None, None, 0)  # `Dispatcher.parsed` when nothing is noted
_NO_DISPATCHER = SimpleNamespace(parsed=_NOTHING)  # until `plug_in` sets the real one
_KEEP_MODELS = 16  # MODEL messages kept to announce again to a restarted writer
# Past this many bytes recorded, the taker is woken before its interval: big batches then move
# on in ~1 MB pieces, not one buffer of up to `queue_bytes` (a freed buffer that big would
# also raise glibc's mmap threshold, and later ones would stay in the heap)
WAKE_BYTES = 1 << 20


def _load_compiled() -> tuple[Any, str]:
    """agent/_tapfast.c's module when it is built and agrees with this file's layout (the
    frame offsets and kinds it reads and writes), else None and why not."""
    try:
        from agent import _tapfast  # type: ignore[attr-defined]
    except ImportError as e:
        return None, f"not built ({e})"
    want = {"magic_byte": MAGIC_BYTE, "result_type": _RESULT, "fail": _FAIL,
            "result_off": _RESULT_OFF, "msg_size": MSG.size, "binary_one": BINARY_ONE,
            "json_one": JSON_ONE}
    if want != _tapfast.LAYOUT:
        return None, f"built for another layout ({_tapfast.LAYOUT} != {want})"
    return _tapfast, ""


__all__ = ["BINARY_BATCH", "BINARY_ONE", "FLUSH", "JSON_BATCH", "JSON_ONE", "JSON_ROW",
           "JSON_ROWS", "LABELS", "MODEL", "MSG", "SNAPSHOT", "TAP_MODES", "Tap", "compiled",
           "draws", "labels_message", "not_compiled_reason"]


_compiled, _COMPILED_WHY = _load_compiled()
TAP_MODES: dict[str, bool | None] = {"auto": None, "c": True, "python": False}  # `compiled=`


def draws(rows: int, rate: float) -> np.ndarray:
    """`rows` independent draws, each True with probability `rate` (to 2**-32). From the
    random module's generator, not numpy.random: importing that costs the agent ~6.6 MB of
    resident memory for this one use (issue 15)."""
    return np.frombuffer(random.randbytes(4 * rows), np.uint32) < rate * 4294967296.0


def compiled() -> bool:
    """Whether taps record the usual answer in C (agent/_tapfast.c, scripts/build-tap.sh)."""
    return _compiled is not None


def not_compiled_reason() -> str:
    """Why `compiled()` is False ("" when it is True)."""
    return _COMPILED_WHY


def message(kind: int, token: int, body: bytes, rows: int = 0) -> bytes:
    return MSG.pack(kind, rows, token, 0.0, len(body), 0) + body


def labels_message(labels: list[tuple[str, int, float | None]], source: str) -> bytes:
    return message(LABELS, 0, orjson.dumps([[d, v, t, source] for d, v, t in labels]))


class _PyRecorder:
    """agent/_tapfast.c's `Recorder` in Python, for where it is not built: the buffer, its
    bounds and the model tokens, with the same methods and attributes. Its `record` hands
    every answer to the tap's `_slow` (the compiled one keeps the usual answer to itself)."""

    def __init__(self, active: Any, slow: Any, clock: Any, *, cap: int, cap_bytes: int,
                 wake_bytes: int, **draw: Any) -> None:
        del active, clock, draw  # (the compiled recorder's own path reads them)
        self._slow = slow
        self._cap, self._cap_bytes, self._wake_bytes = cap, cap_bytes, wake_bytes
        self._lock = threading.Lock()
        self._acquire, self._release = self._lock.acquire, self._lock.release
        self._out = bytearray()
        self._n = 0  # messages in `_out`
        self._last_p: Any = None
        self._token = 0
        self._fresh: list[tuple[int, Any]] = []  # (token, predictor) first seen since a take
        self._retired: list[Any] = []  # snapshots replaced since: released by `take`'s thread
        self._woken = False
        self.dispatch: Any = None  # (read by the compiled recorder only)
        self.backlog = 0
        self.wake: Any = None
        self.dropped = 0

    def record(self, buf: bytearray | bytes, start: int, end: int, answer: bytes) -> None:
        if self._n >= self._cap or len(self._out) + self.backlog >= self._cap_bytes:
            self.dropped += 1
            return
        self._slow(buf, start, end, answer, None)

    def append(self, kind: int, rows: int, p: Any, t: float, answer: bytes, extra: Any
               ) -> None:
        """One message into the buffer, under the lock `take` swaps it with."""
        self._acquire()  # not `with`: 2x the cost of the calls here
        try:
            if p is not self._last_p:
                self._new_model(p)
            out = self._out
            if not extra:  # the usual answer
                out += _PACK(kind, rows, self._token, t, len(answer), 0)
                out += answer
            else:
                if type(extra) is tuple:
                    out += _PACK(kind, rows, self._token, t, len(answer),
                                 sum(map(len, extra)))
                    out += answer
                    for piece in extra:
                        out += piece
                else:
                    out += _PACK(kind, rows, self._token, t, len(answer), len(extra))
                    out += answer
                    out += extra
                if len(out) > self._wake_bytes and not self._woken and self.wake is not None:
                    self._woken = True
                    self.wake()
            self._n += 1
        finally:
            self._release()

    def _new_model(self, p: Any) -> None:
        """(Under the lock.) `p` answers from now on: a new token, announced by the next take;
        the snapshot it replaces is released there too (freeing an ORT session takes ~0.2 ms
        with the GIL: not on the serving thread)."""
        self._token += 1
        self._fresh.append((self._token, p))
        if self._last_p is not None:
            self._retired.append(self._last_p)
        self._last_p = p

    def send(self, msg: bytes) -> bool:
        with self._lock:
            if len(self._out) + self.backlog >= self._cap_bytes:
                return False
            self._out += msg
        return True

    def take(self) -> tuple[bytearray, int, list[tuple[int, Any]], list[Any]]:
        with self._lock:
            taken = self._out, self._n, self._fresh, self._retired
            self._out, self._n, self._fresh, self._retired = bytearray(), 0, [], []
            self._woken = False
        return taken

    def waiting(self) -> int:
        return self._n


class _OnRecorder:
    """A `Tap` attribute that `record` reads or counts, kept on its recorder."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, tap: Any, owner: type | None = None) -> Any:
        return self if tap is None else getattr(tap._rec, self.name)

    def __set__(self, tap: Any, value: Any) -> None:
        setattr(tap._rec, self.name, value)


class Tap:
    """See the module docstring. `record` runs on the serving thread; `take` and `send` on any
    other one.

    What to record is decided here (`_classify`); the buffer, its bounds and the model tokens
    are the recorder's: agent/_tapfast.c's `Recorder` when it is built (`compiled()`), whose
    `record` keeps the usual answer (one row, a decision, not a fail, not drawn, the same model
    as the last) to itself and hands every other one to `_slow`; else (or `compiled=False`)
    `_PyRecorder`, which hands it every answer. tests/test_predlog_tap.py feeds both the same
    answers and compares the bytes."""

    def __init__(self, runtime: Any, *, capture_rate: float = 0.01, capture_fails: bool = True,
                 queue_size: int = 65536, queue_bytes: int = 16 << 20,
                 clock=time.time, compiled: bool | None = None) -> None:
        self._active = runtime.active
        # agent.dispatch.Dispatcher: its `parsed` (answer, row, decision)
        self._dispatch: Any = _NO_DISPATCHER
        self._rate = capture_rate
        self._fails = capture_fails
        self._random = random.random
        self._clock = clock
        self.announced: dict[int, bytes] = {}  # token -> MODEL message, the newest few
        if compiled is None:
            compiled = _compiled is not None
        elif compiled and _compiled is None:
            raise RuntimeError(f"agent/_tapfast.c is {_COMPILED_WHY}")
        recorder = _compiled.Recorder if compiled else _PyRecorder
        self._rec = recorder(
            runtime.active, self._slow, None if clock is time.time else clock,
            rate=capture_rate, fails=capture_fails, cap=queue_size, cap_bytes=queue_bytes,
            wake_bytes=WAKE_BYTES, seed=random.getrandbits(64) | 1)
        self._rec.dispatch = self._dispatch
        self._append = self._rec.append
        self.record = self._rec.record
        self.compiled = compiled  # True when `record` is agent/_tapfast.c's

    @property
    def dispatch(self) -> Any:
        """The dispatcher whose `parsed` note `record` reads (both `_classify` and the
        compiled recorder do)."""
        return self._dispatch

    @dispatch.setter
    def dispatch(self, value: Any) -> None:
        self._dispatch = self._rec.dispatch = value

    backlog = _OnRecorder()  # bytes taken but not handed over yet (the taker sets it)
    wake = _OnRecorder()  # None, or called (once per take) when WAKE_BYTES are waiting
    dropped = _OnRecorder()  # answers not recorded: the buffer was full

    def _slow(self, buf: bytearray | bytes, start: int, end: int, answer: bytes,
              sampled: bool | None) -> None:
        """What the recorder hands over after counting the bounds: every answer
        (`_PyRecorder`), or every one but the usual (the compiled recorder; for a single row
        it drew the sample: `sampled`, else None). Never raises: called after `answer` was
        sent for the message `buf[start:end]` (a JSON line without its newline, or a whole
        binary frame)."""
        try:
            what = self._classify(buf, start, end, answer, sampled)
            if what is not None:
                self._append(what[0], what[1], self._active(), self._clock(), answer, what[2])
        except Exception:  # a tap must never break serving
            log.exception("prediction log: tap failed")

    def _classify(self, buf: bytearray | bytes, start: int, end: int, answer: bytes,
                  sampled: bool | None = None) -> tuple[int, int, Any] | None:
        """What to record of `answer`: (kind, rows, extra), or None when it is not a decision
        (an error frame, health, a refused row). `extra`: bytes, or pieces to copy in order
        (a tuple). `sampled`: whether a single row's input is kept (a fail, or the draw),
        when the compiled tap drew it; None: drawn here. agent/_tapfast.c decides the usual
        answer the same way: keep them alike.

        The usual answer (one row, a pass, not drawn) takes the short path: its header read
        in place (binary) or its decision from the dispatcher (JSON, `Dispatcher.parsed`: no
        search of the answer's text; figures in docs/operations.md)."""
        a0 = answer[0]
        extra: Any = b""
        rows = 1
        if a0 == MAGIC_BYTE:
            if answer[5] != _RESULT:  # an error frame (it can be shorter than a result's head)
                return None
            _, rows, vlen = _TAP_HEAD(answer, 5)
            kind = BINARY_ONE
            if rows != 1:
                kind = BINARY_BATCH
                extra = self._sample_frame(buf, start, answer, rows)
            elif sampled or (sampled is None and (
                    (self._fails and answer[_RESULT_OFF + vlen + (-vlen % 8) + 8] == _FAIL)
                    or self._random() < self._rate)):  # sampled: a fail, or the draw
                n = int.from_bytes(buf[start + 16:start + 20], "little")
                extra = buf[start + 32:start + 32 + 4 * n]
        elif a0 == 0x7B:  # "{": one JSON answer
            kind = JSON_ONE
            parsed = self._dispatch.parsed
            if parsed[0] is answer:  # the dispatcher's: its decision, the row it parsed
                decision = parsed[2]
                if decision > _FAIL:  # refused: not a decision, not logged
                    return None
                if sampled or (sampled is None and (
                        (self._fails and decision == _FAIL) or self._random() < self._rate)):
                    kind, extra = JSON_ROW, parsed[1].astype(_F4, copy=False).tobytes()
            elif _DECISION_TEXT not in answer:  # not a decision (health, info, an error)
                return None
            elif (self._fails and _FAIL_TEXT in answer) or self._random() < self._rate:
                extra = buf[start:end]  # answered elsewhere (a big line): the line
        elif a0 == 0x5B and _DECISION_TEXT in answer:  # "[": a batch with a decision
            parsed = self._dispatch.parsed
            if parsed[0] is answer:  # the dispatcher's: its rows and their decisions
                self._dispatch.parsed = _NOTHING  # (the rows can be MBs: not kept)
                decisions, x = parsed[2], parsed[1]
                if not (decisions <= _FAIL).all():  # some refused by the scoring
                    x, decisions = x[decisions <= _FAIL], decisions[decisions <= _FAIL]
                kind, rows = JSON_ROWS, len(decisions)
                extra = self._sampled(decisions, x)
            else:
                kind = JSON_BATCH
                rows = answer.count(_DECISION_TEXT)
                draw = draws(rows, self._rate)
                if (self._fails and _FAIL_TEXT in answer) or draw.any():
                    # pieces, copied once into the buffer (a line can be 350 kB)
                    extra = (U32.pack(end - start), memoryview(buf)[start:end],
                             draw.tobytes())
        else:
            return None
        return kind, rows, extra

    def _sample_frame(self, buf, start: int, answer: bytes, rows: int) -> bytes:
        """A batch frame's sampled rows as BINARY_BATCH's extra (`_sampled`)."""
        vlen = answer[40] | answer[41] << 8
        k = int.from_bytes(answer[16:20], "little")
        rec = np.frombuffer(answer, record_dtype(k), rows, _RESULT_OFF + vlen + (-vlen % 8))
        n = int.from_bytes(buf[start + 16:start + 20], "little")
        x = np.frombuffer(buf, _F4, rows * n, start + 24 + 8 * rows).reshape(rows, n)
        return self._sampled(rec["decision"], x)

    def _sampled(self, decisions: np.ndarray, x: np.ndarray) -> bytes:
        """A batch's sampled rows (every fail, and the random draw) of its rows `x`: u32
        count, their u32 places, their float32 rows; b"" when none is."""
        want = draws(len(decisions), self._rate)
        if self._fails:
            want |= decisions == _FAIL
        idx = np.flatnonzero(want)
        if not len(idx):
            return b""
        return b"".join((U32.pack(len(idx)), idx.astype(_U4).tobytes(),
                         x[idx].astype(_F4, copy=False).tobytes()))

    def waiting(self) -> int:
        """Answers recorded and not taken yet."""
        return self._rec.waiting()

    def take(self) -> tuple[list[bytes | bytearray], int]:
        """Everything recorded since the last take, as parts to write in order (the MODEL
        messages of models first seen, then the answers), and how many answers that is."""
        data, n, fresh, retired = self._rec.take()
        del retired  # the replaced snapshots go here, on this thread
        parts: list[bytes | bytearray] = []
        for token, p in fresh:
            msg = message(MODEL, token, orjson.dumps(describe(p)))
            self.announced[token] = msg
            parts.append(msg)
        while len(self.announced) > _KEEP_MODELS:
            del self.announced[min(self.announced)]
        if data:
            parts.append(data)
        return parts, n

    def send(self, msg: bytes) -> bool:
        """Queue a message of another kind (labels) behind the answers; False when full."""
        return self._rec.send(msg)
