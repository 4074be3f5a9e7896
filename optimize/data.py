"""Die test data: a seeded generator that looks like a parametric test program, and the loaders
every later stage reads data through (CSV, NPZ, the real SECOM fab data).

Generator
---------
`generate_dies(DieConfig(...))` simulates wafer sort of `n_dies` dies, each measured on
`n_params` (default 512) parameters in named groups (`PARAM_GROUPS`: supply and quiescent
currents, leakage currents, threshold voltages, drive currents and voltages, ring-oscillator
frequencies, setup and hold timing margins, Vmin, on-die temperature sensors). Every parameter
is driven by four latent factors (process speed, Vt shift, leakage, temperature) through
per-parameter loadings, plus small independent noise. The factors themselves carry structure:
a per-lot and a per-wafer offset, a radial term (edge dies are slower, higher-Vt, leakier) and
the die's own variation. Leakage and IDDQ are log-normal (heavy right tail); the rest is linear
in the factors. Each parameter is standardized so its pass distribution has unit variance in
"sigma units" before it is mapped to physical units.

The test program (names, units, spec limits) depends only on `n_params`, never on the seed:
different seeds are different production runs of the same product. Spec limits sit 5 to 6.5
sigma from the centre of the pass distribution, rounded to 4 significant digits.

Labels: `defect` is one of
  - `none`   a passing die. A normal die that happens to land outside a limit is relabelled
             `gross` (the test program fails it), so every `pass` die is inside spec.
  - `gross`  one to three parameters of one group far outside their limits (a short: a current
             over its high limit; an open: a dead ring oscillator or transistor; a negative
             timing margin; a Vt out of range). A per-parameter limit rule catches every one; the
             violating cells are never blanked to missing.
  - `subtle` every parameter inside spec (forced into the inner 80% of each limit band, in sigma
             units), but the joint structure is broken across dozens of parameters: the die's
             own part of one factor is set to 1.2 to 2.5 sigma and one side of the parameters sees
             it with the opposite sign. Either the speed factor flips for the timing side (ring
             oscillators, timing margins, Vmin) against the current side (fast oscillators with
             low leakage), or the measured threshold voltages disagree with the drive and leakage
             currents. Limits cannot see it; a model of the joint distribution can.
`label` is `fail` for `gross` and `subtle`, else `pass`.

Drift (`DieConfig.drift`): from `drift_start` (fraction of the run) to the last die, one
process factor (`drift_factor`, default speed) moves linearly by `drift_size` sigma.

Missing measurements: a fraction `missing_rate` of cells is NaN (empty in CSV).

All randomness comes from one `np.random.default_rng(seed)`, drawn in a fixed order, and CSV
floats are written with `%.6g`, so the same config gives a byte-identical file (for the same
numpy version).

CSV layout (`write_csv`)
------------------------
One header row, then one row per die, comma separated, no quoting needed:

    die_id,timestamp,lot,wafer,x,y,label,defect,idd_core_01,...,temp_sensor_16

`die_id` like `LOT0001-W03-D117`; `timestamp` ISO 8601 to the second, increasing; `lot`;
`wafer` (1-25); `x`, `y` die coordinates on the wafer map (integers, centre 0); `label`
`pass`/`fail`; `defect` `none`/`gross`/`subtle`; then the parameter columns in metadata order,
`%.6g` formatted, missing = empty cell.

Spec sidecar (`dies.csv` -> `dies.spec.json`, `write_spec`/`load_spec`)
------------------------------------------------------------------------
    {
      "format": "edgefleet-die-spec",
      "version": 1,
      "groups": {"idd_core": "core supply current IDD", ...},      (optional, informative)
      "parameters": [
        {"name": "idd_core_01", "group": "idd_core", "unit": "mA", "low": 30.5, "high": 55.2},
        ...
      ]
    }
`parameters` lists one entry per parameter in column order. `low`/`high` are numbers or `null`
(no limit on that side). A die violates a limit when a measured value is `< low` or `> high`;
a missing measurement violates nothing. Unknown keys are ignored.

Loaders
-------
`load_csv`, `load_npz` (or `load_dataset`, by suffix) return a frozen `Dataset`. Columns that
are not measurements never reach `Dataset.X`; they are recognized by name, case-insensitive:
`NON_FEATURE_COLUMNS` (id, die_id, row, index, timestamp, time, date, label, defect, lot, wafer,
x, y, tester, site) plus any names passed as `non_feature_columns=`, `label_column=`,
`time_column=`, `id_column=`. Feature cells that are empty, `nan`, `na`, `n/a`, `null` or `none`
(case-insensitive) are missing (NaN). Labels map to 1 = fail, 0 = pass from pass/fail, 1/0,
true/false, good/bad, and -1 (= pass, the UCI SECOM convention), case-insensitive. Any bad
input raises `DataError` whose message names the file, the line (1-based) or column, and what
was expected.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import json
import math
import operator
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agent.errors import EdgefleetError
from agent.fsio import fsync_dir

SPEC_FORMAT = "edgefleet-die-spec"
SPEC_VERSION = 1
NON_FEATURE_COLUMNS = frozenset(
    {"id", "die_id", "row", "index", "timestamp", "time", "date", "label", "defect", "lot",
     "wafer", "x", "y", "tester", "site"}
)  # fmt: skip
DEFECTS = ("none", "gross", "subtle")
FLOAT_FORMAT = "%.6g"

_LABEL_VALUES = {
    "pass": 0, "fail": 1, "0": 0, "1": 1, "0.0": 0, "1.0": 1, "-1": 0,
    "false": 0, "true": 1, "good": 0, "bad": 1,
}  # fmt: skip
_MISSING = frozenset({"", "nan", "na", "n/a", "null", "none"})
_ID_NAMES = ("die_id", "id", "row")
_TIME_NAMES = ("timestamp", "time", "date")
_MIN_PARAMS = 15  # one per group


class DataError(EdgefleetError):
    """A data file (or generator config) is unusable: the message names the file, the line or
    column, and what was expected."""


# --------------------------------------------------------------------------------------------
# Parameter metadata (the "test program")


@dataclass(frozen=True)
class ParamSpec:
    """One measured parameter: a die fails it when the value is `< low` or `> high`."""

    name: str
    group: str
    unit: str
    low: float | None
    high: float | None


@dataclass(frozen=True)
class _Group:
    name: str
    description: str
    unit: str
    weight: int  # parameters in the default 512-parameter program
    log: bool  # value = centre * exp(scale * u), else centre + scale * u
    centre: float
    scale: float
    loadings: tuple[float, float, float, float]  # on (speed, vt, leak, temp), before scaling
    noise: float  # independent per-parameter noise, same units as the loadings


FACTORS = ("speed", "vt", "leak", "temp")

PARAM_GROUPS: tuple[_Group, ...] = (
    _Group("idd_core", "core supply current IDD", "mA", 24, False, 42.0, 2.5,
           (0.65, -0.30, 0.25, 0.20), 0.35),
    _Group("idd_io", "I/O supply current", "mA", 16, False, 12.0, 0.8,
           (0.45, -0.20, 0.15, 0.10), 0.50),
    _Group("iddq", "quiescent supply current IDDQ", "uA", 32, True, 150.0, 0.35,
           (0.40, -0.45, 0.70, 0.35), 0.25),
    _Group("ileak_core", "core transistor leakage", "nA", 40, True, 8.0, 0.50,
           (0.45, -0.50, 0.65, 0.30), 0.30),
    _Group("ileak_io", "I/O pad leakage", "nA", 24, True, 3.0, 0.55,
           (0.35, -0.40, 0.75, 0.30), 0.35),
    _Group("vth_n", "NMOS threshold voltage", "V", 40, False, 0.35, 0.012,
           (-0.30, 0.85, 0.0, -0.15), 0.30),
    _Group("vth_p", "PMOS threshold voltage magnitude", "V", 40, False, 0.38, 0.013,
           (-0.25, 0.80, 0.0, -0.15), 0.35),
    _Group("idsat_n", "NMOS saturation drive current", "uA/um", 32, False, 640.0, 22.0,
           (0.70, -0.50, 0.0, -0.10), 0.30),
    _Group("idsat_p", "PMOS saturation drive current", "uA/um", 32, False, 310.0, 12.0,
           (0.65, -0.50, 0.0, -0.10), 0.35),
    _Group("vdrive", "output drive voltage VOH under load", "V", 24, False, 1.62, 0.02,
           (0.40, -0.35, -0.10, -0.05), 0.50),
    _Group("ro_freq", "ring-oscillator frequency", "MHz", 64, False, 1250.0, 28.0,
           (0.80, -0.40, 0.0, -0.20), 0.25),
    _Group("tmargin_setup", "setup timing margin", "ps", 48, False, 120.0, 10.0,
           (0.60, -0.30, 0.0, -0.20), 0.45),
    _Group("tmargin_hold", "hold timing margin", "ps", 48, False, 45.0, 5.0,
           (-0.50, 0.20, 0.0, 0.10), 0.50),
    _Group("vmin", "minimum operating voltage", "V", 32, False, 0.68, 0.011,
           (-0.45, 0.60, 0.0, 0.10), 0.40),
    _Group("temp_sensor", "on-die temperature sensor", "degC", 16, False, 32.0, 1.2,
           (0.0, 0.0, 0.10, 0.90), 0.25),
)  # fmt: skip

# Latent factor structure, per factor (speed, vt, leak, temp): standard deviations of the lot,
# wafer and die parts, and the coefficient of the radial term (r^2 - 0.5), r in [0, 1].
_LOT_SD = np.array([0.35, 0.35, 0.30, 0.0])
_WAFER_SD = np.array([0.25, 0.25, 0.20, 0.50])
_DIE_SD = np.array([0.85, 0.80, 0.90, 0.85])
_RADIAL = np.array([-0.50, 0.60, 0.30, 0.0])
_FACTOR_VAR = _LOT_SD**2 + _WAFER_SD**2 + _DIE_SD**2 + _RADIAL**2 / 12.0  # r^2 ~ U(0, 1)

# Subtle defect modes: (factor index, groups that see the factor with the opposite sign).
_SUBTLE_MODES = (
    (0, ("ro_freq", "tmargin_setup", "tmargin_hold", "vmin")),
    (1, ("vth_n", "vth_p")),
)
_SUBTLE_SIZE = (1.2, 2.5)  # |die's own part| of the split factor, in sigma of the factor
# Gross defect modes: (groups, which limit is broken: +1 high, -1 low, 0 either), weight.
_GROSS_MODES = (
    (("idd_core", "idd_io", "iddq", "ileak_core", "ileak_io"), +1, 0.50),  # short
    (("ro_freq", "idsat_n", "idsat_p"), -1, 0.25),  # open / dead device
    (("tmargin_setup", "tmargin_hold"), -1, 0.15),  # timing failure
    (("vth_n", "vth_p", "vmin", "vdrive"), 0, 0.10),  # parametric out of range
)
_PROGRAM_SEED = 20_240_108  # the test program does not depend on the data seed
_WAFER_RADIUS = 8  # dies; about 200 dies per wafer
_WAFERS_PER_LOT = 25
_START_TIME = np.datetime64("2024-01-08T06:00:00", "s")


@dataclass(frozen=True)
class _Program:
    spec: tuple[ParamSpec, ...]
    groups: np.ndarray  # (P,) group index
    loadings: np.ndarray  # (P, 4), scaled so the pass distribution of u has unit variance
    noise: np.ndarray  # (P,)
    centre: np.ndarray  # (P,)
    scale: np.ndarray  # (P,)
    log: np.ndarray  # (P,) bool
    u_low: np.ndarray  # (P,) limits in sigma units (from the rounded limits)
    u_high: np.ndarray  # (P,)


def _group_counts(n_params: int) -> list[int]:
    """Split n_params over the groups in proportion to their weights (largest remainder), at
    least one per group."""
    weights = np.array([g.weight for g in PARAM_GROUPS], dtype=float)
    spare = n_params - len(PARAM_GROUPS)
    exact = weights / weights.sum() * spare
    counts = np.floor(exact).astype(int)
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[: spare - counts.sum()]] += 1
    return [int(c) + 1 for c in counts]


def _round_sig(value: float, digits: int = 4) -> float:
    return float(f"{value:.{digits}g}")


@functools.lru_cache(maxsize=8)
def _program(n_params: int) -> _Program:
    rng = np.random.default_rng(_PROGRAM_SEED)
    counts = _group_counts(n_params)
    specs: list[ParamSpec] = []
    rows: list[tuple[int, np.ndarray, float, float, float, bool, float, float]] = []
    for gi, (group, count) in enumerate(zip(PARAM_GROUPS, counts, strict=True)):
        width = max(2, len(str(count)))
        for k in range(count):
            jitter = 1.0 + 0.15 * rng.standard_normal(4)
            b = np.array(group.loadings) * jitter
            noise = group.noise * (1.0 + 0.15 * rng.standard_normal())
            sd = math.sqrt(float(b**2 @ _FACTOR_VAR) + noise**2)
            centre = group.centre * rng.uniform(0.85, 1.15)
            scale = group.scale * rng.uniform(0.8, 1.25)
            k_low, k_high = rng.uniform(5.0, 6.5, size=2)
            if group.log:
                low, high = centre * math.exp(-scale * k_low), centre * math.exp(scale * k_high)
            else:
                low, high = centre - scale * k_low, centre + scale * k_high
            low, high = _round_sig(low), _round_sig(high)
            name = f"{group.name}_{k + 1:0{width}d}"
            specs.append(ParamSpec(name, group.name, group.unit, low, high))
            rows.append((gi, b / sd, noise / sd, centre, scale, group.log, low, high))
    columns = (np.array(col) for col in zip(*rows, strict=True))
    gidx, b, noise, centre, scale, log, low, high = columns
    log = log.astype(bool)
    u_low = np.where(log, np.log(np.maximum(low, 1e-300) / centre), low - centre) / scale
    u_high = np.where(log, np.log(high / centre), high - centre) / scale
    return _Program(tuple(specs), gidx, b, noise, centre, scale, log, u_low, u_high)


def die_parameters(n_params: int = 512) -> tuple[ParamSpec, ...]:
    """The parameter metadata (name, group, unit, spec limits) of the n_params test program.
    Deterministic: the same for every seed."""
    _check_n_params(n_params)
    return _program(n_params).spec


def _check_n_params(n_params: int) -> None:
    if not isinstance(n_params, int) or not _MIN_PARAMS <= n_params <= 100_000:
        raise DataError(
            f"n_params must be an integer from {_MIN_PARAMS} (one per group) to 100000, "
            f"got {n_params!r}"
        )


def spec_limits(spec: Sequence[ParamSpec]) -> tuple[np.ndarray, np.ndarray]:
    """(low, high) float arrays, -inf/+inf where a side has no limit."""
    low = np.array([-np.inf if p.low is None else p.low for p in spec], dtype=np.float64)
    high = np.array([np.inf if p.high is None else p.high for p in spec], dtype=np.float64)
    return low, high


def out_of_spec(X: np.ndarray, spec: Sequence[ParamSpec]) -> np.ndarray:
    """(n, F) bool: which measurements violate their limit. NaN violates nothing."""
    low, high = spec_limits(spec)
    if X.shape[1] != len(low):
        raise DataError(f"out_of_spec: X has {X.shape[1]} columns, spec has {len(low)}")
    with np.errstate(invalid="ignore"):
        return np.less(X, low) | np.greater(X, high)


# --------------------------------------------------------------------------------------------
# Dataset


@dataclass(frozen=True)
class Dataset:
    """Measurements and what is known about them. Only X reaches a model.

    X: (n, F) float32/float64, NaN = missing. labels: (n,) int64, 1 = fail, 0 = pass.
    defect: (n,) str. times: (n,) datetime64[s]. ids: (n,) str. spec: per-feature metadata in
    feature order. extra: other non-feature columns (lot, wafer, x, y, ...) as (n,) arrays.
    source: the file it was loaded from (None when generated).
    """

    X: np.ndarray
    feature_names: tuple[str, ...]
    labels: np.ndarray | None = None
    defect: np.ndarray | None = None
    times: np.ndarray | None = None
    ids: np.ndarray | None = None
    spec: tuple[ParamSpec, ...] | None = None
    source: Path | None = None
    extra: Mapping[str, np.ndarray] = field(default_factory=dict)

    @property
    def n_rows(self) -> int:
        return int(self.X.shape[0])

    @property
    def n_features(self) -> int:
        return int(self.X.shape[1])


# --------------------------------------------------------------------------------------------
# Generator


@dataclass(frozen=True)
class DieConfig:
    """What `generate_dies` simulates. Rates are per die; missing_rate is per cell."""

    n_dies: int = 20_000
    n_params: int = 512
    seed: int = 0
    gross_rate: float = 0.02
    subtle_rate: float = 0.03
    missing_rate: float = 0.001
    drift: bool = False
    drift_factor: str = "speed"
    drift_start: float = 0.5  # fraction of the run where the shift begins
    drift_size: float = 1.5  # shift in sigma of the factor, reached at the last die

    def __post_init__(self) -> None:
        _check_n_params(self.n_params)
        if not isinstance(self.n_dies, int) or self.n_dies < 1:
            raise DataError(f"n_dies must be a positive integer, got {self.n_dies!r}")
        for name in ("gross_rate", "subtle_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise DataError(f"{name} must be in [0, 1], got {getattr(self, name)!r}")
        if self.gross_rate + self.subtle_rate > 1.0:
            raise DataError("gross_rate + subtle_rate must be at most 1")
        if not 0.0 <= self.missing_rate <= 0.5:
            raise DataError(f"missing_rate must be in [0, 0.5], got {self.missing_rate!r}")
        if self.drift_factor not in FACTORS:
            raise DataError(f"drift_factor must be one of {', '.join(FACTORS)}")
        if not 0.0 <= self.drift_start < 1.0:
            raise DataError(f"drift_start must be in [0, 1), got {self.drift_start!r}")


def _wafer_map() -> np.ndarray:
    """(D, 2) integer die coordinates inside the wafer circle, in serpentine test order."""
    r = _WAFER_RADIUS
    coords = []
    for row, y in enumerate(range(r, -r - 1, -1)):
        xs = range(-r, r + 1) if row % 2 == 0 else range(r, -r - 1, -1)
        coords.extend((x, y) for x in xs if x * x + y * y <= r * r)
    return np.array(coords, dtype=np.int64)


def gross_defects(rng: np.random.Generator, X: np.ndarray, keep: np.ndarray, rows: np.ndarray,
                  prog: _Program) -> None:
    """Gross: one to three parameters of one group far outside a limit, on each of `rows`
    (marked in `keep`, so they are never blanked to missing)."""
    low, high = spec_limits(prog.spec)
    group_names = [g.name for g in PARAM_GROUPS]
    mode_p = np.array([m[2] for m in _GROSS_MODES])
    for i in rows:
        groups, side, _ = _GROSS_MODES[rng.choice(len(_GROSS_MODES), p=mode_p / mode_p.sum())]
        g = group_names.index(groups[rng.integers(len(groups))])
        cols = np.flatnonzero(prog.groups == g)
        cols = rng.choice(cols, size=min(len(cols), int(rng.integers(1, 4))), replace=False)
        for c in cols:
            s = side if side != 0 else (1 if rng.random() < 0.5 else -1)
            if prog.log[c]:
                factor = rng.uniform(1.5, 20.0)
                X[i, c] = high[c] * factor if s > 0 else low[c] / factor
            else:
                over = (high[c] - low[c]) * rng.uniform(0.25, 1.5)
                X[i, c] = high[c] + over if s > 0 else low[c] - over
            keep[i, c] = True


def generate_dies(config: DieConfig = DieConfig()) -> Dataset:
    """Simulate wafer sort of config.n_dies dies; see the module docstring for the model."""
    cfg = config
    prog = _program(cfg.n_params)
    rng = np.random.default_rng(cfg.seed)
    n, n_par = cfg.n_dies, cfg.n_params

    # Where each die sits: lot, wafer, position on the wafer map.
    wmap = _wafer_map()
    per_wafer = len(wmap)
    wafer_seq = np.arange(n) // per_wafer  # running wafer number
    n_wafers = int(wafer_seq[-1]) + 1
    lot_idx = wafer_seq // _WAFERS_PER_LOT
    n_lots = int(lot_idx[-1]) + 1
    xy = wmap[np.arange(n) % per_wafer]  # (n, 2)
    r2 = (xy**2).sum(axis=1) / _WAFER_RADIUS**2  # (n,) in [0, 1]

    # Latent factors: structured part (lot, wafer, radial, drift) + the die's own part.
    lot_off = rng.standard_normal((n_lots, 4)) * _LOT_SD
    wafer_off = rng.standard_normal((n_wafers, 4)) * _WAFER_SD
    structured = lot_off[lot_idx] + wafer_off[wafer_seq] + np.outer(r2 - 0.5, _RADIAL)  # (n, 4)
    if cfg.drift:
        t = np.arange(n) / max(n - 1, 1)
        ramp = np.clip((t - cfg.drift_start) / (1.0 - cfg.drift_start), 0.0, 1.0)
        j = FACTORS.index(cfg.drift_factor)
        structured[:, j] += cfg.drift_size * math.sqrt(_FACTOR_VAR[j]) * ramp
    own = rng.standard_normal((n, 4)) * _DIE_SD  # (n, 4)

    # Which dies are defective.
    draw = rng.random(n)
    defect = np.full(n, "none", dtype="<U6")
    defect[draw < cfg.gross_rate] = "gross"
    defect[(draw >= cfg.gross_rate) & (draw < cfg.gross_rate + cfg.subtle_rate)] = "subtle"
    subtle = np.flatnonzero(defect == "subtle")
    gross = np.flatnonzero(defect == "gross")

    # Subtle: the die's own part of one factor is set to a clear +-m, and one side of the
    # parameters sees it with the opposite sign.
    sub_mode = rng.integers(0, len(_SUBTLE_MODES), size=len(subtle))
    sub_sign = rng.choice([-1.0, 1.0], len(subtle))
    sub_delta = rng.uniform(*_SUBTLE_SIZE, size=len(subtle)) * sub_sign
    for mode, (j, _) in enumerate(_SUBTLE_MODES):
        rows = subtle[sub_mode == mode]
        own[rows, j] = sub_delta[sub_mode == mode] * math.sqrt(_FACTOR_VAR[j])

    factors = structured + own  # (n, 4)
    u = factors @ prog.loadings.T  # (n, P), sigma units
    u += rng.standard_normal((n, n_par)) * prog.noise
    group_names = [g.name for g in PARAM_GROUPS]
    for mode, (j, flipped) in enumerate(_SUBTLE_MODES):
        rows = subtle[sub_mode == mode]
        cols = np.flatnonzero(np.isin(prog.groups, [group_names.index(g) for g in flipped]))
        u[np.ix_(rows, cols)] -= 2.0 * np.outer(own[rows, j], prog.loadings[cols, j])
    # Keep subtle dies in the inner 80% of every limit band: no limit can see them.
    band = 0.1 * (prog.u_high - prog.u_low)
    u[subtle] = np.clip(u[subtle], prog.u_low + band, prog.u_high - band)

    X = np.where(prog.log, prog.centre * np.exp(prog.scale * u), prog.centre + prog.scale * u)

    keep = np.zeros((n, n_par), dtype=bool)  # cells never blanked to missing
    gross_defects(rng, X, keep, gross, prog)

    if cfg.missing_rate > 0:
        X[(rng.random((n, n_par)) < cfg.missing_rate) & ~keep] = np.nan

    # A normal die outside a limit is failed by the test program: relabel it gross.
    stray = (defect == "none") & out_of_spec(X, prog.spec).any(axis=1)
    defect[stray] = "gross"

    # Test times: a few seconds per die, longer at wafer and lot changes.
    step = rng.integers(2, 6, size=n)
    new_wafer = np.r_[False, wafer_seq[1:] != wafer_seq[:-1]]
    new_lot = np.r_[False, lot_idx[1:] != lot_idx[:-1]]
    step[new_wafer] += rng.integers(60, 180, size=int(new_wafer.sum()))
    step[new_lot] += rng.integers(600, 3600, size=int(new_lot.sum()))
    times = _START_TIME + np.cumsum(step).astype("timedelta64[s]")

    lots = np.array([f"LOT{k + 1:04d}" for k in range(n_lots)])[lot_idx]
    wafer_no = wafer_seq % _WAFERS_PER_LOT + 1
    die_no = np.arange(n) % per_wafer + 1
    ids = np.array(
        [f"{lot}-W{w:02d}-D{d:03d}" for lot, w, d in zip(lots, wafer_no, die_no, strict=True)]
    )
    return Dataset(
        X=X,
        feature_names=tuple(p.name for p in prog.spec),
        labels=(defect != "none").astype(np.int64),
        defect=defect,
        times=times,
        ids=ids,
        spec=prog.spec,
        source=None,
        extra={"lot": lots, "wafer": wafer_no, "x": xy[:, 0], "y": xy[:, 1]},
    )


# --------------------------------------------------------------------------------------------
# Writers


def spec_path_for(data_path: Path | str) -> Path:
    """The sidecar of a data file: dies.csv -> dies.spec.json."""
    return Path(data_path).with_suffix(".spec.json")


def _atomic_file(path: Path, write: Callable[[Any], None], *, binary: bool = False) -> None:
    """Write through `write(file)` to a temp file in the same directory, fsync, rename over
    path, fsync the directory: the file appears only when complete."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") if binary else open(tmp, "w", encoding="utf-8", newline="") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as e:
        _remove_quietly(tmp)
        raise DataError(f"{path}: cannot write: {e.strerror or e}") from e
    except BaseException:
        _remove_quietly(tmp)
        raise


