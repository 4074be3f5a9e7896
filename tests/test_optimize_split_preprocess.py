"""Stages 1-2: the split trains on passing dies only, in time order; preprocessing survives
missing, constant, never-observed and wildly scaled columns."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from optimize.data import DataError, Dataset
from optimize.preprocess import fit_preprocessor
from optimize.split import SplitConfig, SplitError, split_dataset
from tests.conftest import examples
from tests.optimize_support import small_dies


def test_split_is_time_ordered_and_trains_on_passes_only():
    data = small_dies()
    shuffled = np.random.default_rng(0).permutation(data.n_rows)
    data = dataclasses.replace(data, X=data.X[shuffled], labels=data.labels[shuffled],
                               defect=data.defect[shuffled], times=data.times[shuffled])
    split = split_dataset(data)
    assert (split.train.labels == 0).all()
    assert split.time_ordered
    t = data.times
    assert t[split.train.rows].max() <= t[split.val.rows].min()
    assert t[split.val.rows].max() <= t[split.test.rows].min()
    assert len(split.train) + split.dropped_train_fails + len(split.val) + len(split.test) == 600


def test_split_without_labels_or_times_shuffles_and_keeps_every_row():
    data = Dataset(X=small_dies().X, feature_names=small_dies().feature_names)
    split = split_dataset(data, SplitConfig(seed=3))
    assert not split.time_ordered and split.dropped_train_fails == 0
    assert split.val.labels is None and split.val.passes.all()
    rows = np.concatenate([split.train.rows, split.val.rows, split.test.rows])
    assert sorted(rows.tolist()) == list(range(600))


def test_too_few_passing_dies_names_the_file_and_the_label_column(tmp_path):
    data = small_dies()
    labels = np.ones(data.n_rows, dtype=np.int64)
    labels[:10] = 0
    data = dataclasses.replace(data, labels=labels, source=tmp_path / "dies.csv")
    with pytest.raises(SplitError, match=r"dies\.csv: only \d+ passing dies in the training "
                       r"split .*column 'label'.*expected at least 50"):
        split_dataset(data)


def test_preprocessing_handles_constant_never_observed_and_extreme_scales():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 6)) * np.array([1e-4, 1e4, 1.0, 1.0, 1.0, 1.0]) + 5.0
    x[:, 2] = 7.0  # constant
    x[:, 3] = np.nan  # never observed
    x[::3, 4] = np.nan  # often missing
    x[:, 5] = np.where(np.arange(200) < 190, 2.0, 3.0)  # constant except rare values: IQR 0
    prep = fit_preprocessor(x)
    assert prep.active.tolist() == [True, True, False, False, True, True]
    z = prep.scale(x)
    assert np.isfinite(z).all()
    assert (z[:, 2] == 0).all() and (z[:, 3] == 0).all()
    for j in (0, 1, 4):  # robust scaling puts 1e-4 and 1e4 signals on one footing
        assert 0.5 < np.nanstd(z[:, j]) < 2.0


def test_all_missing_training_data_is_refused():
    with pytest.raises(DataError, match="every feature of every training pass is missing"):
        fit_preprocessor(np.full((50, 4), np.nan), where="dies.csv")


@settings(max_examples=examples(60), deadline=None)
@given(st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), min_size=4,
                max_size=4))
def test_any_raw_row_maps_to_finite_bounded_inputs(row):
    x = np.random.default_rng(1).normal(size=(100, 4)) * [1e-3, 1.0, 1e3, 0.0]
    prep = fit_preprocessor(x)
    z = prep.scale(np.array([row]))
    assert np.isfinite(z).all() and np.abs(z).max() <= prep.bound * 1.0001
    assert np.abs(prep.transform(np.array([row]))).max() <= prep.clip


def test_time_ordered_split_of_a_floor_with_lots_cuts_between_lots():
    """A floor sees whole lots: validation and test hold every die of their lots (the cut
    moved to the nearest lot boundary), and `whole_lots=False` cuts at the fractions."""
    from optimize.floor import FloorConfig, generate_floor

    data = generate_floor(FloorConfig(n_dies=2600, n_params=32, wafers_per_lot=2, seed=5))
    lots = data.extra["lot"]
    split = split_dataset(data)
    assert split.lot_aligned
    parts = [set(lots[p.rows].tolist()) for p in (split.train_period, split.val, split.test)]
    assert not (parts[0] & parts[1]) and not (parts[1] & parts[2]) and not (parts[0] & parts[2])
    for p in (split.val, split.test):  # whole lots: every die of each lot is in the part
        assert all(len(p.rows[lots[p.rows] == lot]) == (lots == lot).sum()
                   for lot in set(lots[p.rows].tolist()))
    cut = split_dataset(data, SplitConfig(whole_lots=False))
    assert not cut.lot_aligned and len(cut.test) == round(0.2 * 2600) != len(split.test)
