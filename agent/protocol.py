"""The agent's wire protocol on its Unix socket: constants, parsers and encoders, no I/O.

Two encodings share one stream; the first byte of each message says which (docs/protocol.md):

- `0x89` starts a binary frame: a 24-byte little-endian header (`HEADER`), then `length` bytes
  of payload. A PREDICT payload is `rows` uint64 die ids, then `rows * columns` float32 values
  (NaN = not measured). The answer is a RESULT frame of fixed-size records (`record_dtype`) or
  an ERROR frame.
- any other byte starts a JSON line: UTF-8 JSON terminated by `\\n`, one object (a request) or
  an array of predict objects (a batch). The answer is one JSON line: an object, or an array in
  the batch's order.

Everything here is a pure function of its input so the parsers can be fuzzed directly.
"""

from __future__ import annotations

import functools
import json
import math
import re
import struct
import warnings
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, NamedTuple

import numpy as np
import orjson

from agent.calibration import DEFAULT_CONTEXT, tester_key

# A value beyond float32 becomes inf and is refused by the caller's finite check with its
# index; numpy's warning about the cast says nothing more (and np.errstate costs ~1 us a call).
warnings.filterwarnings("ignore", message="overflow encountered in cast", category=RuntimeWarning)

PROTOCOL_VERSION = 1
MAGIC = b"\x89EFP"
MAGIC_BYTE = MAGIC[0]

# magic, version, type, flags, tag, rows, columns, payload length
HEADER = struct.Struct("<4sBBHIIII")
HEADER_SIZE = HEADER.size  # 24
RESULT_BLOCK = struct.Struct("<QQH6x")  # latency_ns, model_sequence, version_len; 24 bytes
ERROR_BLOCK = struct.Struct("<HHii")  # code, reserved, row, column; then a UTF-8 message
NO_SEQUENCE = 2**64 - 1  # model_sequence when no model is loaded
LABEL_RECORD_SIZE = 24  # u64 die id, f64 time, u8 label, 7 reserved (agent/labels.py)


class FrameType(IntEnum):
    PREDICT = 1  # client -> agent
    RESULT = 2  # agent -> client
    ERROR = 3  # agent -> client
    LABEL = 4  # client -> agent: final-test labels (agent/labels.py)
    LABELED = 5  # agent -> client: how many labels were accepted


class Decision(IntEnum):
    PASS = 0
    FAIL = 1
    ERROR = 2  # this row was refused; see error_code


class Source(IntEnum):
    MODEL = 0
    FALLBACK = 1
    NONE = 2  # error rows


class ErrorCode(IntEnum):
    """Error codes: numbers in binary frames, lowercase names in JSON (`code.label`)."""

    BAD_JSON = 1  # the line is not UTF-8 JSON
    BAD_REQUEST = 2  # valid JSON, but not a request: wrong type, missing field
    UNKNOWN_OP = 3
    BAD_WIDTH = 4  # params has the wrong number of values
    BAD_VALUE = 5  # a value that is neither a number nor null
    NOT_FINITE = 6  # an infinite value, or one outside the float32 range
    TOO_MANY_MISSING = 7
    TOO_LARGE = 8  # line or frame over the limit: the connection is closed
    BAD_FRAME = 9  # unparseable binary header: the connection is closed
    UNAVAILABLE = 10  # no model and no fallback rules: nothing can screen this die
    BUSY = 11  # too many connections: the connection is closed
    INTERNAL = 12
    INCOMPLETE = 13  # the client disconnected mid-message (counted, never sent)

    @property
    def label(self) -> str:
        return self.name.lower()


DECISION_LABELS = ("pass", "fail", "error")
SOURCE_LABELS = ("model", "fallback", None)


class ProtocolError(Exception):
    """A request that gets an error answer. `field`/`index` point at the offending part."""

    def __init__(
        self, code: ErrorCode, message: str, *, field: str | None = None,
        index: int | None = None, row: int | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field
        self.index = index
        self.row = row

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"code": self.code.label, "message": self.message}
        if self.field is not None:
            out["field"] = self.field
        if self.index is not None:
            out["index"] = self.index
        return out


