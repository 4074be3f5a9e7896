"""Run every benchmark in turn (`make bench`); each writes its JSON to bench/results/.

The benchmarks compare against baselines measured in the same run (raw ONNX Runtime, a socket
echo, FastAPI, the unpruned FP32 model), so their ratios mean something on a shared, noisy
machine; absolute numbers do not transfer between machines. Run one alone with its own flags
(`python bench/agent_bench.py --help`).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ORDER = ["optimize_bench.py", "agent_bench.py", "install_bench.py", "shadow_bench.py",
         "fleet_link_bench.py", "rollout_bench.py"]


def main() -> int:
    failed = []
    for name in ORDER:
        script = BENCH / name
        if not script.exists():
            continue
        print(f"\n=== {name}", flush=True)
        t0 = time.monotonic()
        rc = subprocess.call([sys.executable, str(script)], cwd=BENCH.parent)
        print(f"=== {name}: exit {rc} in {time.monotonic() - t0:.0f} s", flush=True)
        if rc:
            failed.append(name)
    summary = f"; failed: {', '.join(failed)}" if failed else ""
    print(f"\nresults in {BENCH / 'results'}{summary}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
