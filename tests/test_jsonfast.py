"""The JSON fast path (agent/_jsonfloats.c, agent/jsonfast.py) against the json module: it must
accept exactly what json.loads accepts, give the same float32 values bit for bit, and change no
answer of the agent. Generated text (hypothesis), random bytes, and the hand-picked lines where
a shortcut could be fooled."""

from __future__ import annotations

import json
import math
import time
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import agent.jsonfast as jsonfast
from agent.dispatch import Dispatcher
from agent.metrics import AgentMetrics
from agent.protocol import ProtocolError, json_values, parse_json_line, parse_params
from agent.runtime import Runtime
from tests.agent_support import build_model, make_keys
from tests.conftest import examples

# 400 examples each; the "dev" Hypothesis profile runs ten times as many (tests/conftest.py)
SETTINGS = settings(max_examples=examples(400),
                    deadline=None, suppress_health_check=list(HealthCheck))

def test_the_native_reader_is_built():
    """Every JSON request on a box takes this path: a build that lost the extension would
    quietly cost ~30 us a request, so its absence fails here (and every test below) loudly."""
    assert jsonfast.PARSER == "native", (
        "agent._jsonfloats is not built: run `make venv` (or `pip install -e .`) with a C "
        "compiler present")


def _read(text: bytes, n: int, pos: int = 0) -> tuple[int, np.ndarray]:
    x = np.full(n, 7.0, dtype=np.float32)
    return jsonfast._parse_array(text, pos, x), x


def _reference(text: bytes, n: int) -> np.ndarray | None:
    """What the agent's ordinary path makes of `text` as a params array: json.loads, then the
    float32 conversion (an int beyond float range is refused as not finite, like inf)."""
    try:
        values = json.loads(text, parse_constant=_refuse)
    except (ValueError, RecursionError):
        return None
    if type(values) is not list or len(values) != n:
        return None
    out = np.empty(n, dtype=np.float32)
    for i, v in enumerate(values):
        if v is None:
            out[i] = np.nan
        elif type(v) in (int, float):
            try:
                d = float(v)
            except OverflowError:
                d = math.inf if v > 0 else -math.inf
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out[i] = np.float32(d)
        else:
            return None
    return out


def _refuse(constant: str) -> float:
    raise ValueError(f"{constant} is not JSON")