_RECORD_HEAD = [
    ("die_id", "<u8"),
    ("decision", "u1"),
    ("source", "u1"),
    ("error_code", "<u2"),
    ("imputed", "<u4"),
    ("error_column", "<i4"),
    ("score", "<f4"),
    ("threshold", "<f4"),
    ("confidence", "<f4"),
]


@functools.cache
def record_dtype(k: int) -> np.dtype:
    """One RESULT row: 32 bytes, then k int32 top indices and k float32 contributions."""
    return np.dtype([*_RECORD_HEAD, ("top_index", "<i4", (k,)), ("top_contribution", "<f4", (k,))])


RESULT_PREFIX = struct.Struct("<4sBBHIIIIQQH6x")  # HEADER + RESULT_BLOCK, packed in one call
_RESULT = int(FrameType.RESULT)


@functools.cache
def row_struct(k: int) -> struct.Struct:
    """A whole record (head and top-k tail) as one struct, for one-row answers."""
    return struct.Struct(f"<QBBHIifff{k}i{k}f")


def pack_row(row: tuple, record: struct.Struct) -> bytes:
    """One record from a row tuple (record field order; see agent.predictor.Row)."""
    return record.pack(*row[:9], *row[9], *row[10])


def encode_one_result(body: bytes, k: int, tag: int, latency_ns: int, model_sequence: int,
                      version_padded: bytes, version_len: int) -> bytes:
    """A one-row RESULT frame (the same bytes as `encode_result`, in one pack call)."""
    length = RESULT_BLOCK.size + len(version_padded) + len(body)
    return RESULT_PREFIX.pack(MAGIC, PROTOCOL_VERSION, FrameType.RESULT, 0, tag, 1, k, length,
                              latency_ns, model_sequence, version_len) + version_padded + body


class OneResult:
    """One-row RESULT frames of one model (top-k `k`, `version`, `sequence`), each packed by
    one struct call from a row tuple (`agent.predictor.Row`): the same bytes as
    `encode_one_result(pack_row(row, row_struct(k)), ...)` in one call instead of two packs
    and two concatenations."""

    __slots__ = ("_mid", "_pack", "_tail")

    def __init__(self, k: int, version: bytes, sequence: int) -> None:
        vpad = pad_version(version)
        self._pack = struct.Struct(f"<4sBBHIIIIQQH6x{len(vpad)}sQBBHIifff{k}i{k}f").pack
        self._mid = (1, k, RESULT_BLOCK.size + len(vpad) + row_struct(k).size)
        self._tail = (sequence, len(version), vpad)

    def frame(self, tag: int, latency_ns: int, row: tuple) -> bytes:
        return self._pack(MAGIC, PROTOCOL_VERSION, _RESULT, 0, tag, *self._mid, latency_ns,
                          *self._tail, *row[:9], *row[9], *row[10])


def pad_version(version: bytes) -> bytes:
    return version + b"\x00" * _pad8(len(version))


def _pad8(n: int) -> int:
    return -n % 8


# ---------------------------------------------------------------------------- binary frames


class Header(NamedTuple):
    type: int
    flags: int
    tag: int
    rows: int
    columns: int
    length: int


def parse_header(data: bytes | bytearray | memoryview, offset: int = 0) -> Header:
    """Check a 24-byte header; raise `ProtocolError(BAD_FRAME)` when the stream cannot be trusted
    to continue (the caller then closes the connection)."""
    magic, version, ftype, flags, tag, rows, columns, length = HEADER.unpack_from(data, offset)
    if magic != MAGIC:
        raise ProtocolError(ErrorCode.BAD_FRAME,
                            f"header: magic expected {MAGIC!r}, found {magic!r}", field="magic")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(ErrorCode.BAD_FRAME,
                            f"header: version expected {PROTOCOL_VERSION}, found {version}",
                            field="version")
    if ftype not in (FrameType.PREDICT, FrameType.LABEL):
        raise ProtocolError(ErrorCode.BAD_FRAME,
                            f"header: type expected {int(FrameType.PREDICT)} (PREDICT) or "
                            f"{int(FrameType.LABEL)} (LABEL), found {ftype}", field="type")
    if flags and ftype != FrameType.PREDICT:  # PREDICT: the tester id (`frame_tester`)
        raise ProtocolError(ErrorCode.BAD_FRAME, f"header: flags expected 0, found {flags}",
                            field="flags")
    if ftype == FrameType.LABEL:
        if columns or length != rows * LABEL_RECORD_SIZE:
            raise ProtocolError(
                ErrorCode.BAD_FRAME, f"header: a LABEL frame has columns 0 and length rows * "
                f"{LABEL_RECORD_SIZE} = {rows * LABEL_RECORD_SIZE}, found columns {columns}, "
                f"length {length}", field="length")
        return Header(ftype, flags, tag, rows, columns, length)
    if length != rows * (8 + 4 * columns):
        raise ProtocolError(
            ErrorCode.BAD_FRAME,
            f"header: length expected rows * (8 + 4 * columns) = {rows * (8 + 4 * columns)}, "
            f"found {length}", field="length")
    return Header(ftype, flags, tag, rows, columns, length)


