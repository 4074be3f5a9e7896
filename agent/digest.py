"""The bundle digest of an installed version: the SHA-256 the fleet names a model by.

Its own module (re-exported by agent.link): the predictor needs it on every swap, in the
serving process, and importing agent.link there would pull in the MQTT client on the first
swap of an agent that has no fleet link.

The digest is that of the canonical bundle (docs/bundle-format.md: the archive has exactly one
encoding; bundles written by edgefleet are that encoding): `BundleHasher` computes it from the
members in canonical order. An install computes it once, while unpacking (the bytes it writes
are the bytes it hashes), and `remember`s it for the version directory; `cached_bundle_digest`
returns that, and rebuilds it from the stored files only for a version this process did not
unpack (start-up, or a version evicted from the small cache).
"""

from __future__ import annotations

import hashlib
import tarfile
import threading
from pathlib import Path

from agent.manifest import Manifest, loads_in_pieces

_CACHE_MAX = 8  # versions: the store keeps two or three, a few more for retired ones
_cache: dict[tuple[str, int, int], str] = {}  # by (directory, manifest.sig inode, mtime)
_cache_lock = threading.Lock()


def canonical_header(name: str, size: int) -> bytes:
    """The one ustar header v1 allows for a member: only name and size vary."""
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime, info.uid, info.gid = size, 0o644, 0, 0, 0
    info.uname = info.gname = ""
    return info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict")


class BundleHasher:
    """SHA-256 of the canonical bundle, fed member by member in canonical order (manifest.json,
    manifest.sig, then the listed files sorted by name): `member(name, size)`, its bytes in
    any number of `update` calls, and `hexdigest()` after the last member. hashlib releases
    the GIL on big chunks; what holds it is one tar header per member."""

    def __init__(self) -> None:
        self._h = hashlib.sha256()
        self._pad = 0

    def member(self, name: str, size: int) -> None:
        self._h.update(b"\0" * self._pad)
        self._h.update(canonical_header(name, size))
        self._pad = -size % tarfile.BLOCKSIZE

    def update(self, data: bytes | memoryview) -> None:
        self._h.update(data)

    def hexdigest(self) -> str:
        h = self._h.copy()
        h.update(b"\0" * (self._pad + 2 * tarfile.BLOCKSIZE))
        return h.hexdigest()


def bundle_digest(version_dir: Path, manifest: Manifest | None = None) -> str:
    """The bundle digest of an installed version, rebuilt from the stored files. It equals the
    `sha256` the install command named.

    `manifest`: the version's parsed manifest when the caller has it: its file list is used when
    its bytes are the stored manifest.json's, so that 200 kB of JSON is not parsed again with
    the GIL held (issue 15)."""
    d = Path(version_dir)
    manifest_bytes = (d / "manifest.json").read_bytes()
    if manifest is not None and manifest.signed_bytes == manifest_bytes:
        names = sorted(manifest.files)
    else:
        # orjson in pieces: json.loads of a ~200 kB manifest held the GIL for 1-5 ms on every
        # fresh install, stalling answers on the serving loop (issue 15)
        names = sorted(loads_in_pieces(manifest_bytes)["files"])
    h = BundleHasher()
    for name in ["manifest.json", "manifest.sig", *names]:
        data = manifest_bytes if name == "manifest.json" else (d / name).read_bytes()
        h.member(name, len(data))
        h.update(data)
    return h.hexdigest()


def _key(version_dir: Path) -> tuple[str, int, int]:
    st = (Path(version_dir) / "manifest.sig").stat()
    return str(version_dir), st.st_ino, st.st_mtime_ns


def remember(version_dir: Path, digest: str) -> None:
    """Record the digest of the version in `version_dir` (as its files are now: a version
    rewritten in place has a new manifest.sig, and so a new key)."""
    key = _key(version_dir)
    with _cache_lock:
        _cache.pop(key, None)
        while len(_cache) >= _CACHE_MAX:
            _cache.pop(next(iter(_cache)))
        _cache[key] = digest


def cached_bundle_digest(version_dir: Path, manifest: Manifest | None = None) -> str:
    """`bundle_digest`, from the cache when this version's digest is known: the install
    computed it while unpacking, or an earlier call rebuilt it. Kept per version directory: a
    snapshot is rebuilt on every fallback change and a rollback loads a retained version
    again. Raises what `bundle_digest` raises."""
    digest = _cache.get(_key(version_dir))
    if digest is None:
        digest = bundle_digest(version_dir, manifest)
        remember(version_dir, digest)
    return digest
