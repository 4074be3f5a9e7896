"""The install state machine, in process: what goes live, what is refused, what is recorded."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from agent.engine import Engine
from agent.install import (
    InstallBusy,
    InstallConfig,
    Installer,
    InstallFailed,
    IntegrityMonitor,
    NoRollbackTarget,
    State,
)
from agent.manifest import Manifest
from agent.store import Store, version_id
from tests.install_helpers import make_keys, real_bundle, tree_snapshot


class Slot:
    """What the server's model slot does, reduced to what the installer needs: swap, fallback.
    It checks that the pointer on disk already names a model when it is swapped in."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.engine: Engine | None = None
        self.manifest: Manifest | None = None
        self.swaps: list[str] = []
        self.fallbacks: list[str] = []
        self.swapped = threading.Event()
        self.fell_back = threading.Event()

    def swap(self, engine: Engine, manifest: Manifest) -> None:
        assert Store(self.root).active() == version_id(manifest), "swapped before commit point"
        self.engine, self.manifest = engine, manifest
        self.swaps.append(manifest.version)
        self.swapped.set()

    def enter_fallback(self, reason: str) -> None:
        self.fallbacks.append(reason)
        self.fell_back.set()

    def predict_one(self) -> float:
        assert self.engine is not None and self.manifest is not None
        x = np.zeros((1, self.manifest.input.n_features), dtype=np.float32)
        return float(self.engine.predict(x).score[0])


class Kit:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.key, self.ring = make_keys(tmp)
        self.root = tmp / "store"
        self.slot = Slot(self.root)
        self._n = 0

    def bundle(self, sequence: int, **kw) -> Path:
        self._n += 1
        path = self.tmp / f"bundle-{self._n}.efb"
        real_bundle(path, self.key, sequence=sequence, seed=kw.pop("seed", self._n), **kw)
        return path

    def installer(self, config: InstallConfig = InstallConfig(), root: Path | None = None):
        self.slot.root = root or self.root
        return Installer.open(root or self.root, self.ring, config, on_commit=self.slot.swap,
                              on_fallback=self.slot.enter_fallback)

    def vid(self, bundle: Path) -> str:
        from agent.bundle import read_manifest_unverified

        return version_id(read_manifest_unverified(bundle))


@pytest.fixture
def kit(tmp_path: Path) -> Kit:
    return Kit(tmp_path)


@pytest.fixture
def inst(kit: Kit) -> Iterator[Installer]:
    i = kit.installer()
    yield i
    i.close()


def _box(root: Path) -> dict:
    """Everything that decides what serves: versions, pointers, staging, quarantine."""
    return {k: v for k, v in tree_snapshot(root).items()
            if k not in ("store.json", "install.json", "lock")}


def test_install_goes_live_after_the_pointer_moved(kit, inst):
    b = kit.bundle(1)
    result = inst.install(b)
    assert (result.outcome, result.id, result.from_id) == ("committed", kit.vid(b), None)
    assert set(result.timings) == {"verify", "unpack", "load", "self_test", "commit", "cleanup"}
    assert kit.slot.swaps == ["1.1.1"]  # Slot.swap asserts the pointer moved first
    assert inst.store.active() == kit.vid(b) and inst.store.staging_entries() == []
    assert json.loads((kit.root / "install.json").read_text())["state"] == "idle"
    assert kit.slot.predict_one() >= 0


def test_bundle_failing_its_self_test_never_goes_live(kit, inst):
    good = kit.bundle(1)
    inst.install(good)
    before = _box(kit.root)
    bad = kit.bundle(2, golden_offset=0.5)  # verifies, but its golden scores are off
    with pytest.raises(InstallFailed, match="golden vector") as e:
        inst.install(bad)
    assert (e.value.state, e.value.kind) == ("self_test", "SelfTestError")
    assert kit.slot.swaps == ["1.1.1"]
    assert _box(kit.root) == before  # exactly as it was: the bad version is gone
    last = inst.store.history()[-1]
    assert (last["event"], last["id"], last["state"]) == ("install_failed", kit.vid(bad),
                                                          "self_test")
    rec = json.loads((kit.root / "install.json").read_text())
    assert rec["state"] == "idle" and rec["last"]["outcome"] == "rolled_back"
    assert inst.store.highest_sequence() == 1  # a failed install does not count