def _remove_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()


def write_spec(path: Path | str, spec: Sequence[ParamSpec]) -> None:
    """Write the spec sidecar JSON (format in the module docstring)."""
    used = {p.group for p in spec}
    doc = {
        "format": SPEC_FORMAT,
        "version": SPEC_VERSION,
        "groups": {g.name: g.description for g in PARAM_GROUPS if g.name in used},
        "parameters": [
            {"name": p.name, "group": p.group, "unit": p.unit, "low": p.low, "high": p.high}
            for p in spec
        ],
    }
    _atomic_file(Path(path), lambda f: f.write(json.dumps(doc, indent=1) + "\n"))


def _as_text(values: np.ndarray) -> list[str]:
    if np.issubdtype(values.dtype, np.datetime64):
        return [str(v) for v in np.datetime_as_string(values, unit="s")]
    return [str(v) for v in values.tolist()]


def write_csv(path: Path | str, data: Dataset, *, sidecar: bool = True) -> Path:
    """Write `data` as CSV (layout in the module docstring) and, when it has a spec and
    `sidecar` is true, the `.spec.json` next to it. Floats are `%.6g`, missing is an empty
    cell. Returns the CSV path. The file appears only when complete."""
    path = Path(path)
    X = np.asarray(data.X)
    if X.ndim != 2 or X.shape[1] != len(data.feature_names):
        raise DataError(f"{path}: X must be (n, {len(data.feature_names)}), got {X.shape}")
    if np.isinf(X).any():
        raise DataError(f"{path}: X holds infinite values; expected finite numbers or NaN")
    head: list[tuple[str, list[str]]] = []
    if data.ids is not None:
        head.append(("die_id", _as_text(data.ids)))
    if data.times is not None:
        head.append(("timestamp", _as_text(data.times)))
    head.extend((name, _as_text(np.asarray(col))) for name, col in data.extra.items())
    if data.labels is not None:
        head.append(("label", ["fail" if v else "pass" for v in data.labels.tolist()]))
    if data.defect is not None:
        head.append(("defect", _as_text(data.defect)))
    columns = [name for name, _ in head] + list(data.feature_names)
    for name in columns:
        if any(c in name for c in ',"\r\n'):
            raise DataError(f"{path}: column name {name!r} holds a comma, quote or newline")
    fmt = ",".join([FLOAT_FORMAT] * X.shape[1])

    def write(f: Any) -> None:
        f.write(",".join(columns) + "\n")
        cells = list(zip(*(values for _, values in head), strict=True)) if head else None
        for i in range(X.shape[0]):
            line = (fmt % tuple(X[i].tolist())).replace("nan", "")
            if cells:
                line = ",".join(cells[i]) + "," + line
            f.write((line or '""') + "\n")  # a lone missing cell is not a blank line

    _atomic_file(path, write)
    if sidecar and data.spec is not None:
        write_spec(spec_path_for(path), data.spec)
    return path


