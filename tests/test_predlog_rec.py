"""A single JSON answer as the tap packs it from the dispatcher's result row (JSON_REC,
agent/predlog_tap.py) is logged exactly as its text would be: the same prediction blocks,
captured rows, die index and proxy counts as the text path (`_json_part`) writes for the
same answers, byte for byte."""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import orjson
import pytest

from agent.predformat import decode_block
from agent.predlog import PredictionLog, PredLogConfig, _round6
from agent.predlog_tap import JSON_ONE, JSON_REC, JSON_ROW, MSG, Tap
from agent.protocol import json_values
from agent.segring import read_ring
from tests.agent_support import build_model, make_keys, running_agent

N = 8
_NOTHING = (None, None, 0)

# die ids: text (short, unicode, cut at 255 bytes, cut inside a character), numeric (0 and
# the largest), none, empty; and ids the tap leaves to the text path (true, a fraction, a
# negative and a huge integer)
DIES = ["D1", 7, None, "", "ünïcødé-✓-🙂", "x" * 300, "é" * 200, 0, 2**64 - 1, "D" * 63,
        "\u2028tab\there", True, 1.5, -3, 2**70]
PACKED = 11  # the first 11: JSON_REC; the rest: text


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    keys = make_keys(d)
    return (build_model(d, *keys, n_features=N),
            build_model(d, *keys, n_features=N, version="2.0.0", sequence=2, top_k=2))


def _answers(models, rows: list[tuple[object, np.ndarray]], swap_at: int) -> list[tuple]:
    """(request line, answer, the dispatcher's note, the snapshot serving) of each (die id,
    row), as a real dispatcher answers them; the second model answers from `swap_at` on."""
    out = []
    with running_agent(models[0]) as server:
        for i, (die, x) in enumerate(rows):
            if i == swap_at:
                server.runtime.swap(models[1].engine(), models[1].manifest)
            line = json.dumps({"id": i, "die_id": die, "params": json_values(x)}).encode()
            answer = server.dispatch.json_line(line, time.perf_counter())
            out.append((line, answer, server.dispatch.parsed, server.runtime.active()))
    return out


def _stream(answers: list[tuple], *, noted: bool, capture_rate: float) -> bytes:
    """The tap's byte stream for the answers: with the dispatcher's notes (JSON_REC), or
    without (the text path). Each answer tapped at its own time, under its snapshot."""
    clock = iter(range(10**6))
    tap = Tap(SimpleNamespace(active=None), capture_rate=capture_rate,
              clock=lambda: 1000.0 + next(clock))
    holder = SimpleNamespace(parsed=_NOTHING)
    tap.dispatch = holder
    for line, answer, parsed, active in answers:
        tap._active = lambda active=active: active
        holder.parsed = parsed if noted else _NOTHING
        tap.record(line, 0, len(line), answer)
    parts, _ = tap.take()
    return b"".join(bytes(p) for p in parts)


def _kinds(data: bytes) -> list[int]:
    out, pos = [], 0
    while pos < len(data):
        kind, _rows, _tok, _t, alen, elen = MSG.unpack_from(data, pos)
        out.append(kind)
        pos += MSG.size + alen + elen
    return out


def _written(directory: Path, data: bytes) -> dict:
    plog = PredictionLog(PredLogConfig(directory=directory, min_free_bytes=0),
                         clock=lambda: 5000.0)
    plog.feed(data)
    plog.flush()
    snap = plog.snapshot()
    index = np.concatenate(plog.index.recent).tobytes() if plog.index.recent else b""
    plog.stop()
    return {
        "predictions": read_ring(directory / "predictions", 0, 10**9, 1 << 40).records,
        "capture": read_ring(directory / "capture", 0, 10**9, 1 << 40).records,
        "index": index, "stats": snap["stats"], "records": snap["records"],
        "captured": snap["captured"], "models": snap["models"]}


