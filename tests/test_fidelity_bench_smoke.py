"""bench/fidelity_bench.py: its command line and the pooling of lots and testers over seeds that
the issue's ">= 95% of lots and testers" check reads. The bench's figures come from full runs
(three default builds and SECOM: many minutes; docs/model.md "Measured"), not from here."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("fidelity_bench", REPO / "bench" /
                                                  "fidelity_bench.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_help_names_the_options():
    proc = subprocess.run([sys.executable, "bench/fidelity_bench.py", "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    for option in ("--seeds", "--lots", "--wafers-per-lot", "--secom", "--keep-dir"):
        assert option in proc.stdout


def _row(name: str, passes: int, fixed: bool, calibrated: bool) -> dict:
    return {"name": name, "passes": passes, "judged": passes >= 1060, "min_passes": 1060,
            "p_on_target": 0.99, "fixed": {"flagged": 10, "in_band": fixed},
            "calibrated": {"flagged": 10, "in_band": calibrated}}


def test_pooled_counts_judged_groups_of_every_seed_and_lists_the_small_ones():
    runs = {"seed a": {"groups": {"lot": [_row("L1", 1880, False, True),
                                          _row("L2", 1870, True, True)],
                                  "tester": [_row("T1", 2400, False, False)]}},
            "seed b": {"groups": {"lot": [_row("L3", 1900, True, False),
                                          _row("L4", 280, True, True)],
                                  "tester": [_row("T1", 2300, True, True)]}}}
    pooled = _bench()._pooled(runs)
    lots, testers = pooled["lot"], pooled["tester"]
    assert lots["judged"] == 3 and lots["too_small"] == ["L4 (10 of 280)"]
    assert (lots["calibrated"]["in_band"], lots["fixed"]["in_band"]) == (2, 2)
    assert lots["calibrated"]["share"] == 2 / 3
    assert testers["judged"] == 2 and testers["calibrated"]["share"] == 0.5
    assert abs(lots["expected_in_band_on_target"] - 3 * 0.99) < 1e-9