def frame_tester(buf: bytes | bytearray | memoryview, offset: int = 0) -> str:
    """The calibration context of a PREDICT frame: its header's `flags`, the tester id 1..65535
    (the same context as JSON `"tester": <that integer>`); 0, the default context."""
    tester = buf[offset + 6] | buf[offset + 7] << 8
    return str(tester) if tester else DEFAULT_CONTEXT


def encode_predict(params: np.ndarray, die_ids: np.ndarray | None = None, tag: int = 0,
                   tester: int = 0) -> bytes:
    """A PREDICT frame for a (rows, columns) batch; die ids default to 0..rows-1; `tester`
    (1..65535, 0 = none) goes in the header's flags."""
    x = np.ascontiguousarray(params, dtype="<f4")
    if x.ndim == 1:
        x = x.reshape(1, -1)
    rows, columns = x.shape
    ids = np.arange(rows, dtype="<u8") if die_ids is None else np.asarray(die_ids, dtype="<u8")
    if ids.shape != (rows,):
        raise ValueError(f"die_ids: expected {rows} ids, found shape {ids.shape}")
    header = HEADER.pack(MAGIC, PROTOCOL_VERSION, FrameType.PREDICT, tester, tag, rows, columns,
                         rows * (8 + 4 * columns))
    return header + ids.tobytes() + x.tobytes()


def encode_result(records: np.ndarray | bytes, k: int, tag: int, latency_ns: int,
                  model_sequence: int, model_version: bytes, rows: int | None = None) -> bytes:
    """A RESULT frame: header, block (latency, model sequence and version), then the records
    (a record array, or `rows` records already packed)."""
    vpad = _pad8(len(model_version))
    if isinstance(records, bytes):
        body = records
    else:
        body, rows = records.tobytes(), len(records)
    length = RESULT_BLOCK.size + len(model_version) + vpad + len(body)
    return b"".join((
        HEADER.pack(MAGIC, PROTOCOL_VERSION, FrameType.RESULT, 0, tag, rows, k, length),
        RESULT_BLOCK.pack(min(latency_ns, 2**64 - 1), model_sequence, len(model_version)),
        model_version, b"\x00" * vpad, body,
    ))


def encode_error_frame(err: ProtocolError, tag: int = 0) -> bytes:
    msg = err.message.encode("utf-8")[:4000]
    row = -1 if err.row is None else err.row
    col = -1 if err.index is None else err.index
    payload = ERROR_BLOCK.pack(err.code, 0, row, col) + msg
    header = HEADER.pack(MAGIC, PROTOCOL_VERSION, FrameType.ERROR, 0, tag, 0, 0, len(payload))
    return header + payload


@dataclass(frozen=True)
class ResultFrame:
    """A decoded RESULT frame (client side)."""

    tag: int
    k: int
    latency_ns: int
    model_sequence: int | None
    model_version: str | None
    records: np.ndarray  # record_dtype(k)


