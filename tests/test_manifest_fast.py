"""The manifest parser's array fast paths give exactly what the entry-by-entry checks give: the
same `Manifest` for a valid manifest, the same error (class and message) for an invalid one,
whatever entry of the golden vectors, rules or drift reference is off."""

from __future__ import annotations

import copy
import gc
import math
import re

import numpy as np
import orjson
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import agent.manifest as manifest_module
from agent.manifest import ManifestError, parse_manifest, parse_manifest_bytes

N = 6


def _fields() -> dict:
    return {
        "format": "edgefleet-bundle", "format_version": 1,
        "model": {"name": "m", "version": "v1", "sequence": 1},
        "created": "2026-01-01T00:00:00Z",
        "input": {"n_features": N, "dtype": "float32",
                  "feature_names": [f"p{i}" for i in range(N)]},
        "decision": {"threshold": 1.0, "confidence_scale": 0.5, "top_k": 2},
        "fallback": {"rules": [{"feature": i, "low": -1.0 - i, "high": 2 + i} for i in range(N)]},
        "golden": {"abs_tol": 1e-4, "rel_tol": 1e-3, "vectors": [
            {"params": [0.5 * i - 1 for i in range(N)], "score": 0.25},
            {"params": [None, *range(N - 1)], "score": 1.5}]},
        "drift_reference": {"edges": [[-1.0, 0.0, 1.0 + i] for i in range(N - 1)] + [[]],
                            "proportions": [[0.25, 0.25, 0.25, 0.25]] * (N - 1) + [[1.0]]},
        "files": {"model.onnx": {"sha256": "0" * 64, "size": 10}},
        "signer": "0123456789abcdef",
    }


# Values that stand where a number is expected: valid ones and every kind of wrong one.
_ODD = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True), st.integers(-(10**400), 10**400),
    st.none(), st.booleans(), st.text(max_size=3), st.builds(list), st.builds(dict),
)

# Places a value can be put: (path to the list, index chooser).
_SPOTS = ["golden.vectors.0.params", "golden.vectors.1.params", "fallback.rules.low",
          "fallback.rules.high", "fallback.rules.feature", "fallback.rules", "drift.edges",
          "drift.proportions", "drift.edges.row", "drift.proportions.row"]


def _put(obj: dict, spot: str, i: int, value) -> None:
    rules, drift = obj["fallback"]["rules"], obj["drift_reference"]
    if spot.startswith("golden"):
        obj["golden"]["vectors"][int(spot.split(".")[2])]["params"][i % N] = value
    elif spot == "fallback.rules":
        rules[i % N] = value
    elif spot.startswith("fallback.rules."):
        if isinstance(rules[i % N], dict):  # an earlier edit may have replaced the rule itself
            rules[i % N][spot.rsplit(".", 1)[1]] = value
    elif spot.endswith(".row"):
        drift[spot.split(".")[1]][i % N] = value
    else:
        row = drift[spot.split(".")[1]][i % (N - 1)]
        if isinstance(row, list) and row:
            row[i % len(row)] = value


def _outcome(obj: dict, fast: bool) -> object:
    manifest_module.FAST = fast
    try:
        m = parse_manifest(obj, "m.json")
        _assert_drift_arrays_match_the_tuples(m)
        return m
    except ManifestError as e:
        return ("error", str(e))
    finally:
        manifest_module.FAST = True


@settings(max_examples=300)
@given(st.lists(st.tuples(st.sampled_from(_SPOTS), st.integers(0, 50), _ODD), max_size=3))
@example([("drift.proportions", 0, 10**400)])  # past float's range: once an OverflowError
def test_fast_and_entry_by_entry_checks_agree(changes):
    obj = _fields()
    for spot, i, value in changes:
        _put(obj, spot, i, value)
    slow = _outcome(copy.deepcopy(obj), fast=False)
    fast = _outcome(obj, fast=True)
    if isinstance(slow, tuple):
        assert fast == slow
    else:  # NaN != NaN: compare the parsed fields' text
        assert repr(fast) == repr(slow)
        assert fast.rules == slow.rules and fast.drift_edges == slow.drift_edges


def _assert_drift_arrays_match_the_tuples(m) -> None:
    """`drift_arrays` (what the drift monitor uses) is the tuples, padded as the monitor
    pads them itself (agent.drift._padded)."""
    from agent.drift import _padded

    if m.drift_edges is None:
        assert m.drift_arrays is None
        return
    k = max(map(len, m.drift_edges))
    edges, props = m.drift_arrays
    np.testing.assert_array_equal(edges, _padded(m.drift_edges, k, np.inf, np.float32))
    np.testing.assert_array_equal(props, _padded(m.drift_proportions, k + 1, 0.0, np.float64))
    assert edges.dtype == np.float32 and props.dtype == np.float64
    assert not edges.flags.writeable and not props.flags.writeable


def test_null_params_are_nan_and_missing_rule_limits_are_none():
    obj = _fields()
    obj["fallback"]["rules"][0] = {"feature": 0}
    m = parse_manifest(obj)
    assert math.isnan(m.golden[1].params[0]) and m.golden[1].params[1:] == (0.0, 1.0, 2.0, 3.0,
                                                                             4.0)
    assert m.rules[0][1:] == (None, None)
    assert m.drift_edges[-1] == () and m.drift_proportions[-1] == (1.0,)
    _assert_drift_arrays_match_the_tuples(m)


def test_a_number_too_large_for_a_double_is_refused_by_name():
    obj = _fields()
    obj["golden"]["vectors"][0]["params"][3] = 10**400
    with pytest.raises(ManifestError, match=r"golden.vectors\[0\].params\[3\]: expected a fini"):
        parse_manifest(obj)