def test_downgrade_through_install_is_refused_and_local_rollback_works(kit, inst):
    one, two = kit.bundle(1), kit.bundle(2)
    inst.install(one)
    inst.install(two)
    with pytest.raises(InstallFailed, match="sequence 1 is below the minimum allowed 2") as e:
        inst.install(one)
    assert (e.value.state, e.value.kind) == ("verify", "Downgrade")
    result = inst.rollback()
    assert (result.op, result.id, result.from_id) == ("rollback", kit.vid(one), kit.vid(two))
    assert (inst.store.active(), inst.store.previous()) == (kit.vid(one), kit.vid(two))
    assert inst.store.highest_sequence() == 2  # a rollback never lowers the floor
    assert inst.store.history()[-1]["event"] == "rollback"
    with pytest.raises(InstallFailed, match="Downgrade|below the minimum"):
        inst.install(one)
    again = inst.install(two)  # equal sequence is allowed; the retained directory is reused
    assert "unpack" in again.timings and inst.store.active() == kit.vid(two)
    assert kit.slot.swaps == ["1.1.1", "1.2.2", "1.1.1", "1.2.2"]


def test_rollback_needs_a_previous_version(kit, inst):
    with pytest.raises(NoRollbackTarget, match="no previous version"):
        inst.rollback()
    inst.install(kit.bundle(1))
    with pytest.raises(NoRollbackTarget):
        inst.rollback()
    with pytest.raises(NoRollbackTarget, match="no version"):
        inst.rollback(to="../..")


def test_rollback_target_changed_on_disk_is_refused(kit, inst):
    one, two = kit.bundle(1), kit.bundle(2)
    inst.install(one)
    inst.install(two)
    model = inst.store.model_path(kit.vid(one))
    model.write_bytes(model.read_bytes()[:-1] + b"\x00")
    with pytest.raises(InstallFailed, match="changed on disk") as e:
        inst.rollback()
    assert (e.value.state, e.value.kind) == ("load", "IntegrityError")
    assert inst.store.active() == kit.vid(two)


def test_input_width_change_needs_force(kit, inst):
    inst.install(kit.bundle(1, n=16))
    narrow = kit.bundle(2, n=8)
    with pytest.raises(InstallFailed, match="input width 8, the running model .* takes 16"):
        inst.install(narrow)
    assert inst.install(narrow, force=True).outcome == "committed"
    assert kit.slot.manifest.input.n_features == 8


def test_reinstalling_the_active_bundle_changes_nothing(kit, inst):
    b = kit.bundle(1)
    inst.install(b)
    result = inst.install(b)
    assert result.outcome == "unchanged" and kit.slot.swaps == ["1.1.1"]


def test_latency_limit_keeps_a_slow_model_out(kit):
    inst = kit.installer(InstallConfig(max_latency_s=1e-9))
    try:
        with pytest.raises(InstallFailed, match="median single-row latency") as e:
            inst.install(kit.bundle(1))
        assert e.value.kind == "LatencyTooHigh"
        assert inst.store.active() is None and inst.store.version_ids() == []
    finally:
        inst.close()


def test_tampered_bundle_is_refused_before_anything_is_written(kit, inst):
    inst.install(kit.bundle(1))
    before = _box(kit.root)
    b = kit.bundle(2)
    data = bytearray(b.read_bytes())
    data[-2000] ^= 0xFF  # inside model.onnx's padding or data
    b.write_bytes(bytes(data))
    with pytest.raises(InstallFailed) as e:
        inst.install(b)
    assert e.value.state == "verify"
    assert _box(kit.root) == before


def test_swap_failure_moves_the_pointer_back(kit):
    inst = kit.installer()
    try:
        inst.install(kit.bundle(1))

        def broken_swap(engine, manifest):
            raise RuntimeError("slot refused")

        inst.attach(on_commit=broken_swap)
        with pytest.raises(InstallFailed, match="slot refused") as e:
            inst.install(kit.bundle(2))
        assert e.value.state == "commit"
        assert inst.store.active() == "1-1.1.1-" + inst.store.active().rsplit("-", 1)[1]
        assert inst.store.highest_sequence() == 1
    finally:
        inst.close()


