"""The model store: versions, the atomically switched pointers, garbage collection, integrity."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.bundle import unpack_bundle, verify_bundle
from agent.keys import Keyring
from agent.store import Store, StoreBusy, StoreError, version_id
from tests.install_helpers import make_keys, real_bundle


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    return make_keys(tmp_path)


def _add_version(store: Store, keys, tmp_path: Path, seq: int, seed: int = 0) -> str:
    """Unpack a real bundle into staging and promote it, as the installer does."""
    key, ring = keys
    path = tmp_path / f"b{seq}-{seed}.efb"
    real_bundle(path, key, sequence=seq, seed=seed)
    m = verify_bundle(path, Keyring.load(ring))
    vid = version_id(m)
    unpack_bundle(path, m, store.new_staging(vid))
    store.promote(vid)
    return vid


def test_version_id_names_sequence_version_and_manifest_digest(keys, tmp_path):
    store = Store(tmp_path / "store")
    vid = _add_version(store, keys, tmp_path, 7, seed=3)
    seq, version, digest = vid.split("-")
    assert (seq, version, len(digest)) == ("7", "1.7.3", 12)
    assert sorted(p.name for p in store.version_dir(vid).iterdir()) == [
        "manifest.json", "manifest.sig", "model.onnx"
    ]
    assert store.staging_entries() == []


def test_pointers_are_relative_symlinks_switched_by_rename(keys, tmp_path):
    store = Store(tmp_path / "store")
    a = _add_version(store, keys, tmp_path, 1)
    b = _add_version(store, keys, tmp_path, 2)
    assert store.active() is None
    store.set_active(a)
    ino_before = os.lstat(store.root / "active").st_ino
    store.set_active(b)
    store.set_previous(a)
    assert os.readlink(store.root / "active") == f"versions/{b}"
    assert os.lstat(store.root / "active").st_ino != ino_before  # a new link, renamed over
    assert (store.active(), store.previous()) == (b, a)
    assert not list(store.root.glob(".*.tmp"))
    with pytest.raises(StoreError, match="no such version"):
        store.set_active("9-nope-000000000000")
    with pytest.raises(StoreError, match="no such version"):
        store.set_active("..")  # ids are one path component of a fixed form


def test_a_dangling_pointer_reads_as_no_version(keys, tmp_path):
    store = Store(tmp_path / "store")
    os.symlink("versions/1-gone-000000000000", store.root / "active")
    assert store.active() is None
    assert store.pointer_target("active") == "1-gone-000000000000"
    assert store.check_integrity() == [f"{store.versions_dir}/1-gone-000000000000: "
                                       "version directory missing"]


def test_gc_keeps_active_previous_and_keep_minus_one_recent_versions(keys, tmp_path):
    store = Store(tmp_path / "store", keep=2)
    ids = [_add_version(store, keys, tmp_path, seq) for seq in (1, 2, 3, 4)]
    for i, vid in enumerate(ids):  # each became active in turn
        store.record_event({"event": "install", "id": vid, "from": ids[i - 1] if i else None})
    store.set_active(ids[3])
    store.set_previous(ids[2])
    stray = store.new_staging("leftover")
    (stray / "x").write_bytes(b"x")
    removed = store.gc()
    assert store.version_ids() == sorted(ids[1:])  # ids[1]: the one more that served recently
    assert removed == [f"versions/{ids[0]}"]
    assert store.staging_entries() == ["leftover"]  # only start-up wipes staging
    store.gc(wipe_staging=True)
    assert store.staging_entries() == []
    Store(store.root, keep=1).gc()
    assert store.version_ids() == sorted(ids[2:])


def test_gc_never_removes_protected_and_removes_versions_never_active(keys, tmp_path):
    store = Store(tmp_path / "store", keep=3)
    a = _add_version(store, keys, tmp_path, 1)
    b = _add_version(store, keys, tmp_path, 2)  # unpacked but never went live
    store.set_active(a)
    assert store.gc(protect=(b,)) == []
    assert store.gc() == [f"versions/{b}"]


def test_flipped_byte_in_the_active_model_is_detected(keys, tmp_path):
    store = Store(tmp_path / "store")
    vid = _add_version(store, keys, tmp_path, 1)
    store.set_active(vid)
    assert store.check_integrity() == []
    model = store.model_path(vid)
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0x01
    model.write_bytes(bytes(data))
    (problem,) = store.check_integrity()
    assert f"{model}: sha256 expected" in problem and "changed on disk" in problem


def test_changed_manifest_truncated_model_and_extra_files_are_detected(keys, tmp_path):
    store = Store(tmp_path / "store")
    vid = _add_version(store, keys, tmp_path, 1)
    d = store.version_dir(vid)
    (d / "payload.sh").write_text("echo hi")
    assert store.check_integrity(vid) == [f"{d}/payload.sh: unexpected file in a version directory"]
    (d / "payload.sh").unlink()
    with open(d / "model.onnx", "r+b") as f:
        f.truncate(10)
    assert "size expected" in store.check_integrity(vid)[0]
    (d / "manifest.json").write_bytes((d / "manifest.json").read_bytes().replace(b"2.0", b"9.0"))
    assert "manifest changed on disk" in store.check_integrity(vid)[0]
    assert store.trusted_manifest(vid) is None


def test_promote_replaces_a_damaged_copy_and_keeps_an_intact_one(keys, tmp_path):
    store = Store(tmp_path / "store")
    vid = _add_version(store, keys, tmp_path, 1)
    inode = store.version_dir(vid).stat().st_ino
    _add_version(store, keys, tmp_path, 1)  # the same bundle again: staged copy dropped
    assert store.version_dir(vid).stat().st_ino == inode
    store.model_path(vid).write_bytes(b"rot")
    _add_version(store, keys, tmp_path, 1)
    assert store.check_integrity(vid) == []
    assert [p.name.rsplit(".", 1)[0] for p in store.quarantine_dir.iterdir()] == [vid]
    assert store.staging_entries() == []


def test_highest_sequence_survives_rollback_and_falls_back_to_versions(keys, tmp_path):
    store = Store(tmp_path / "store")
    a = _add_version(store, keys, tmp_path, 3)
    b = _add_version(store, keys, tmp_path, 5)
    store.set_active(a)
    assert store.highest_sequence() == 3  # no record yet: from the versions present
    store.record_event({"event": "install", "id": b}, sequence=5)
    store.record_event({"event": "install", "id": a}, sequence=3)
    assert store.highest_sequence() == 5
    assert [e["event"] for e in store.history()] == ["install", "install"]


def test_the_store_lock_admits_one_owner(tmp_path):
    one, two = Store(tmp_path / "s"), Store(tmp_path / "s")
    one.lock()
    with pytest.raises(StoreBusy, match="in use by another process"):
        two.lock()
    one.unlock()
    two.lock()
    two.unlock()


def test_keep_must_retain_the_previous_version(tmp_path):
    with pytest.raises(StoreError, match="keep must be >= 1"):
        Store(tmp_path / "s", keep=0)


def test_list_versions_marks_active_and_previous(keys, tmp_path):
    store = Store(tmp_path / "store")
    a = _add_version(store, keys, tmp_path, 1)
    b = _add_version(store, keys, tmp_path, 2)
    store.set_active(b)
    store.set_previous(a)
    rows = store.list_versions(check=True)
    assert [(v.id, v.active, v.previous, v.problems) for v in rows] == [
        (b, True, False, ()), (a, False, True, ())
    ]
