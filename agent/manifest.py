"""The bundle manifest (format v1): a strict parser from JSON to frozen dataclasses.

Every field is checked for presence, type and range; an error names the JSON path, what was
expected and what was found. Unknown top-level keys are refused unless they start with `x-`
(vendor extensions), so a typo never silently drops a setting. See docs/bundle-format.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import hashlib
import itertools
import json
import math
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import orjson

from agent.errors import EdgefleetError
from agent.wire import Reason

FORMAT_NAME = "edgefleet-bundle"
FORMAT_VERSION = 1  # the newest format this code understands
MODEL_FILE = "model.onnx"
DTYPES = ("float32",)

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
_KID_RE = re.compile(r"^[0-9a-f]{16}$")


class BundleError(EdgefleetError):
    """Base of every way a bundle can be refused."""

    reason = Reason.BUNDLE_CORRUPT


class ManifestError(BundleError):
    """The manifest is not valid JSON or does not follow the v1 schema."""

    reason = Reason.BUNDLE_CORRUPT


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    size: int


@dataclass(frozen=True)
class InputSchema:
    n_features: int
    feature_names: tuple[str, ...]
    dtype: str = "float32"


# Fail the die when parameter `feature` (an index) is below `low` or above `high` (None: no
# limit); a missing measurement (NaN) never violates a rule. A plain tuple (feature, low, high):
# a manifest holds one per feature, and the garbage collector stops tracking a tuple of numbers
# after its first look, where it keeps scanning a named tuple or any class's instances in every
# young collection until they are promoted (each collection holds the GIL; issue 15).
Rule = tuple[int, float | None, float | None]


@dataclass(frozen=True)
class GoldenVector:
    params: tuple[float, ...]  # NaN where the JSON has null (a missing measurement)
    score: float


@dataclass(frozen=True)
class Manifest:
    format_version: int
    name: str
    version: str
    sequence: int
    created: datetime
    expires: datetime | None
    input: InputSchema
    threshold: float
    confidence_scale: float
    top_k: int
    rules: tuple[Rule, ...]
    golden: tuple[GoldenVector, ...]
    golden_abs_tol: float
    golden_rel_tol: float
    files: dict[str, FileEntry]
    signer: str
    evaluation: dict[str, Any] = field(default_factory=dict)
    drift_edges: tuple[tuple[float, ...], ...] | None = None
    drift_proportions: tuple[tuple[float, ...], ...] | None = None
    # the same drift reference as the drift monitor holds it: edges (n, k) float32 padded on
    # the right with +inf, proportions (n, k + 1) float64 padded with 0 (k: the most edges of
    # any feature). Built here from the parser's flat arrays, so that building a monitor on a
    # swap copies two arrays instead of walking ~10k floats in 1k tuples (issue 15)
    drift_arrays: tuple[np.ndarray, np.ndarray] | None = field(default=None, compare=False,
                                                               repr=False)
    # the decoded JSON without its per-feature arrays (see `_head`): what the agent reads at
    # run time (created, alert_psi, max_missing, min_measured, calibration, x- extensions)
    head: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    signed_bytes: bytes = field(default=b"", compare=False, repr=False)  # manifest.json as stored
    # the whole decoded JSON when the manifest was not parsed from bytes (else decoded anew)
    tree: dict[str, Any] | None = field(default=None, compare=False, repr=False)

    @property
    def model_digest(self) -> str:
        return self.files[MODEL_FILE].sha256

    @property
    def raw(self) -> dict[str, Any]:
        """The whole decoded manifest.json, for tools that print or rewrite it.

        Decoded from `signed_bytes` on each call when the manifest was parsed from bytes: a
        kept tree of a 512-feature manifest is ~2.5k lists and dicts, that every young garbage
        collection during an install scanned (issue 15); the agent reads `head`."""
        if self.tree is not None:
            return self.tree
        return orjson.loads(self.signed_bytes) if self.signed_bytes else dict(self.head)


_PARSED_MAX = 4  # the manifests of the active, previous and incoming versions, and one spare
_parsed: dict[bytes, Manifest] = {}
_parsed_lock = threading.Lock()


def parse_manifest_bytes(data: bytes, where: str) -> Manifest:
    """Parse manifest.json bytes; `where` names the file in error messages.

    The result is kept by the bytes' SHA-256 (the same bytes always give the same manifest, so
    nothing that changed can be served from the cache): an install parses the incoming
    manifest once, and the running model's, the previous version's on a rollback and the
    store's integrity checks find theirs parsed. The parse runs on the install thread of the
    serving process, where every millisecond it holds the GIL can delay an answer."""
    key = hashlib.sha256(data).digest()  # hashlib lets other threads run while it hashes
    m = _parsed.get(key)
    if m is not None:
        return m
    with _no_collection():
        try:
            # orjson: a 100 kB manifest parses in a fifth of json's time, and the parse holds
            # the GIL from start to end (the serving thread waits on it during an install); it
            # refuses NaN and Infinity and checks UTF-8, as this did with the json module
            obj = loads_in_pieces(data)
        except ValueError as e:
            raise ManifestError(f"{where}: not valid UTF-8 JSON: {e}") from None
        # the tree is dropped here (the manifest keeps its bytes and `head`): freed by
        # reference counting at once, never scanned by a garbage collection
        m = dataclasses.replace(parse_manifest(obj, where), signed_bytes=bytes(data), tree=None)
        del obj
    with _parsed_lock:
        while len(_parsed) >= _PARSED_MAX:
            _parsed.pop(next(iter(_parsed)))
        _parsed[key] = m
    return m


@contextlib.contextmanager
def _no_collection() -> Iterator[None]:
    """No automatic garbage collection inside (restored after, if it was on).

    A 512-feature manifest decodes to ~2.5k lists and dicts, alive until the parse ends: young
    collections during the parse (one per 700 allocations) scanned them again and again, ~1 ms
    each with the GIL held (issue 15), to find nothing to free; reference counting frees the
    tree when the parse drops it. Collection is process-wide state: with two parses at once,
    it comes back when the one that turned it off ends (nothing else in the agent turns it
    off)."""
    was_on = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_on:
            gc.enable()


# Top-level keys before which a manifest is cut for `loads_in_pieces`: in the canonical (sorted)
# order they split a 512-feature manifest into pieces of at most the drift reference (half of
# its ~210 kB; the golden vectors are most of the rest).
_CUT_BEFORE = (b',"drift_reference":', b',"evaluation":', b',"fallback":', b',"golden":',
               b',"input":')


def loads_in_pieces(data: bytes) -> Any:
    """`orjson.loads(data)`, parsed as a few top-level pieces when the bytes allow it.

    One orjson call on a 210 kB manifest holds the GIL for ~0.6 ms without a break (more under
    load), and the serving thread waits for all of it (issue 15); between pieces the
    interpreter hands the GIL over. Cutting at `,"key":` gives pieces `{...}`; when every
    piece parses as a non-empty object the cuts were between top-level members (a cut inside
    a string or a nested value leaves a piece unbalanced or unterminated, which orjson
    refuses), so the whole is valid and is exactly the pieces' members in order (a repeated
    key keeps its last value, as in one parse). Anything else: one parse of the whole, which
    also gives its error."""
    cuts = sorted(i for i in map(data.find, _CUT_BEFORE) if i > 0)
    if len(cuts) < 2 or len(data) < 65536:
        return orjson.loads(data)
    obj: dict[str, Any] = {}
    bounds = [*cuts, len(data)]
    pieces = [data[:cuts[0]] + b"}"] + [b"{" + data[a + 1:b] + (b"}" if b != len(data) else b"")
                                        for a, b in itertools.pairwise(bounds)]
    for piece in pieces:
        try:
            part = orjson.loads(piece)
        except ValueError:
            return orjson.loads(data)
        if not isinstance(part, dict) or not part:
            return orjson.loads(data)
        obj.update(part)
    return obj


def canonical_json(obj: Any) -> bytes:
    """The bytes a writer stores as manifest.json: sorted keys, no spaces, UTF-8, no NaN."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


