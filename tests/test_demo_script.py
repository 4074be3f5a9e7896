"""scripts/demo.sh's own lines that look at results, run on what they look at: the step that
shows fail decisions prints them from the tab-separated file `agent predict` writes (a grep
for " fail " printed nothing), and the script parses. The demo itself is `make demo`."""

from __future__ import annotations

import re
import subprocess

from tests.conftest import REPO

DEMO = REPO / "scripts" / "demo.sh"


def test_the_demo_parses():
    r = subprocess.run(["bash", "-n", str(DEMO)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_the_fail_decisions_step_prints_three_fails(tmp_path):
    # `agent predict --file` writes die, decision, score, then the worst parameters, tab-separated
    # (tests/test_agent_cli.py checks that format against a real agent).
    rows = [f"D{i}\t{'fail' if i % 3 == 0 else 'pass'}\t{i / 10:.2f}\tp00{i % 7}={i}"
            for i in range(1, 40)]
    (tmp_path / "decisions.txt").write_text("\n".join(rows) + "\n")
    (line,) = [ln for ln in DEMO.read_text().splitlines() if "decisions.txt" in ln
               and ln.startswith("awk")]
    cmd = re.sub(r'"\$OUT/decisions.txt"', str(tmp_path / "decisions.txt"), line)
    r = subprocess.run(["bash", "-euo", "pipefail", "-c", cmd], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert [ln.split("\t")[:2] for ln in r.stdout.splitlines()] == \
        [["D3", "fail"], ["D6", "fail"], ["D9", "fail"]]
