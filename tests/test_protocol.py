"""The wire protocol as pure functions: frames and JSON lines both ways, and the parsers under
random input (hypothesis). Live sockets are in test_agent_server.py and test_protocol_fuzz.py."""

from __future__ import annotations

import json
import math
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.calibration import tester_key as key_of
from agent.labels import encode_label_frame
from agent.protocol import (
    HEADER,
    HEADER_SIZE,
    MAGIC,
    NO_SEQUENCE,
    PROTOCOL_VERSION,
    Decision,
    ErrorCode,
    FrameType,
    OneResult,
    ProtocolError,
    Source,
    decode_answer_frame,
    encode_error_frame,
    encode_one_result,
    encode_predict,
    encode_result,
    frame_tester,
    json_values,
    pack_row,
    pad_version,
    params_text_is_numeric,
    parse_header,
    parse_json_line,
    parse_params,
    record_dtype,
    request_op,
    row_struct,
)
from tests.conftest import examples

SETTINGS = settings(max_examples=examples(300), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------------------- binary frames


def test_predict_frame_layout_is_header_ids_then_float32_rows():
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    frame = encode_predict(x, np.array([7, 2**63], dtype=np.uint64), tag=99)
    assert frame[:4] == b"\x89EFP" and len(frame) == HEADER_SIZE + 2 * 8 + 6 * 4
    h = parse_header(frame)
    assert (h.type, h.tag, h.rows, h.columns, h.length) == (FrameType.PREDICT, 99, 2, 3, 40)
    assert struct.unpack_from("<2Q", frame, 24) == (7, 2**63)
    assert np.array_equal(np.frombuffer(frame, "<f4", offset=40).reshape(2, 3), x)


@pytest.mark.parametrize(("field", "patch"), [
    ("magic", lambda b: b"\x89EFQ" + b[4:]),
    ("version", lambda b: b[:4] + bytes([2]) + b[5:]),
    ("type", lambda b: b[:5] + bytes([2]) + b[6:]),
    ("length", lambda b: b[:20] + struct.pack("<I", 13) + b[24:]),
])
def test_a_bad_header_is_refused_naming_the_field(field, patch):
    frame = patch(encode_predict(np.zeros((1, 4), np.float32)))
    with pytest.raises(ProtocolError) as e:
        parse_header(frame)
    assert e.value.code == ErrorCode.BAD_FRAME and e.value.field == field
    assert field in e.value.message


def test_a_predict_frame_names_its_tester_in_the_flags_and_a_label_frame_cannot():
    """Flags were reserved (0); a PREDICT frame now carries the tester id 1..65535 there for
    the agent's per-tester calibration (0: the shared context, as every earlier client sends),
    keyed like JSON's integer `tester`. Any other frame type with flags stays `bad_frame`."""
    frame = encode_predict(np.zeros((1, 4), np.float32), tester=513)
    assert parse_header(frame).flags == 513 and frame[6:8] == b"\x01\x02"
    assert frame_tester(frame) == key_of(513) == "513"
    assert frame_tester(b"pad" + encode_predict(np.zeros((2, 4), np.float32)), 3) == ""
    label = encode_label_frame([1], [1])
    with pytest.raises(ProtocolError) as e:
        parse_header(label[:6] + b"\x01\x00" + label[8:])
    assert e.value.code == ErrorCode.BAD_FRAME and e.value.field == "flags"


def test_result_frame_round_trips_through_the_client_decoder():
    k = 3
    rec = np.zeros(2, dtype=record_dtype(k))
    rec["die_id"] = [5, 6]
    rec["decision"] = [Decision.FAIL, Decision.ERROR]
    rec["source"] = [Source.MODEL, Source.NONE]
    rec["error_code"] = [0, ErrorCode.NOT_FINITE]
    rec["error_column"] = [-1, 17]
    rec["score"] = [4.5, np.nan]
    rec["top_index"] = [[3, 1, -1], [-1, -1, -1]]
    rec["top_contribution"] = [[2.0, 1.0, 0.0], [0, 0, 0]]
    frame = encode_result(rec, k, tag=4, latency_ns=1234, model_sequence=42,
                          model_version=b"2026.1")
    header, payload = frame[:HEADER_SIZE], frame[HEADER_SIZE:]
    assert HEADER.unpack(header)[7] == len(payload)
    out = decode_answer_frame(header, payload)
    assert (out.tag, out.k, out.latency_ns, out.model_sequence, out.model_version) == (
        4, 3, 1234, 42, "2026.1")
    assert out.records.tobytes() == rec.tobytes()
    assert record_dtype(k).itemsize == 32 + 8 * k


def test_one_row_encoder_writes_the_same_bytes_as_the_batch_encoder():
    k, version = 5, b"v1.2.3"
    row = (9, 1, 0, 0, 2, -1, 3.5, 3.25, 0.5, [4, 0, 2, -1, -1], [9.0, 1.5, 0.25, 0.0, 0.0])
    rec = np.zeros(1, dtype=record_dtype(k))
    rec[0] = (*row[:9], row[9], row[10])
    one = encode_one_result(pack_row(row, row_struct(k)), k, 3, 777, 8, pad_version(version),
                            len(version))
    assert one == encode_result(rec, k, 3, 777, 8, version)
    assert OneResult(k, version, 8).frame(3, 777, row) == one
    assert OneResult(k, b"", NO_SEQUENCE).frame(3, 777, row) == encode_result(
        rec, k, 3, 777, NO_SEQUENCE, b"")


def test_no_model_sequence_decodes_as_none():
    frame = encode_result(np.zeros(0, record_dtype(1)), 1, 0, 0, NO_SEQUENCE, b"")
    out = decode_answer_frame(frame[:HEADER_SIZE], frame[HEADER_SIZE:])
    assert out.model_sequence is None and out.model_version is None and len(out.records) == 0


def test_error_frame_carries_code_row_column_and_message():
    frame = encode_error_frame(ProtocolError(ErrorCode.BAD_WIDTH, "columns: expected 512",
                                             index=3, row=1), tag=8)
    with pytest.raises(ProtocolError) as e:
        decode_answer_frame(frame[:HEADER_SIZE], frame[HEADER_SIZE:])
    assert (e.value.code, e.value.index, e.value.row) == (ErrorCode.BAD_WIDTH, 3, 1)
    assert e.value.message == "columns: expected 512"
    assert HEADER.unpack_from(frame)[2] == FrameType.ERROR and HEADER.unpack_from(frame)[4] == 8


# ---------------------------------------------------------------------------- JSON lines


def test_params_null_becomes_nan_and_numbers_become_float32():
    x = parse_params({"params": [1, 2.5, None, -0.0]}, 4)
    assert x.dtype == np.float32 and x[0] == 1 and x[1] == 2.5 and math.isnan(x[2])


@pytest.mark.parametrize(("record", "code", "needle"), [
    ({"params": [1, 2]}, ErrorCode.BAD_WIDTH, "expected 3 values, found 2"),
    ({"params": [1, "2", 3]}, ErrorCode.BAD_VALUE, "params[1]"),
    ({"params": [1, 2, True]}, ErrorCode.BAD_VALUE, "params[2]"),
    ({"params": [1, [2], 3]}, ErrorCode.BAD_VALUE, "params[1]"),
    ({"params": [1, 2, 10**400]}, ErrorCode.NOT_FINITE, "params[2]"),
    ({"params": "1,2,3"}, ErrorCode.BAD_REQUEST, "params: expected a list"),
    ({"die_id": 4}, ErrorCode.BAD_REQUEST, "found nothing"),
    ([1, 2, 3], ErrorCode.BAD_REQUEST, "expected an object"),
])
def test_a_bad_record_is_refused_naming_the_field_or_index(record, code, needle):
    with pytest.raises(ProtocolError) as e:
        parse_params(record, 3)
    assert e.value.code == code and needle in e.value.message


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")
def test_json_numbers_beyond_float32_become_inf_for_the_finite_check():
    assert np.isinf(parse_params({"params": [1e39, 0, 0]}, 3)[0])


@pytest.mark.parametrize(("line", "needle"), [
    (b"\xff\xfe{}", "not UTF-8"),
    (b'{"params": [NaN]}', "NaN is not valid JSON"),
    (b'{"params": [Infinity]}', "Infinity is not valid JSON"),
    (b'{"a": 1} {"b": 2}', "extra data"),
    (b"[" * 100_000, "nested too deeply"),
    (b"[" * 1025 + b"]" * 1025, "nested too deeply"),  # orjson's limit, 1024 levels
    (b'\xef\xbb\xbf{"params": [1]}', "not valid JSON"),  # a BOM is not JSON
    (b'{"params": [1, -Infinity]}', "-Infinity is not valid JSON"),
    (b'{"id": "\xff"}', "not UTF-8"),
    (b"", "not valid JSON"),
])
def test_a_line_that_is_not_json_is_refused(line, needle):
    with pytest.raises(ProtocolError) as e:
        parse_json_line(line)
    assert e.value.code == ErrorCode.BAD_JSON and needle in e.value.message


def test_leading_and_trailing_whitespace_is_allowed():
    assert parse_json_line(b'  {"op": "health"} \t') == {"op": "health"}


@pytest.mark.parametrize(("obj", "op"), [
    ({"params": []}, "predict"), ({"op": "info"}, "info"), ([{}], "predict"),
    ({"op": "health"}, "health"),
])
def test_request_op_defaults_to_predict(obj, op):
    assert request_op(obj) == op


@pytest.mark.parametrize("obj", [{"op": "reboot"}, {"op": ["x"]}, {"op": None}])
def test_an_unknown_op_is_refused_naming_op(obj):
    with pytest.raises(ProtocolError) as e:
        request_op(obj)
    assert e.value.code == ErrorCode.UNKNOWN_OP and e.value.field == "op"


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")
def test_json_values_are_the_shortest_text_that_reads_back_as_the_same_float32():
    x = np.array([0.1, 1 / 3, np.nan, -2.5e-8, np.inf, 3.4e38], dtype=np.float32)
    vals = json_values(x)
    assert vals[2] is None and vals[4] == 1e39
    back = np.array([np.nan if v is None else v for v in vals], dtype=np.float32)
    mask = ~np.isnan(x) & np.isfinite(x)
    assert np.array_equal(back[mask], x[mask])
    assert json.dumps(vals[0]) == "0.1"


# ---------------------------------------------------------------------------- properties

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**30, 10**30),
                         st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=8))