def test_the_same_bytes_are_parsed_once():
    data = orjson.dumps(_fields())
    first = parse_manifest_bytes(data, "a")
    assert parse_manifest_bytes(bytes(data), "b") is first
    changed = data.replace(b'"v1"', b'"v2"')
    assert parse_manifest_bytes(changed, "c").version == "v2"


@pytest.mark.parametrize(("spot", "i", "value", "message"), [
    ("drift.proportions.row", 0, [0.5, -0.25, 0.5, 0.25], "proportions summing to 1"),
    ("drift.edges.row", 1, [1.0, 0.0, 2.0], "non-decreasing edges"),
    ("fallback.rules", 2, {"feature": 2, "low": 3.0, "high": 1.0}, r"rules\[2\].low: expected <="),
    ("fallback.rules.feature", 4, N, r"rules\[4\].feature: expected an index in 0..5"),
    ("golden.vectors.0.params", 5, True, r"params\[5\]: expected a finite number or null"),
    ("golden.vectors.1.params", 1, math.nan, r"params\[1\]: expected a finite number or null"),
])
def test_each_kind_of_bad_entry_is_named_by_both_paths(spot, i, value, message):
    obj = _fields()
    _put(obj, spot, i, value)
    slow = _outcome(copy.deepcopy(obj), fast=False)
    assert _outcome(obj, fast=True) == slow
    assert isinstance(slow, tuple) and slow[0] == "error"
    assert re.search(message, slow[1])


_PAD = b" " * 70_000  # past the size below which the manifest is parsed in one call


@pytest.mark.parametrize("data", [
    b'{"a":1' + _PAD + b',"golden":{"x":1},"input":2,"golden":5}',  # a repeated key
    b'{"s":"x,\\"golden\\":' + _PAD + b'","input":1,"fallback":2}',  # a cut inside a string
    b'{"n":{"q":1' + _PAD + b',"golden":2},"input":{"a":1},"fallback":[1]}',  # nested key
    b'{' + _PAD + b',"golden":1,"input":2}',  # an empty first piece
    b'{"a":1,"golden":1' + _PAD + b',"input":2,}',  # trailing comma
    b'{"a":1,"golden":1' + _PAD + b',"input":2} x',  # trailing text
    b'{"a":1,"golden":1' + _PAD + b',"input":2}\n  ',
    b'{"x":"\xff"' + _PAD + b',"golden":1,"input":2}',  # invalid UTF-8
    b'[{"a":1' + _PAD + b',"golden":1,"input":2}]',  # not an object
    b'{"a":1' + _PAD + b',"golden":1,"input":2',  # truncated
])
def test_a_manifest_parsed_in_pieces_is_what_one_parse_gives(data):
    """Cuts that are not between top-level members are detected: the same object, key order
    and acceptance as one orjson parse."""
    try:
        want = orjson.loads(data)
    except ValueError:
        with pytest.raises(ValueError):
            manifest_module.loads_in_pieces(data)
        return
    got = manifest_module.loads_in_pieces(data)
    assert got == want and list(got) == list(want)


def test_a_large_manifest_is_cut_where_its_members_are(monkeypatch):
    """A 512-feature manifest with golden vectors, rules and drift reference parses in pieces,
    none near the whole, to the same object as one parse."""
    fields = _fields()
    n = 512
    fields["input"] = {"n_features": n, "dtype": "float32",
                       "feature_names": [f"p{j}" for j in range(n)]}
    fields["golden"]["vectors"] = [{"params": [j / 7 for j in range(n)], "score": 1.0}] * 8
    fields["drift_reference"] = {"edges": [[-1 / 3, 1 / 7, 2 / 9]] * n,
                                 "proportions": [[0.25, 0.25, 0.25, 0.25]] * n}
    data = orjson.dumps(fields, option=orjson.OPT_SORT_KEYS)
    assert len(data) > 65536
    sizes: list[int] = []

    class Counting:
        @staticmethod
        def loads(b: bytes):
            sizes.append(len(b))
            return orjson.loads(b)

    monkeypatch.setattr(manifest_module, "orjson", Counting)
    got = manifest_module.loads_in_pieces(data)
    assert got == orjson.loads(data) and list(got) == list(orjson.loads(data))
    assert len(sizes) >= 4 and max(sizes) < 0.6 * len(data)


def test_a_parsed_manifest_keeps_its_bytes_and_no_decoded_tree():
    """Issue 15: the decoded tree of a 512-feature manifest is ~2.5k lists and dicts that every
    young garbage collection during an install scanned; the manifest keeps its bytes, a `head`
    without the per-feature arrays, and plain-tuple rules (untracked by the collector)."""
    fields = _fields()
    fields["x-vendor"] = {"k": 1}
    data = manifest_module.canonical_json(fields)
    was_on = gc.isenabled()
    m = parse_manifest_bytes(data, "a")
    assert gc.isenabled() == was_on  # parsed with collection off, and restored
    assert m.tree is None and m.raw == orjson.loads(data)  # the whole manifest, on demand
    assert "rules" not in m.head["fallback"] and "vectors" not in m.head["golden"]
    assert set(m.head["drift_reference"]) == set() and m.head["x-vendor"] == {"k": 1}
    assert m.head["created"] == fields["created"] and m.head["input"] == {"n_features": N,
                                                                         "dtype": "float32"}
    assert all(type(r) is tuple for r in m.rules) and m.rules[1] == (1, -2.0, 3.0)
    assert parse_manifest(fields).raw is fields  # parsed from a tree: that tree
