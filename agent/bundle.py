"""Signed model bundles (`*.efb`): write, verify, unpack. The device-side trust boundary.

A bundle is an uncompressed POSIX tar holding `manifest.json`, `manifest.sig` and the files the
manifest lists (at least `model.onnx`). `manifest.sig` is a detached Ed25519 signature over
`SIGNING_CONTEXT + <the exact bytes of manifest.json>`, made by a key the device's keyring trusts
for the `release` role. The manifest pins every other file by SHA-256 and size, so one signature
covers the whole bundle.

`verify_bundle` checks, in this order, and raises one `BundleError` subclass per failure:

 1. size limits           bundle file, manifest, member count, each member   -> LimitExceeded
 2. archive safety        no absolute paths, no `..`, only regular files,
                          no duplicate names, not truncated                 -> UnsafeArchive,
                                                                               CorruptArchive
 3. manifest schema       strict v1 parse                                   -> ManifestError
 4. signature             by a trusted, non-revoked `release` key           -> SignatureError
 5. files                 each listed file present, digest and size match,
                          nothing unlisted                                  -> DigestMismatch,
                                                                               MissingFile,
                                                                               UnexpectedFile
 6. expiry                                                                  -> Expired
 7. format compatibility  format_version <= FORMAT_VERSION                  -> Incompatible
 8. anti-downgrade        sequence >= min_sequence                          -> Downgrade
                          and, at min_sequence itself, the very version
                          installed with it (`sequence_holder`)             -> SequenceReused

Verification reads the archive without writing anything; `unpack_bundle` then writes the verified
files into a staging directory, hashing again as it writes (the file could change between the two
reads), and fsyncs them. Nothing reaches its final place unverified. See docs/bundle-format.md.

`verify_unpacked` checks an installed version again (signature, files) whenever it is about to
serve:

Revoked keys and installed models. A model serves only while its manifest's signature
verifies against the keyring as it is on disk when the model *starts* serving. From the moment
a release key's id is in `revoked.txt`:
 1. no bundle it signed is installed or shadowed (reason `bundle-signature`);
 2. no retained version it signed becomes active again: a rollback to it is refused, and the
    agent does not switch to it when the active version fails its integrity check;
 3. at the next agent start, an active version it signed does not load: the previous version
    serves if it verifies, else the rule fallback;
 4. a version it signed that is serving keeps serving until one of the above replaces it:
    revocation alone never swaps a running model. To take boxes off it, roll out a bundle
    signed by a trusted key. Rotate before you revoke.
A revoked fleet key's commands are refused from the next command on (`untrusted-key`).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import tarfile
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.digest import BundleHasher, canonical_header
from agent.fsio import atomic_write, fsync_dir
from agent.keys import Keyring, KeyringError, key_id, verify_signature
from agent.manifest import (
    FORMAT_NAME,
    FORMAT_VERSION,
    BundleError,
    Manifest,
    ManifestError,
    canonical_json,
    format_time,
    parse_manifest,
    parse_manifest_bytes,
    utc_now,
)
from agent.store import version_id
from agent.wire import Reason

MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "manifest.sig"
SIGNING_CONTEXT = b"edgefleet-bundle-v1\x00"
_CHUNK = 1 << 20
_EOF_MARKER = 2 * tarfile.BLOCKSIZE
_MEMBER_NAME_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}")

__all__ = [
    "BundleError",
    "CorruptArchive",
    "DigestMismatch",
    "Downgrade",
    "Expired",
    "Incompatible",
    "LimitExceeded",
    "Limits",
    "ManifestError",
    "MissingFile",
    "SequenceReused",
    "SignatureError",
    "UnexpectedFile",
    "UnsafeArchive",
    "read_manifest_unverified",
    "unpack_bundle",
    "verify_bundle",
    "write_bundle",
]


class LimitExceeded(BundleError):
    reason = Reason.TOO_LARGE


class UnsafeArchive(BundleError):
    reason = Reason.BUNDLE_CORRUPT


class CorruptArchive(BundleError):
    reason = Reason.BUNDLE_CORRUPT


class SignatureError(BundleError):
    reason = Reason.BUNDLE_SIGNATURE


class DigestMismatch(BundleError):
    reason = Reason.DIGEST_MISMATCH


class MissingFile(BundleError):
    reason = Reason.BUNDLE_CORRUPT


class UnexpectedFile(BundleError):
    reason = Reason.BUNDLE_CORRUPT


class Expired(BundleError):
    reason = Reason.BUNDLE_EXPIRED


class Incompatible(BundleError):
    reason = Reason.INCOMPATIBLE


class Downgrade(BundleError):
    reason = Reason.DOWNGRADE


class SequenceReused(BundleError):
    """Another bundle was installed with this sequence: a sequence names one bundle for ever."""

    reason = Reason.SEQUENCE_REUSED


@dataclass(frozen=True)
class Limits:
    """Upper bounds checked before anything else is read."""

    max_bundle_bytes: int = 512 * 1024 * 1024
    max_manifest_bytes: int = 16 * 1024 * 1024
    max_members: int = 64
    max_member_bytes: int = 256 * 1024 * 1024


@dataclass
class _Archive:
    members: dict[str, tarfile.TarInfo]
    manifest_bytes: bytes
    signature_bytes: bytes


def _scan(path: Path, tf: tarfile.TarFile, limits: Limits, size: int) -> dict[str, tarfile.TarInfo]:
    """Read every header; check counts, sizes, names and types before any content is used."""
    members: dict[str, tarfile.TarInfo] = {}
    count = 0
    while True:
        try:
            m = tf.next()
        except (tarfile.TarError, ValueError, UnicodeError, OverflowError, EOFError) as e:
            raise CorruptArchive(
                f"{path}: corrupt or truncated tar after {count} members: {e}"
            ) from None
        if m is None:
            break
        count += 1
        if count > limits.max_members:
            raise LimitExceeded(
                f"{path}: more than {limits.max_members} members (limit max_members)"
            )
        _check_member(path, m, members, limits, size)
        members[m.name] = m
    return members


def _check_member(
    path: Path, m: tarfile.TarInfo, seen: Mapping[str, tarfile.TarInfo], limits: Limits, size: int
) -> None:
    name = m.name
    if name.startswith("/") or os.path.isabs(name):
        raise UnsafeArchive(f"{path}: member {name!r} has an absolute path")
    if ".." in name.replace("\\", "/").split("/"):
        raise UnsafeArchive(f"{path}: member {name!r} escapes the bundle with '..'")
    if not m.isreg():
        kind = ("symlink" if m.issym() else "hard link" if m.islnk() else "directory"
                if m.isdir() else "device or special file")
        raise UnsafeArchive(f"{path}: member {name!r} is a {kind}; only regular files allowed")
    if not _MEMBER_NAME_RE.fullmatch(name):
        raise UnsafeArchive(
            f"{path}: member {name!r} is not a plain file name of 1-100 [A-Za-z0-9._-]"
        )
    if name in seen:
        raise UnsafeArchive(f"{path}: member {name!r} appears twice")
    if m.size > limits.max_member_bytes:
        raise LimitExceeded(
            f"{path}: member {name!r} is {m.size} bytes, limit {limits.max_member_bytes}"
        )
    if m.offset_data + m.size > size:
        raise CorruptArchive(
            f"{path}: truncated: member {name!r} needs {m.offset_data + m.size} bytes, "
            f"file has {size}"
        )


def _check_framing(path: Path, members: Mapping[str, tarfile.TarInfo], size: int) -> None:
    """Every byte the tar reader would skip or tolerate must be canonical: each header equal to
    `_canonical_header`, zero padding after each member, then exactly the end-of-archive marker.
    With the signature and the digests this makes every byte of a bundle matter, so no
    corruption of a valid bundle can pass as valid."""
    end = 0
    with open(path, "rb") as f:
        for m in members.values():
            f.seek(m.offset)
            header = f.read(m.offset_data - m.offset)
            if header != canonical_header(m.name, m.size):
                raise CorruptArchive(
                    f"{path}: member {m.name!r}: header is not the canonical v1 ustar header "
                    "(mode 0644, owner 0, mtime 0, no extended headers)"
                )
            data_end = m.offset_data + m.size
            padded = -(-data_end // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
            f.seek(data_end)
            if f.read(padded - data_end).strip(b"\x00"):
                raise CorruptArchive(f"{path}: member {m.name!r}: non-zero padding")
            end = max(end, padded)
        f.seek(end)
        while chunk := f.read(_CHUNK):
            if chunk.strip(b"\x00"):
                raise CorruptArchive(
                    f"{path}: unreadable or unexpected data after the last member (offset {end})"
                )
    trailer = size - end
    if trailer != _EOF_MARKER:
        raise CorruptArchive(
            f"{path}: truncated or padded: the archive must end with exactly the "
            f"{_EOF_MARKER}-byte end marker, found {trailer} bytes after the last member"
        )


def _read_member(tf: tarfile.TarFile, m: tarfile.TarInfo, path: Path) -> bytes:
    f = tf.extractfile(m)
    assert f is not None
    data = f.read()
    if len(data) != m.size:
        raise CorruptArchive(f"{path}: member {m.name!r} is truncated")
    return data


def _open(path: Path, limits: Limits) -> tuple[tarfile.TarFile, _Archive]:
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as e:
        raise BundleError(f"cannot read bundle {path}: {e.strerror}") from None
    if size > limits.max_bundle_bytes:
        raise LimitExceeded(f"{path}: bundle is {size} bytes, limit {limits.max_bundle_bytes}")
    try:
        tf = tarfile.open(path, mode="r:")  # noqa: SIM115 (closed by the caller) uncompressed only
    except tarfile.TarError as e:
        raise CorruptArchive(f"{path}: not an uncompressed tar archive: {e}") from None
    try:
        members = _scan(path, tf, limits, size)
        _check_framing(path, members, size)
        for required in (MANIFEST_NAME, SIGNATURE_NAME):
            if required not in members:
                raise MissingFile(f"{path}: no {required} in the bundle")
        if members[MANIFEST_NAME].size > limits.max_manifest_bytes:
            raise LimitExceeded(
                f"{path}: {MANIFEST_NAME} is {members[MANIFEST_NAME].size} bytes, "
                f"limit {limits.max_manifest_bytes}"
            )
        if members[SIGNATURE_NAME].size > 4096:
            raise LimitExceeded(f"{path}: {SIGNATURE_NAME} is larger than 4096 bytes")
        archive = _Archive(
            members,
            _read_member(tf, members[MANIFEST_NAME], path),
            _read_member(tf, members[SIGNATURE_NAME], path),
        )
    except BaseException:
        tf.close()
        raise
    return tf, archive


def _check_signature(where: Path, manifest_bytes: bytes, signature_bytes: bytes,
                     manifest: Manifest, keyring: Keyring) -> None:
    try:
        sig = json.loads(signature_bytes.decode("utf-8"))
        algorithm, kid = sig["algorithm"], sig["key_id"]
        signature = base64.b64decode(sig["signature"], validate=True)
        if base64.b64encode(signature).decode("ascii") != sig["signature"] or len(signature) != 64:
            raise ValueError("signature is not 64 bytes in canonical base64")
        if canonical_json(sig) != signature_bytes:
            raise ValueError("not in canonical JSON form")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, AttributeError) as e:
        raise SignatureError(f"{where}: {SIGNATURE_NAME} is malformed: {e}") from None
    if algorithm != "ed25519":
        raise SignatureError(
            f"{where}: signature algorithm: expected 'ed25519', found {algorithm!r}"
        )
    if kid != manifest.signer:
        raise SignatureError(
            f"{where}: signature key id {kid!r} does not match manifest signer {manifest.signer!r}"
        )
    try:
        public_key = keyring.public_key(kid, "release")
    except KeyringError as e:
        raise SignatureError(f"{where}: {e}") from None
    if not verify_signature(public_key, signature, SIGNING_CONTEXT + manifest_bytes):
        raise SignatureError(
            f"{where}: signature does not match {MANIFEST_NAME} for key {kid} "
            "(manifest or signature was altered)"
        )


def _check_files(path: Path, tf: tarfile.TarFile, archive: _Archive, manifest: Manifest) -> None:
    listed = set(manifest.files)
    present = set(archive.members) - {MANIFEST_NAME, SIGNATURE_NAME}
    for name in sorted(listed - present):
        raise MissingFile(f"{path}: {name} is listed in the manifest but not in the bundle")
    for name in sorted(present - listed):
        raise UnexpectedFile(f"{path}: member {name!r} is not listed in the manifest")
    for name, entry in sorted(manifest.files.items()):
        member = archive.members[name]
        if member.size != entry.size:
            raise DigestMismatch(
                f"{path}: {name}: size expected {entry.size}, found {member.size}"
            )
        digest = hashlib.sha256()
        f = tf.extractfile(member)
        assert f is not None
        n = 0
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            n += len(chunk)
        if n != entry.size:
            raise CorruptArchive(f"{path}: member {name!r} is truncated")
        if digest.hexdigest() != entry.sha256:
            raise DigestMismatch(
                f"{path}: {name}: sha256 expected {entry.sha256}, found {digest.hexdigest()}"
            )


def verify_bundle(
    path: Path,
    keyring: Keyring,
    *,
    min_sequence: int | None = None,
    sequence_holder: str | None = None,
    now: datetime | None = None,
    limits: Limits = Limits(),
) -> Manifest:
    """Verify a bundle completely (see the module docstring for the order); return its manifest.

    Raises a `BundleError` subclass; the message names the bundle, the member or field, and the
    expected and found values.
    """
    path = Path(path)
    tf, archive = _open(path, limits)
    with tf:
        manifest = parse_manifest_bytes(archive.manifest_bytes, f"{path}: {MANIFEST_NAME}")
        _check_signature(path, archive.manifest_bytes, archive.signature_bytes, manifest,
                         keyring)
        _check_files(path, tf, archive, manifest)
    now = now or utc_now()
    if manifest.expires is not None and now >= manifest.expires:
        raise Expired(
            f"{path}: expired at {format_time(manifest.expires)}, now {format_time(now)}"
        )
    if manifest.format_version > FORMAT_VERSION:
        raise Incompatible(
            f"{path}: format_version {manifest.format_version} is newer than this agent "
            f"supports ({FORMAT_VERSION})",
            hint="upgrade the agent first",
        )
    if min_sequence is not None and manifest.sequence < min_sequence:
        raise Downgrade(
            f"{path}: sequence {manifest.sequence} is below the minimum allowed {min_sequence}"
        )
    if sequence_holder is not None and manifest.sequence == min_sequence \
            and version_id(manifest) != sequence_holder:
        raise SequenceReused(
            f"{path}: sequence {manifest.sequence} was installed here as {sequence_holder}; "
            f"this bundle is {version_id(manifest)}",
            hint="give a new bundle a new sequence",
        )
    return manifest


def read_manifest_unverified(path: Path, limits: Limits = Limits()) -> Manifest:
    """Parse the manifest without checking signature or digests: for `inspect` only."""
    tf, archive = _open(Path(path), limits)
    tf.close()
    return parse_manifest_bytes(archive.manifest_bytes, f"{path}: {MANIFEST_NAME}")


def verify_unpacked(directory: Path, keyring: Keyring, *, files: bool = True) -> Manifest:
    """Check a directory `unpack_bundle` wrote, as it sits in a model store: the manifest's
    signature by a trusted, non-revoked release key (step 4), then, with `files`, every listed
    file's size and SHA-256 (step 5; the store's own integrity check does that too). Expiry and
    sequence are install-time checks and are not repeated: a model that was valid when
    installed stays servable. The keyring is the one on disk *now*: this is how revocation
    reaches installed models (see "Revoked keys and installed models" in the module
    docstring)."""
    directory = Path(directory)
    try:
        manifest_bytes = (directory / MANIFEST_NAME).read_bytes()
        signature_bytes = (directory / SIGNATURE_NAME).read_bytes()
    except OSError as e:
        raise MissingFile(f"{directory}: cannot read {e.filename}: {e.strerror}") from None
    manifest = parse_manifest_bytes(manifest_bytes, f"{directory}: {MANIFEST_NAME}")
    _check_signature(directory, manifest_bytes, signature_bytes, manifest, keyring)
    for name, entry in sorted(manifest.files.items()) if files else ():
        target = directory / name
        digest, size = hashlib.sha256(), 0
        try:
            with open(target, "rb") as f:
                while chunk := f.read(_CHUNK):
                    digest.update(chunk)
                    size += len(chunk)
        except OSError as e:
            raise MissingFile(
                f"{target}: listed in the manifest but unreadable: {e.strerror}"
            ) from None
        if size != entry.size:
            raise DigestMismatch(f"{target}: size expected {entry.size}, found {size}")
        if digest.hexdigest() != entry.sha256:
            raise DigestMismatch(
                f"{target}: sha256 expected {entry.sha256}, found {digest.hexdigest()}"
            )
    return manifest


def unpack_bundle(path: Path, manifest: Manifest, dest: Path, limits: Limits = Limits()) -> str:
    """Write the verified files of `path` into the empty directory `dest` (staging), hashing
    each again while writing, fsync every file and the directory. Raises `DigestMismatch` if the
    bundle changed since it was verified; the caller then discards `dest`.

    Returns the bundle digest of what it wrote (agent.digest: the canonical bundle's SHA-256,
    the fleet's name for the model), hashed from the same bytes, in canonical member order, so
    that nothing reads the files again to name the model (issue 15)."""
    path, dest = Path(path), Path(dest)
    tf, archive = _open(path, limits)
    bundle_hash = BundleHasher()
    with tf:
        if archive.manifest_bytes != manifest.signed_bytes:
            raise DigestMismatch(f"{path}: {MANIFEST_NAME} changed since verification")
        for name, data in ((MANIFEST_NAME, archive.manifest_bytes),
                           (SIGNATURE_NAME, archive.signature_bytes)):
            bundle_hash.member(name, len(data))
            bundle_hash.update(data)
        for name, entry in sorted(manifest.files.items()):
            member = archive.members.get(name)
            if member is None:
                raise MissingFile(f"{path}: {name} vanished since verification")
            src = tf.extractfile(member)
            assert src is not None
            digest = hashlib.sha256()
            bundle_hash.member(name, entry.size)  # a size that differs fails just below
            target = dest / name
            with open(target, "xb") as out:
                while chunk := src.read(_CHUNK):
                    digest.update(chunk)
                    bundle_hash.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            if digest.hexdigest() != entry.sha256:
                raise DigestMismatch(
                    f"{path}: {name}: sha256 expected {entry.sha256}, found {digest.hexdigest()} "
                    "(bundle changed since verification)"
                )
        for name, data in ((MANIFEST_NAME, archive.manifest_bytes),
                           (SIGNATURE_NAME, archive.signature_bytes)):
            atomic_write(dest / name, data)
    fsync_dir(dest)
    return bundle_hash.hexdigest()


def write_bundle(
    out: Path,
    manifest_fields: Mapping[str, Any],
    files: Mapping[str, Path | bytes],
    private_key: Ed25519PrivateKey,
) -> Manifest:
    """Build and sign a bundle. `manifest_fields` holds everything but `format`, `files` and
    `signer`, which are filled in here. The result is parsed back with the device's own parser
    before it is written, so a bundle that a device would refuse is never produced. The file
    appears at `out` atomically (temp file, fsync, rename)."""
    blobs = {name: (src if isinstance(src, bytes) else Path(src).read_bytes())
             for name, src in files.items()}
    obj = dict(manifest_fields)
    obj.setdefault("format_version", FORMAT_VERSION)
    obj.setdefault("created", format_time(utc_now()))
    obj["format"] = FORMAT_NAME
    obj["signer"] = key_id(private_key.public_key())
    obj["files"] = {
        name: {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
        for name, data in sorted(blobs.items())
    }
    manifest_bytes = canonical_json(obj)
    manifest = parse_manifest(json.loads(manifest_bytes), "manifest to sign")
    signature = private_key.sign(SIGNING_CONTEXT + manifest_bytes)
    sig_bytes = canonical_json({
        "algorithm": "ed25519",
        "key_id": obj["signer"],
        "signature": base64.b64encode(signature).decode("ascii"),
    })
    # The archive is written by hand: canonical headers, data, zero padding, end marker. There
    # is exactly one byte string for a given set of files (see `_check_framing`).
    parts = []
    for name, data in [(MANIFEST_NAME, manifest_bytes), (SIGNATURE_NAME, sig_bytes),
                       *sorted(blobs.items())]:
        parts += [canonical_header(name, len(data)), data,
                  b"\x00" * (-len(data) % tarfile.BLOCKSIZE)]
    parts.append(b"\x00" * _EOF_MARKER)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(Path(out), b"".join(parts))
    return manifest