def write_npz(path: Path | str, data: Dataset) -> Path:
    """Write `data` as an uncompressed .npz (no pickled objects): X, feature_names and, when
    present, labels, defect, times (datetime64[s]), ids, extra columns (`extra:<name>`) and the
    spec as JSON (`spec_json`)."""
    path = Path(path)
    arrays: dict[str, np.ndarray] = {
        "X": np.asarray(data.X),
        "feature_names": np.array(data.feature_names, dtype=str),
    }
    for name in ("labels", "defect", "times", "ids"):
        value = getattr(data, name)
        if value is not None:
            arrays[name] = np.asarray(value)
    for name, col in data.extra.items():
        col = np.asarray(col)
        arrays[f"extra:{name}"] = col.astype(str) if col.dtype == object else col
    if data.spec is not None:
        arrays["spec_json"] = np.array(json.dumps([_spec_entry(p) for p in data.spec]))
    _atomic_file(path, lambda f: np.savez(f, **arrays), binary=True)
    return path


def _spec_entry(p: ParamSpec) -> dict[str, Any]:
    return {"name": p.name, "group": p.group, "unit": p.unit, "low": p.low, "high": p.high}


# --------------------------------------------------------------------------------------------
# Loaders


def _limit(value: Any, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise DataError(f"{where}: expected a finite number or null, found {value!r}")
    return float(value)


def _parse_spec_entries(entries: Any, where: str) -> tuple[ParamSpec, ...]:
    if not isinstance(entries, list) or not entries:
        raise DataError(f"{where}: 'parameters' must be a non-empty list")
    out = []
    seen: set[str] = set()
    for k, e in enumerate(entries):
        at = f"{where}: parameters[{k}]"
        if not isinstance(e, dict):
            raise DataError(f"{at}: expected an object, found {type(e).__name__}")
        for key in ("name", "group", "unit"):
            if not isinstance(e.get(key, ""), str):
                raise DataError(f"{at}.{key}: expected a string, found {e.get(key)!r}")
        name = e.get("name")
        if not name:
            raise DataError(f"{at}.name: missing")
        if name in seen:
            raise DataError(f"{at}.name: duplicate parameter {name!r}")
        seen.add(name)
        low, high = _limit(e.get("low"), f"{at}.low"), _limit(e.get("high"), f"{at}.high")
        if low is not None and high is not None and low > high:
            raise DataError(f"{at}: low {low} is above high {high}")
        out.append(ParamSpec(name, e.get("group", ""), e.get("unit", ""), low, high))
    return tuple(out)


def load_spec(path: Path | str) -> tuple[ParamSpec, ...]:
    """Read a spec sidecar (format in the module docstring)."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise DataError(f"{path}: cannot read spec: {e.strerror or e}") from e
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(doc, dict) or doc.get("format") != SPEC_FORMAT:
        raise DataError(f"{path}: expected a JSON object with format {SPEC_FORMAT!r}")
    if doc.get("version") != SPEC_VERSION:
        raise DataError(
            f"{path}: expected spec version {SPEC_VERSION}, found {doc.get('version')!r}"
        )
    return _parse_spec_entries(doc.get("parameters"), str(path))


def _align_spec(
    spec: Sequence[ParamSpec], feature_names: Sequence[str], where: str
) -> tuple[ParamSpec, ...]:
    """The spec entries in feature order; every feature needs one (extra entries are fine:
    the caller may have excluded columns)."""
    by_name = {p.name: p for p in spec}
    missing = [name for name in feature_names if name not in by_name]
    if missing:
        raise DataError(
            f"{where}: no limits for feature column(s) {', '.join(missing[:5])}"
            f"{' ...' if len(missing) > 5 else ''}; expected one entry per feature column"
        )
    return tuple(by_name[name] for name in feature_names)


def _map_labels(values: Sequence[str], lines: Sequence[int], path: Path, column: str) -> np.ndarray:
    out = np.empty(len(values), dtype=np.int64)
    for k, v in enumerate(values):
        code = _LABEL_VALUES.get(v.strip().lower())
        if code is None:
            raise DataError(
                f"{path}: line {lines[k]}, column {column!r}: unknown label {v!r}; expected "
                "pass/fail, 1/0, true/false or good/bad"
            )
        out[k] = code
    return out


def _parse_times(
    values: Sequence[str], lines: Sequence[int], path: Path, column: str
) -> np.ndarray:
    try:
        return np.array([v.strip() for v in values], dtype="datetime64[s]")
    except ValueError:
        for k, v in enumerate(values):
            try:
                np.datetime64(v.strip(), "s")
            except ValueError:
                raise DataError(
                    f"{path}: line {lines[k]}, column {column!r}: expected an ISO 8601 time "
                    f"like 2024-01-08T06:00:00, found {v!r}"
                ) from None
        raise


def _pick(
    header_lc: Sequence[str], option: str | None, defaults: Sequence[str], path: Path, what: str
) -> int | None:
    """Index of the column named by `option`, else of the first default name present."""
    if option is not None:
        if option.lower() not in header_lc:
            raise DataError(f"{path}: no {what} column {option!r} in the header")
        return header_lc.index(option.lower())
    for name in defaults:
        if name in header_lc:
            return header_lc.index(name)
    return None


def load_csv(
    path: Path | str,
    *,
    non_feature_columns: Iterable[str] = (),
    label_column: str | None = None,
    time_column: str | None = None,
    id_column: str | None = None,
    expect_features: Sequence[str] | None = None,
    dtype: type | np.dtype = np.float64,
) -> Dataset:
    """Load a CSV of measurements: a header row, then one row per die.

    Non-feature columns (module docstring) are set aside; `non_feature_columns` adds names to
    the default set. The label column is `label_column` or `label`; the time column
    `time_column` or the first of timestamp/time/date; the id column `id_column` or the first
    of die_id/id/row. `expect_features`: the exact feature columns required (e.g. a model's
    inputs), in order. The spec sidecar (`spec_path_for(path)`) is loaded when present.
    Raises DataError (file, line or column, what was expected) on any bad input.
    """
    path = Path(path)
    with _open_text(path) as f:
        reader = csv.reader(f)
        try:
            header = next(reader, None)
            while header == []:  # leading blank lines
                header = next(reader, None)
            if header is None:
                raise DataError(f"{path}: file is empty; expected a header row of column names")
            header = [h.strip() for h in header]
            header_lc = [h.lower() for h in header]
            width = len(header)
            for k, name in enumerate(header_lc):
                if not name:
                    raise DataError(f"{path}: line 1, column {k + 1}: empty column name")
                if header_lc.index(name) != k:
                    raise DataError(f"{path}: line 1: duplicate column name {header[k]!r}")

            label_i = _pick(header_lc, label_column, ("label",), path, "label")
            time_i = _pick(header_lc, time_column, _TIME_NAMES, path, "time")
            id_i = _pick(header_lc, id_column, _ID_NAMES, path, "id")
            defect_i = header_lc.index("defect") if "defect" in header_lc else None
            skip = set(NON_FEATURE_COLUMNS)
            for name in non_feature_columns:
                if name.lower() not in header_lc:
                    raise DataError(f"{path}: non-feature column {name!r} is not in the header")
                skip.add(name.lower())
            special = {i for i in (label_i, time_i, id_i, defect_i) if i is not None}
            feat_idx = [k for k, h in enumerate(header_lc) if h not in skip and k not in special]
            other_idx = [k for k in range(width) if k not in feat_idx and k not in special]
            if not feat_idx:
                raise DataError(
                    f"{path}: line 1: no feature columns; every column is an id, time, label "
                    "or other non-feature column"
                )
            names = tuple(header[k] for k in feat_idx)
            if expect_features is not None and tuple(expect_features) != names:
                raise DataError(f"{path}: {_feature_mismatch(expect_features, names)}")

            X, lines, text = _read_rows(reader, path, header, feat_idx, width)
        except csv.Error as e:
            raise DataError(f"{path}: line {reader.line_num}: malformed CSV: {e}") from e
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text: {e}") from e

    if X.shape[0] == 0:
        raise DataError(f"{path}: no data rows after the header; expected at least one die")
    inf = np.argwhere(np.isinf(X))
    if len(inf):
        r, c = inf[0]
        raise DataError(
            f"{path}: line {lines[r]}, column {names[c]!r}: expected a finite number, found inf"
        )
    if np.isnan(X).all():
        raise DataError(f"{path}: every feature cell is missing; expected some measurements")

    labels = None if label_i is None else _map_labels(text[label_i], lines, path, header[label_i])
    times = None if time_i is None else _parse_times(text[time_i], lines, path, header[time_i])
    spec_file = spec_path_for(path)
    spec = None
    if spec_file.exists():
        spec = _align_spec(load_spec(spec_file), names, str(spec_file))
    return Dataset(
        X=X.astype(dtype, copy=False),
        feature_names=names,
        labels=labels,
        defect=None if defect_i is None else np.array(text[defect_i], dtype=str),
        times=times,
        ids=None if id_i is None else np.array(text[id_i], dtype=str),
        spec=spec,
        source=path,
        extra={header[k]: np.array(text[k], dtype=str) for k in other_idx},
    )


def _open_text(path: Path) -> Any:
    try:
        return open(path, encoding="utf-8-sig", newline="")
    except OSError as e:
        raise DataError(f"{path}: cannot open: {e.strerror or e}") from e


def _feature_mismatch(expected: Sequence[str], found: Sequence[str]) -> str:
    missing = [n for n in expected if n not in set(found)]
    unexpected = [n for n in found if n not in set(expected)]
    msg = f"expected {len(expected)} feature columns, found {len(found)}"
    if missing:
        msg += f"; missing {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}"
    if unexpected:
        msg += f"; unexpected {', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}"
    if not missing and not unexpected:
        msg += "; same columns in a different order"
    return msg


def _read_rows(
    reader: Any, path: Path, header: Sequence[str], feat_idx: Sequence[int], width: int
) -> tuple[np.ndarray, np.ndarray, dict[int, list[str]]]:
    """Parse the data rows: (X (n, F) float64, 1-based line number per row, text of the
    non-feature columns by column index)."""
    n_feat = len(feat_idx)
    lo, hi = feat_idx[0], feat_idx[-1] + 1
    if hi - lo == n_feat:  # contiguous: a slice is the fastest getter

        def get(row: list[str]) -> list[str]:
            return row[lo:hi]
    elif n_feat == 1:

        def get(row: list[str]) -> list[str]:
            return [row[lo]]
    else:
        get = operator.itemgetter(*feat_idx)  # type: ignore[assignment]
    text_idx = [k for k in range(width) if k not in set(feat_idx)]
    text: dict[int, list[str]] = {k: [] for k in text_idx}
    chunks: list[np.ndarray] = []
    buf = np.empty((4096, n_feat))
    filled = 0
    lines: list[int] = []
    for row in reader:
        if not row or (len(row) == 1 and not row[0].strip() and width > 1):
            continue  # blank line
        line = reader.line_num
        if len(row) != width:
            raise DataError(
                f"{path}: line {line}: expected {width} fields as in the header, found {len(row)}"
            )
        cells = get(row)
        try:
            buf[filled] = list(map(float, cells))
        except ValueError:
            try:  # empty cells (missing values) only: 5 s of a 20,000-row build on _slow_row
                buf[filled] = [float(c) if c else math.nan for c in cells]
            except ValueError:
                buf[filled] = _slow_row(cells, path, line, header, feat_idx)
        for k in text_idx:
            text[k].append(row[k])
        lines.append(line)
        filled += 1
        if filled == len(buf):
            chunks.append(buf)
            buf = np.empty((len(buf), n_feat))
            filled = 0
    chunks.append(buf[:filled])
    return np.concatenate(chunks), np.array(lines), text


def _slow_row(
    cells: Sequence[str], path: Path, line: int, header: Sequence[str], feat_idx: Sequence[int]
) -> list[float]:
    out = []
    for k, cell in enumerate(cells):
        s = cell.strip()
        if s.lower() in _MISSING:
            out.append(math.nan)
            continue
        try:
            out.append(float(s))
        except ValueError:
            raise DataError(
                f"{path}: line {line}, column {header[feat_idx[k]]!r}: expected a number or an "
                f"empty cell, found {cell!r}"
            ) from None
    return out


def load_npz(path: Path | str, *, dtype: type | np.dtype = np.float64) -> Dataset:
    """Load an .npz written by `write_npz` (or any .npz with `X` (n, F) and optionally
    `feature_names`, `labels`, `defect`, `times`, `ids`). Pickled objects are refused."""
    path = Path(path)
    try:
        npz = np.load(path, allow_pickle=False)
    except OSError as e:
        raise DataError(f"{path}: cannot open: {e.strerror or e}") from e
    except (ValueError, EOFError) as e:
        raise DataError(f"{path}: not a readable .npz file: {e}") from e
    try:
        with npz:
            arrays = {key: npz[key] for key in npz.files}
    except ValueError as e:
        raise DataError(f"{path}: holds pickled or unreadable arrays: {e}") from e
    if "X" not in arrays:
        raise DataError(f"{path}: expected an array named 'X', found {sorted(arrays) or 'none'}")
    X = arrays["X"]
    if X.ndim != 2 or X.shape[0] == 0 or X.shape[1] == 0:
        raise DataError(f"{path}: array 'X': expected shape (n, F) with n, F >= 1, got {X.shape}")
    if not np.issubdtype(X.dtype, np.number):
        raise DataError(f"{path}: array 'X': expected numbers, found dtype {X.dtype}")
    n, n_feat = X.shape
    names = arrays.get("feature_names")
    if names is None:
        names = np.array([f"f{k}" for k in range(n_feat)])
    if names.shape != (n_feat,):
        raise DataError(
            f"{path}: array 'feature_names': expected {n_feat} names, got shape {names.shape}"
        )
    X = X.astype(dtype)
    if np.isinf(X).any():
        r, c = np.argwhere(np.isinf(X))[0]
        raise DataError(f"{path}: array 'X' row {r + 1}, column {names[c]!r}: found inf")
    if np.isnan(X).all():
        raise DataError(f"{path}: every value of 'X' is missing; expected some measurements")

    def column(key: str) -> np.ndarray | None:
        value = arrays.get(key)
        if value is not None and value.shape != (n,):
            raise DataError(f"{path}: array {key!r}: expected shape ({n},), got {value.shape}")
        return value

    labels = column("labels")
    if labels is not None:
        if labels.dtype.kind in "US":
            labels = _map_labels([str(v) for v in labels], range(1, n + 1), path, "labels")
        elif not np.isin(labels, (0, 1)).all():
            raise DataError(f"{path}: array 'labels': expected only 0 (pass) and 1 (fail)")
        labels = labels.astype(np.int64)
    times = column("times")
    if times is not None and not np.issubdtype(times.dtype, np.datetime64):
        times = _parse_times([str(v) for v in times], range(1, n + 1), path, "times")
    spec = None
    feature_names = tuple(str(v) for v in names)
    if "spec_json" in arrays:
        where = f"{path}: array 'spec_json'"
        try:
            entries = json.loads(str(arrays["spec_json"]))
        except ValueError as e:
            raise DataError(f"{where}: not valid JSON: {e}") from e
        spec = _align_spec(_parse_spec_entries(entries, where), feature_names, where)
    elif spec_path_for(path).exists():
        sidecar = spec_path_for(path)
        spec = _align_spec(load_spec(sidecar), feature_names, str(sidecar))
    extra = {}
    for key in arrays:
        if key.startswith("extra:"):
            extra[key.removeprefix("extra:")] = column(key)
    return Dataset(
        X=X,
        feature_names=feature_names,
        labels=labels,
        defect=column("defect"),
        times=times,
        ids=column("ids"),
        spec=spec,
        source=path,
        extra=extra,
    )


def load_dataset(path: Path | str, **options: Any) -> Dataset:
    """Load by suffix: .npz -> `load_npz`, anything else -> `load_csv` (options go to it)."""
    path = Path(path)
    if path.suffix.lower() == ".npz":
        dtype = options.pop("dtype", np.float64)
        if options:
            raise DataError(f"{path}: options {sorted(options)} apply to CSV files only")
        return load_npz(path, dtype=dtype)
    return load_csv(path, **options)