def test_prepared_snapshot_is_built_while_loading_and_goes_live_at_the_commit(kit):
    """`on_prepare` (the runtime's `prepare`, as the agent wires it) builds the serving
    snapshot in the load step, while the old model still serves; the commit only switches to
    it, after the pointer moved. A snapshot prepared for an install that then fails its self
    test never serves, and the failure rolls back as before."""
    from agent.predictor import Limits
    from agent.runtime import Runtime

    runtime = Runtime(Limits())
    seen: list[tuple[str, str | None, str | None]] = []  # (event, serving, store's active)

    def prepare(engine, manifest):
        go_live = runtime.prepare(engine, manifest)
        seen.append(("prepared", runtime.active().version, Store(kit.root).active()))

        def switch():
            old = go_live()
            seen.append(("live", runtime.active().version, Store(kit.root).active()))
            return old

        return switch

    inst = Installer.open(kit.root, kit.ring, on_commit=runtime.swap, on_prepare=prepare)
    try:
        b1 = kit.bundle(1)
        inst.install(b1)
        assert seen == [("prepared", None, None), ("live", "1.1.1", kit.vid(b1))]
        p1 = runtime.active()
        # the digest unpacking computed: the bundle's sha256, what the fleet names it by
        assert p1.bundle_digest == hashlib.sha256(b1.read_bytes()).hexdigest()
        seen.clear()
        with pytest.raises(InstallFailed) as e:
            inst.install(kit.bundle(2, golden_offset=0.5))
        assert e.value.state == "self_test"
        assert seen == [("prepared", "1.1.1", kit.vid(b1))]  # built, never switched to
        assert runtime.active() is p1 and inst.store.active() == kit.vid(b1)
        b3 = kit.bundle(3)
        inst.install(b3)
        assert runtime.active().version == "1.3.3" and runtime.swaps == 2
        inst.rollback()  # a retained version goes through the load step too
        assert runtime.active().version == "1.1.1" and runtime.swaps == 3
        assert runtime.active().bundle_digest == p1.bundle_digest
    finally:
        inst.close()


def test_one_job_at_a_time(kit):
    inst = kit.installer()
    second = kit.bundle(2)
    seen: list[Exception] = []

    def swap_and_try_another(engine, manifest):
        try:
            inst.install(second)
        except InstallBusy as e:
            seen.append(e)

    inst.attach(on_commit=swap_and_try_another)
    try:
        inst.install(kit.bundle(1))
    finally:
        inst.close()
    assert len(seen) == 1


def test_bundle_downloaded_into_staging_is_removed_after_install(kit, inst):
    target = inst.store.download_path("model.efb")
    target.write_bytes(kit.bundle(1).read_bytes())
    inst.install(target)
    assert inst.store.staging_entries() == []


def test_flipped_byte_in_the_active_model_switches_to_previous(kit, inst):
    one, two = kit.bundle(1), kit.bundle(2)
    inst.install(one)
    inst.install(two)
    model = inst.store.model_path(kit.vid(two))
    data = bytearray(model.read_bytes())
    data[100] ^= 0x04
    model.write_bytes(bytes(data))
    report = inst.check_integrity()
    assert (report.ok, report.action, report.active, report.now_active) == (
        False, "previous", kit.vid(two), kit.vid(one))
    assert "sha256 expected" in report.problems[0]
    assert kit.slot.swaps[-1] == "1.1.1" and kit.slot.fallbacks == []
    assert (inst.store.active(), inst.store.previous()) == (kit.vid(one), None)
    assert [p.name.rsplit(".", 1)[0] for p in inst.store.quarantine_dir.iterdir()] == [
        kit.vid(two)]
    assert inst.store.history()[-1]["event"] == "integrity"
    assert inst.status()["integrity"]["action"] == "previous"
    assert inst.check_integrity().ok


def test_flipped_byte_without_previous_enters_fallback_and_stays_there_after_restart(kit):
    inst = kit.installer()
    b = kit.bundle(1)
    inst.install(b)
    model = inst.store.model_path(kit.vid(b))
    model.write_bytes(b"\x00" + model.read_bytes()[1:])
    report = inst.check_integrity()
    assert (report.ok, report.action) == (False, "fallback")
    assert len(kit.slot.fallbacks) == 1 and "unusable" in kit.slot.fallbacks[0]
    inst.check_integrity()
    assert len(kit.slot.fallbacks) == 1  # entered once, not on every check
    inst.close()
    again = kit.installer()
    try:
        start = again.start()
        assert start.engine is None and start.integrity.action == "fallback"
        assert start.manifest is not None and start.manifest.rules  # its rules still serve
        assert "sha256 expected" in start.fallback_reason
    finally:
        again.close()


def test_start_loads_the_active_model_or_else_the_previous(kit):
    inst = kit.installer()
    one, two = kit.bundle(1), kit.bundle(2)
    inst.install(one)
    inst.install(two)
    inst.close()
    inst = kit.installer()
    start = inst.start()
    assert start.engine is not None and start.manifest.version == "1.2.2"
    assert start.recovered is None and start.integrity.ok
    inst.close()
    model = Store(kit.root).model_path(kit.vid(two))
    model.write_bytes(model.read_bytes() + b"\x00")
    inst = kit.installer()
    try:
        start = inst.start()
        assert start.manifest.version == "1.1.1" and start.integrity.action == "previous"
        assert inst.store.active() == kit.vid(one)
    finally:
        inst.close()


