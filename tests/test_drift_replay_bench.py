"""bench/drift_replay.py still runs end to end on a tiny floor run; its figures are judged by
full runs (docs/model.md), not here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_drift_replay_bench_writes_before_and_after_alerts(tmp_path: Path):
    out = tmp_path / "replay.json"
    proc = subprocess.run([sys.executable, "bench/drift_replay.py", "--seeds", "5",
                           "--drift-seeds", "5", "--lots", "5", "--after-lots", "1",
                           "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = json.loads(out.read_text())["runs"]
    assert [(r["seed"], r["drift"]) for r in runs] == [(5, False), (5, True)]
    for r in runs:
        assert r["alert_after"] >= r["alert_before"] - 1e-6  # the period term only adds
        assert r["test_psi"] is not None and r["period_psi"] is not None
        assert r["after"]["psi"] is not None and r["after"]["refit_psi"] is not None
