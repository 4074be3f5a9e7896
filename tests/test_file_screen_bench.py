"""bench/file_screen_bench.py still runs end to end, on a tiny file; its figures are judged by
full runs (`bench/file_screen_bench.py`), not here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_file_screen_bench_reports_the_cli_beside_the_client(tmp_path: Path):
    out = tmp_path / "fs.json"
    proc = subprocess.run([sys.executable, "bench/file_screen_bench.py", "--dies", "40",
                           "--runs", "1", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    fs = json.loads(out.read_text())["file_screening"]
    assert fs["dies"] == 40 and fs["client_dies_per_s"] > 0
    assert fs["ratio"] > 0 and fs["light_ratio"] > 0 and fs["ratio_inprocess"] > 0
    assert fs["cli_startup_s"] > 0 and 0 < fs["ratio_bound"] < 1