class _Reader:
    """Typed access to a JSON object with errors that name the path."""

    def __init__(self, where: str) -> None:
        self.where = where

    def fail(self, path: str, expected: str, found: Any) -> ManifestError:
        shown = json.dumps(found)[:80] if not isinstance(found, _Missing) else "nothing"
        return ManifestError(f"{self.where}: field {path}: expected {expected}, found {shown}")

    def get(self, obj: dict, key: str, path: str, kind: type | tuple, *, optional: bool = False):
        if key not in obj:
            if optional:
                return None
            raise self.fail(f"{path}{key}", _kind_name(kind), _MISSING)
        value = obj[key]
        if value is None and optional:
            return None
        # bool is an int in Python; JSON true is never a number here.
        if isinstance(value, bool) and bool not in _as_tuple(kind):
            raise self.fail(f"{path}{key}", _kind_name(kind), value)
        if not isinstance(value, kind):
            raise self.fail(f"{path}{key}", _kind_name(kind), value)
        return value

    def number(self, obj: dict, key: str, path: str, *, optional: bool = False) -> float | None:
        v = self.get(obj, key, path, (int, float), optional=optional)
        if v is None:
            return None
        if not _finite(v):
            raise self.fail(f"{path}{key}", "a finite number", v)
        return float(v)

    def time(self, obj: dict, key: str, path: str, *, optional: bool = False) -> datetime | None:
        v = self.get(obj, key, path, str, optional=optional)
        if v is None:
            return None
        try:
            t = datetime.fromisoformat(v.replace("Z", "+00:00"))
        except ValueError:
            raise self.fail(f"{path}{key}", "an ISO 8601 time", v) from None
        if t.tzinfo is None:
            raise self.fail(f"{path}{key}", "a time with a UTC offset (e.g. ...Z)", v)
        return t.astimezone(UTC)


