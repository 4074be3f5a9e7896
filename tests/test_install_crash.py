"""kill -9 during installs, with real processes and real files: after a restart the box serves a
verified model, the old or the new one, never a mix, and staging is empty.

The driver (tests/install_driver.py) is a separate process that starts like the agent and
installs; `EDGEFLEET_CRASH_AT` makes it SIGKILL itself at a named point, and the random loop
kills it from outside at random moments (`EDGEFLEET_KILL_LOOP` iterations, default 20; the
draws come from `EDGEFLEET_KILL_SEED`, fixed by default, 0 for a random seed).
"""

from __future__ import annotations

import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.bundle import read_manifest_unverified
from agent.install import CRASH_POINTS, Installer
from agent.store import Store, version_id
from tests.conftest import REPO
from tests.install_helpers import make_keys, real_bundle, tree_snapshot

# Where the crash leaves the box after recovery: the old version, or the new one.
_NEW_AFTER = {"commit.pointer", "commit.swapped", "cleanup", "idle"}


def _driver(store: Path, ring: Path, *args: str, crash_at: str | None = None,
            stderr=subprocess.PIPE) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "EDGEFLEET_CRASH_AT"}
    env["PYTHONPATH"] = str(REPO)
    if crash_at:
        env["EDGEFLEET_CRASH_AT"] = crash_at
    return subprocess.Popen(
        [sys.executable, "-m", "tests.install_driver", str(store), str(ring), *args],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True)


def _box(root: Path) -> dict:
    return {k: v for k, v in tree_snapshot(root).items()
            if k not in ("store.json", "install.json", "lock")}


def _vid(bundle: Path) -> str:
    return version_id(read_manifest_unverified(bundle))


def _assert_sound(root: Path, ring: Path, allowed: set[str | None]) -> str | None:
    """Restart as the agent does; the serving version must be one of `allowed`, intact, loaded
    and self-tested; nothing may be left in staging or half-written in the root."""
    inst = Installer.open(root, ring)
    try:
        start = inst.start()
        store = inst.store
        active = store.active()
        assert active in allowed, f"active {active}, expected one of {allowed}"
        assert store.check_integrity() == []
        if active is not None:
            assert start.engine is not None and start.integrity.ok
            assert version_id(start.manifest) == active  # the manifest and model that serve
        assert store.staging_entries() == [], store.staging_entries()
        assert not list(root.glob(".*.tmp"))
        assert set(store.version_ids()) <= {v for v in allowed if v} | {store.previous()}
        assert inst.status()["state"] == "idle"
        return active
    finally:
        inst.close()


@pytest.fixture
def box(tmp_path: Path):
    """A store serving version A with Z as previous; bundles B (good) and X (fails self-test)."""
    key, ring = make_keys(tmp_path)
    bundles = {}
    for name, seq, offset in (("Z", 1, 0.0), ("A", 2, 0.0), ("B", 3, 0.0), ("X", 3, 0.5)):
        bundles[name] = tmp_path / f"{name}.efb"
        real_bundle(bundles[name], key, sequence=seq, seed=seq + int(offset * 10),
                    golden_offset=offset)
    root = tmp_path / "store"
    inst = Installer.open(root, ring)
    inst.install(bundles["Z"])
    inst.install(bundles["A"])
    inst.close()
    return root, ring, bundles


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_kill_at_every_persisted_step_recovers_old_or_new(box, point):
    root, ring, bundles = box
    before = _box(root)
    a, b = _vid(bundles["A"]), _vid(bundles["B"])
    bundle = bundles["X"] if point == "rollback" else bundles["B"]
    proc = _driver(root, ring, "install", str(bundle), crash_at=point)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, (out, err)
    expected = b if point in _NEW_AFTER else a
    assert _assert_sound(root, ring, {a, b}) == expected
    store = Store(root)
    if expected == a:
        assert _box(root) == before  # exactly as it was
    else:
        assert store.previous() == a and store.highest_sequence() == 3
        assert [e["event"] for e in store.history()].count("install") == 3  # recorded once