def decode_answer_frame(header_bytes: bytes, payload: bytes) -> ResultFrame:
    """Decode a RESULT frame; raise `ProtocolError` carrying the agent's error for ERROR frames."""
    magic, version, ftype, _flags, tag, rows, k, length = HEADER.unpack(header_bytes)
    if magic != MAGIC or version != PROTOCOL_VERSION or len(payload) != length:
        raise ProtocolError(ErrorCode.BAD_FRAME, f"bad answer header {header_bytes!r}")
    if ftype == FrameType.ERROR:
        code, _res, row, col = ERROR_BLOCK.unpack_from(payload)
        try:
            ecode = ErrorCode(code)
        except ValueError:
            ecode = ErrorCode.INTERNAL
        raise ProtocolError(ecode, payload[ERROR_BLOCK.size:].decode("utf-8", "replace"),
                            index=None if col < 0 else col, row=None if row < 0 else row)
    if ftype != FrameType.RESULT:
        raise ProtocolError(ErrorCode.BAD_FRAME, f"unexpected answer frame type {ftype}")
    latency_ns, sequence, vlen = RESULT_BLOCK.unpack_from(payload)
    start = RESULT_BLOCK.size + vlen + _pad8(vlen)
    version = payload[RESULT_BLOCK.size:RESULT_BLOCK.size + vlen].decode("ascii")
    records = np.frombuffer(payload, dtype=record_dtype(k), count=rows, offset=start)
    return ResultFrame(tag, k, latency_ns, None if sequence == NO_SEQUENCE else sequence,
                       version or None, records)


def row_error(code: int, column: int, imputed: int, n_features: int, limit: int) -> ProtocolError:
    """The error a refused record row stands for, with a message naming the column."""
    code = ErrorCode(code)
    if code == ErrorCode.NOT_FINITE:
        return ProtocolError(code, f"params[{column}]: infinite or outside the float32 range",
                             field="params", index=column)
    if code == ErrorCode.TOO_MANY_MISSING:
        return ProtocolError(code, f"params: {imputed} of {n_features} values missing, "
                             f"at most {limit} allowed", field="params")
    if code == ErrorCode.UNAVAILABLE:
        return ProtocolError(code, "no model is loaded and no fallback rules are configured")
    return ProtocolError(code, code.label)


# ---------------------------------------------------------------------------- JSON lines

OPS = ("predict", "health", "info", "label")


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON (use null for a missing value)")


_decoder = json.JSONDecoder(parse_constant=_refuse_constant)
_LEADING_SPACE = re.compile(r"[ \t\r]*")
_orjson_loads = orjson.loads
_OrjsonError = orjson.JSONDecodeError
JSON_PARSER = "orjson"
"""Which library reads JSON lines (`info` answers say it)."""


def _raw_decode(text: str) -> tuple[Any, int]:
    start = _LEADING_SPACE.match(text).end() if text[:1] in (" ", "\t", "\r") else 0
    return _decoder.raw_decode(text, start)


_JSON_SPACE = b" \t\r\n"


def params_text_is_numeric(line: bytes | bytearray | memoryview) -> bool:
    """True when the text of a line that parsed as JSON proves that every `params` list in it
    (one request, or each request of a batch) holds only numbers and nulls, so `parse_params`
    may skip its per-element type scan (~9 us of a JSON request). Conservative: False whenever
    unsure. Why it is sound: with no backslash in the line no key is escaped and no string
    holds a quote, so every key named params is a literal `"params"` in the text, and a literal
    `"params"` followed by `:` is a key (a string value is never followed by `:` in valid JSON);
    when each such literal is followed by a list whose text up to the first `]` has no quote
    (no string), no `[` or `{` (no container, so that `]` closes it) and no `t` or `f` (no
    true/false), what is left in valid JSON is numbers and nulls. Each test is one memchr over
    the list's text (bytes.find of one byte): about a microsecond for 512 values, where
    counting the keys over the whole line and deleting the number characters took six."""
    if type(line) is memoryview:
        line = line.tobytes()
    if b"\\" in line:
        return False
    find = line.find
    key = find(b'"params"')
    if key < 0:
        return False
    while key >= 0:
        key += 8
        start = find(b"[", key)
        if start < 0 or line[key:start].strip(_JSON_SPACE) != b":":
            return False
        end = find(b"]", start)
        if end < 0 or find(b'"', start, end) >= 0 or find(b"t", start, end) >= 0 or \
                find(b"f", start, end) >= 0 or find(b"{", start, end) >= 0 or \
                find(b"[", start + 1, end) >= 0:
            return False
        key = find(b'"params"', end)
    return True


