"""The calibration's floor-wide body tracker (agent/calibration.py `BodyTracker`, the build's
`optimize.calibrate.body_params`): an excursion moves every tester's threshold by the body's
move, noise and a lower body do not, a mostly bad lot trips its guard and resets it, its state
survives a restart, and a block or a state file without it behaves as before it existed."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.calibration import (
    BodyParams,
    Calibration,
    CalibrationCollector,
    CalibrationError,
    CalibrationHub,
    CalibrationParams,
    manifest_block,
    simulate,
)
from optimize.calibrate import CalibrateConfig, body_params, calibration_params

BODY = BodyParams(ref=0.7, band=0.02, window=200, beta=3.0, max_factor=1.2)


def _params(body: BodyParams | None = BODY, **kw) -> CalibrationParams:
    """A tail that hardly moves (prior 100,000), so what moves the threshold is the body."""
    base = dict(threshold=1.0, level=0.99, cap=1.12, low=0.9, high=1.05, expected_flagged=0.05,
                window=400, prior=100_000, every=8, min_samples=40, body=body)
    return CalibrationParams(**{**base, **kw})


def _normal(rng: np.random.Generator, n: int, scale: float = 1.0) -> list[float]:
    return [float(np.float32(v)) for v in rng.normal(0.7, 0.05, n) * scale]


def _feed(cal: Calibration, scores: list[float], testers: tuple[str, ...] = ("T1", "T2")
          ) -> list[float]:  # fmt: skip
    return [cal.judge(testers[i % len(testers)], s) for i, s in enumerate(scores)]


def test_an_excursion_raises_every_testers_threshold_by_the_bodys_move_then_lets_go() -> None:
    """Scores 5% higher on the floor: once a window of them is in, every tester's die is judged
    against its own threshold times (1.05)^beta, a tester that sent none of them too; back to
    normal, the factor returns to 1 within a window."""
    rng = np.random.default_rng(0)
    cal = Calibration(_params(), "m")
    _feed(cal, _normal(rng, 600))
    assert cal.body_factor() == 1.0
    own = {k: t for k, t, _ in cal.snapshot()}
    shifted = _normal(rng, 400, 1.05)
    _feed(cal, shifted, ("T1",))
    mean = np.mean(np.array(shifted[-BODY.window:], np.float32), dtype=np.float64)
    assert cal.body_factor() == pytest.approx((mean / BODY.ref) ** BODY.beta, rel=1e-6)
    assert cal.body_factor() == pytest.approx(1.05**3, abs=0.05)
    factor = cal.body_factor()
    assert cal.judge("T2", 0.7) == np.float32(own["T2"] * factor)
    _feed(cal, _normal(rng, 300))
    assert cal.body_factor() == 1.0


@pytest.mark.parametrize("scale", [1.0, 0.95, 0.9])
def test_a_body_within_its_band_or_below_its_reference_changes_nothing(scale) -> None:
    """Up only: a lower body (a tester reading low) is the tail's business, not the body's."""
    cal = Calibration(_params(), "m")
    thr = _feed(cal, _normal(np.random.default_rng(1), 1500, scale))
    assert cal.body_factor() == 1.0
    assert thr == simulate(_params(body=None), np.array(_normal(np.random.default_rng(1), 1500,
                                                                 scale)),
                           ["T1", "T2"] * 750).tolist()


def test_the_factor_is_bounded_by_max_factor() -> None:
    cal = Calibration(_params(), "m")
    _feed(cal, _normal(np.random.default_rng(2), 600, 1.3))  # (1.3)^3 = 2.2
    assert cal.body_factor() == BODY.max_factor


def _bad_lot(cal: Calibration, rng: np.random.Generator, share: float) -> list[bool]:
    """A lot where `share` of the dies are defects scoring 1.0-1.3 (over the threshold, half of
    them under the cap): whether each defect was failed."""
    caught = []
    for i in range(600):
        if rng.random() < share:
            s = float(np.float32(rng.uniform(1.0, 1.3)))
            caught.append(s > cal.judge(f"T{i % 2}", s))
        else:
            cal.judge(f"T{i % 2}", _normal(rng, 1)[0])
    return caught


def test_a_mostly_bad_lot_trips_the_body_guard_and_is_forgotten() -> None:
    """40% defects move the window's mean as an excursion would; the floor's share of dies over
    their threshold trips the guard (3x expected) within a few dozen dies, the ring is dropped
    and the factor is 1 while it lasts: the defects are failed against the testers' own
    thresholds. Without the guard the factor would sit at its bound and let defects pass."""
    guarded = Calibration(_params(), "m")
    _feed(guarded, _normal(np.random.default_rng(3), 600))
    caught = _bad_lot(guarded, np.random.default_rng(4), 0.4)
    assert guarded.body is not None and guarded.body.frozen
    assert guarded.body_factor() == 1.0
    unguarded = Calibration(_params(guard=1e6), "m")
    _feed(unguarded, _normal(np.random.default_rng(3), 600))
    missed = _bad_lot(unguarded, np.random.default_rng(4), 0.4)
    assert unguarded.body_factor() == BODY.max_factor
    assert np.mean(caught) > np.mean(missed) + 0.2
    _feed(guarded, _normal(np.random.default_rng(5), 1500))  # normal again: learns, from empty
    assert not guarded.body.frozen and guarded.body.n == BODY.window


def test_a_frozen_tester_teaches_the_body_nothing() -> None:
    """One tester of ten sends only dies over its threshold (a bad lot on one tester): it
    freezes within a few dozen dies (its own guard) and its dies stop entering the body; the
    floor's share (10%) stays under the body's guard."""
    rng = np.random.default_rng(6)
    cal = Calibration(_params(), "m")
    normal = [f"T{i}" for i in range(9)]
    _feed(cal, _normal(rng, 900), tuple(normal))
    for _ in range(300):
        cal.judge("T9", 1.05)
        _feed(cal, _normal(rng, 9), tuple(normal))
    assert cal.body is not None and not cal.body.frozen
    assert dict((k, s) for k, _, s in cal.snapshot())["T9"] == "frozen"
    assert np.float32(1.05) not in np.frombuffer(cal.body.ring, np.float32)  # early ones too
    assert cal.body_factor() == 1.0


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(min_value=0, max_value=1.25, width=32), min_size=0, max_size=900),
       st.lists(st.floats(min_value=0, max_value=1.25, width=32), min_size=1, max_size=300))
def test_saved_state_with_a_body_continues_exactly(first, then) -> None:
    """Save after `first`, load into a fresh calibration (a restart): the thresholds given for
    `then` are the ones the uninterrupted calibration gives, the body's factor included."""
    a = Calibration(_params(), "m")
    _feed(a, first)
    b = Calibration(_params(), "m")
    b.load_state(a.state_bytes())
    assert _feed(b, then) == _feed(a, then)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(min_value=0, max_value=1.5, allow_nan=False, width=32), min_size=1,
                max_size=800),
       st.lists(st.sampled_from(["T1", "T2", None]), min_size=800, max_size=800))