json_values_st = st.recursive(json_scalars, lambda c: st.one_of(
    st.lists(c, max_size=4), st.dictionaries(st.text(max_size=6), c, max_size=4)), max_leaves=12)


@SETTINGS
@given(st.binary(max_size=300))
def test_random_bytes_never_crash_the_json_parser(data):
    try:
        parse_json_line(data)
    except ProtocolError as e:
        assert e.code == ErrorCode.BAD_JSON


@SETTINGS
@given(st.binary(min_size=HEADER_SIZE, max_size=HEADER_SIZE))
def test_random_headers_are_accepted_only_when_consistent(data):
    try:
        h = parse_header(MAGIC + data[4:])
    except ProtocolError as e:
        assert e.code == ErrorCode.BAD_FRAME and e.field
    else:
        assert h.length == h.rows * (8 + 4 * h.columns) and h.flags == 0
        assert data[4] == PROTOCOL_VERSION


@SETTINGS
@given(json_values_st, st.integers(1, 6))
def test_random_json_records_get_an_array_or_a_protocol_error(obj, n):
    try:
        x = parse_params(obj, n)
    except ProtocolError as e:
        assert e.code in (ErrorCode.BAD_REQUEST, ErrorCode.BAD_WIDTH, ErrorCode.BAD_VALUE,
                          ErrorCode.NOT_FINITE, ErrorCode.UNKNOWN_OP)
    else:
        assert x.shape == (n,) and x.dtype == np.float32


