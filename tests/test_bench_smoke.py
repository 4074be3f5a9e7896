"""The agent benchmark still runs end to end (it once broke silently when the model store
changed layout). A small budget, and its figures are not judged here: numbers come from full
benchmark runs on a quiet machine (`make bench`), tests check behaviour."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_agent_benchmark_runs_and_reports_every_figure(tmp_path: Path):
    out = tmp_path / "agent.json"
    proc = subprocess.run(
        [sys.executable, "bench/agent_bench.py", "--requests", "300", "--seconds", "0.3",
         "--clients", "2", "--file-dies", "300", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode in (0, 1), proc.stderr[-3000:]  # 1: a target missed on a busy box
    report = json.loads(out.read_text())
    for key in ("ort_inprocess", "echo_plain", "agent_binary", "agent_json", "fastapi"):
        assert report[key]["p50_us"] > 0, key
    assert {t["name"] for t in report["targets"]} >= {
        "binary single-row p50 vs floor", "json single-row p50 vs floor",
        "batched binary throughput", "2 clients p99.9", "start to ready"}
    assert report["agent_errors"] == 0 and report["agent_predictions"] > 1000
    parts = report["agent_rss_parts_mb"]  # where the resident set is, beside its total
    assert parts["RssFile"] > 0 and parts["heap"] > 0
    assert parts["RssFile"] + parts["RssAnon"] == pytest.approx(report["agent_rss_mb"], abs=2)
    tree = report["agent_tree_memory_mb"]  # the log's writer process counts for the device
    assert tree["writer_rss_mb"] > 0 and 0 < tree["pss_mb"] < report["agent_rss_mb"] + tree[
        "writer_rss_mb"]
    assert report["throughput"]["dies_per_s"] > 0 and report["json_throughput"]["dies_per_s"] > 0
    assert report["json_parser"] == "orjson"