def _finite(value: object) -> bool:
    """No infinite float anywhere in `value`: json.dumps writes one as Infinity, which is not
    JSON, so the fast path must refuse the line (in any field, not only params)."""
    if type(value) is float:
        return math.isfinite(value)
    if isinstance(value, dict | list):
        return all(map(_finite, value.values() if isinstance(value, dict) else value))
    return True


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal as float32 bit patterns, any NaN equal to any NaN."""
    nan = np.isnan(a)
    return bool(np.array_equal(nan, np.isnan(b))
                and np.array_equal(a[~nan].view(np.uint32), b[~nan].view(np.uint32)))


# ---------------------------------------------------------------------------- the C reader

digits = st.text("0123456789", min_size=1, max_size=25)
json_number = st.builds(
    lambda sign, lead, frac, exp: sign + lead + frac + exp,
    st.sampled_from(["", "-"]),
    st.one_of(st.just("0"), st.builds(lambda a, b: a + b, st.sampled_from("123456789"),
                                      st.text("0123456789", max_size=22))),
    st.one_of(st.just(""), digits.map(lambda d: "." + d)),
    st.one_of(st.just(""), st.builds(lambda e, s, d: e + s + d, st.sampled_from("eE"),
                                     st.sampled_from(["", "+", "-"]),
                                     st.text("0123456789", min_size=1, max_size=4))))
valid_token = st.one_of(
    json_number, st.just("null"),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.floats(allow_nan=False, allow_infinity=False, width=32).map(
        lambda v: json.dumps(json_values(np.array([v], np.float32))[0])),
    st.integers(-(10**40), 10**40).map(str),
    st.integers(-(2**64), 2**64).map(str),
    st.sampled_from(["0", "-0", "-0.0", "1e308", "1e309", "-1e400", "1e-400", "4.9e-324",
                     "3.4028235e38", "3.4028236e38", "3.4028235677973366e38", "9007199254740993",
                     "0.1", "1" + "0" * 400, "0." + "0" * 340 + "1"]))
invalid_token = st.sampled_from([
    "01", "-01", "00", "+1", ".5", "-.5", "1.", "1.e5", "1e", "1e+", "-", "--1", "NaN",
    "Infinity", "-Infinity", "nan", "true", "false", '"1"', "[]", "{}", "1.5.2", "0x10", "",
    "nul", "nulll", "1_000", "1e5.5", "١", "1 2", "null1"])
whitespace = st.sampled_from(["", " ", "  ", "\t", "\r\n", "\n", " \t "])
bad_whitespace = st.sampled_from(["\f", "\v", "\xa0", "\u2003"])


@SETTINGS
@given(st.lists(st.tuples(whitespace, valid_token, whitespace), min_size=1, max_size=12),
       st.sampled_from([b"", b"]", b"}\n", b' , "id": 1}']))
def test_valid_arrays_read_the_same_as_json_loads(items, suffix):
    text = ("[" + ",".join(a + t + b for a, t, b in items) + "]").encode()
    ref = _reference(text, len(items))
    assert ref is not None  # the generator makes valid JSON
    end, x = _read(text + suffix, len(items))
    assert end == len(text)
    assert _same_bits(x, ref), (text, x, ref)


@SETTINGS
@given(st.lists(st.tuples(st.one_of(whitespace, bad_whitespace),
                          st.one_of(valid_token, invalid_token), whitespace),
                min_size=0, max_size=8),
       st.integers(-1, 1), st.sampled_from(["[", "[ ", ""]), st.sampled_from(["]", "", ",]", " ]"]))
def test_anything_json_refuses_the_reader_refuses(items, dn, opening, closing):
    n = max(0, len(items) + dn)
    text = (opening + ",".join(a + t + b for a, t, b in items) + closing).encode()
    ref = _reference(text, n)
    end, x = _read(text, n)
    if ref is None:
        assert end == -1, text
    else:
        assert end == len(text) and _same_bits(x, ref), text


@SETTINGS
@given(st.binary(max_size=200), st.integers(-3, 210), st.integers(0, 6))
def test_random_bytes_are_refused_or_read_as_json_would(data, pos, n):
    end, x = _read(data, n, pos)
    if end == -1:
        return
    assert 0 <= pos < end <= len(data)
    ref = _reference(data[pos:end], n)
    assert ref is not None and _same_bits(x, ref), data


def test_the_reader_refuses_wrong_arguments():
    x = np.empty(2, np.float32)
    with pytest.raises(TypeError):
        jsonfast._parse_array("[1,2]", 0, x)  # text, not bytes
    with pytest.raises(TypeError, match="float32"):
        jsonfast._parse_array(b"[1,2]", 0, np.empty(2, np.float64))
    ro = np.empty(2, np.float32)
    ro.flags.writeable = False
    with pytest.raises((TypeError, BufferError, ValueError)):
        jsonfast._parse_array(b"[1,2]", 0, ro)
    assert jsonfast._parse_array(bytearray(b"[1,2]"), 0, x) == 5
    assert jsonfast._parse_array(memoryview(b"xx[1,2]"), 2, x) == 7 and x.tolist() == [1, 2]


def test_a_long_number_is_read_with_python_s_own_conversion():
    long = "3." + "14159265358979323846" * 30
    end, x = _read(f"[{long}, -{long}e-3]".encode(), 2)
    assert end > 0 and x.tolist() == [np.float32(float(long)), np.float32(-float(long) / 1000)]


# ---------------------------------------------------------------------------- whole lines

N = 6
params_item = st.one_of(st.none(), st.floats(width=32, allow_nan=False),
                        st.floats(allow_nan=False, allow_infinity=False),
                        st.integers(-(10**40), 10**40), st.booleans(), st.text(max_size=2))
scalar = st.one_of(st.none(), st.integers(), st.text(max_size=8), st.floats(allow_nan=False))


@SETTINGS
@given(st.lists(params_item, min_size=N - 1, max_size=N + 1),
       st.dictionaries(st.sampled_from(["id", "die_id", "lot", "x", "params_"]), scalar,
                       max_size=3),
       st.booleans(), st.booleans())
@example([0] * N, {"id": math.inf}, True, False)  # Infinity outside params: refused
def test_a_line_means_the_same_to_the_fast_path_and_to_json(params, extra, params_first, spaced):
    obj = {"params": params, **extra} if params_first else {**extra, "params": params}
    line = json.dumps(obj, separators=(", ", ": ") if spaced else (",", ":")).encode()
    fast = jsonfast.parse_predict_line(line, N)
    if fast is None:  # refused: only for an escape, params that are not N numbers/nulls, or
        # an Infinity anywhere in the line
        assert b"\\" in line or len(params) != N or any(
            type(v) not in (int, float, type(None)) or (type(v) is float and not math.isfinite(v))
            for v in params) or not _finite(extra)
        return
    got, x = fast
    full = parse_json_line(line)
    assert got == {**full, "params": 0}
    try:
        ref = parse_params(full, N)
    except ProtocolError as e:  # an int beyond float range: the finite check names it
        assert e.code.label == "not_finite" and not np.isfinite(x[e.index])
        return
    assert _same_bits(x, ref)


@SETTINGS
@given(st.lists(st.tuples(st.lists(params_item, min_size=N - 1, max_size=N + 1),
                          st.dictionaries(st.sampled_from(["id", "die_id", "lot"]), scalar,
                                          max_size=2),
                          st.booleans()), min_size=1, max_size=5))
@example([([None] * N, {"id": math.inf}, False)])  # Infinity outside params: refused
def test_a_batch_means_the_same_to_the_fast_path_and_to_json(records):
    objs = [{**extra, "params": params} if not nested else {**extra, "x": {"params": params}}
            for params, extra, nested in records]
    line = json.dumps(objs).encode()
    fast = jsonfast.parse_batch_line(line, N)
    plain = all(not nested and len(params) == N and all(
        type(v) in (int, float, type(None)) and (type(v) is not float or math.isfinite(v))
        for v in params) and _finite(extra) for params, extra, nested in records)
    if fast is None:
        assert b"\\" in line or not plain
        return
    assert plain
    items, x = fast
    full = parse_json_line(line)
    assert items == [{**o, "params": 0} for o in full] and x.shape == (len(full), N)
    for row, obj in zip(x, full, strict=True):
        try:
            ref = parse_params(obj, N)
        except ProtocolError as e:
            assert e.code.label == "not_finite" and not np.isfinite(row[e.index])
        else:
            assert _same_bits(row, ref)


@pytest.mark.parametrize("line", [
    b'[{"params": [1,2,3,4,5,6]}, {"x": {"params": [1,2,3,4,5,6]}}]',
    b'[{"params": [1,2,3,4,5,6], "y": {"params": [1,2,3,4,5,6]}}, {"z": 1}]',
    b'[{"params": [1,2,3,4,5,6]}, [1]]',
    b'[{"params": [1,2,3,4,5,6]}, {"params": [1,2,3,4,5]}]',
    b'[{"params": [1,2,3,4,5,6]}, {"params": [1,2,3,4,5,6]}',
    b'{"params": [1,2,3,4,5,6]}',
    b'[]',
])
def test_batches_the_fast_path_cannot_vouch_for_are_left_to_json(line):
    assert jsonfast.parse_batch_line(line, N) is None


@pytest.mark.parametrize("line", [
    b'{"\\u0070arams": [1,2,3,4,5,6]}',  # an escaped key
    b'{"params": [1,2,3,4,5,6], "params": [1,2,3,4,5,6]}',  # twice: json keeps the last
    b'{"x": {"params": [1,2,3,4,5,6]}}',  # not the top level
    b'{"x": ["params", [1,2,3,4,5,6]]}',  # a string, not a key
    b'{"die_id": "params", "params": [1,2,3,4,5,6]}',
    b'{"params"\x0c: [1,2,3,4,5,6]}',  # form feed is not JSON whitespace
    b'{"params": [1,2,3,4,5,6]} x',  # trailing text
    b'{"params": [1,2,3,4,5,6], "die_id": "\xff"}',  # not UTF-8
    b'{"params": [1,2,3,4,5,6]',  # cut short
    b'["params", [1,2,3,4,5,6]]',
    b'{"params": [1,2,3,4,5,6e]}',
    b'{"params": [1,2,3,4,5]}',  # wrong width: the full parse names it
])
def test_lines_the_fast_path_cannot_vouch_for_are_left_to_json(line):
    assert jsonfast.parse_predict_line(line, N) is None


def test_the_fast_path_reads_a_plain_request():
    obj, x = jsonfast.parse_predict_line(
        b'{"id": 7, "die_id": "W3-12", "params": [1, -2.5, null, 1e-3, 0, 3]}', N)
    assert obj == {"id": 7, "die_id": "W3-12", "params": 0}
    assert _same_bits(x, np.array([1, -2.5, np.nan, 1e-3, 0, 3], np.float32))


# ---------------------------------------------------------------------------- the agent


@pytest.fixture(scope="module")
def dispatcher(tmp_path_factory):
    d = tmp_path_factory.mktemp("model")
    model = build_model(d, *make_keys(d), n_features=N)
    runtime = Runtime()
    runtime.swap(model.engine(), model.manifest)
    return Dispatcher(runtime, AgentMetrics(runtime))


def _fast_and_slow(dispatcher: Dispatcher, line: bytes) -> tuple[dict | list, dict | list]:
    """The agent's answer to a line, with the fast path and then without (as if the C reader
    were not built)."""
    fast = _answer(dispatcher, line)
    saved = jsonfast._parse_array
    jsonfast._parse_array = None
    try:
        return fast, _answer(dispatcher, line)
    finally:
        jsonfast._parse_array = saved


def _answer(dispatcher: Dispatcher, line: bytes) -> dict | list:
    """The agent's answer without its latency (an object, or a batch's list of them)."""
    out = json.loads(dispatcher.json_line(line, time.perf_counter()))
    for a in out if isinstance(out, list) else [out]:
        a.pop("latency_us", None)
    return out


@SETTINGS
@given(st.lists(st.one_of(st.none(), st.floats(width=32), st.integers(-3, 3),
                          st.sampled_from([1e39, -1e300, 10**50])), min_size=N, max_size=N),
       scalar, st.sampled_from(["predict", "nope", None]))
def test_every_answer_is_the_same_with_and_without_the_fast_path(dispatcher, params, die_id,
                                                                 op):
    req = {"id": 1, "die_id": die_id, "params": params, **({"op": op} if op else {})}
    line = json.dumps(req).encode()  # NaN/Infinity literals too: both paths refuse them
    fast, slow = _fast_and_slow(dispatcher, line)
    assert fast == slow


@SETTINGS
@given(st.lists(st.tuples(st.lists(st.one_of(st.none(), st.floats(width=32), st.integers(-3, 3),
                                             st.sampled_from([1e39, 10**50, True, "x"])),
                                   min_size=N - 1, max_size=N + 1),
                          scalar, st.sampled_from(["predict", "nope", None])),
                min_size=0, max_size=4))
def test_every_batch_answer_is_the_same_with_and_without_the_fast_path(dispatcher, records):
    line = json.dumps([{"die_id": d, "params": params, **({"op": op} if op else {})}
                       for params, d, op in records]).encode()
    fast, slow = _fast_and_slow(dispatcher, line)
    assert fast == slow


def test_info_says_which_json_parser_runs(dispatcher):
    info = json.loads(dispatcher.json_line(b'{"op": "info"}', time.perf_counter()))
    assert info["json_parser"] == jsonfast.PARSER