_NUMBER_OR_NULL = frozenset((float, int, type(None)))


def parse_json_line(line: bytes | bytearray | memoryview) -> Any:
    """Decode one line (without its newline); raise `ProtocolError(BAD_JSON)`.

    orjson reads the line. What it refuses goes to the json module, which names the error in
    the agent's words, or takes what orjson does not but the agent always has: a number beyond
    double range (it becomes inf, refused later as not_finite with its index), a lone
    surrogate escape. orjson also reads an integer beyond 64 bits as a float; an `id` or
    `die_id` must come back exactly as sent, so a line whose ids read as floats is read again
    by the json module (a float id is rare; a huge integer id is the only case this changes).
    Nesting: orjson takes up to 1024 levels, the json module's recursion limit less; deeper is
    refused with "JSON nested too deeply"."""
    try:
        obj = _orjson_loads(line)
    except _OrjsonError:
        return _json_module_loads(line)
    t = type(obj)
    if t is dict:
        if type(obj.get("id")) is float or type(obj.get("die_id")) is float:
            return _json_module_loads(line)
    elif t is list:
        for item in obj:
            if type(item) is dict and (type(item.get("id")) is float
                                       or type(item.get("die_id")) is float):
                return _json_module_loads(line)
    return obj


def _json_module_loads(line: bytes | bytearray | memoryview) -> Any:
    try:
        text = str(line, "utf-8")
        obj, end = _raw_decode(text)
        if end != len(text) and not text[end:].isspace():
            raise ValueError(f"extra data after the JSON value (char {end})")
        return obj
    except UnicodeDecodeError as e:
        raise ProtocolError(ErrorCode.BAD_JSON, f"line is not UTF-8 (byte {e.start})") from None
    except RecursionError:
        raise ProtocolError(ErrorCode.BAD_JSON, "JSON nested too deeply") from None
    except ValueError as e:
        raise ProtocolError(ErrorCode.BAD_JSON, f"not valid JSON: {e}") from None


def request_op(obj: Any) -> str:
    """The operation of a decoded request object; raise `ProtocolError` for a bad one."""
    if isinstance(obj, list):
        return "predict"
    if not isinstance(obj, dict):
        raise ProtocolError(ErrorCode.BAD_REQUEST,
                            f"request: expected an object or an array, found {_kind(obj)}")
    op = obj.get("op", "predict")
    if op not in OPS:
        shown = json.dumps(op)[:40] if _jsonable(op) else repr(op)[:40]
        raise ProtocolError(ErrorCode.UNKNOWN_OP,
                            f"op: expected one of {', '.join(OPS)}, found {shown}", field="op")
    return op


def parse_params(record: Any, n_features: int, where: str = "", *,
                 numeric: bool = False) -> np.ndarray:
    """One predict record's params as float32 (NaN for null); raise `ProtocolError` naming the
    field or index. Infinite values (and values beyond float32) are left as inf for the caller's
    finite check, which reports their index. `numeric=True` (from `params_text_is_numeric`)
    skips the type scan."""
    if not isinstance(record, dict):
        raise ProtocolError(ErrorCode.BAD_REQUEST,
                            f"{where}request: expected an object, found {_kind(record)}")
    op = record.get("op", "predict")
    if op != "predict":
        raise ProtocolError(ErrorCode.UNKNOWN_OP if op not in OPS else ErrorCode.BAD_REQUEST,
                            f"{where}op: a batch holds only predict requests", field="op")
    params = record.get("params")
    if not isinstance(params, list):
        found = "nothing" if "params" not in record else _kind(params)
        raise ProtocolError(ErrorCode.BAD_REQUEST,
                            f"{where}params: expected a list of {n_features} numbers or nulls, "
                            f"found {found}", field="params")
    if len(params) != n_features:
        raise ProtocolError(ErrorCode.BAD_WIDTH,
                            f"{where}params: expected {n_features} values, found {len(params)}",
                            field="params")
    # type(), not isinstance: JSON true/false are bools, which isinstance would take as ints
    if not numeric and not set(map(type, params)) <= _NUMBER_OR_NULL:
        i = next(i for i, v in enumerate(params) if type(v) not in _NUMBER_OR_NULL)
        shown = json.dumps(params[i])[:40] if _jsonable(params[i]) else repr(params[i])[:40]
        raise ProtocolError(ErrorCode.BAD_VALUE,
                            f"{where}params[{i}]: expected a number or null, found {shown}",
                            field="params", index=i)
    try:
        return np.array(params, dtype=np.float32)  # null -> NaN; beyond float32 -> inf
    except OverflowError:  # an integer beyond float range; name the first non-finite value,
        # as the finite check does when numpy returns inf instead (and agent.jsonfast always)
        i = next(i for i, v in enumerate(params) if v is not None and not _finite32(v))
        raise ProtocolError(ErrorCode.NOT_FINITE,
                            f"{where}params[{i}]: infinite or outside the float32 range",
                            field="params", index=i) from None


