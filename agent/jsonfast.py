"""The fast path for JSON predict lines (one die, or a batch): each params array goes straight
from the line's bytes into float32, the rest of the line through the json module as usual.

Why: CPython's json module makes a Python float of each of the 512 numbers and numpy then
copies them out again, ~35 us of a ~60 us request (more than the model). The C reader
(agent/_jsonfloats.c) takes the same text to float32 in a few microseconds.

Why it cannot change an answer: the fast path takes a line only when it can prove the line
means the same to it as to the json module, and otherwise returns None so the caller parses
it the ordinary way (which also names every error):
- the line has no backslash, so no key is spelled with escapes and no string holds a quote;
  then a literal `"params"` followed by `:` and `[` (JSON whitespace between) can only be a
  key, and every `params` key is such a literal;
- the C reader accepts exactly JSON's number grammar and `null`, exactly `n_features` of them,
  and gives the values json.loads + numpy's float32 conversion give, bit for bit
  (tests/test_jsonfast.py checks both against the json module on generated text);
- the rest of the line, with each array replaced by `0`, must parse as JSON to an object whose
  top-level `params` is that 0 (for a batch: an array of such objects, one per `"params"` in
  the line): so each `"params"` found was a request's own key, and the whole line is valid
  JSON because a valid value stood where each 0 stands.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from agent.protocol import ProtocolError, parse_json_line

try:
    from agent._jsonfloats import parse_array as _parse_array
except ImportError:  # a checkout nobody built: the json module parses every line
    _parse_array = None

PARSER = "native" if _parse_array is not None else "python"
"""Which parser reads JSON params here, for `info` answers and the start-up log."""

_KEY = b'"params"'
_KEY_TO_ARRAY = re.compile(rb'"params"[ \t\r\n]*:[ \t\r\n]*\[')  # JSON whitespace only
_F4 = np.float32
_empty = np.empty


def parse_predict_line(line: bytes, n_features: int) -> tuple[dict[str, Any], np.ndarray] | None:
    """(request object with params replaced by 0, params as float32 with NaN for null), or
    None when the fast path cannot vouch for the line (the caller then parses it in full)."""
    read = _read(line, n_features, 1)
    if read is None:
        return None
    obj, rows = read
    if type(obj) is not dict or not _is_placeholder(obj):
        return None
    return obj, rows[0]


def parse_batch_line(line: bytes,
                     n_features: int) -> tuple[list[dict[str, Any]], np.ndarray] | None:
    """A batch line (a JSON array of predict objects): (the objects with params replaced by 0,
    their params as a (rows, n_features) float32 array in the same order), or None as above.
    Why the order holds: every object must have a top-level params placeholder and there are
    exactly as many `"params"` keys in the line as objects, so each object has exactly one and
    the i-th key in the text belongs to the i-th object."""
    read = _read(line, n_features, None)
    if read is None:
        return None
    items, rows = read
    if type(items) is not list or len(items) != len(rows):
        return None
    for item in items:
        if type(item) is not dict or not _is_placeholder(item):
            return None
    return items, np.stack(rows)


def _is_placeholder(obj: dict[str, Any]) -> bool:
    v = obj.get("params")
    return type(v) is int and v == 0


def _read(line: bytes, n: int, rows: int | None) -> tuple[Any, list[np.ndarray]] | None:
    """The line with each `"params": [...]` replaced by 0, parsed as JSON, and the arrays read
    into float32 rows (at most `rows` of them; None: any number). The search for the next key
    starts after the array just read: arrays are most of a line's bytes."""
    if _parse_array is None or b"\\" in line:
        return None
    at = line.find(_KEY)
    if at < 0:
        return None
    read: list[np.ndarray] = []
    parts, prev = [], 0
    while at >= 0:
        if rows is not None and len(read) == rows:
            return None
        m = _KEY_TO_ARRAY.match(line, at)
        if m is None:
            return None
        x = _empty(n, _F4)
        end = _parse_array(line, m.end() - 1, x)
        if end < 0:
            return None
        read.append(x)
        parts += (line[prev:at], b'"params":0')
        prev = end
        at = line.find(_KEY, end)
    parts.append(line[prev:])
    try:
        obj = parse_json_line(b"".join(parts))
    except ProtocolError:
        return None
    return obj, read