def test_kill_during_recovery_is_recovered_on_the_next_start(box):
    root, ring, bundles = box
    before = _box(root)
    first = _driver(root, ring, "install", str(bundles["B"]), crash_at="unpack.staged")
    first.communicate(timeout=60)
    second = _driver(root, ring, "rollback", crash_at="rollback")  # dies while recovering
    out, _ = second.communicate(timeout=60)
    assert second.returncode == -signal.SIGKILL and "ready" not in out
    _assert_sound(root, ring, {_vid(bundles["A"])})
    assert _box(root) == before


def test_random_kills_during_many_installs_and_rollbacks(tmp_path):
    """The driver installs and rolls back in a loop; we kill -9 it at random moments: after a
    random number (0-3) of its operations are done, at a random time within about one
    operation's length as measured in this run, so the kills land inside operations and some
    operations complete however fast or slow the machine is."""
    rounds = int(os.environ.get("EDGEFLEET_KILL_LOOP", "20"))
    # the draws come from a fixed seed (EDGEFLEET_KILL_SEED=0: a random one)
    rng = random.Random(int(os.environ.get("EDGEFLEET_KILL_SEED", "12")) or None)
    key, ring = make_keys(tmp_path)
    bundles = []
    for seq in range(1, 10 * rounds + 2):  # ~10 installs fit in a round
        path = tmp_path / f"b{seq}.efb"
        real_bundle(path, key, sequence=seq, seed=seq, golden_offset=0.5 if seq % 5 == 0 else 0)
        bundles.append(str(path))
    root = tmp_path / "store"
    active: str | None = None
    kills_mid_operation = 0
    interrupted: list[str] = []
    op_s: list[float] = []  # how long the driver's operations take here and now
    log = tmp_path / "driver.log"
    for _ in range(rounds):
        # stdout is read through its one file object only (readline, then read to the end):
        # communicate() would read the raw pipe and lose lines readline() had buffered. stderr
        # goes to a file, so a chatty driver cannot block on a full pipe.
        with open(log, "w") as err:
            proc = _driver(root, ring, "loop", *bundles, stderr=err)
        assert proc.stdout is not None
        lines = [proc.stdout.readline()]
        assert lines[0].startswith("ready"), lines[0] + proc.stdout.read() + log.read_text()
        lines += _operations(proc, rng.randint(0, 3), op_s)
        typical = statistics.median(op_s) if op_s else 0.1
        time.sleep(rng.uniform(0.0, 1.5 * typical))
        proc.send_signal(signal.SIGKILL)
        lines += proc.stdout.readlines()
        proc.stdout.close()
        assert proc.wait(60) == -signal.SIGKILL, log.read_text()
        allowed = _allowed_after([line.strip() for line in lines], active)
        kills_mid_operation += len(allowed) > 1
        record = root / "install.json"
        interrupted.append(json.loads(record.read_text())["state"] if record.exists() else "-")
        active = _assert_sound(root, ring, allowed)
    assert active is not None
    print(f"\n{kills_mid_operation} of {rounds} kills inside an operation; operations took "
          f"{statistics.median(op_s):.3f} s (median); states on disk at the kill: "
          f"{sorted(interrupted)}")
    assert kills_mid_operation > 0  # the kills did land inside operations


def _operations(proc: subprocess.Popen, n: int, took: list[float]) -> list[str]:
    """The driver's lines until `n` operations are done (or it stops), appending to `took`
    how long each one took from its `begin` line to its `done` line."""
    lines: list[str] = []
    began = None
    while n > 0:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith("begin"):
            began = time.monotonic()
        elif line.startswith("done"):
            n -= 1
            if began is not None:
                took.append(time.monotonic() - began)
    return lines


def _allowed_after(lines: list[str], active_before: str | None) -> set[str | None]:
    """From the driver's log: the versions allowed to serve after the kill."""
    allowed: set[str | None] = {active_before}
    for line in lines:
        word, *rest = line.split()
        if word in ("ready", "done"):
            allowed = {_none(rest[0]) if rest else None}
        elif word == "begin":
            allowed = {_none(rest[1]), _none(rest[2])}
    return allowed


def _none(word: str) -> str | None:
    return None if word == "None" else word
