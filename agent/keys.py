"""Ed25519 keys, key ids and the keyring a device trusts.

Two roles exist and never mix: `release` keys sign model bundles, `fleet` keys sign commands to
devices. A keyring is a directory:

    keyring/
      release/<key_id>.pub   PEM public keys trusted to sign bundles
      fleet/<key_id>.pub     PEM public keys trusted to sign fleet commands
      revoked.txt            optional: one key id per line (# comments); wins over trust

or, the same keyring flat (one Kubernetes Secret mounted as a directory, docs/deploy-k3s.md):
`release.<key_id>.pub`, `fleet.<key_id>.pub` and `revoked.txt` side by side.

A key id is the first 16 hex characters of the SHA-256 of the raw 32-byte public key, so it can be
recomputed from the key alone and cannot be chosen by whoever writes the file name. Rotation: trust
the new key, ship bundles signed by it, then revoke the old one.

The directory is the truth. `LiveKeyring` (what the installer and the device link verify with)
re-reads it whenever anything in it changed (names, inodes, sizes, times, followed through
symlinks as Kubernetes swaps them), so a key revoked or trusted on disk applies to the very next
verification, without a restart; a keyring that cannot be read then refuses everything.
"""

from __future__ import annotations

import hashlib
import os
import stat
import threading
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from agent.errors import EdgefleetError
from agent.fsio import atomic_write

ROLES = ("release", "fleet")
PASSPHRASE_ENV = "EDGEFLEET_KEY_PASSPHRASE"


class KeyFileError(EdgefleetError):
    """A key file could not be used: missing, unreadable, wrong type or loose permissions."""


class KeyringError(EdgefleetError):
    """The keyring does not vouch for a key: unknown, revoked, or trusted for another role."""


class UnknownKey(KeyringError):
    pass


class RevokedKey(KeyringError):
    pass


class WrongRole(KeyringError):
    pass


def key_id(public_key: Ed25519PublicKey) -> str:
    """First 16 hex chars of SHA-256 over the raw public key bytes."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def _check_role(role: str) -> None:
    if role not in ROLES:
        raise KeyringError(f"unknown key role {role!r}", hint=f"use one of {', '.join(ROLES)}")


def write_private(path: Path, data: bytes) -> None:
    """Create the file with mode 0600 from the start, so the key is never readable by others."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class KeyPair:
    private_path: Path
    public_path: Path
    key_id: str


def generate_keypair(out_dir: Path, name: str, passphrase: bytes | None = None) -> KeyPair:
    """Write `<name>.key` (PKCS#8 PEM, mode 0600, encrypted when a passphrase is given) and
    `<name>.pub` (SubjectPublicKeyInfo PEM). Refuses to overwrite an existing key."""
    out_dir.mkdir(parents=True, exist_ok=True)
    priv_path, pub_path = out_dir / f"{name}.key", out_dir / f"{name}.pub"
    for p in (priv_path, pub_path):
        if p.exists():
            raise KeyFileError(f"{p} already exists", hint="choose another --name or --out")
    key = Ed25519PrivateKey.generate()
    enc: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase)
        if passphrase
        else serialization.NoEncryption()
    )
    write_private(
        priv_path,
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc),
    )
    pub_path.write_bytes(public_pem(key.public_key()))
    return KeyPair(priv_path, pub_path, key_id(key.public_key()))


