"""The tap's record-and-take (agent/predlog_tap.py `Tap`), whatever keeps the answers until
reference and packed by `take` on the taker's thread, the rest copied at once; the stream is
the same MSG stream either way, models announced before the answers naming them, the bounds
counted in the stream's bytes."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from agent.predlog_tap import JSON_ONE, JSON_ROW, LABELS, MODEL, MSG, Tap

ROW = np.arange(4, dtype=np.float32)


class _Runtime:
    """`runtime.active()` answers with whatever predictor the test set last."""

    def __init__(self) -> None:
        self.p = SimpleNamespace(manifest=None)

    def active(self):
        return self.p


def _tap(runtime: _Runtime, **kw) -> Tap:
    clock = iter(range(1000, 10**6)).__next__
    tap = Tap(runtime, capture_rate=0.0, clock=lambda: float(clock()), **kw)
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


def test_models_come_before_the_answers_naming_them_and_answers_keep_their_order():
    """A model swap between kept answers, a sampled (copied) answer among them, a label
    message, and a swap between takes: each take announces its new models first, and its
    answers follow in the order recorded, each naming the model that answered it."""
    rt = _Runtime()
    tap = _tap(rt)
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


def test_an_answer_that_is_not_bytes_is_logged_as_it_was_when_recorded():
    """A kept reference must not see later changes: a bytearray answer is copied."""
    tap = _tap(_Runtime())
    text = bytearray(b'{"id":1,"decision":"pass"}')
    tap.dispatch.parsed = (text, ROW, 0)
    tap.record(b"", 0, 0, text)
    text[1:5] = b"XXXX"
    assert _messages(tap.take()[0])[-1][3] == b'{"id":1,"decision":"pass"}'


def test_the_bounds_count_the_stream_s_bytes_and_drop_and_count_past_them():
    """`queue_bytes` holds what the packed stream will hold (headers, answers, extras), with
    the taker's `backlog`; `queue_size` answers; past either an answer is dropped and counted,
    and a take makes room again."""
    size = MSG.size + len(b'{"id":0,"decision":"pass"}') + 74  # one answer's message: 125
    tap = _tap(_Runtime(), queue_bytes=3 * size)
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
    count = _tap(_Runtime(), queue_size=2)
    for i in range(4):
        _answer(count, i, decision=i % 2)  # kept or copied alike
    assert (count.waiting(), count.dropped) == (2, 2)
    assert len(_messages(count.take()[0])) == 1 + 2
