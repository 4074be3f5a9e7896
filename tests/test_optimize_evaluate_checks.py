"""The build's target checks on the shipped model's false-fail (optimize/evaluate.py): recall is
judged where the test false-fail is the target, and the validation threshold's test rate
against the [0.5x, 2x] band, with its Wilson interval beside it."""

from __future__ import annotations

import numpy as np

from optimize.evaluate import _ffr_band_check, operating_point


def test_operating_point_sets_the_threshold_on_the_test_passes() -> None:
    scores = np.r_[np.arange(1000) / 1000.0, 0.9955, 0.5, 2.0]  # 1000 passes, 3 fails
    passes = np.r_[np.ones(1000, bool), np.zeros(3, bool)]
    subtle = np.r_[np.zeros(1000, bool), True, True, False]
    gross = np.r_[np.zeros(1002, bool), True]
    op = operating_point(scores, passes, {"subtle": subtle, "gross": gross}, 0.01)
    assert op["test_ffr"] == 0.01  # exactly 10 of 1000 passes above the threshold
    assert np.sum(scores[passes] > op["threshold"]) == 10
    assert op["recall"] == {"subtle": 0.5, "gross": 1.0}


def _model(k: int, n: int) -> dict:
    return {"test_ffr": k / n, "test_passes": n, "test_false_fails": k, "target_ffr": 0.01}


def test_ffr_band_check_is_the_band_with_the_interval_beside_it() -> None:
    ok = _ffr_band_check(_model(120, 9400))  # 1.28%: over the target, inside the band
    assert ok is not None and ok["ok"] and ok["rule"] == "in" and ok["limit"] == [0.005, 0.02]
    assert ok["ci"][0] > 0.01 and not ok["ci_contains_target"]
    assert _ffr_band_check(_model(94, 9400))["ci_contains_target"]
    assert not _ffr_band_check(_model(200, 9400))["ok"]  # 2.1%
    assert not _ffr_band_check(_model(40, 9400))["ok"]  # 0.43%
    assert _ffr_band_check({"test_ffr": None, "target_ffr": 0.01}) is None  # no labels
