"""The agent's JSON reader (orjson, with the json module for what orjson refuses;
agent.protocol.parse_json_line) against the json module alone: it must accept exactly what the
json module accepts, read the same values (an integer id exactly, however large), name the same
errors, and change no answer of the agent. Generated text (hypothesis), random bytes, and the
hand-picked lines where the two libraries differ (numbers beyond double range, integers beyond
64 bits, BOM, nesting, lone surrogates)."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import agent.dispatch as dispatch_module
from agent.dispatch import Dispatcher
from agent.metrics import AgentMetrics
from agent.protocol import (
    JSON_PARSER,
    ErrorCode,
    ProtocolError,
    _json_module_loads,
    json_values,
    parse_json_line,
)
from agent.runtime import Runtime
from tests.agent_support import build_model, make_keys
from tests.conftest import examples

# 400 examples each; the "dev" Hypothesis profile runs ten times as many (tests/conftest.py)
SETTINGS = settings(max_examples=examples(400),
                    deadline=None, suppress_health_check=list(HealthCheck))


def _outcome(read, line: bytes):
    """('ok', value) or ('error', code, message) for one reader."""
    try:
        return ("ok", read(line))
    except ProtocolError as e:
        return ("error", e.code, e.message)


def _same(a, b) -> bool:
    """Equal as JSON values, with types: 1 is not 1.0, -0.0 is not 0.0, NaN equals NaN."""
    if type(a) is not type(b):
        return False
    if type(a) is float:
        return (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a)
                                                     == math.copysign(1, b))
    if type(a) is list:
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if type(a) is dict:
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def _agrees_with_json_module(line: bytes) -> None:
    """Both refuse (with bad_json), or both read the same value: ids exactly, every other
    number the same as a float (orjson reads an integer beyond 64 bits as a float, the value
    numpy's float32 conversion takes from the json module's int too)."""
    got, ref = _outcome(parse_json_line, line), _outcome(_json_module_loads, line)
    if ref[0] == "error":
        assert got[0] == "error" and got[1] == ref[1] == ErrorCode.BAD_JSON, line
        return
    assert got[0] == "ok", (line, got)
    assert _same(_floats(got[1]), _floats(ref[1])), line
    for g, r in zip(_requests(got[1]), _requests(ref[1]), strict=True):
        assert _same(g.get("id"), r.get("id")) and _same(g.get("die_id"), r.get("die_id")), line


def _requests(v) -> list[dict]:
    if type(v) is dict:
        return [v]
    return [x for x in v if type(x) is dict] if type(v) is list else []


def _floats(v):
    """Integers as floats (orjson reads an integer beyond 64 bits as a float, like numpy will)."""
    if type(v) is int:
        try:
            return float(v)
        except OverflowError:
            return math.inf if v > 0 else -math.inf
    if type(v) is list:
        return [_floats(x) for x in v]
    if type(v) is dict:
        return {k: _floats(x) for k, x in v.items()}
    return v


# ---------------------------------------------------------------------------- generated text

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
    json_number, st.just("null"), st.just("true"), st.just('"x"'),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.floats(allow_nan=False, allow_infinity=False, width=32).map(
        lambda v: json.dumps(json_values(np.array([v], np.float32))[0])),
    st.integers(-(10**40), 10**40).map(str),
    st.integers(-(2**64), 2**64).map(str),
    st.sampled_from(["0", "-0", "-0.0", "1e308", "1e309", "-1e400", "1e-400", "4.9e-324",
                     "3.4028235e38", "3.4028236e38", "9007199254740993", "18446744073709551616",
                     "-9223372036854775809", "0.1", "1" + "0" * 400, "0." + "0" * 340 + "1",
                     '"\\ud800"', '"\\u00e9"', '"é"', "[]", "{}"]))
invalid_token = st.sampled_from([
    "01", "-01", "+1", ".5", "1.", "1e", "-", "NaN", "Infinity", "-Infinity", "nan", "",
    "nul", "1_000", "١", "1 2", "null1", '"\x01"', "'x'"])
whitespace = st.sampled_from(["", " ", "\t", "\r\n", "\n", " \t "])
odd_whitespace = st.sampled_from(["\f", "\v", "\xa0", "\u2003", "\ufeff"])
ID = st.one_of(valid_token, invalid_token)


@SETTINGS
@given(st.lists(st.tuples(st.one_of(whitespace, odd_whitespace),
                          st.one_of(valid_token, invalid_token), whitespace),
                min_size=0, max_size=8),
       ID, ID, st.sampled_from(["", " ", "\r", "\f", " x"]), st.booleans())
def test_a_request_line_reads_the_same_as_with_the_json_module(items, rid, die_id, tail, batch):
    params = "[" + ",".join(a + t + b for a, t, b in items) + "]"
    obj = f'{{"id": {rid}, "die_id": {die_id}, "params": {params}}}'
    line = (f"[{obj}, {obj}]" if batch else obj) + tail
    _agrees_with_json_module(line.encode())


@SETTINGS
@given(st.binary(max_size=200))
def test_random_bytes_read_the_same_as_with_the_json_module(data):
    _agrees_with_json_module(data)


@pytest.mark.parametrize("rid", [2**64 - 1, 2**64, -(2**63) - 1, 10**40, -(10**30), 0.5, -0.0,
                                 1e300])
def test_an_integer_id_of_any_size_is_read_exactly(rid):
    line = json.dumps({"id": rid, "die_id": rid, "params": [1]}).encode()
    obj = parse_json_line(line)
    assert type(obj["id"]) is type(rid) and obj["id"] == rid and obj["die_id"] == rid
    batch = parse_json_line(b"[" + line + b"]")
    assert type(batch[0]["id"]) is type(rid) and batch[0]["id"] == rid


def test_nesting_up_to_1024_levels_is_read():
    assert parse_json_line(b"[" * 1024 + b"]" * 1024) is not None


def test_a_number_beyond_double_range_reads_as_infinity_not_as_an_error():
    """The json module reads 1e400 as inf, which the agent refuses as not_finite with its index:
    orjson refuses the line, and the json module reads it as before."""
    assert parse_json_line(b'{"params": [1, 1e400]}')["params"][1] == math.inf


# ---------------------------------------------------------------------------- the agent

N = 6
scalar = st.one_of(st.none(), st.integers(-(2**70), 2**70), st.text(max_size=8),
                   st.floats(allow_nan=False, allow_infinity=False), st.booleans())


@pytest.fixture(scope="module")
def dispatcher(tmp_path_factory):
    d = tmp_path_factory.mktemp("model")
    model = build_model(d, *make_keys(d), n_features=N)
    runtime = Runtime()
    runtime.swap(model.engine(), model.manifest)
    return Dispatcher(runtime, AgentMetrics(runtime))


def _with_and_without_orjson(dispatcher: Dispatcher, line: bytes):
    """The agent's answer to a line, then the same with the json module reading every line and
    no numeric shortcut."""
    fast = _answer(dispatcher, line)
    saved = dispatch_module.parse_json_line, dispatch_module.params_text_is_numeric
    dispatch_module.parse_json_line = _json_module_loads
    dispatch_module.params_text_is_numeric = lambda line: False
    try:
        return fast, _answer(dispatcher, line)
    finally:
        dispatch_module.parse_json_line, dispatch_module.params_text_is_numeric = saved


def _answer(dispatcher: Dispatcher, line: bytes):
    """The agent's answer without its latency (an object, or a batch's list of them)."""
    out = json.loads(dispatcher.json_line(line, time.perf_counter()))
    for a in out if isinstance(out, list) else [out]:
        if isinstance(a, dict):
            a.pop("latency_us", None)
            a.pop("uptime_s", None)
    return out


@SETTINGS
@given(st.lists(st.one_of(st.none(), st.floats(width=32), st.integers(-3, 3),
                          st.sampled_from([1e39, -1e300, 10**50, 2**64, True, "1"])),
                min_size=N - 1, max_size=N + 1),
       scalar, scalar, st.sampled_from(["predict", "nope", "health", None]))
def test_every_answer_is_the_same_as_with_the_json_module(dispatcher, params, rid, die_id, op):
    req = {"id": rid, "die_id": die_id, "params": params, **({"op": op} if op else {})}
    line = json.dumps(req).encode()  # NaN/Infinity literals too: both refuse them
    fast, slow = _with_and_without_orjson(dispatcher, line)
    assert fast == slow


@SETTINGS
@given(st.lists(st.tuples(st.lists(st.one_of(st.none(), st.floats(width=32), st.integers(-3, 3),
                                             st.sampled_from([1e39, 10**50, True, "x"])),
                                   min_size=N - 1, max_size=N + 1),
                          scalar, st.sampled_from(["predict", "nope", None])),
                min_size=0, max_size=4))
def test_every_batch_answer_is_the_same_as_with_the_json_module(dispatcher, records):
    line = json.dumps([{"die_id": d, "params": params, **({"op": op} if op else {})}
                       for params, d, op in records]).encode()
    fast, slow = _with_and_without_orjson(dispatcher, line)
    assert fast == slow


def test_info_says_which_json_parser_runs(dispatcher):
    info = json.loads(dispatcher.json_line(b'{"op": "info"}', time.perf_counter()))
    assert info["json_parser"] == JSON_PARSER == "orjson"


@SETTINGS
@given(st.one_of(st.none(), st.integers(), st.text(), st.text(alphabet=st.characters(
    min_codepoint=0, max_codepoint=0x7f))))
def test_an_echoed_id_is_the_json_encoders_text(v):
    """The answer writer quotes plain ASCII ids itself; the text is the encoder's, byte for
    byte, for every id (escapes, control characters, non-ASCII go to the encoder)."""
    assert dispatch_module._scalar(v) == dispatch_module._dumps(v)
