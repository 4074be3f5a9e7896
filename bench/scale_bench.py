"""The controller's cost at fleet sizes one simulator process cannot hold: bench/rollout_bench.py's
scale scenario (v1 -> v2 through shadow, canary and waves, the real `edgefleet fleet rollout`
CLI in its own process) on light-mode floors spread over simulator processes, with the
controller process's own CPU seconds and peak RSS (os.wait4 on it) next to its pace.

    .venv/bin/python bench/scale_bench.py [--sizes 1000,2000,5000] [--procs 2]
                                          [--out bench/results/scale.json]

Per size: the rollout's wall time and state, controller CPU (total and per device), controller
peak RSS, command-to-live distribution, step timeouts, devices on v2, duplicate commands, and
the load average before and after. docs/scale.md reports these figures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import rollout_bench as rb  # noqa: E402
from sim_bench import write_results  # noqa: E402


def _cli_measured(self: rb.Floor, *args: str, timeout: float = 900
                  ) -> subprocess.CompletedProcess:
    """Floor.cli, reaping the controller with os.wait4 for its own resource usage."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-m", "edgefleet", *args], cwd=rb.REPO,
                                env=self.env.env(self.broker, self.db_path), stdout=out,
                                stderr=err, text=True)
        deadline = t0 + timeout
        while True:
            pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                proc.kill()
            time.sleep(0.1)
        proc.returncode = os.waitstatus_to_exitcode(status)
        self.controller = {"cpu_s": round(ru.ru_utime + ru.ru_stime, 2),
                           "max_rss_mb": round(ru.ru_maxrss / 1024, 1),
                           "process_wall_s": round(time.monotonic() - t0, 2)}
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out.read(), err.read())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="1000,2000,5000")
    p.add_argument("--procs", type=int, default=2)
    p.add_argument("--no-shadow", action="store_true")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "scale.json")
    args = p.parse_args()
    rb.SIM.update(procs=args.procs, light=True)
    rb.Floor.cli = _cli_measured  # type: ignore[method-assign]
    controllers: list[dict[str, Any]] = []
    original_close = rb.Floor.close

    def close(self: rb.Floor) -> None:
        controllers.append(getattr(self, "controller", {}))
        original_close(self)

    rb.Floor.close = close  # type: ignore[method-assign]
    results: dict[str, Any] = {"machine": {"cpus": os.cpu_count()}, "procs": args.procs,
                               "runs": {}}
    with tempfile.TemporaryDirectory(prefix="scale-bench-") as tmp:
        env = rb.Env(Path(tmp))
        try:
            for n in map(int, args.sizes.split(",")):
                print(f"running scale-{n} ...", flush=True)
                load0 = os.getloadavg()
                t0 = time.monotonic()
                r = rb.scenario_scale(env, n, not args.no_shadow)
                ctl = controllers[-1]
                steps = r.get("step_status", {})
                results["runs"][n] = {
                    "devices": n, "loadavg_start": load0, "loadavg_end": os.getloadavg(),
                    "scenario_s": round(time.monotonic() - t0, 1),
                    "state": r.get("state"), "exit_code": r.get("exit_code"),
                    "rollout_wall_s": r.get("wall_s"),
                    "first_command_to_all_live_s": r.get("first_command_to_all_live_s"),
                    "controller": {**ctl, "cpu_ms_per_device": round(
                        1000 * ctl.get("cpu_s", 0) / n, 2)},
                    "command_to_live_s": r.get("command_to_live_s"),
                    "step_timeouts": sum(v for k, v in steps.items() if k.endswith("timeout")),
                    "devices_on_v2": r.get("devices_on_v2"),
                    "duplicate_commands": r.get("duplicate_commands"),
                    "stages": [(s["stage"], s["state"], s["deploy_s"]) for s in r["stages"]],
                    "stderr": r.get("stderr")}
                print(json.dumps(results["runs"][n], indent=1), flush=True)
        finally:
            env.close()
    write_results(args.out, results)


if __name__ == "__main__":
    main()