class _Missing:
    pass


_MISSING = _Missing()


def _as_tuple(kind: type | tuple) -> tuple:
    return kind if isinstance(kind, tuple) else (kind,)


def _kind_name(kind: type | tuple) -> str:
    if set(_as_tuple(kind)) == {int, float}:
        return "a number"
    names = {int: "an integer", float: "a number", str: "a string", list: "a list",
             dict: "an object", bool: "true/false"}
    return " or ".join(names.get(k, k.__name__) for k in _as_tuple(kind))


_TOP_KEYS = {
    "format", "format_version", "model", "created", "expires", "input", "decision", "fallback",
    "golden", "evaluation", "drift_reference", "files", "signer",
}


def parse_manifest(obj: Any, where: str = "manifest.json") -> Manifest:
    """Check a decoded manifest against the v1 schema and build a `Manifest`."""
    r = _Reader(where)
    if not isinstance(obj, dict):
        raise r.fail("(top level)", "an object", obj)
    unknown = sorted(k for k in obj if k not in _TOP_KEYS and not k.startswith("x-"))
    if unknown:
        raise ManifestError(f"{where}: unknown field {unknown[0]!r} (extensions must start x-)")
    fmt = r.get(obj, "format", "", str)
    if fmt != FORMAT_NAME:
        raise r.fail("format", repr(FORMAT_NAME), fmt)
    version = r.get(obj, "format_version", "", int)
    if version < 1:
        raise r.fail("format_version", "an integer >= 1", version)

    model = r.get(obj, "model", "", dict)
    name = r.get(model, "name", "model.", str)
    if not _NAME_RE.match(name):
        raise r.fail("model.name", "1-128 chars of [A-Za-z0-9._-]", name)
    model_version = r.get(model, "version", "model.", str)
    if not _NAME_RE.match(model_version):
        raise r.fail("model.version", "1-128 chars of [A-Za-z0-9._-]", model_version)
    sequence = r.get(model, "sequence", "model.", int)
    if sequence < 0:
        raise r.fail("model.sequence", "an integer >= 0", sequence)

    created = r.time(obj, "created", "")
    expires = r.time(obj, "expires", "", optional=True)
    assert created is not None
    if expires is not None and expires <= created:
        raise r.fail("expires", f"a time after created ({created.isoformat()})", obj["expires"])

    inp = r.get(obj, "input", "", dict)
    n = r.get(inp, "n_features", "input.", int)
    if not 1 <= n <= 100_000:
        raise r.fail("input.n_features", "an integer in 1..100000", n)
    names = r.get(inp, "feature_names", "input.", list)
    if len(names) != n or not (set(map(type, names)) <= {str}
                               or all(isinstance(x, str) for x in names)):
        raise r.fail("input.feature_names", f"{n} strings", f"{len(names)} entries")
    if len(set(names)) != n:
        raise r.fail("input.feature_names", "unique names", "duplicates")
    dtype = r.get(inp, "dtype", "input.", str)
    if dtype not in DTYPES:
        raise r.fail("input.dtype", " or ".join(DTYPES), dtype)

    decision = r.get(obj, "decision", "", dict)
    threshold = r.number(decision, "threshold", "decision.")
    scale = r.number(decision, "confidence_scale", "decision.")
    assert threshold is not None and scale is not None
    if scale <= 0:
        raise r.fail("decision.confidence_scale", "a number > 0", scale)
    top_k = r.get(decision, "top_k", "decision.", int)
    if not 1 <= top_k <= n:
        raise r.fail("decision.top_k", f"an integer in 1..{n}", top_k)

    fallback = r.get(obj, "fallback", "", dict)
    rule_list = r.get(fallback, "rules", "fallback.", list)
    rules = _fast_rules(rule_list, n) if FAST else None
    if rules is None:
        rules = _parse_rules(r, rule_list, n)

    golden_obj = r.get(obj, "golden", "", dict)
    abs_tol = r.number(golden_obj, "abs_tol", "golden.")
    rel_tol = r.number(golden_obj, "rel_tol", "golden.")
    assert abs_tol is not None and rel_tol is not None
    if abs_tol < 0 or rel_tol < 0:
        raise r.fail("golden.abs_tol", "tolerances >= 0", [abs_tol, rel_tol])
    vectors = []
    for i, vec in enumerate(r.get(golden_obj, "vectors", "golden.", list)):
        p = f"golden.vectors[{i}]."
        if not isinstance(vec, dict):
            raise r.fail(p[:-1], "an object", vec)
        params = r.get(vec, "params", p, list)
        if len(params) != n:
            raise r.fail(f"{p}params", f"{n} numbers or nulls", f"{len(params)} entries")
        values = _fast_numbers(params, nullable=True) if FAST else None
        if values is None:
            values = _parse_params(r, params, p)
        score = r.number(vec, "score", p)
        assert score is not None
        vectors.append(GoldenVector(tuple(values), score))

    evaluation = r.get(obj, "evaluation", "", dict, optional=True) or {}

    drift_edges = drift_props = drift_arrays = None
    drift = r.get(obj, "drift_reference", "", dict, optional=True)
    if drift is not None:
        drift_edges, drift_props, drift_arrays = _parse_drift(r, drift, n)

    files_obj = r.get(obj, "files", "", dict)
    files: dict[str, FileEntry] = {}
    for fname, entry in files_obj.items():
        p = f"files[{fname!r}]."
        if not _NAME_RE.match(fname) or fname in ("manifest.json", "manifest.sig"):
            raise r.fail(f"files[{fname!r}]", "a plain file name other than manifest.*", fname)
        if not isinstance(entry, dict):
            raise r.fail(p[:-1], "an object", entry)
        sha = r.get(entry, "sha256", p, str)
        if not _SHA_RE.match(sha):
            raise r.fail(f"{p}sha256", "64 lowercase hex digits", sha)
        size = r.get(entry, "size", p, int)
        if size < 0:
            raise r.fail(f"{p}size", "an integer >= 0", size)
        files[fname] = FileEntry(sha, size)
    if MODEL_FILE not in files:
        raise r.fail("files", f"an entry for {MODEL_FILE}", sorted(files))

    signer = r.get(obj, "signer", "", str)
    if not _KID_RE.match(signer):
        raise r.fail("signer", "a 16-hex-digit key id", signer)

    return Manifest(
        format_version=version,
        name=name,
        version=model_version,
        sequence=sequence,
        created=created,
        expires=expires,
        input=InputSchema(n, tuple(names), dtype),
        threshold=threshold,
        confidence_scale=scale,
        top_k=top_k,
        rules=tuple(rules),
        golden=tuple(vectors),
        golden_abs_tol=abs_tol,
        golden_rel_tol=rel_tol,
        files=files,
        signer=signer,
        evaluation=evaluation,
        drift_edges=drift_edges,
        drift_proportions=drift_props,
        drift_arrays=drift_arrays,
        head=_head(obj),
        tree=obj,
    )


