"""The model store: every installed model version on disk, and the pointer to the one that serves.

    <root>/
      versions/<id>/          one directory per installed version, complete before it appears
                              (renamed in from staging) and never modified afterwards:
                              manifest.json, manifest.sig and every file the manifest lists
      active   -> versions/<id>   symlink to the version that serves; moved by rename (atomic)
      previous -> versions/<id>   symlink to the rollback target
      staging/                downloads, unpacking, and directories on their way out; empty
                              whenever no install runs (wiped at start-up)
      quarantine/<id>.<time>/ versions that failed an integrity check, kept for inspection
      store.json              highest sequence ever installed, and the event history
      install.json            the install state machine's record (agent/install.py)
      lock                    flock'ed by the one process that owns the store

A version id is `<sequence>-<version>-<first 12 hex of sha256(manifest.json)>`: unique per signed
manifest, readable by a person, and a check of the manifest itself at rest (the manifest pins
every other file by digest). Nothing under `versions/` is ever written in place: a version is
unpacked and fsynced in `staging/`, renamed into `versions/`, and removed by being renamed back
into `staging/` first, so `versions/` only ever holds complete directories.

Pointers move by writing a new symlink under a temporary name and renaming it over the old one,
then fsyncing the root directory: after a power cut `active` names either the old version or the
new one. Garbage collection keeps the active and previous versions and, with `keep` > 1, the
`keep - 1` other versions that served most recently; everything else goes.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.errors import EdgefleetError
from agent.fsio import atomic_write, fsync_dir
from agent.manifest import MODEL_FILE, Manifest, parse_manifest_bytes

MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "manifest.sig"
HISTORY_LIMIT = 200
QUARANTINE_LIMIT = 3
_CHUNK = 1 << 20
_ID_RE = re.compile(r"^[0-9]+-[A-Za-z0-9._-]+-[0-9a-f]{12}$")  # one path component, never ..

__all__ = ["Store", "StoreBusy", "StoreError", "VersionInfo", "version_id"]


class StoreError(EdgefleetError):
    """The model store is missing, unreadable or inconsistent."""


class StoreBusy(StoreError):
    """Another process owns the store (holds its lock)."""


def version_id(manifest: Manifest) -> str:
    """`<sequence>-<version>-<sha256(manifest.json)[:12]>`: the directory name of a version."""
    digest = hashlib.sha256(manifest.signed_bytes).hexdigest()[:12]
    return f"{manifest.sequence}-{manifest.version}-{digest}"


@dataclass(frozen=True)
class VersionInfo:
    id: str
    name: str
    version: str
    sequence: int
    created: str
    active: bool
    previous: bool
    last_active: float | None  # unix time this version last became active, if recorded
    problems: tuple[str, ...] | None = None  # integrity problems, when checked

    def to_json(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["problems"] = list(self.problems) if self.problems is not None else None
        return d


class Store:
    """One model store directory. Only the process holding `lock()` may change it."""

    def __init__(self, root: Path, *, keep: int = 1) -> None:
        if keep < 1:
            raise StoreError(f"keep must be >= 1 (the previous version), not {keep}")
        self.root = Path(root)
        self.keep = keep
        self.versions_dir = self.root / "versions"
        self.staging_dir = self.root / "staging"
        self.quarantine_dir = self.root / "quarantine"
        self.record_path = self.root / "store.json"
        self._lock_fd: int | None = None
        self._record_cache: tuple[tuple[int, int, int], dict[str, Any]] | None = None
        for d in (self.root, self.versions_dir, self.staging_dir, self.quarantine_dir):
            d.mkdir(parents=True, exist_ok=True)

    # -- ownership ----------------------------------------------------------------------------

    def lock(self) -> None:
        """Take the store's exclusive lock (released by `unlock` or when the process dies)."""
        if self._lock_fd is not None:
            return
        fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreBusy(
                f"model store {self.root} is in use by another process",
                hint="stop the running agent, or use its admin socket",
            ) from None
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- pointers -----------------------------------------------------------------------------

    def active(self) -> str | None:
        """Id of the active version, or None (no pointer, or it names a missing directory)."""
        return self._read_pointer("active")

    def previous(self) -> str | None:
        return self._read_pointer("previous")

    def _read_pointer(self, name: str) -> str | None:
        try:
            target = os.readlink(self.root / name)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StoreError(f"{self.root / name}: not a symlink ({e.strerror})") from None
        vid = Path(target).name
        return vid if self.has_version(vid) else None

    def pointer_target(self, name: str) -> str | None:
        """The id a pointer names even if its directory is gone (for recovery and reports)."""
        try:
            return Path(os.readlink(self.root / name)).name
        except FileNotFoundError:
            return None

    def set_active(self, vid: str | None) -> None:
        """Move `active` to `vid` (None removes it). Durable when this returns."""
        self._set_pointer("active", vid)

    def set_previous(self, vid: str | None) -> None:
        self._set_pointer("previous", vid)

    def _set_pointer(self, name: str, vid: str | None) -> None:
        link = self.root / name
        if vid is None:
            with contextlib.suppress(FileNotFoundError):
                link.unlink()
            fsync_dir(self.root)
            return
        if not self.has_version(vid):
            raise StoreError(f"cannot point {name} at {vid!r}: no such version in "
                             f"{self.versions_dir}")
        tmp = self.root / f".{name}.tmp"
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        os.symlink(f"versions/{vid}", tmp)
        os.replace(tmp, link)
        fsync_dir(self.root)

    # -- versions -----------------------------------------------------------------------------

    def version_dir(self, vid: str) -> Path:
        return self.versions_dir / vid

    def model_path(self, vid: str) -> Path:
        return self.versions_dir / vid / MODEL_FILE

    def has_version(self, vid: str) -> bool:
        return bool(_ID_RE.match(vid)) and (self.versions_dir / vid).is_dir()

    def manifest(self, vid: str) -> Manifest:
        """The stored manifest of a version (parsed, not re-verified: see `check_integrity`)."""
        path = self.versions_dir / vid / MANIFEST_NAME
        try:
            data = path.read_bytes()
        except OSError as e:
            raise StoreError(f"cannot read {path}: {e.strerror}") from None
        return self._parse(data, path)

    def trusted_manifest(self, vid: str) -> Manifest | None:
        """The manifest of `vid` if it is unchanged on disk (its digest matches the id), even
        when the model file is damaged: its fallback rules can still be used. Else None."""
        try:
            data = (self.versions_dir / vid / MANIFEST_NAME).read_bytes()
            if not vid.endswith("-" + hashlib.sha256(data).hexdigest()[:12]):
                return None
            return self._parse(data, self.versions_dir / vid / MANIFEST_NAME)
        except (OSError, EdgefleetError):
            return None

    def _parse(self, data: bytes, path: Path) -> Manifest:
        """Parse manifest bytes (`parse_manifest_bytes` keeps parses by the bytes' SHA-256,
        so the same version is not parsed again)."""
        return parse_manifest_bytes(data, str(path))

    def version_ids(self) -> list[str]:
        return sorted(p.name for p in self.versions_dir.iterdir()
                      if p.is_dir() and not p.name.startswith("."))

    def list_versions(self, *, check: bool = False) -> list[VersionInfo]:
        """Every installed version, newest sequence first; with `check`, each one's problems."""
        active, previous = self.active(), self.previous()
        last = self._last_active()
        out = []
        for vid in self.version_ids():
            try:
                m = self.manifest(vid)
                name, version, seq, created = m.name, m.version, m.sequence, m.head["created"]
            except EdgefleetError:
                name, version, seq, created = "?", "?", -1, "?"
            out.append(VersionInfo(
                vid, name, version, seq, created, vid == active, vid == previous, last.get(vid),
                tuple(self.check_integrity(vid)) if check else None,
            ))
        return sorted(out, key=lambda v: (v.sequence, v.last_active or 0), reverse=True)

    # -- staging and promotion ----------------------------------------------------------------

    def new_staging(self, name: str) -> Path:
        """An empty directory `staging/<name>` (a stale one is removed first)."""
        path = self.staging_dir / name
        if path.exists():
            shutil.rmtree(path)
        path.mkdir()
        fsync_dir(self.staging_dir)
        return path

    def download_path(self, name: str) -> Path:
        """Where a downloader should write a bundle: `staging/download-<name>`. Staging is wiped
        at start-up, so an interrupted download never survives a restart."""
        return self.staging_dir / f"download-{Path(name).name}"

    def promote(self, vid: str) -> None:
        """Rename the complete, fsynced `staging/<vid>` to `versions/<vid>` (durably). If an
        intact copy of the version is already installed, the staged copy is dropped; a damaged
        one is moved to quarantine first."""
        src, dst = self.staging_dir / vid, self.versions_dir / vid
        if dst.exists():
            if not self.check_integrity(vid):
                self._discard(src)
                return
            self.quarantine(vid)
        os.rename(src, dst)
        fsync_dir(self.versions_dir)
        fsync_dir(self.staging_dir)

    def discard_staging(self, name: str) -> None:
        """Remove `staging/<name>` (a directory or a file) if it exists."""
        path = self.staging_dir / Path(name).name
        if path.is_dir() and not path.is_symlink():
            self._discard(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
            fsync_dir(self.staging_dir)

    def quarantine(self, vid: str) -> Path:
        """Move a version out of `versions/` into `quarantine/<id>.<unix time>` (never used
        again, kept for a person to look at)."""
        dst = self.quarantine_dir / f"{vid}.{int(time.time() * 1000)}"
        os.rename(self.versions_dir / vid, dst)
        fsync_dir(self.quarantine_dir)
        fsync_dir(self.versions_dir)
        return dst

    def _discard(self, path: Path) -> None:
        """Remove a directory crash-safely: rename it into staging (atomic), then delete it. A
        half-deleted directory can then only be found in staging, which is wiped at start-up."""
        if not path.exists():
            return
        if path.parent != self.staging_dir:
            trash = self.staging_dir / f".trash-{path.name}-{os.getpid()}-{time.monotonic_ns()}"
            os.rename(path, trash)
            fsync_dir(path.parent)
            fsync_dir(self.staging_dir)
            path = trash
        shutil.rmtree(path)
        fsync_dir(self.staging_dir)

    # -- integrity ----------------------------------------------------------------------------

    def check_integrity(self, vid: str | None = None) -> list[str]:
        """What is wrong with version `vid` (default: the active one) on disk; [] if nothing.

        Checks: the directory exists; manifest.json hashes to the digest in the id and parses;
        every listed file exists with the listed size and SHA-256; there is no other file but
        manifest.sig. (The signature is checked whenever a version is about to serve, not here:
        see "Revoked keys and installed models" in agent/install.py.) With no active version,
        returns []."""
        if vid is None:
            vid = self.pointer_target("active")
            if vid is None:
                return []
        d = self.versions_dir / vid
        if not d.is_dir():
            return [f"{d}: version directory missing"]
        problems: list[str] = []
        try:
            data = (d / MANIFEST_NAME).read_bytes()
        except OSError as e:
            return [f"{d / MANIFEST_NAME}: cannot read: {e.strerror}"]
        digest = hashlib.sha256(data).hexdigest()[:12]
        if not vid.endswith(f"-{digest}"):
            problems.append(
                f"{d / MANIFEST_NAME}: sha256 starts {digest}, the version id says "
                f"{vid.rsplit('-', 1)[-1]} (manifest changed on disk)"
            )
            return problems
        try:
            m = self._parse(data, d / MANIFEST_NAME)
        except EdgefleetError as e:
            return [str(e)]
        allowed = {MANIFEST_NAME, SIGNATURE_NAME, *m.files}
        for extra in sorted(p.name for p in d.iterdir() if p.name not in allowed):
            problems.append(f"{d / extra}: unexpected file in a version directory")
        for name, entry in sorted(m.files.items()):
            problems += _check_file(d / name, entry.sha256, entry.size)
        return problems

    # -- the store record: highest sequence and history ---------------------------------------

    def read_record(self) -> dict[str, Any]:
        """store.json, parsed (a copy; cached while the file's inode, size and mtime stay the
        same: every write replaces the inode, so a cached copy is never stale)."""
        try:
            st = os.stat(self.record_path)
        except FileNotFoundError:
            return {"highest_sequence": None, "history": []}
        key = (st.st_ino, st.st_size, st.st_mtime_ns)
        if self._record_cache is None or self._record_cache[0] != key:
            try:
                rec = json.loads(self.record_path.read_bytes())
            except ValueError as e:
                raise StoreError(f"{self.record_path}: not valid JSON: {e}") from None
            except FileNotFoundError:
                return {"highest_sequence": None, "history": []}
            rec.setdefault("highest_sequence", None)
            rec.setdefault("history", [])
            self._record_cache = (key, rec)
        rec = self._record_cache[1]
        return {**rec, "history": list(rec["history"])}

    def highest_sequence(self) -> int | None:
        """The highest sequence ever installed here (never lowered by a rollback). If the record
        is missing, the highest sequence among the active and previous versions."""
        seqs = [s for s in (self.read_record()["highest_sequence"],) if s is not None]
        for vid in (self.active(), self.previous()):
            if vid is not None and vid.split("-", 1)[0].isdigit():  # the id starts with it
                seqs.append(int(vid.split("-", 1)[0]))
        return max(seqs) if seqs else None

    def highest_holder(self) -> str | None:
        """The version id that was installed with the highest sequence (two different bundles
        never share a sequence): recorded with it, else found in the history or among the
        active and previous versions (a store written before it was recorded). None if
        unknown."""
        rec = self.read_record()
        highest = self.highest_sequence()
        if highest is None:
            return None
        if rec.get("highest_sequence") == highest and rec.get("highest_id"):
            return rec["highest_id"]
        prefix = f"{highest}-"
        for ev in reversed(rec["history"]):
            if ev.get("event") == "install" and str(ev.get("id") or "").startswith(prefix):
                return ev["id"]
        for vid in (self.active(), self.previous()):
            if vid is not None and vid.startswith(prefix):
                return vid
        return None

    def record_event(self, event: dict[str, Any], *, sequence: int | None = None) -> None:
        """Append an event to the history (bounded) and raise the highest sequence to
        `sequence` (its holder: the event's `id`); written atomically."""
        rec = self.read_record()
        if sequence is not None:
            if rec["highest_sequence"] is None or sequence > rec["highest_sequence"]:
                rec["highest_id"] = event.get("id")
            rec["highest_sequence"] = max(sequence, rec["highest_sequence"] or sequence)
        rec["history"] = [*rec["history"], {"time": time.time(), **event}][-HISTORY_LIMIT:]
        atomic_write(self.record_path, json.dumps(rec, separators=(",", ":")).encode() + b"\n")
        st = os.stat(self.record_path)  # our own write: cache it rather than trust the stat key
        self._record_cache = ((st.st_ino, st.st_size, st.st_mtime_ns), rec)

    def history(self) -> list[dict[str, Any]]:
        return list(self.read_record()["history"])

    def _last_active(self) -> dict[str, float]:
        """Version id -> the last time it became active (from the history)."""
        last: dict[str, float] = {}
        for ev in self.read_record()["history"]:
            if ev.get("event") in ("install", "rollback", "integrity") and ev.get("id"):
                last[ev["id"]] = ev["time"]
            if ev.get("from"):
                last[ev["from"]] = max(last.get(ev["from"], 0.0), ev["time"])
        return last

    # -- garbage collection -------------------------------------------------------------------

    def retained(self) -> set[str]:
        """Versions garbage collection keeps: active, previous, and the `keep - 1` other
        versions that served most recently."""
        keep = {v for v in (self.active(), self.previous()) if v is not None}
        last = self._last_active()
        others = sorted((v for v in self.version_ids() if v not in keep and v in last),
                        key=lambda v: last[v], reverse=True)
        return keep | set(others[: self.keep - 1])

    def gc(self, *, protect: tuple[str, ...] = (), wipe_staging: bool = False) -> list[str]:
        """Remove versions that are not retained or protected, stale pointer temp files, old
        quarantine entries, and half-deleted directories in staging; with `wipe_staging`
        (start-up, when no install can run) everything in staging. Returns what it removed."""
        removed: list[str] = []
        keep = self.retained() | set(protect)
        for vid in self.version_ids():
            if vid not in keep:
                self._discard(self.versions_dir / vid)
                removed.append(f"versions/{vid}")
        for p in sorted(self.staging_dir.iterdir()):
            if p.name in protect or not (wipe_staging or p.name.startswith(".trash-")):
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
            removed.append(f"staging/{p.name}")
        for p in self.root.glob(".*.tmp"):  # pointer or record written by a killed process
            p.unlink()
        old = sorted(self.quarantine_dir.iterdir(), key=lambda p: p.stat().st_mtime)
        for p in old[:-QUARANTINE_LIMIT]:
            shutil.rmtree(p)
            removed.append(f"quarantine/{p.name}")
        if removed:
            fsync_dir(self.staging_dir)
            fsync_dir(self.quarantine_dir)
            fsync_dir(self.root)
        return removed

    def staging_entries(self) -> list[str]:
        return sorted(p.name for p in self.staging_dir.iterdir())


def _check_file(path: Path, sha256: str, size: int) -> list[str]:
    try:
        st = path.lstat()
    except FileNotFoundError:
        return [f"{path}: missing"]
    if not path.is_file() or path.is_symlink():
        return [f"{path}: not a regular file"]
    if st.st_size != size:
        return [f"{path}: size expected {size}, found {st.st_size}"]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    if digest.hexdigest() != sha256:
        return [f"{path}: sha256 expected {sha256}, found {digest.hexdigest()} "
                "(changed on disk)"]
    return []
