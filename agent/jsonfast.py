"""The fast path for JSON predict lines: the params array goes straight from the line's bytes
into a float32 array, the rest of the line through the json module as usual.

Why: CPython's json module makes a Python float of each of the 512 numbers and numpy then
copies them out again, ~35 us of a ~60 us request (more than the model). The C reader
(agent/_jsonfloats.c) takes the same text to float32 in a few microseconds.

Why it cannot change an answer: the fast path takes a line only when it can prove the line
means the same to it as to the json module, and otherwise returns None so the caller parses
it the ordinary way (which also names every error):
- the line has no backslash, so no key is spelled with escapes and no string holds a quote;
  then a literal `"params"` that occurs once and is followed by `:` and `[` (JSON whitespace
  between) can only be a key, and the only `params` key;
- the C reader accepts exactly JSON's number grammar and `null`, exactly `n_features` of them,
  and gives the values json.loads + numpy's float32 conversion give, bit for bit
  (tests/test_jsonfast.py checks both against the json module on generated text);
- the rest of the line, with the array replaced by `0`, must parse as JSON to an object whose
  top-level `params` is that 0: so the `"params"` found was the top-level key, and the
  whole line is valid JSON because a valid value stood where the 0 stands.
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
    if _parse_array is None or b"\\" in line:
        return None
    at = line.find(_KEY)
    if at < 0 or line.find(_KEY, at + 8) >= 0:
        return None
    m = _KEY_TO_ARRAY.match(line, at)
    if m is None:
        return None
    x = _empty(n_features, _F4)
    end = _parse_array(line, m.end() - 1, x)
    if end < 0:
        return None
    try:
        obj = parse_json_line(line[:at] + b'"params":0' + line[end:])
    except ProtocolError:
        return None
    if type(obj) is not dict or type(obj.get("params")) is not int or obj["params"] != 0:
        return None
    return obj, x