# The per-feature arrays of a manifest, left out of `Manifest.head` (the parsed fields hold them)
_ARRAYS = {"drift_reference": ("edges", "proportions"), "fallback": ("rules",),
           "golden": ("vectors",), "input": ("feature_names",)}


def _head(obj: dict[str, Any]) -> dict[str, Any]:
    """`obj` without the arrays in `_ARRAYS` (the rest of each object kept as is)."""
    return {k: ({kk: vv for kk, vv in v.items() if kk not in _ARRAYS[k]}
                if k in _ARRAYS and isinstance(v, dict) else v) for k, v in obj.items()}


def _parse_rules(r: _Reader, rule_list: list, n: int) -> list[Rule]:
    rules = []
    for i, rule in enumerate(rule_list):
        p = f"fallback.rules[{i}]."
        if not isinstance(rule, dict):
            raise r.fail(p[:-1], "an object", rule)
        feat = r.get(rule, "feature", p, int)
        if not 0 <= feat < n:
            raise r.fail(f"{p}feature", f"an index in 0..{n - 1}", feat)
        low = r.number(rule, "low", p, optional=True)
        high = r.number(rule, "high", p, optional=True)
        if low is not None and high is not None and low > high:
            raise r.fail(f"{p}low", f"<= high ({high})", low)
        rules.append((feat, low, high))
    return rules