def public_pem(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def load_private_key(path: Path, passphrase: bytes | None = None) -> Ed25519PrivateKey:
    """Load a signing key. A key readable or writable by group or others is refused: a leaked
    release key lets anyone ship a model to every box on the floor."""
    path = Path(path)
    try:
        st = path.stat()
    except OSError as e:
        raise KeyFileError(f"cannot read private key {path}: {e.strerror}") from None
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise KeyFileError(
            f"private key {path} has loose permissions "
            f"{stat.S_IMODE(st.st_mode):04o} (expected 0600)",
            hint=f"run: chmod 600 {path}",
        )
    if passphrase is None and os.environ.get(PASSPHRASE_ENV):
        passphrase = os.environ[PASSPHRASE_ENV].encode()
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=passphrase)
    except TypeError:
        raise KeyFileError(
            f"private key {path} is encrypted", hint=f"set {PASSPHRASE_ENV}"
        ) from None
    except ValueError as e:
        raise KeyFileError(f"cannot load private key {path}: {e}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path} is not an Ed25519 private key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    path = Path(path)
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except (OSError, ValueError) as e:
        raise KeyFileError(f"cannot load public key {path}: {e}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"{path} is not an Ed25519 public key")
    return key


def verify_signature(public_key: Ed25519PublicKey, signature: bytes, data: bytes) -> bool:
    try:
        public_key.verify(signature, data)
    except InvalidSignature:
        return False
    return True


@dataclass(frozen=True)
class Keyring:
    """Trusted public keys by role, plus revoked key ids. Immutable once loaded."""

    trusted: dict[str, dict[str, Ed25519PublicKey]]  # role -> key_id -> key
    revoked: frozenset[str]
    path: Path | None = None

    @classmethod
    def load(cls, directory: Path) -> Keyring:
        directory = Path(directory)
        if not directory.is_dir():
            raise KeyringError(
                f"keyring {directory} is not a directory",
                hint="create one with: edgefleet keys trust KEY.pub --keyring DIR --role release",
            )
        trusted: dict[str, dict[str, Ed25519PublicKey]] = {r: {} for r in ROLES}
        for role in ROLES:
            files = [(p, p.stem) for p in sorted((directory / role).glob("*.pub"))]
            files += [(p, p.name[len(role) + 1:-4])  # flat: <role>.<key_id>.pub
                      for p in sorted(directory.glob(f"{role}.*.pub"))]
            for pub, named in files:
                key = load_public_key(pub)
                kid = key_id(key)
                if named != kid:
                    raise KeyringError(
                        f"keyring file {pub} holds key {kid}, but its name says {named}",
                        hint="re-add it with: edgefleet keys trust",
                    )
                trusted[role][kid] = key
        both = set(trusted["release"]) & set(trusted["fleet"])
        if both:
            raise KeyringError(
                f"keyring {directory}: key {sorted(both)[0]} is trusted for both roles",
                hint="a key signs either bundles or fleet commands, never both",
            )
        return cls(trusted, _read_revoked(directory / "revoked.txt"), directory)

    def public_key(self, kid: str, role: str) -> Ed25519PublicKey:
        """The key to check a signature by `kid` made for `role`; raises `KeyringError`."""
        _check_role(role)
        if kid in self.revoked:
            raise RevokedKey(f"key {kid} is revoked in keyring {self.path}")
        if kid in self.trusted[role]:
            return self.trusted[role][kid]
        for other in ROLES:
            if other != role and kid in self.trusted[other]:
                raise WrongRole(
                    f"key {kid} is trusted for role {other!r}, not for {role!r}",
                )
        raise UnknownKey(f"key {kid} is not in keyring {self.path} for role {role!r}")


class LiveKeyring:
    """A keyring directory as it is on disk now (see the module docstring).

    `current()` costs a few `stat` calls when nothing changed; it re-reads the keyring when the
    fingerprint of the directory (every entry of it and of its role directories: name, inode,
    size, mtime, ctime, following symlinks) differs from the one it was loaded with. The
    fingerprint is taken *before* loading, so a change racing the load is seen next time.
    A `Keyring` with no directory (built in memory) is served as it is."""

    def __init__(self, source: Keyring | Path) -> None:
        self._static = source if isinstance(source, Keyring) and source.path is None else None
        self.directory = None if self._static is not None else Path(
            source.path if isinstance(source, Keyring) else source)  # type: ignore[arg-type]
        self._lock = threading.Lock()
        self._loaded: tuple[tuple, Keyring] | None = None
        self.reloads = 0  # how many times the directory was read (for tests and metrics)

    def current(self) -> Keyring:
        """The keyring as the directory says now; raises `KeyringError`/`KeyFileError` if it
        cannot be read (the caller refuses what it was verifying)."""
        if self._static is not None:
            return self._static
        assert self.directory is not None
        fingerprint = _fingerprint(self.directory)
        with self._lock:
            if self._loaded is not None and self._loaded[0] == fingerprint:
                return self._loaded[1]
            ring = Keyring.load(self.directory)
            self._loaded = (fingerprint, ring)
            self.reloads += 1
            return ring


def _fingerprint(directory: Path) -> tuple:
    """What changes whenever a key file or revoked.txt is added, removed or rewritten."""
    out = []
    for d in (directory, *(directory / r for r in ROLES)):
        try:
            names = sorted(os.listdir(d))
        except FileNotFoundError:
            out.append((str(d), None))
            continue
        except OSError as e:
            raise KeyringError(f"cannot read keyring directory {d}: {e.strerror}") from None
        for name in names:
            try:
                st = os.stat(d / name)  # follows symlinks (Kubernetes' ..data swap)
            except FileNotFoundError:  # a dangling link, or removed meanwhile
                out.append((str(d), name, None))
                continue
            out.append((str(d), name, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns,
                        st.st_ctime_ns))
    return tuple(out)


def _read_revoked(path: Path) -> frozenset[str]:
    if not path.exists():
        return frozenset()
    ids = set()
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            ids.add(line)
    return frozenset(ids)


def trust_key(keyring_dir: Path, public_key_path: Path, role: str) -> str:
    """Add a public key to the keyring for one role; returns its key id."""
    _check_role(role)
    key = load_public_key(public_key_path)
    kid = key_id(key)
    other = [r for r in ROLES if r != role and (Path(keyring_dir) / r / f"{kid}.pub").exists()]
    if other:
        raise WrongRole(f"key {kid} is already trusted for role {other[0]!r}")
    target_dir = Path(keyring_dir) / role
    target_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(target_dir / f"{kid}.pub", public_pem(key))
    return kid


def revoke_key(keyring_dir: Path, kid: str) -> None:
    """Append a key id to the keyring's revocation list (idempotent)."""
    path = Path(keyring_dir) / "revoked.txt"
    Path(keyring_dir).mkdir(parents=True, exist_ok=True)
    current = _read_revoked(path)
    if kid in current:
        return
    text = path.read_text() if path.exists() else "# revoked key ids, one per line\n"
    atomic_write(path, (text.rstrip("\n") + f"\n{kid}\n").encode())

