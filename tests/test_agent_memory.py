"""agent/memory.py: the agent's malloc settings, read back from glibc itself (malloc_info)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from agent.memory import _libc

REPO = Path(__file__).resolve().parents[1]

# Four threads allocate after the limit is set; glibc gives each thread that first allocates a
# new arena while there are fewer than the limit (contended or not), so the arena count shows
# the limit. malloc_info writes one <heap nr=...> element per arena.
_PROBE = """
import ctypes, sys, threading
from agent.memory import limit_arenas
limit = int(sys.argv[1])
if limit:
    limit_arenas(limit)
else:
    limit_arenas()
keep = []
def work():
    keep.append([bytearray(4096) for _ in range(64)])
threads = [threading.Thread(target=work) for _ in range(4)]
for t in threads:
    t.start()
for t in threads:
    t.join()
libc = ctypes.CDLL("libc.so.6")
libc.fopen.restype = ctypes.c_void_p
fp = libc.fopen(sys.argv[2].encode(), b"w")
libc.malloc_info(0, ctypes.c_void_p(fp))
libc.fclose(ctypes.c_void_p(fp))
"""


def _arenas(limit: int, tmp_path: Path) -> int:
    out = tmp_path / f"info{limit}.xml"
    subprocess.run([sys.executable, "-c", _PROBE, str(limit), str(out)], cwd=REPO, check=True,
                   env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}, timeout=60)
    return out.read_text().count("<heap nr=")


@pytest.mark.skipif(_libc() is None, reason="glibc only")
def test_every_thread_allocates_from_one_arena(tmp_path):
    """One arena, so the idle trim (malloc_trim) reaches every free page: a thread arena's top
    is only trimmed by a free() past the (dynamic) trim threshold."""
    assert _arenas(4, tmp_path) > 1  # the probe does make arenas when allowed
    assert _arenas(0, tmp_path) == 1  # the agent's default