@pytest.mark.parametrize("capture_rate", [0.0, 1.0])
def test_packed_json_answers_are_logged_exactly_as_their_text(models, tmp_path, capture_rate):
    """Passes and fails (top contributions; the second model has k = 2), every kind of die
    id, a missing value, rows sampled (all, or the fails only), and a model swap between
    answers: the blocks, captures, index, proxy counts and model table written from the
    packed records equal those written from the answers' text, byte for byte."""
    x = models[0].train[:2 * len(DIES)].copy()
    x[1::3] += 50.0  # fails
    x[4, 2] = np.nan  # imputed
    # a score the model cannot give (non-finite): the rules answer, a fail's top padded
    # with -1 (which the answer's text leaves out) when fewer rules than k are broken; and a
    # refused row (too many missing: not logged)
    rules = models[1].train[40:43].copy()
    rules[0, 5] = 1e19
    rules[1, [2, 6]] = 1e30
    rules[2] = np.nan
    rows = [(DIES[i % len(DIES)], r) for i, r in enumerate(x)]
    answers = _answers(models, [*rows, ("fb1", rules[0]), ("fb2", rules[1]), ("no", rules[2])],
                       swap_at=len(DIES) + 3)
    assert [orjson.loads(a).get("source") for _, a, _, _ in answers[-3:]] == [
        "fallback", "fallback", None]
    assert [len(orjson.loads(a)["top"]) for _, a, _, _ in answers[-3:-1]] == [1, 2]
    answers = answers[:-1]
    fails = [json.loads(a)["decision"] == "fail" for _, a, _, _ in answers]
    assert all(fails[1::3]) and not all(fails)
    packed = _stream(answers, noted=True, capture_rate=capture_rate)
    text = _stream(answers, noted=False, capture_rate=capture_rate)
    assert [k for k in _kinds(packed) if k in (JSON_REC, JSON_ROW, JSON_ONE)] == [
        JSON_REC if i % len(DIES) < PACKED else
        JSON_ROW if capture_rate or fails[i] else JSON_ONE for i in range(len(x))] + [
        JSON_REC, JSON_REC]
    assert capture_rate or len(packed) < len(text) / 2
    got, expected = _written(tmp_path / "rec", packed), _written(tmp_path / "text", text)
    assert got["records"]["predictions"] == len(x) + 2
    assert got["captured"]["fail"] == sum(fails)
    assert len(got["models"]) == 2
    assert got == expected
    # the rules' fail alone: its block is as wide as its text's top list (1), not k (2)
    alone = answers[-2:-1]
    assert _written(tmp_path / "rec1", _stream(alone, noted=True, capture_rate=capture_rate)
                    ) == _written(tmp_path / "text1", _stream(alone, noted=False,
                                                              capture_rate=capture_rate))


def test_confidence_is_rounded_as_the_answer_text_rounds_it():
    """`_round6` is Python's round(v, 6), ties and near-ties included."""
    rng = np.random.default_rng(7)
    ties = (rng.integers(0, 10**6, 2000) + 0.5) / 1e6
    values = np.concatenate([rng.random(5000), ties, np.nextafter(ties, 2),
                             np.nextafter(ties, -2), rng.normal(0, 1e4, 500),
                             [np.nan, np.inf, -np.inf, 0.0, -0.0, 1.0, 1e300, -5e-7]])
    got = _round6(values)
    want = np.array([round(float(v), 6) for v in values])
    np.testing.assert_array_equal(got, want)
    assert (np.signbit(got) == np.signbit(want)).all()


def test_a_non_finite_score_or_threshold_is_logged_as_the_text_s_null(tmp_path):
    """The text spells a non-finite score or threshold null (read as NaN, and 0 for a
    threshold); a packed record carries the float: the writer reads it alike."""
    from agent.predlog_tap import _PACK_REC, _REC_SIZE

    rec = _PACK_REC(JSON_REC, 1, 1, 1000.0, _REC_SIZE + 1, 0, 0, 0, 1, 0, float("inf"),
                    float("nan"), 0.25, 0) + b"a"
    text = b'{"id":1,"die_id":"a","decision":"pass","score":null,"threshold":null,' \
           b'"confidence":0.25,"source":"model","top":[]}'
    plain = MSG.pack(JSON_ONE, 1, 1, 1000.0, len(text), 0) + text
    got, expected = _written(tmp_path / "rec", rec), _written(tmp_path / "text", plain)
    assert got == expected
    (block,) = got["predictions"]
    (row,) = decode_block(block[1])
    assert np.isnan(row["score"]) and row["threshold"] == 0.0 and row["die_id"] == "a"