def test_integrity_monitor_checks_on_a_schedule(kit, inst):
    inst.install(kit.bundle(1))
    monitor = IntegrityMonitor(inst, interval_s=0.02).start()
    try:
        model = inst.store.model_path(inst.store.active())
        model.write_bytes(model.read_bytes()[::-1])
        assert kit.slot.fell_back.wait(10)
    finally:
        monitor.stop()
    assert inst.integrity.action == "fallback"


def test_recovery_after_an_interrupted_install_in_process(kit, inst):
    """A record left in `unpack` (what a crash leaves) is rolled back by the next operation."""
    inst.install(kit.bundle(1))
    before = _box(kit.root)
    rec = json.loads((kit.root / "install.json").read_text())
    staged = inst.store.new_staging("2-x-000000000000")
    (staged / "model.onnx").write_bytes(b"half")
    rec["state"] = State.UNPACK.value
    rec["job"].update(op="install", state="unpack", id="2-x-000000000000", token="t1",
                      from_id=inst.store.active(), previous_before=None)
    (kit.root / "install.json").write_text(json.dumps(rec))
    recovered = inst.recover()
    assert recovered["state"] == "unpack"
    assert _box(kit.root) == before
    assert inst.store.history()[-1]["reason"] == "interrupted at unpack (crash or power loss)"


def test_config_from_environment_and_overrides():
    env = {"EDGEFLEET_STORE_KEEP": "3", "EDGEFLEET_MAX_LATENCY_MS": "0",
           "EDGEFLEET_INTEGRITY_INTERVAL_S": "60"}
    cfg = InstallConfig.from_env(env, latency_rows=10)
    assert (cfg.keep, cfg.max_latency_s, cfg.integrity_interval_s, cfg.latency_rows) == (
        3, None, 60.0, 10)


# -- disk full ------------------------------------------------------------------------------