params_items = st.one_of(st.none(), st.integers(-10**6, 10**6),
                         st.floats(allow_nan=False, allow_infinity=False, width=32),
                         st.booleans(), st.text(max_size=3), st.lists(st.integers(), max_size=2))


@SETTINGS
@given(st.lists(params_items, min_size=1, max_size=8), st.dictionaries(
    st.sampled_from(["id", "die_id", "x", "params", "op"]), json_values_st, max_size=3),
    st.booleans())
def test_the_numeric_shortcut_never_lets_a_non_number_through(params, extra, spaced):
    obj = {**extra, "params": params}
    line = json.dumps(obj, separators=(", ", ": ") if spaced else (",", ":")).encode()
    parsed = parse_json_line(line)
    slow_error = fast_error = None
    try:
        slow = parse_params(parsed, len(params))
    except ProtocolError as e:
        slow_error = e.code
    try:
        fast = parse_params(parsed, len(params), numeric=params_text_is_numeric(line))
    except ProtocolError as e:
        fast_error = e.code
    assert slow_error == fast_error
    if slow_error is None:
        assert np.array_equal(slow, fast, equal_nan=True)


def test_the_numeric_shortcut_is_refused_for_escaped_keys_or_any_non_numeric_params():
    assert params_text_is_numeric(b'{"id":1,"params":[1,2.5,null,-3e4]}')
    assert params_text_is_numeric(b'[{"params":[1]},{"params" : [ 2 , null ]}]')
    assert params_text_is_numeric(b'{"x":{"params":[1]},"params":[1]}')  # both numeric
    assert not params_text_is_numeric(b'{"params":[1,true]}')
    assert not params_text_is_numeric(b'{"x":{"params":[1]},"\\u0070arams":[true]}')
    assert not params_text_is_numeric(b'{"x":{"params":[true]},"params":[1]}')
    assert not params_text_is_numeric(b'[{"params":[1]},{"params":[false]}]')
    assert not params_text_is_numeric(b'{"die_id":"params","params":[1]}')  # a value: unsure
    assert not params_text_is_numeric(b'{"params":[1,"2"]}')
    assert not params_text_is_numeric(b'{"params":[1,[2]]}')  # a list: the first ] is not its end
    assert not params_text_is_numeric(b'{"params":[1,{"a":2}]}')
    assert not params_text_is_numeric(b'{"params":[1,false]}')
    assert not params_text_is_numeric(b'{"params":[1],"x":{"params":[null,true]}}')  # each one
    assert not params_text_is_numeric(b'{"params" 1, "x": [1]}')  # not followed by a list
