"""The tap's record-and-take (agent/predlog_tap.py `Tap`), in both implementations: the
compiled one (agent/_tapfast.c, built by scripts/build-tap.sh) and the pure-Python one. The
stream is the same MSG stream either way, byte for byte, models announced before the answers
naming them, the bounds counted in the stream's bytes.

Where the compiled tap is not built its tests skip, but not under CI (CI=true): `make test`
builds it, so a skip there would hide a broken build."""

from __future__ import annotations

import os
import threading
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.predlog_tap import (
    BINARY_BATCH,
    BINARY_ONE,
    JSON_ONE,
    JSON_ROW,
    LABELS,
    MODEL,
    MSG,
    Tap,
    compiled,
)
from agent.protocol import (
    ErrorCode,
    ProtocolError,
    encode_error_frame,
    encode_predict,
    encode_result,
    record_dtype,
)

ROW = np.arange(4, dtype=np.float32)


def _need_compiled() -> None:
    if not compiled():
        if os.environ.get("CI"):
            pytest.fail("agent/_tapfast.c is not built under CI: scripts/build-tap.sh")
        pytest.skip("agent/_tapfast.c is not built (scripts/build-tap.sh)")


@pytest.fixture(params=["python", "compiled"])
def impl(request) -> bool:
    """Each test once per implementation: True for the compiled tap."""
    if request.param == "compiled":
        _need_compiled()
    return request.param == "compiled"


class _Runtime:
    """`runtime.active()` answers with whatever predictor the test set last."""

    def __init__(self) -> None:
        self.p = SimpleNamespace(manifest=None)

    def active(self):
        return self.p


def _tap(runtime: _Runtime, compiled: bool = False, **kw) -> Tap:
    clock = iter(range(1000, 10**6)).__next__
    kw.setdefault("capture_rate", 0.0)
    tap = Tap(runtime, clock=lambda: float(clock()), compiled=compiled, **kw)
    assert tap.compiled == compiled
    tap.dispatch = SimpleNamespace(parsed=(None, None, 0))
    return tap


def _answer(tap: Tap, i: int, decision: int = 0, size: int = 0) -> bytes:
    """A JSON answer the dispatcher noted (so the tap reads its decision there), recorded."""
    text = b'{"id":%d,"decision":"%s"%s}' % (i, b"fail" if decision else b"pass", b" " * size)
    tap.dispatch.parsed = (text, ROW, decision)
    tap.record(b"", 0, 0, text)
    return text


def _messages(parts: list) -> list[tuple[int, int, float, bytes, bytes]]:
    """(kind, token, time, answer, extra) of each message in `parts`, in order."""
    data, out, at = b"".join(bytes(p) for p in parts), [], 0
    while at < len(data):
        kind, _rows, token, t, alen, xlen = MSG.unpack_from(data, at)
        at += MSG.size
        out.append((kind, token, t, data[at:at + alen], data[at + alen:at + alen + xlen]))
        at += alen + xlen
    return out


def test_models_come_before_the_answers_naming_them_and_answers_keep_their_order(impl):
    """A model swap between kept answers, a sampled (copied) answer among them, a label
    message, and a swap between takes: each take announces its new models first, and its
    answers follow in the order recorded, each naming the model that answered it."""
    rt = _Runtime()
    tap = _tap(rt, impl)
    first = [_answer(tap, 0), _answer(tap, 1)]
    old = rt.p
    rt.p = SimpleNamespace(manifest=None)
    first += [_answer(tap, 2, decision=1), _answer(tap, 3)]
    assert tap.send(MSG.pack(LABELS, 0, 0, 0.0, 2, 0) + b"[]")
    rt.p = old  # back to the first model: a new token all the same
    first.append(_answer(tap, 4))
    parts, n = tap.take()
    got = _messages(parts)
    assert n == 5 and tap.waiting() == 0
    assert [(k, tok) for k, tok, *_ in got[:3]] == [(MODEL, 1), (MODEL, 2), (MODEL, 3)]
    assert [(k, tok, a) for k, tok, _, a, _ in got[3:]] == [
        (JSON_ONE, 1, first[0]), (JSON_ONE, 1, first[1]), (JSON_ROW, 2, first[2]),
        (JSON_ONE, 2, first[3]), (LABELS, 0, b"[]"), (JSON_ONE, 3, first[4])]
    assert got[5][4] == ROW.tobytes()  # the fail's row, captured
    assert [t for k, _, t, _, _ in got[3:] if k != LABELS] == [1000.0, 1001.0, 1002.0, 1003.0,
                                                               1004.0]
    rt.p = SimpleNamespace(manifest=None)
    later = _answer(tap, 5)
    parts, n = tap.take()
    assert n == 1 and [(k, tok, a) for k, tok, _, a, _ in _messages(parts)] == [
        (MODEL, 4, b"null"), (JSON_ONE, 4, later)]
    assert tap.take() == ([], 0)