@contextlib.contextmanager
def _tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A size-limited tmpfs. Fails (never skips) where it cannot be mounted: CI runs as root."""
    path.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs at {path} (needs root / CAP_SYS_ADMIN): "
                    f"{proc.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_disk_full_during_unpack_rolls_back_and_serving_continues(kit, tmp_path):
    with _tmpfs(tmp_path / "small", "1m") as mnt:
        inst = kit.installer(root=mnt / "store")
        try:
            inst.install(kit.bundle(1))
            before = _box(mnt / "store")
            big = kit.bundle(2, extra_files={"calibration.bin": os.urandom(2 << 20)})
            with pytest.raises(InstallFailed, match="No space left on device") as e:
                inst.install(big)
            assert (e.value.state, e.value.kind) == ("unpack", "OSError")
            assert _box(mnt / "store") == before
            assert kit.slot.swaps == ["1.1.1"] and kit.slot.predict_one() >= 0
            assert inst.store.history()[-1]["event"] == "install_failed"
            assert inst.install(kit.bundle(3)).outcome == "committed"  # space was freed
            assert inst.store.staging_entries() == []
        finally:
            inst.close()


def test_progress_callback_sees_each_persisted_state(kit, inst):
    seen: list[str] = []
    inst.install(kit.bundle(1), on_state=seen.append)
    assert seen == ["verify", "unpack", "load", "self_test", "commit", "cleanup"]
    seen.clear()
    with pytest.raises(InstallFailed):
        inst.install(kit.bundle(2, golden_offset=1.0), on_state=seen.append)
    assert seen == ["verify", "unpack", "load", "self_test", "rollback"]


def test_reinstalling_the_same_bundle_repairs_a_damaged_active_model(kit, inst):
    b = kit.bundle(1)
    inst.install(b)
    model = inst.store.model_path(kit.vid(b))
    model.write_bytes(model.read_bytes()[:-4])
    assert inst.check_integrity().action == "fallback" and inst.fallback_reason
    result = inst.install(b)  # same sequence as the floor: allowed
    assert result.outcome == "committed" and inst.fallback_reason is None
    assert inst.store.check_integrity() == [] and kit.slot.swaps == ["1.1.1", "1.1.1"]
    assert len(list(inst.store.quarantine_dir.iterdir())) == 1


def test_a_model_that_does_not_load_never_goes_live(kit, inst):
    from agent.bundle import write_bundle
    from agent.keys import load_private_key
    from tests.conftest import manifest_fields

    inst.install(kit.bundle(1))
    before = _box(kit.root)
    broken = kit.tmp / "broken.efb"
    write_bundle(broken, manifest_fields(model={"name": "x", "version": "2", "sequence": 2}),
                 {"model.onnx": b"this is not an onnx graph"}, load_private_key(kit.key))
    with pytest.raises(InstallFailed, match="cannot load model") as e:
        inst.install(broken)
    assert (e.value.state, e.value.kind) == ("load", "EngineError")
    assert _box(kit.root) == before and kit.slot.swaps == ["1.1.1"]


def test_a_release_key_revoked_on_disk_stops_its_bundles_at_once(kit):
    """The agent hands the installer the keyring it loaded at start (agent/app.py): a key
    revoked on disk afterwards must stop the very next install, without a restart."""
    from agent.keys import Keyring, key_id, load_private_key, revoke_key

    inst = Installer.open(kit.root, Keyring.load(kit.ring), InstallConfig(),
                          on_commit=kit.slot.swap)
    try:
        inst.install(kit.bundle(1))
        revoke_key(kit.ring, key_id(load_private_key(kit.key).public_key()))
        before = _box(kit.root)
        with pytest.raises(InstallFailed) as e:
            inst.install(kit.bundle(2))
        assert (e.value.state, e.value.kind, e.value.reason) == \
            ("verify", "SignatureError", "bundle-signature")
        assert "revoked" in e.value.detail
        assert _box(kit.root) == before
    finally:
        inst.close()


def _second_release_key(kit: Kit) -> Path:
    from agent.keys import generate_keypair, trust_key

    pair = generate_keypair(kit.tmp / "keys", "release-b")
    trust_key(kit.ring, pair.public_path, "release")
    return pair.private_path


def _revoke(kit: Kit, key: Path) -> None:
    from agent.keys import key_id, load_private_key, revoke_key

    revoke_key(kit.ring, key_id(load_private_key(key).public_key()))


def test_a_retained_version_signed_by_a_revoked_key_is_never_rolled_back_to(kit, inst):
    key_b = _second_release_key(kit)
    one = kit.bundle(1)  # signed by key A
    two = kit.tmp / "two.efb"
    real_bundle(two, key_b, sequence=2, seed=2)
    inst.install(one)
    inst.install(two)
    _revoke(kit, kit.key)
    before = _box(kit.root)
    with pytest.raises(InstallFailed) as e:
        inst.rollback()
    assert (e.value.state, e.value.reason) == ("load", "bundle-signature")
    assert "revoked" in e.value.detail
    assert _box(kit.root) == before and inst.store.active() == kit.vid(two)


def test_at_restart_the_previous_version_is_verified_before_it_serves(kit):
    """The active model is damaged at rest and the previous one was signed by a key revoked
    since: at start-up neither may serve, the rules answer (and say why)."""
    key_b = _second_release_key(kit)
    one = kit.bundle(1)  # signed by key A
    two = kit.tmp / "two.efb"
    real_bundle(two, key_b, sequence=2, seed=2)
    inst = kit.installer()
    inst.install(one)
    inst.install(two)
    inst.close()
    _revoke(kit, kit.key)
    model = Store(kit.root).model_path(kit.vid(two))
    model.write_bytes(model.read_bytes() + b"\x00")
    inst = kit.installer()
    try:
        start = inst.start()
        assert start.engine is None and start.integrity.action == "fallback"
        assert "revoked" in start.fallback_reason and kit.vid(one) in start.fallback_reason
        assert inst.store.active() == kit.vid(two)  # nothing moved to a revoked model
    finally:
        inst.close()


def test_a_sequence_names_one_bundle_for_ever(kit, inst):
    one, two = kit.bundle(1), kit.bundle(2)
    inst.install(one)
    inst.install(two)
    inst.rollback()  # back on 1; 2 stays the highest sequence installed here
    other_two = kit.bundle(2)  # signed, valid, same sequence, different content
    before = _box(kit.root)
    with pytest.raises(InstallFailed) as e:
        inst.install(other_two)
    assert (e.value.state, e.value.kind, e.value.reason) == \
        ("verify", "SequenceReused", "sequence-reused")
    assert kit.vid(two) in e.value.detail
    assert _box(kit.root) == before
    assert inst.install(two).id == kit.vid(two)  # the bundle that holds it may come back