def _finite32(v: float) -> bool:
    try:
        return math.isfinite(v) and abs(v) < _FLOAT32_OVERFLOW
    except OverflowError:  # an int beyond float range
        return False


_FLOAT32_OVERFLOW = float.fromhex("0x1.ffffffp+127")  # and above, float32 rounding gives inf


def _kind(v: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "true/false",
             int: "a number", float: "a number", type(None): "null"}
    return names.get(type(v), type(v).__name__)


def _jsonable(v: Any) -> bool:
    return isinstance(v, (str, int, float, bool, type(None)))


def check_ids(obj: dict[str, Any], where: str = "") -> None:
    """Refuse an `id` or `die_id` that cannot be echoed as sent: an array or object, or a number
    beyond the double range (the client would lose its correlation key)."""
    for key in ("id", "die_id"):
        v = obj.get(key)
        if v is None or type(v) in (str, int, bool) or (type(v) is float and math.isfinite(v)):
            continue
        found = _kind(v) if type(v) is not float else "a number beyond the double range"
        raise ProtocolError(ErrorCode.BAD_REQUEST,
                            f"{where}{key}: expected a string, a number, true/false or null, "
                            f"found {found}", field=key)


def parse_tester(obj: Any, where: str = "") -> str:
    """A predict request's optional `tester` (a string of 1..64 printable characters or a
    non-negative integer) as its calibration context key (agent.calibration); absent or
    null: the default context."""
    if type(obj) is not dict or obj.get("tester") is None:
        return DEFAULT_CONTEXT
    try:
        return tester_key(obj["tester"])
    except ValueError as e:
        raise ProtocolError(ErrorCode.BAD_VALUE, f"{where}tester: {e}, found "
                            f"{_kind(obj['tester'])}", field="tester") from None


def json_id(obj: Any, key: str) -> Any:
    """The `id` or `die_id` to echo: any JSON scalar; containers (refused by `check_ids`) are
    echoed as null."""
    if not isinstance(obj, dict):
        return None
    v = obj.get(key)
    return v if _jsonable(v) and (type(v) is not float or math.isfinite(v)) else None


_JSON_SPECIAL = {"nan": None, "inf": 1e39, "-inf": -1e39}


def json_values(row: np.ndarray) -> list[float | None]:
    """A float32 row as JSON-ready values: the shortest decimal that reads back as the same
    float32 (half the bytes, and half the agent's parse time, of float64 reprs), None for NaN,
    and +/-1e39 for infinities (JSON has none; the agent refuses both as not finite)."""
    out: list[float | None] = []
    for text in np.asarray(row, dtype=np.float32).astype(str).tolist():
        out.append(_JSON_SPECIAL[text] if text in _JSON_SPECIAL else float(text))
    return out


_encoder = json.JSONEncoder(separators=(",", ":"), allow_nan=False, ensure_ascii=False)


def encode_json(obj: Any) -> bytes:
    """One answer line (with its newline)."""
    return (_encoder.encode(obj) + "\n").encode("utf-8")


def error_json(err: ProtocolError, request_id: Any = None, die_id: Any = None) -> dict[str, Any]:
    return {"id": request_id, "die_id": die_id, "error": err.to_json()}
