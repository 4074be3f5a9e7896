"""bench/predlog_bench.py still runs end to end (small budget; its figures are judged only in
full runs, on a quiet machine)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_predlog_benchmark_runs_and_reports_both_encodings(tmp_path: Path):
    out = tmp_path / "predlog.json"
    proc = subprocess.run(
        [sys.executable, "bench/predlog_bench.py", "--requests", "100", "--rounds", "2",
         "--batch-seconds", "0.5", "--heads-seconds", "0.3", "--heads-rounds", "1",
         "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode in (0, 1), proc.stderr[-3000:]  # 1: the target missed on a busy box
    report = json.loads(out.read_text())
    for enc in ("binary", "json"):
        figures = report["figures"][enc]
        for ratio in (figures["p99_ratio"], figures["noise_p99_ratio"]):  # log's cost, noise
            assert len(ratio["per_round"]) == 2
            assert ratio["ci95"][0] <= ratio["median"] <= ratio["ci95"][1]
    assert report["cpu"]["on"]["serving_us_per_answer"] > 0
    written = report["log_records"]['edgefleet_predlog_records_total{log="predictions"}']
    assert written == 2 * 2 * (100 + 200)  # rounds x encodings x (requests + warm-up): all
    assert report["cpu"]["on"]["writer_process_us_per_answer"] > 0  # the log's own process
    assert report["batches"]["on"]["memory"]["writer_rss_mb"] > 0
    for agent in ("off", "on"):
        for clients in ("8", "32"):
            assert len(report["heads"][agent][clients]["p999_us"]) == 1


@pytest.mark.slow
def test_predlog_benchmark_shares_its_rounds_among_fresh_agent_sets(tmp_path: Path):
    """--agent-sets: the rounds run on fresh agent processes, set after set, and are pooled;
    each set's serving-thread ratios are reported too. --python-tap: a fourth agent with the
    pure-Python tap in the same rounds, and the report names the tap `on` ran."""
    from agent.predlog_tap import compiled

    report = _report(tmp_path, "bench/predlog_bench.py", "--requests", "50", "--rounds", "3",
                     "--agent-sets", "2", "--batch-seconds", "0", "--python-tap", ok=(0, 1))
    assert [one["rounds"] for one in report["per_set"]] == [2, 1]
    assert all(one["off2/off"] > 0 and one["on/off"] > 0 for one in report["per_set"])
    assert report["on_tap"].startswith("compiled" if compiled() else "Python")
    for enc in ("binary", "json"):
        assert len(report["figures"][enc]["p99_ratio"]["per_round"]) == 3
        assert len(report["figures"][enc]["ref_p99_ratio"]["per_round"]) == 3
    written = report["log_records"]['edgefleet_predlog_records_total{log="predictions"}']
    assert written == 1 * 2 * (50 + 200)  # the last set's agent: its one round, all written


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("strace") is None, reason="bench/gil_waits.py needs strace")
def test_gil_waits_benchmark_runs(tmp_path: Path):
    report = _report(tmp_path, "bench/gil_waits.py", "--rounds", "1", "--seconds", "0.5")
    for agent in ("off", "on"):
        (run,) = report["rounds"][agent]
        assert run["answers_per_s"] > 0 and run["futex_wait_ms"] >= 0


@pytest.mark.slow
def test_tap_clock_benchmark_times_the_tap_of_each_encoding(tmp_path: Path):
    report = _report(tmp_path, "bench/tap_clock.py", "--rounds", "1", "--requests", "50")
    (taps,) = report["taps"].values()
    for enc in ("binary", "json"):
        assert taps[enc]["calls"] == 50  # the turn's 200 warm-up calls are left out
        assert 0 < taps[enc]["median_ns"] <= taps[enc]["p99_ns"]


def _report(tmp_path: Path, script: str, *args: str, ok: tuple[int, ...] = (0,)) -> dict:
    """Run a bench script (exit status in `ok`) and return the JSON it wrote."""
    out = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, script, *args, "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode in ok, proc.stderr[-3000:]
    return json.loads(out.read_text())