def _parse_params(r: _Reader, params: list, p: str) -> list[float]:
    values = []
    for j, x in enumerate(params):
        if x is None:
            values.append(math.nan)
        elif isinstance(x, (int, float)) and not isinstance(x, bool) and _finite(x):
            values.append(float(x))
        else:
            raise r.fail(f"{p}params[{j}]", "a finite number or null", x)
    return values


def _parse_drift(r: _Reader, drift: dict, n: int):
    edges = r.get(drift, "edges", "drift_reference.", list)
    props = r.get(drift, "proportions", "drift_reference.", list)
    if len(edges) != n or len(props) != n:
        raise r.fail("drift_reference", f"edges and proportions for {n} features",
                      f"{len(edges)} and {len(props)}")
    fast = _fast_drift(edges, props) if FAST else None
    if fast is not None:
        return fast
    out_e, out_p = [], []
    for i, (e, p) in enumerate(zip(edges, props, strict=True)):
        ok = (isinstance(e, list) and isinstance(p, list) and len(p) == len(e) + 1
              and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in e + p))
        if not ok:
            raise r.fail(f"drift_reference[{i}]", "k edges and k+1 proportions",
                         [len(x) if isinstance(x, list) else x for x in (e, p)])
        try:  # an integer past float's range is refused here, not raised as OverflowError
            fe, fp = tuple(float(x) for x in e), tuple(float(x) for x in p)
        except OverflowError:
            raise r.fail(f"drift_reference[{i}]", "numbers within float range",
                         [x for x in e + p if isinstance(x, int)]) from None
        if any(b < a for a, b in itertools.pairwise(e)):
            raise r.fail(f"drift_reference.edges[{i}]", "non-decreasing edges", e)
        if any(x < 0 for x in p) or abs(sum(p) - 1.0) > 1e-3:
            raise r.fail(f"drift_reference.proportions[{i}]", "proportions summing to 1", p)
        out_e.append(fe)
        out_p.append(fp)
    flat_e = np.array([x for e in out_e for x in e], dtype=np.float64)
    flat_p = np.array([x for p in out_p for x in p], dtype=np.float64)
    lengths = np.array([len(e) for e in out_e], dtype=np.intp)
    return tuple(out_e), tuple(out_p), _drift_arrays(flat_e, flat_p, lengths)


