"""Stage 1: split a dataset into train (passing dies only), validation and test.

Rows are ordered by time when the data has a time column (the model is then judged on dies
tested after the ones it learnt from, as in production), else shuffled with a seed. The first
`1 - val_fraction - test_fraction` of that order is the training period, then validation, then
test. Failing dies of the training period are left out: the autoencoder learns what a passing
die looks like. Without labels every die counts as passing (only parity figures are possible).

Whole lots (`whole_lots`, on by default): when the data is time-ordered and names its lots, each
cut moves to the nearest place no lot straddles (every die of a lot before it or every die
after it), so validation and test hold whole lots, as a floor sees them: a threshold is then
calibrated on, and judged per lot on, complete lots rather than the tail of one (a lot cut in
two had a few hundred dies left on one side, too few to judge its false-fail). A cut stays
where the fractions put it when no clean place keeps every part non-empty.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from optimize.data import DataError, Dataset


class SplitError(DataError):
    """The data cannot be split into usable train / validation / test parts."""


@dataclass(frozen=True)
class SplitConfig:
    val_fraction: float = 0.2
    test_fraction: float = 0.2
    seed: int = 0  # row shuffle when the data has no time column
    min_train_passes: int = 50
    min_val_passes: int = 20
    whole_lots: bool = True  # time-ordered data with lots: cut at lot boundaries


@dataclass(frozen=True)
class Part:
    """Rows of one split. `rows` index the dataset (file order, 0-based)."""

    x: np.ndarray  # (n, n_features) float64 raw, NaN = missing
    rows: np.ndarray  # (n,) int64
    labels: np.ndarray | None  # (n,) 1 = fail, 0 = pass
    defect: np.ndarray | None  # (n,) str: none / gross / subtle / ...
    groups: Mapping[str, np.ndarray] = field(default_factory=dict)  # lot/wafer/tester -> (n,)

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def passes(self) -> np.ndarray:
        """(n,) bool: passing dies (all of them when there are no labels)."""
        return np.ones(len(self), bool) if self.labels is None else self.labels == 0


@dataclass(frozen=True)
class Split:
    train: Part  # passing dies of the training period only
    val: Part
    test: Part
    time_ordered: bool
    dropped_train_fails: int  # failing dies of the training period, not used
    train_period: Part | None = None  # every die of the training period, fails included
    lot_aligned: bool = False  # the cuts fall between lots (SplitConfig.whole_lots)


GROUP_COLUMNS = ("lot", "wafer", "tester")  # non-feature columns the report breaks rates down by


def split_dataset(data: Dataset, cfg: SplitConfig = SplitConfig()) -> Split:
    """Split `data` (see the module docstring). Raises `SplitError` when a part would be too
    small to train or calibrate on."""
    where = str(data.source) if data.source is not None else "generated data"
    n = data.n_rows
    if not (0 < cfg.val_fraction < 1 and 0 < cfg.test_fraction < 1
            and cfg.val_fraction + cfg.test_fraction < 1):  # fmt: skip
        raise SplitError(f"{where}: validation and test fractions must be in (0, 1) and sum < 1")
    if data.times is not None:
        order = np.argsort(data.times, kind="stable")
    else:
        order = np.random.default_rng(cfg.seed).permutation(n)
    n_test = round(n * cfg.test_fraction)
    n_val = round(n * cfg.val_fraction)
    n_train = n - n_val - n_test
    cuts = [n_train, n_train + n_val]
    lot = {k.lower(): v for k, v in data.extra.items()}.get("lot")
    aligned = False
    if cfg.whole_lots and data.times is not None and lot is not None:
        clean = lot_cuts(np.asarray(lot).astype(str)[order])
        moved = [int(clean[np.argmin(np.abs(clean - c))]) if len(clean) else c for c in cuts]
        if 0 < moved[0] < moved[1] < n:
            cuts, aligned = moved, True
    n_train, n_val = cuts[0], cuts[1] - cuts[0]
    train_rows, val_rows, test_rows = np.split(order, cuts)

    def part(rows: np.ndarray) -> Part:
        rows = np.sort(rows) if data.times is None else rows
        return Part(
            x=np.asarray(data.X[rows], dtype=np.float64),
            rows=rows.astype(np.int64),
            labels=None if data.labels is None else data.labels[rows],
            defect=None if data.defect is None else data.defect[rows],
            groups=_groups(data, rows),
        )

    train_all, val, test = part(train_rows), part(val_rows), part(test_rows)
    keep = train_all.passes
    train = Part(
        x=train_all.x[keep],
        rows=train_all.rows[keep],
        labels=None if train_all.labels is None else train_all.labels[keep],
        defect=None if train_all.defect is None else train_all.defect[keep],
        groups={k: v[keep] for k, v in train_all.groups.items()},
    )
    period = "by time" if data.times is not None else f"shuffled with seed {cfg.seed}"
    label_hint = "column 'label' (1/fail = failing die)" if data.labels is not None else "rows"
    if len(train) < cfg.min_train_passes:
        raise SplitError(
            f"{where}: only {len(train)} passing dies in the training split (first {n_train} of "
            f"{n} rows {period}, {label_hint}); expected at least {cfg.min_train_passes}",
            hint="add passing dies or lower the minimum in the build config",
        )
    if int(val.passes.sum()) < cfg.min_val_passes:
        raise SplitError(
            f"{where}: only {int(val.passes.sum())} passing dies in the validation split "
            f"({n_val} rows {period}, {label_hint}); expected at least {cfg.min_val_passes} to "
            "calibrate the threshold",
            hint="add passing dies or lower the minimum in the build config",
        )
    return Split(train, val, test, data.times is not None, int((~keep).sum()), train_all,
                 aligned)


def lot_cuts(lots: np.ndarray) -> np.ndarray:
    """Positions p (1..n-1) in `lots` (the lot of each row, in time order) that no lot
    straddles: every row of a lot is before p or every row is at or after p."""
    _, inverse = np.unique(lots, return_inverse=True)
    last = np.zeros(inverse.max() + 1 if len(inverse) else 0, np.int64)
    np.maximum.at(last, inverse, np.arange(len(lots)))
    reach = np.maximum.accumulate(last[inverse]) if len(lots) else last  # furthest row so far
    return np.flatnonzero(reach[:-1] == np.arange(len(lots) - 1)) + 1


def _groups(data: Dataset, rows: np.ndarray) -> dict[str, np.ndarray]:
    """The lot / wafer / tester of each row, as strings (a wafer is named within its lot)."""
    extra = {k.lower(): np.asarray(v) for k, v in data.extra.items()}
    out = {k: extra[k][rows].astype(str) for k in GROUP_COLUMNS if k in extra}
    if "wafer" in out and "lot" in out:
        out["wafer"] = np.char.add(np.char.add(out["lot"], "-W"), out["wafer"])
    return out
