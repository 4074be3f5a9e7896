"""Keys and keyring: generation, permissions, passphrases, roles, revocation, rotation."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from agent.keys import (
    KeyFileError,
    Keyring,
    KeyringError,
    LiveKeyring,
    RevokedKey,
    UnknownKey,
    WrongRole,
    generate_keypair,
    key_id,
    load_private_key,
    load_public_key,
    revoke_key,
    trust_key,
)


def test_generated_private_key_is_0600_and_key_id_derives_from_public_key(tmp_path: Path):
    pair = generate_keypair(tmp_path, "release")
    assert stat.S_IMODE(pair.private_path.stat().st_mode) == 0o600
    assert len(pair.key_id) == 16
    assert key_id(load_public_key(pair.public_path)) == pair.key_id
    assert key_id(load_private_key(pair.private_path).public_key()) == pair.key_id


def test_private_key_with_loose_permissions_is_refused(tmp_path: Path):
    pair = generate_keypair(tmp_path, "release")
    os.chmod(pair.private_path, 0o644)
    with pytest.raises(KeyFileError, match=r"loose permissions 0644.*chmod 600"):
        load_private_key(pair.private_path)


def test_passphrase_protects_the_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    pair = generate_keypair(tmp_path, "release", passphrase=b"s3cret")
    assert b"ENCRYPTED" in pair.private_path.read_bytes()
    monkeypatch.delenv("EDGEFLEET_KEY_PASSPHRASE", raising=False)
    with pytest.raises(KeyFileError, match="encrypted"):
        load_private_key(pair.private_path)
    monkeypatch.setenv("EDGEFLEET_KEY_PASSPHRASE", "s3cret")
    assert key_id(load_private_key(pair.private_path).public_key()) == pair.key_id
    monkeypatch.setenv("EDGEFLEET_KEY_PASSPHRASE", "wrong")
    with pytest.raises(KeyFileError):
        load_private_key(pair.private_path)


def test_generate_refuses_to_overwrite(tmp_path: Path):
    generate_keypair(tmp_path, "release")
    with pytest.raises(KeyFileError, match="already exists"):
        generate_keypair(tmp_path, "release")


def test_key_trusted_for_one_role_is_refused_for_the_other(tmp_path: Path):
    rel = generate_keypair(tmp_path / "k", "release")
    fleet = generate_keypair(tmp_path / "k", "fleet")
    trust_key(tmp_path / "ring", rel.public_path, "release")
    trust_key(tmp_path / "ring", fleet.public_path, "fleet")
    ring = Keyring.load(tmp_path / "ring")
    assert ring.public_key(rel.key_id, "release") is not None
    with pytest.raises(WrongRole, match="trusted for role 'release', not for 'fleet'"):
        ring.public_key(rel.key_id, "fleet")
    with pytest.raises(WrongRole):
        ring.public_key(fleet.key_id, "release")
    with pytest.raises(WrongRole):
        trust_key(tmp_path / "ring", rel.public_path, "fleet")


def test_unknown_role_and_unknown_key(tmp_path: Path):
    rel = generate_keypair(tmp_path / "k", "release")
    trust_key(tmp_path / "ring", rel.public_path, "release")
    ring = Keyring.load(tmp_path / "ring")
    with pytest.raises(UnknownKey):
        ring.public_key("0123456789abcdef", "release")
    with pytest.raises(KeyringError, match="unknown key role"):
        ring.public_key(rel.key_id, "admin")


def test_rotation_trust_new_then_revoke_old(tmp_path: Path):
    old = generate_keypair(tmp_path / "k", "old")
    new = generate_keypair(tmp_path / "k", "new")
    ring_dir = tmp_path / "ring"
    trust_key(ring_dir, old.public_path, "release")
    trust_key(ring_dir, new.public_path, "release")
    ring = Keyring.load(ring_dir)
    assert ring.public_key(old.key_id, "release") and ring.public_key(new.key_id, "release")
    revoke_key(ring_dir, old.key_id)
    revoke_key(ring_dir, old.key_id)  # idempotent
    ring = Keyring.load(ring_dir)
    with pytest.raises(RevokedKey):
        ring.public_key(old.key_id, "release")
    assert ring.public_key(new.key_id, "release")


def test_keyring_file_named_for_another_key_is_refused(tmp_path: Path):
    a = generate_keypair(tmp_path / "k", "a")
    (tmp_path / "ring" / "release").mkdir(parents=True)
    (tmp_path / "ring" / "release" / "0000000000000000.pub").write_bytes(
        a.public_path.read_bytes()
    )
    with pytest.raises(KeyringError, match="its name says 0000000000000000"):
        Keyring.load(tmp_path / "ring")


def test_live_keyring_follows_the_directory_and_reads_it_only_when_it_changed(tmp_path: Path):
    old = generate_keypair(tmp_path / "k", "old")
    new = generate_keypair(tmp_path / "k", "new")
    ring_dir = tmp_path / "ring"
    trust_key(ring_dir, old.public_path, "release")
    live = LiveKeyring(Keyring.load(ring_dir))  # a loaded keyring stands for its directory
    assert live.current().public_key(old.key_id, "release")
    assert live.current() is live.current() and live.reloads == 1  # unchanged: not re-read
    trust_key(ring_dir, new.public_path, "release")
    assert live.current().public_key(new.key_id, "release")
    revoke_key(ring_dir, old.key_id)
    with pytest.raises(RevokedKey):
        live.current().public_key(old.key_id, "release")
    (ring_dir / "revoked.txt").write_text("# nothing revoked\n")  # rewritten in place
    assert live.current().public_key(old.key_id, "release")
    assert live.reloads == 4
    # unreadable now: refuse, never fall back to what was loaded before
    (ring_dir / "release" / f"{old.key_id}.pub").write_text("not a key")
    with pytest.raises(KeyFileError):
        live.current()
    # a keyring built in memory has no directory to follow
    mem = Keyring({"release": {}, "fleet": {}}, frozenset())
    assert LiveKeyring(mem).current() is mem


def test_live_keyring_sees_a_kubernetes_secret_update(tmp_path: Path):
    """A Secret mounted as a directory (no subPath): kubelet writes the new contents to a fresh
    timestamped directory and swaps the `..data` symlink; the visible names are symlinks
    through it. The keyring is flat there: `<role>.<key_id>.pub` and `revoked.txt`."""
    rel = generate_keypair(tmp_path / "k", "rel")
    mount = tmp_path / "keyring"
    mount.mkdir()

    def publish(version: str, revoked: str) -> None:
        d = mount / f"..{version}"
        d.mkdir()
        (d / f"release.{rel.key_id}.pub").write_bytes(rel.public_path.read_bytes())
        (d / "revoked.txt").write_text(revoked)
        tmp = mount / "..data_tmp"
        tmp.symlink_to(d.name)
        os.replace(tmp, mount / "..data")

    publish("2026_12_04_01", "")
    for name in (f"release.{rel.key_id}.pub", "revoked.txt"):
        (mount / name).symlink_to(f"..data/{name}")
    live = LiveKeyring(mount)
    assert live.current().public_key(rel.key_id, "release")
    publish("2026_12_04_02", f"{rel.key_id}\n")  # the operator revoked it in the Secret
    with pytest.raises(RevokedKey):
        live.current().public_key(rel.key_id, "release")