def _drift_arrays(flat_e: np.ndarray, flat_p: np.ndarray,
                  n_edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The padded arrays of `Manifest.drift_arrays` from every feature's edges and proportions
    one after the other (`n_edges[i]` edges and `n_edges[i] + 1` proportions for feature i)."""
    k = int(n_edges.max()) if n_edges.size else 0
    edges = np.full((n_edges.size, k), np.inf, dtype=np.float32)
    edges[np.arange(k) < n_edges[:, None]] = flat_e  # row-major: each row's values in order
    props = np.zeros((n_edges.size, k + 1), dtype=np.float64)
    props[np.arange(k + 1) < n_edges[:, None] + 1] = flat_p
    edges.flags.writeable = props.flags.writeable = False  # every monitor of the model shares them
    return edges, props


# -- fast paths ------------------------------------------------------------------------------
#
# A 512-feature manifest holds ~20k numbers (golden vectors, rules, drift reference). Checked one
# by one in Python that took ~4 ms per parse on the install thread of the serving process, in
# the serving thread's GIL budget. Each fast path below checks a whole array in a few C-speed
# passes (type sets, numpy) and returns exactly what the entry-by-entry check returns, or None
# when anything is off: the entry-by-entry check then runs and names the first bad entry.
# tests/test_manifest_fast.py holds the two paths to the same answers.

FAST = True  # tests switch the fast paths off to compare
_NUMBER = frozenset((int, float))
_NUMBER_OR_NULL = frozenset((int, float, type(None)))


def _finite(x: int | float) -> bool:
    """math.isfinite, and False for an integer too large for a double (1e400 written out)."""
    try:
        return math.isfinite(x)
    except OverflowError:
        return False


def _finite_array(values: list | tuple, *, nullable: bool) -> tuple[np.ndarray, bool] | None:
    """`values` as a float64 array (NaN for null when `nullable`) and whether all of them were
    floats (or nulls) already, if every entry is a finite number (or null); None otherwise."""
    kinds = set(map(type, values))  # exact types: a bool (JSON true) is no number here
    if not kinds <= (_NUMBER_OR_NULL if nullable else _NUMBER):
        return None
    try:
        a = np.array(values, dtype=np.float64)  # None -> NaN
    except (OverflowError, TypeError, ValueError):
        return None
    nulls = values.count(None) if type(None) in kinds else 0
    if a.size - np.count_nonzero(np.isfinite(a)) != nulls:
        return None  # a non-finite number (possible from Python's json, never from orjson)
    return a, int not in kinds


def _fast_numbers(values: list, *, nullable: bool) -> list[float] | None:
    """`values` as the entry-by-entry check converts them (floats, NaN for null), or None."""
    checked = _finite_array(values, nullable=nullable)
    if checked is None:
        return None
    return checked[0].tolist()


def _fast_rules(rules: list, n: int) -> list[Rule] | None:
    if not rules or set(map(type, rules)) != {dict}:
        return None
    features, lows, highs = zip(*[(rule.get("feature"), rule.get("low"), rule.get("high"))
                                  for rule in rules], strict=True)
    if set(map(type, features)) != {int}:
        return None
    lo, hi = _finite_array(lows, nullable=True), _finite_array(highs, nullable=True)
    if lo is None or hi is None:
        return None
    try:
        f = np.array(features, dtype=np.int64)
    except OverflowError:
        return None
    if f.min() < 0 or f.max() >= n or np.any(lo[0] > hi[0]):  # NaN (null): no limit
        return None
    if not (lo[1] and hi[1]):  # an integer limit: as a float, like the entry-by-entry check
        lows, highs = (tuple(v if v is None else float(v) for v in x) for x in (lows, highs))
    return list(zip(features, lows, highs, strict=True))


def _fast_drift(edges: list, props: list):
    if set(map(type, edges)) | set(map(type, props)) != {list}:
        return None
    n_edges = np.fromiter(map(len, edges), dtype=np.intp, count=len(edges))
    n_props = np.fromiter(map(len, props), dtype=np.intp, count=len(props))
    if np.any(n_props != n_edges + 1):
        return None
    checked_e = _finite_array(list(itertools.chain.from_iterable(edges)), nullable=False)
    checked_p = _finite_array(list(itertools.chain.from_iterable(props)), nullable=False)
    if checked_e is None or checked_p is None:
        return None
    (e, floats_e), (p, floats_p) = checked_e, checked_p
    start_e = np.cumsum(n_edges) - n_edges
    start_p = np.cumsum(n_props) - n_props
    rising = np.diff(e) >= 0
    across = start_e[(start_e > 0) & (start_e < e.size)] - 1  # pairs of two features' edges
    rising[across] = True
    sums = np.add.reduceat(p, start_p) if p.size else p
    off = np.abs(sums - 1.0)
    # sums within 1e-9 of the limit: the Python sum of the slow path decides, not numpy's
    if not rising.all() or np.any(p < 0) or np.any(off > 1e-3) or np.any(
            np.abs(off - 1e-3) < 1e-9):
        return None
    return (_rows(edges, e, start_e, floats_e), _rows(props, p, start_p, floats_p),
            _drift_arrays(e, p, n_edges))


def _rows(rows: list[list], flat: np.ndarray, starts: np.ndarray, floats: bool):
    """Tuples of floats, one per row: the rows themselves when they hold floats only."""
    if floats:
        return tuple(map(tuple, rows))
    values, cuts = flat.tolist(), [*starts.tolist(), flat.size]
    return tuple(tuple(values[a:b]) for a, b in itertools.pairwise(cuts))


def utc_now() -> datetime:
    return datetime.now(UTC)


def format_time(t: datetime) -> str:
    """RFC 3339 UTC with a Z suffix and whole seconds, as the writer stores times."""
    return t.astimezone(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")