def test_an_answer_that_is_not_bytes_is_logged_as_it_was_when_recorded(impl):
    """A kept reference must not see later changes: a bytearray answer is copied."""
    tap = _tap(_Runtime(), impl)
    text = bytearray(b'{"id":1,"decision":"pass"}')
    tap.dispatch.parsed = (text, ROW, 0)
    tap.record(b"", 0, 0, text)
    text[1:5] = b"XXXX"
    assert _messages(tap.take()[0])[-1][3] == b'{"id":1,"decision":"pass"}'


def test_the_bounds_count_the_stream_s_bytes_and_drop_and_count_past_them(impl):
    """`queue_bytes` holds what the packed stream will hold (headers, answers, extras), with
    the taker's `backlog`; `queue_size` answers; past either an answer is dropped and counted,
    and a take makes room again."""
    size = MSG.size + len(b'{"id":0,"decision":"pass"}') + 74  # one answer's message: 125
    tap = _tap(_Runtime(), impl, queue_bytes=3 * size)
    for i in range(5):
        _answer(tap, i, size=74)
    assert (tap.waiting(), tap.dropped) == (3, 2)
    parts, n = tap.take()
    assert n == 3 and len(parts[-1]) == 3 * size  # parts[0]: the model's announcement
    tap.backlog = 2 * size  # taken, not yet written
    for i in range(3):
        _answer(tap, i, size=74)
    assert (tap.waiting(), tap.dropped) == (1, 4)
    assert not tap.send(b"x")  # a label message is refused, not dropped as an answer
    tap.backlog = 0
    tap.take()
    count = _tap(_Runtime(), impl, queue_size=2)
    for i in range(4):
        _answer(count, i, decision=i % 2)  # kept or copied alike
    assert (count.waiting(), count.dropped) == (2, 2)
    assert len(_messages(count.take()[0])) == 1 + 2


# -- the compiled tap writes what the Python tap writes

def _binary(decision: int, version: bytes, rows: int = 1, tag: int = 7) -> tuple[bytes, bytes]:
    """(request frame, RESULT frame) of `rows` rows, each with `decision`, answered by a model
    whose version is `version` (its length moves where the decision is)."""
    x = np.arange(rows * 4, dtype=np.float32).reshape(rows, 4) + decision
    rec = np.zeros(rows, record_dtype(2))
    rec["die_id"] = np.arange(rows) + 100
    rec["decision"] = decision
    return (encode_predict(x, np.arange(rows, dtype=np.uint64), tag),
            encode_result(rec, 2, tag, 1234, 5, version))


_ERROR = encode_error_frame(ProtocolError(ErrorCode.BAD_FRAME, "no"))


def _feed(tap: Tap, rt: _Runtime, script: list[tuple]) -> None:
    """Record `script`'s answers: ("bin", decision, version, rows), ("json", decision) noted
    by the dispatcher, ("json_text", decision) not noted, ("error",), ("health",),
    ("swap",) a new model, ("label",) a label message."""
    for step in script:
        what = step[0]
        if what == "bin":
            req, ans = _binary(step[1], step[2], step[3])
            tap.record(bytearray(req), 0, len(req), ans)
        elif what == "json":
            text = b'{"id":1,"decision":"%s"}' % (b"fail" if step[1] == 1 else b"pass")
            tap.dispatch.parsed = (text, ROW + step[1], step[1])
            tap.record(b"", 0, 0, text)
        elif what == "json_text":
            line = b'{"params":[1,2,3,4]}'
            text = b'{"id":2,"decision":"%s"}' % (b"fail" if step[1] == 1 else b"pass")
            tap.record(line, 0, len(line), text)
        elif what == "error":
            tap.record(b"", 0, 0, _ERROR)
        elif what == "health":
            tap.record(b"", 0, 0, b'{"status":"ok"}')
        elif what == "swap":
            rt.p = SimpleNamespace(manifest=None)
        else:
            assert tap.send(MSG.pack(LABELS, 0, 0, 0.0, 2, 0) + b"[]")


