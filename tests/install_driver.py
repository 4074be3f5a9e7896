"""A separate process that drives the installer, for kill -9 tests.

    python -m tests.install_driver STORE KEYRING install BUNDLE
    python -m tests.install_driver STORE KEYRING rollback
    python -m tests.install_driver STORE KEYRING loop BUNDLE...   # until killed

It starts like the agent (recovery first), then runs the command. `EDGEFLEET_CRASH_AT` makes the
installer SIGKILL itself at a named point. Before each operation it prints, flushed,
`begin <op> <active> <target>`, so the test knows which two versions are allowed afterwards.
`loop` installs the bundles in sequence order (skipping those below the store's highest and
those that failed) and often rolls back in between, forever; a parent kills it at a random
moment.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

from agent.bundle import read_manifest_unverified
from agent.install import Installer, InstallError
from agent.store import version_id


def _say(*words: object) -> None:
    print(*words, flush=True)


def main(argv: list[str]) -> int:
    store_root, keyring, cmd, *args = argv
    inst = Installer.open(Path(store_root), Path(keyring))
    inst.start()
    s = inst.store
    bundles = [(read_manifest_unverified(Path(b)), Path(b)) for b in args] if cmd == "loop" else []
    _say("ready", s.active())
    if cmd == "install":
        target = version_id(read_manifest_unverified(Path(args[0])))
        _say("begin", "install", s.active(), target)
        inst.install(Path(args[0]))
    elif cmd == "rollback":
        _say("begin", "rollback", s.active(), s.previous())
        inst.rollback()
    elif cmd == "loop":
        failed: set[str] = set()
        rng = random.Random()
        i = 0
        while True:
            highest = s.highest_sequence() or -1
            fresh = [(m, b) for m, b in bundles
                     if m.sequence > highest and version_id(m) not in failed]
            if not fresh and not s.previous():
                _say("exhausted")
                return 0
            if not fresh or (i % 2 and s.previous() and rng.random() < 0.7):
                _say("begin", "rollback", s.active(), s.previous())
                inst.rollback()
            else:
                m, b = fresh[0]
                _say("begin", "install", s.active(), version_id(m))
                try:
                    inst.install(b)
                except InstallError as e:
                    failed.add(version_id(m))
                    _say("failed", type(e).__name__)
            _say("done", s.active())
            i += 1
    else:
        _say("unknown command", cmd)
        return 2
    _say("done", s.active())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
