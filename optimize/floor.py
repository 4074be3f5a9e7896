"""A test floor, simulated: the default data of `edgefleet optimize make-data` (`--profile floor`).

The classic generator (`optimize.data.generate_dies`, `--profile classic`) draws every die from
one population and makes its "subtle" defects easy: every model scores AUC 0.9999 on it. A real
floor is messier, and this generator adds what makes methods differ:

- lots of `wafers_per_lot` wafers (about 200 dies each, serpentine die order, x/y on the map);
- `n_testers` testers (sites). Each wafer is tested on one of them; each tester has its own
  offset (sd `tester_offset` sigma) and gain (sd `tester_gain`) per parameter, so a fixed
  threshold fails more good dies on one tester than on another;
- slow drift: the process factors wander over the run (a smooth random walk, `walk_sd` sigma
  per lot), on top of the lot, wafer and radial structure of the classic program;
  `drift=True` adds a shift of `drift_size` (2.5) sigma of the speed factor over the second
  half, a real excursion (`drift_ramp`: the share of the run it takes to build up from the
  midpoint; 0.5, the default, ramps over the whole second half, a small one is a step after
  which the process stays shifted, the case a retrain fixes);
- correlated parameter families: the same 15 groups and four latent factors (speed, Vt,
  leakage, temperature) as the classic program (`optimize.data.PARAM_GROUPS`), same spec;
- quantized signals: every `quantized_every`-th parameter is read at a tester resolution of
  `quantum` sigma (few distinct values, like SECOM's f543);
- missing values in bursts: a skipped test block (one whole group) on single dies and on runs
  of consecutive dies of one tester, a few dies with a large share missing, rare single cells.

Defect classes (`defect` column; `label` is `fail` for every class but `none`):

- `gross`: one to three parameters far outside spec. Spec limits and every method see it.
- `subtle_uni`: one parameter 4.5-7 within-lot sigma off its lot's centre, inside spec.
  Dynamic PAT per lot sees it; static PAT only when the lot sits near a band edge.
- `subtle_multi`: inside spec and inside PAT on every parameter (each within 3 sigma of its
  lot), but one family disagrees with the factor that drives the others (fast oscillators with
  slow drive current, Vt against leakage, ...). Only a model of the joint distribution sees it.
- `spatial`: the die reads normal-ish, but its neighbourhood on the wafer is a defect cluster
  (leakage 1-2.5 sigma up). A spatial method sees it; a multivariate one weakly.
- `tester`: a good die that a contact fault on one tester made read out of spec on a block of
  currents (truth: it would pass a retest). Spec limits see it; counted as a fail of the data
  and reported apart.

All randomness comes from `np.random.default_rng(seed)` in a fixed order, so one config gives
one file. The test program (names, units, limits) depends only on `n_params`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from optimize.data import (
    _DIE_SD,
    _FACTOR_VAR,
    _LOT_SD,
    _RADIAL,
    _START_TIME,
    _WAFER_RADIUS,
    _WAFER_SD,
    FACTORS,
    PARAM_GROUPS,
    DataError,
    Dataset,
    _check_n_params,
    _program,
    _wafer_map,
    gross_defects,
    out_of_spec,
    spec_limits,
)

FLOOR_DEFECTS = ("none", "gross", "subtle_uni", "subtle_multi", "spatial", "tester")
_GROUP_NAMES = [g.name for g in PARAM_GROUPS]
# Multivariate modes: (factor, groups that see the die's own part of it with the opposite sign).
_MULTI_MODES = (
    (0, ("ro_freq",)),  # fast oscillators, slow drive and timing
    (0, ("idsat_n", "idsat_p")),  # drive current disagrees with speed
    (1, ("vth_n",)),  # NMOS Vt against the rest of the Vt signature
    (2, ("iddq",)),  # quiescent current against leakage
)
_SPATIAL_GROUPS = ("iddq", "ileak_core", "ileak_io")
_TESTER_GROUPS = ("idd_core", "idd_io", "iddq")


@dataclass(frozen=True)
class FloorConfig:
    """What `generate_floor` simulates. Rates are per die."""

    n_dies: int = 20_000
    n_params: int = 256
    seed: int = 0
    n_testers: int = 4
    wafers_per_lot: int = 10
    gross_rate: float = 0.010
    subtle_uni_rate: float = 0.008
    subtle_multi_rate: float = 0.015
    spatial_clusters_per_wafer: float = 0.15  # mean number of defect clusters per wafer
    tester_fault_rate: float = 0.002
    tester_offset: float = 0.15  # sd of a tester's per-parameter offset, sigma units
    tester_gain: float = 0.03  # sd of a tester's per-parameter gain around 1
    walk_sd: float = 0.08  # random-walk step of the process factors per lot, sigma
    quantized_every: int = 23
    quantum: float = 0.5  # tester resolution of quantized parameters, sigma
    block_skip_rate: float = 0.004  # dies with one test block (a group) skipped
    burst_rate: float = 0.0005  # per die: a run of 20-120 dies of one tester skipping a block
    sparse_die_rate: float = 0.001  # dies with 25-45% of their values missing
    cell_missing_rate: float = 0.0005
    drift: bool = False
    drift_size: float = 2.5  # speed shift over the second half, sigma of the factor
    drift_ramp: float = 0.5  # share of the run the shift takes to build up, from the midpoint

    @property
    def dies_per_lot(self) -> int:
        """Dies in a whole lot: `n_dies` a multiple of it ends on a whole lot."""
        return self.wafers_per_lot * len(_wafer_map())

    def __post_init__(self) -> None:
        _check_n_params(self.n_params)
        if not isinstance(self.n_dies, int) or self.n_dies < 1:
            raise DataError(f"n_dies must be a positive integer, got {self.n_dies!r}")
        if not isinstance(self.wafers_per_lot, int) or not 1 <= self.wafers_per_lot <= 50:
            raise DataError(f"wafers_per_lot must be 1..50, got {self.wafers_per_lot!r}")
        if not 1 <= self.n_testers <= 64:
            raise DataError(f"n_testers must be 1..64, got {self.n_testers!r}")
        rates = ("gross_rate", "subtle_uni_rate", "subtle_multi_rate", "tester_fault_rate")
        for name in rates:
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise DataError(f"{name} must be in [0, 1], got {getattr(self, name)!r}")
        if not 0.0 < self.drift_ramp <= 0.5:
            raise DataError(f"drift_ramp must be in (0, 0.5], got {self.drift_ramp!r}")
        if sum(getattr(self, name) for name in rates) > 0.5:
            raise DataError("the defect rates must add up to at most 0.5")


def generate_floor(config: FloorConfig = FloorConfig()) -> Dataset:
    """Simulate a test floor (module docstring). `extra` holds lot, wafer, x, y, tester."""
    cfg = config
    prog = _program(cfg.n_params)
    rng = np.random.default_rng(cfg.seed)
    n, n_par = cfg.n_dies, cfg.n_params
    groups = prog.groups

    # Where each die sits and which tester measures it.
    wmap = _wafer_map()
    per_wafer = len(wmap)
    wafer_seq = np.arange(n) // per_wafer
    n_wafers = int(wafer_seq[-1]) + 1
    lot_idx = wafer_seq // cfg.wafers_per_lot
    n_lots = int(lot_idx[-1]) + 1
    xy = wmap[np.arange(n) % per_wafer]
    r2 = (xy**2).sum(axis=1) / _WAFER_RADIUS**2
    wafer_tester = rng.integers(0, cfg.n_testers, size=n_wafers)
    tester = wafer_tester[wafer_seq]

    # Process factors: lot + wafer + radial + slow walk (+ drift) + the die's own part.
    walk = np.cumsum(rng.standard_normal((n_lots, 4)) * cfg.walk_sd, axis=0)
    walk[:, 3] = 0.0
    lot_off = rng.standard_normal((n_lots, 4)) * _LOT_SD + walk
    wafer_off = rng.standard_normal((n_wafers, 4)) * _WAFER_SD
    structured = lot_off[lot_idx] + wafer_off[wafer_seq] + np.outer(r2 - 0.5, _RADIAL)
    if cfg.drift:
        t = np.arange(n) / max(n - 1, 1)
        ramp = np.clip((t - 0.5) / cfg.drift_ramp, 0.0, 1.0)
        structured[:, 0] += cfg.drift_size * math.sqrt(_FACTOR_VAR[0]) * ramp
    own = rng.standard_normal((n, 4)) * _DIE_SD

    # Defect draw (spatial dies come from clusters below).
    draw = rng.random(n)
    defect = np.full(n, "none", dtype="<U12")
    edges = np.cumsum([cfg.gross_rate, cfg.subtle_uni_rate, cfg.subtle_multi_rate,
                       cfg.tester_fault_rate])
    for name, lo, hi in zip(("gross", "subtle_uni", "subtle_multi", "tester"),
                            np.r_[0.0, edges[:-1]], edges, strict=True):
        defect[(draw >= lo) & (draw < hi)] = name

    # Multivariate: the die's own part of one factor is set to +-m, and one family sees it
    # with the opposite sign. Kept small so no parameter leaves its PAT band.
    multi = np.flatnonzero(defect == "subtle_multi")
    mode = rng.integers(0, len(_MULTI_MODES), size=len(multi))
    m = rng.uniform(0.5, 1.3, size=len(multi)) * rng.choice([-1.0, 1.0], size=len(multi))
    for k, (j, _) in enumerate(_MULTI_MODES):
        rows = multi[mode == k]
        own[rows, j] = m[mode == k] * math.sqrt(_FACTOR_VAR[j])

    factors = structured + own  # (n, 4)
    u = factors @ prog.loadings.T + rng.standard_normal((n, n_par)) * prog.noise  # (n, P)
    for k, (j, flipped) in enumerate(_MULTI_MODES):
        rows = multi[mode == k]
        cols = np.flatnonzero(np.isin(groups, [_GROUP_NAMES.index(g) for g in flipped]))
        u[np.ix_(rows, cols)] -= 2.0 * np.outer(own[rows, j], prog.loadings[cols, j])

    # The lot's own centre and spread per parameter (what DPAT estimates), from passes.
    ok = defect == "none"
    lot_centre = np.zeros((n_lots, n_par))
    lot_sd = np.ones((n_lots, n_par))
    for lot in range(n_lots):
        rows = (lot_idx == lot) & ok
        if rows.sum() > 10:
            lot_centre[lot] = np.median(u[rows], axis=0)
            q75, q25 = np.percentile(u[rows], [75, 25], axis=0)
            lot_sd[lot] = np.maximum((q75 - q25) / 1.349, 0.3)

    # Multivariate defects stay within 3 lot sigma on every parameter (inside PAT).
    if len(multi):
        c, s = lot_centre[lot_idx[multi]], lot_sd[lot_idx[multi]]
        u[multi] = np.clip(u[multi], c - 3.0 * s, c + 3.0 * s)

    # Univariate: one parameter 4.5-7 lot sigma off its lot's centre.
    uni = np.flatnonzero(defect == "subtle_uni")
    uni_col = rng.integers(0, n_par, size=len(uni))
    uni_k = rng.uniform(4.5, 7.0, size=len(uni)) * rng.choice([-1.0, 1.0], size=len(uni))
    u[uni, uni_col] = lot_centre[lot_idx[uni], uni_col] + uni_k * lot_sd[lot_idx[uni], uni_col]

    # Spatial: clusters of dies around a centre on some wafers; leakage up 1-2.5 sigma.
    n_clusters = rng.poisson(cfg.spatial_clusters_per_wafer, size=n_wafers)
    leak_cols = np.flatnonzero(np.isin(groups, [_GROUP_NAMES.index(g) for g in _SPATIAL_GROUPS]))
    for w in np.flatnonzero(n_clusters):
        rows_w = np.flatnonzero(wafer_seq == w)
        for _ in range(int(n_clusters[w])):
            centre = xy[rows_w[rng.integers(len(rows_w))]]
            radius = rng.uniform(1.0, 2.5)
            near = rows_w[((xy[rows_w] - centre) ** 2).sum(axis=1) <= radius**2]
            near = near[defect[near] == "none"]
            defect[near] = "spatial"
            u[np.ix_(near, leak_cols)] += rng.uniform(1.0, 2.5, size=(len(near), 1))

    # Inner band: spec limits must not see subtle, spatial dies.
    band = 0.1 * (prog.u_high - prog.u_low)
    inner = np.isin(defect, ("subtle_uni", "subtle_multi", "spatial"))
    u[inner] = np.clip(u[inner], prog.u_low + band, prog.u_high - band)

    # The tester: gain and offset per parameter, quantized reads.
    gain = 1.0 + rng.standard_normal((cfg.n_testers, n_par)) * cfg.tester_gain
    offset = rng.standard_normal((cfg.n_testers, n_par)) * cfg.tester_offset
    u = u * gain[tester] + offset[tester]
    quantized = np.zeros(n_par, dtype=bool)
    if cfg.quantized_every > 0:
        quantized[cfg.quantized_every - 1 :: cfg.quantized_every] = True
        u[:, quantized] = np.round(u[:, quantized] / cfg.quantum) * cfg.quantum

    X = np.where(prog.log, prog.centre * np.exp(prog.scale * u), prog.centre + prog.scale * u)
    low, high = spec_limits(prog.spec)
    keep = np.zeros((n, n_par), dtype=bool)  # cells never blanked to missing
    gross_defects(rng, X, keep, np.flatnonzero(defect == "gross"), prog)
    tcols = np.flatnonzero(np.isin(groups, [_GROUP_NAMES.index(g) for g in _TESTER_GROUPS]))
    for i in np.flatnonzero(defect == "tester"):  # a contact fault: a block of currents reads high
        cols = rng.choice(tcols, size=min(len(tcols), int(rng.integers(3, 9))), replace=False)
        X[i, cols] = high[cols] + (high[cols] - low[cols]) * rng.uniform(0.05, 0.5, len(cols))
        keep[i, cols] = True

    _missing(rng, cfg, X, keep, groups, tester)

    stray = (defect == "none") & out_of_spec(X, prog.spec).any(axis=1)
    defect[stray] = "gross"  # a normal die outside a limit is failed by the test program

    step = rng.integers(2, 6, size=n)
    new_wafer = np.r_[False, wafer_seq[1:] != wafer_seq[:-1]]
    new_lot = np.r_[False, lot_idx[1:] != lot_idx[:-1]]
    step[new_wafer] += rng.integers(60, 180, size=int(new_wafer.sum()))
    step[new_lot] += rng.integers(600, 3600, size=int(new_lot.sum()))
    times = _START_TIME + np.cumsum(step).astype("timedelta64[s]")
    lots = np.array([f"LOT{k + 1:04d}" for k in range(n_lots)])[lot_idx]
    wafer_no = wafer_seq % cfg.wafers_per_lot + 1
    die_no = np.arange(n) % per_wafer + 1
    ids = np.array([f"{lot}-W{w:02d}-D{d:03d}"
                    for lot, w, d in zip(lots, wafer_no, die_no, strict=True)])
    testers = np.array([f"T{k + 1:02d}" for k in range(cfg.n_testers)])[tester]
    return Dataset(
        X=X, feature_names=tuple(p.name for p in prog.spec),
        labels=(defect != "none").astype(np.int64), defect=defect, times=times, ids=ids,
        spec=prog.spec, source=None,
        extra={"lot": lots, "wafer": wafer_no, "x": xy[:, 0], "y": xy[:, 1], "tester": testers},
    )


def _missing(rng: np.random.Generator, cfg: FloorConfig, X: np.ndarray, keep: np.ndarray,
             groups: np.ndarray, tester: np.ndarray) -> None:
    """Blank cells: skipped blocks on single dies and in bursts, sparse dies, single cells."""
    n, n_par = X.shape
    hole = np.zeros((n, n_par), dtype=bool)
    n_groups = int(groups.max()) + 1
    for i in np.flatnonzero(rng.random(n) < cfg.block_skip_rate):
        hole[i, groups == rng.integers(n_groups)] = True
    for start in np.flatnonzero(rng.random(n) < cfg.burst_rate):
        g = rng.integers(n_groups)
        run = np.arange(start, min(n, start + int(rng.integers(20, 121))))
        run = run[tester[run] == tester[start]]
        hole[np.ix_(run, groups == g)] = True
    for i in np.flatnonzero(rng.random(n) < cfg.sparse_die_rate):
        hole[i, rng.random(n_par) < rng.uniform(0.25, 0.45)] = True
    hole |= rng.random((n, n_par)) < cfg.cell_missing_rate
    X[hole & ~keep] = np.nan


__all__ = ["FACTORS", "FLOOR_DEFECTS", "FloorConfig", "generate_floor"]
