"""Run an `edgefleet` command under yappi's CPU-clock profiler, every thread included (cProfile
sees only the main thread, and the controller parses MQTT on its selector-loop thread):

    .venv/bin/python bench/profiled.py OUT.txt fleet controller --metrics-port 0

On exit (the command returns, or SIGTERM stops it, as it stops the controller service) OUT.txt
gets the functions by own CPU time and by cumulative CPU time, and the CPU time per thread.
bench/rollout_bench.py --profile runs the controller service this way. Needs yappi (the bench
extra).
"""

from __future__ import annotations

import io
import runpy
import sys
from pathlib import Path


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        print(__doc__)
        raise SystemExit(0 if len(sys.argv) > 1 else 2)
    import yappi  # the bench extra

    out = Path(sys.argv[1])
    sys.argv = ["edgefleet", *sys.argv[2:]]
    yappi.set_clock_type("cpu")
    yappi.start()
    try:
        runpy.run_module("edgefleet", run_name="__main__", alter_sys=True)
    except SystemExit:
        pass
    finally:
        yappi.stop()
        buf = io.StringIO()
        stats = yappi.get_func_stats()
        for key in ("ttot", "tsub"):
            buf.write(f"\n== functions by {'cumulative' if key == 'ttot' else 'own'} CPU ==\n")
            stats.sort(key, "desc")
            for f in list(stats)[:80]:
                buf.write(f"{f.tsub:9.3f} own {f.ttot:9.3f} cum {f.ncall:9d} calls  "
                          f"{f.module}:{f.lineno} {f.name}\n")
        buf.write("\n== threads ==\n")
        for t in yappi.get_thread_stats():
            buf.write(f"{t.ttot:9.3f} s  {t.name} ({t.id})\n")
        out.write_text(buf.getvalue())


if __name__ == "__main__":
    main()