def _both(script: list[tuple], rate: float) -> tuple[bytes, bytes]:
    """The stream each implementation writes for `script` (same clock, same models)."""
    out = []
    for c in (False, True):
        rt = _Runtime()
        tap = _tap(rt, c, capture_rate=rate)
        tap.dispatch = SimpleNamespace(parsed=(None, None, 0))
        _feed(tap, rt, script)
        parts, n = tap.take()
        out.append((b"".join(bytes(p) for p in parts), n, tap.dropped))
    return out[0], out[1]


_STEP = st.one_of(
    st.tuples(st.just("bin"), st.sampled_from([0, 1, 2]),
              st.sampled_from([b"", b"v1", b"model-1.2.3", b"x" * 8, b"y" * 13]),
              st.sampled_from([1, 1, 1, 3])),
    st.tuples(st.just("json"), st.sampled_from([0, 1, 2])),
    st.tuples(st.just("json_text"), st.sampled_from([0, 1])),
    st.tuples(st.sampled_from(["error", "health", "swap", "label"])),
)


@given(script=st.lists(_STEP, max_size=30), rate=st.sampled_from([0.0, 1.0]))
def test_the_compiled_tap_writes_the_python_tap_s_stream_byte_for_byte(script, rate):
    """Any mix of answers (binary single rows and batches, pass, fail and refused rows,
    model versions of every padding, JSON answers the dispatcher noted or not, error frames,
    health answers, model swaps, label messages), with nothing or everything drawn for the
    capture sample: the same bytes, the same count. (A draw in between is random in both,
    so only 0 and 1 compare exactly; tests/test_predlog.py checks the rate.)"""
    _need_compiled()
    python, c = _both(script, rate)
    assert c == python


def test_the_usual_answer_is_recorded_in_c_and_the_rest_handed_to_python():
    """A pass drawn for nothing stays in C; a fail (its row captured) and a batch (of fails)
    go through the Python tap's `_slow`, and come back as the same messages."""
    _need_compiled()
    rt = _Runtime()
    tap = _tap(rt, True)
    slow = []
    original = tap._classify
    tap._classify = lambda *a: slow.append(a[3][:4]) or original(*a)
    _feed(tap, rt, [("bin", 0, b"v1", 1), ("bin", 1, b"v1", 1), ("bin", 1, b"v1", 3),
                    ("json", 0), ("json", 1)])
    parts, n = tap.take()
    assert n == 5 and len(slow) == 4  # the first message (a new model) goes through Python too
    got = [(k, x != b"") for k, _, _, _, x in _messages(parts)[1:]]
    assert got == [(BINARY_ONE, False), (BINARY_ONE, True), (BINARY_BATCH, True),
                   (JSON_ONE, False), (JSON_ROW, True)]
    _feed(tap, rt, [("bin", 0, b"v1", 1), ("json", 0)])
    assert len(slow) == 4 and tap.take()[1] == 2  # same model: both in C


def test_an_error_frame_is_not_logged_and_not_an_error_of_the_tap(impl, caplog):
    """A binary error answer (its message can be a few bytes: shorter than a result's head)
    is not a decision: nothing recorded, nothing logged."""
    tap = _tap(_Runtime(), impl)
    short = encode_error_frame(ProtocolError(ErrorCode.BAD_FRAME, "x"))
    assert len(short) < 48
    for answer in (short, _ERROR):
        tap.record(b"", 0, 0, answer)
    assert tap.take() == ([], 0) and not caplog.records


def test_a_take_on_another_thread_never_sees_half_a_message(impl):
    """The serving thread records while another takes as fast as it can: every take holds
    whole messages only, and none is lost or repeated."""
    rt = _Runtime()
    tap = _tap(rt, impl, capture_rate=0.5)
    tap.dispatch = SimpleNamespace(parsed=(None, None, 0))
    taken, stop = [], threading.Event()

    def taker() -> None:
        while not stop.is_set():
            taken.append(tap.take())
        taken.append(tap.take())

    t = threading.Thread(target=taker)
    t.start()
    try:
        _feed(tap, rt, [("bin", i % 2, b"v1", 1) if i % 3 else ("json", i % 2)
                        for i in range(3000)])
    finally:
        stop.set()
        t.join()
    answers = 0
    for parts, n in taken:
        msgs = _messages(parts)  # raises on a cut message
        assert sum(k != MODEL for k, *_ in msgs) == n
        answers += n
    assert answers == 3000 and tap.dropped == 0