def test_simulation_is_the_device_and_the_bound_holds(scores, testers) -> None:
    """`simulate` (what the build reports) answers what `Calibration.judge` answers die by die;
    every threshold stays within [low, high x max_factor]."""
    p = _params()
    testers = testers[: len(scores)]
    thr = simulate(p, np.array(scores, np.float32), testers)
    cal = Calibration(p, "m")
    assert thr.tolist() == [cal.judge("" if t is None else t, s)
                            for s, t in zip(scores, testers, strict=True)]
    assert ((thr >= p.low) & (thr <= np.float32(p.high * BODY.max_factor))).all()


def test_a_block_and_a_state_file_without_a_body_behave_as_before() -> None:
    """An older bundle's block (no `body`) has no body tracker and writes no `body` back; a
    state file saved without one loads into a calibration that has one (an empty body); the
    block with one reads back equal; a bad body object is refused."""
    old = _params(body=None).to_manifest()
    assert "body" not in old
    p = CalibrationParams.from_manifest(old, 1.0)
    assert p is not None and p.body is None and Calibration(p, "m").body is None
    new = manifest_block(_params(), None)
    assert new["body"] == {"ref": 0.7, "band": 0.02, "window": 200, "beta": 3.0,
                           "max_factor": 1.2}
    assert CalibrationParams.from_manifest(json.loads(json.dumps(new)), 1.0) == _params()
    rng = np.random.default_rng(7)
    plain = Calibration(_params(body=None), "m")
    _feed(plain, _normal(rng, 500))
    with_body = Calibration(_params(), "m")
    assert with_body.load_state(plain.state_bytes()) == 2
    assert with_body.body is not None and with_body.body.n == 0
    for bad in ({"ref": -1.0, "band": 0.02}, {"ref": 0.7, "band": 0.02, "window": 0},
                {"ref": 0.7, "band": 0.02, "max_factor": 3.0}, {"ref": 0.7, "band": 0.02,
                                                                 "colour": 1}, [1]):
        with pytest.raises(CalibrationError, match="body"):
            CalibrationParams.from_manifest({**old, "body": bad}, 1.0)


def test_the_factor_is_a_metric_and_survives_the_hub_on_disk(tmp_path) -> None:
    class _Manifest:
        def __init__(self) -> None:
            self.name, self.version, self.sequence, self.threshold = "m", "1.0", 1, 1.0
            self.head = {"decision": {"threshold": 1.0,
                                      "calibration": manifest_block(_params(), None)}}

    hub = CalibrationHub(tmp_path)
    cal = hub.for_manifest(_Manifest())
    assert cal is not None
    _feed(cal, _normal(np.random.default_rng(8), 600, 1.05))
    factor = cal.body_factor()
    assert factor > 1.1
    [value] = [m.samples[0].value for m in CalibrationCollector(hub).collect()
               if m.name == "edgefleet_calibration_body_factor"]
    assert value == factor
    hub.save()
    restarted = CalibrationHub(tmp_path).for_manifest(_Manifest())
    assert restarted is not None and restarted.body_factor() == factor


# -- the build


def test_body_params_measure_the_reference_and_the_noise_of_the_windows() -> None:
    """`ref` is the mean under the cap; `band` the largest |ln| move of the 200-die windows
    times the margin; too few windows, a body tracker configured off, or a mean that is not
    positive give None."""
    rng = np.random.default_rng(9)
    s = np.r_[rng.normal(1.0, 0.1, 4000), [50.0] * 20]  # gross fails: over the cap, not learnt
    cfg = CalibrateConfig()
    b = body_params(cfg, s, cap=2.0)
    assert b is not None and b.ref == pytest.approx(1.0, abs=0.01)
    windows = s[:4000].reshape(-1, 200).mean(axis=1)
    assert b.band == pytest.approx(1.2 * np.abs(np.log(windows / s[:4000].mean())).max())
    assert 0.005 < b.band < 0.03  # 200 dies of sd 0.1: the mean's sd is 0.7%
    assert body_params(cfg, s[:700], cap=2.0) is None
    assert body_params(CalibrateConfig(body_window=0), s, cap=2.0) is None
    assert body_params(cfg, -np.abs(s), cap=2.0) is None


def test_the_build_ships_a_body_tracker_and_tunes_the_level_with_it() -> None:
    """calibration_params puts the body on the complete dies' stratum; with it off
    (`body_window=0`) the block is as before."""
    rng = np.random.default_rng(10)
    n = 6000
    scores = np.r_[rng.normal(1.0, 0.1, n), rng.normal(3.0, 0.5, 120)]
    passes = np.r_[np.ones(n, bool), np.zeros(120, bool)]
    order = rng.permutation(len(scores))
    scores, passes = scores[order], passes[order]
    x = np.zeros((len(scores), 3))
    testers = np.array(["T1", "T2", "T3"])[np.arange(len(scores)) % 3]
    lots = np.array([f"L{i // 1000}" for i in range(len(scores))])
    thr = float(np.quantile(scores[passes], 0.99))
    on = calibration_params(CalibrateConfig(), scores, passes, x, thr, testers, lots)
    off = calibration_params(CalibrateConfig(body_window=0), scores, passes, x, thr, testers,
                             lots)
    assert on is not None and off is not None
    assert on[0].body is not None and off[0].body is None
    assert on[0].body.ref == pytest.approx(1.0, abs=0.01)
    assert "body" in manifest_block(*on) and "body" not in manifest_block(*off)
