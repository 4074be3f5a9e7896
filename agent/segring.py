"""A bounded on-disk ring of records: append-only segment files, a checksum per record.

The prediction log, the captured rows and the label log (agent/predlog.py, agent/labels.py)
each keep one ring. Layout and record format:

    <dir>/<first seq, 20 digits>.seg     segments, oldest first; only the newest is appended to
    record = u32 payload length, u32 crc32(seq bytes + payload), u64 seq, payload

Why this shape:
- **Crash-safe without a journal.** Records are only ever appended (`O_APPEND`), so a crash can
  damage at most the tail of the newest segment. `open` scans that segment and truncates it at
  the first record whose length runs past the end of the file or whose checksum does not match;
  every record before it is intact. A reader does the same check and stops a segment there.
- **fsync policy.** `append` only writes (the page cache survives a killed process: `kill -9`
  loses nothing that was written). `sync()` fsyncs the active segment; the owner calls it at most
  every `fsync_interval_s` (agent/predlog.py: 1 s), and on rotation and close. A power cut loses
  at most the records of the last interval.
- **Bounded.** A segment is closed at `segment_bytes`; whole segments are deleted, oldest first,
  while the ring is over `max_bytes` or a segment's newest record is older than `max_age_s`. The
  active segment is never deleted. Sequence numbers keep growing across segments and restarts,
  so a reader's cursor (`read(cursor)`) stays valid; records deleted before it was read are
  reported as a gap, never silently skipped.
- **Records that hold several items.** A ring made with `count` (a function of the payload)
  numbers items, not records: a record's seq is its first item's, the next record's is that plus
  `count(payload)` (the prediction log writes blocks of answers as one record, agent/predformat.py).
  A reader's cursor may then fall inside a record; `read` returns that record whole and the
  caller skips the items before the cursor.
- **Full disk.** A write that fails (ENOSPC, EIO) is rolled back with `ftruncate` to the last
  whole record and raised as `RingFull`; the caller drops and counts. `min_free_bytes` refuses to
  write at all when the file system is nearly full, so the log never eats the space the model
  store needs (checked at most every 0.5 s while there is room: a statvfs per write would hand
  the GIL to serving and take it back each time).
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from agent.errors import EdgefleetError
from agent.fsio import fsync_dir

log = logging.getLogger("edgefleet.agent")

RECORD = struct.Struct("<IIQ")  # payload length, crc32, seq
SEQ = struct.Struct("<Q")
SUFFIX = ".seg"
MAX_PAYLOAD = 1 << 24

__all__ = ["RingConfig", "RingFull", "RingView", "SegmentRing", "read_records"]

Count = Callable[[bytes], int]  # items in one record's payload


def _one(_payload: bytes) -> int:
    return 1


class RingFull(EdgefleetError):
    """The write was refused or failed (disk full, or under `min_free_bytes`); nothing of it
    remains on disk."""


@dataclass(frozen=True)
class RingConfig:
    max_bytes: int = 256 << 20
    max_age_s: float = 30 * 86400.0
    segment_bytes: int = 8 << 20
    min_free_bytes: int = 64 << 20


@dataclass(frozen=True)
class Batch:
    """What one `read` returns: records `(seq, payload)`, the cursor to read from next, and how
    many records between the requested cursor and the first returned one no longer exist."""

    records: list[tuple[int, bytes]]
    next_cursor: int
    gap: int


def _seg_name(first_seq: int) -> str:
    return f"{first_seq:020d}{SUFFIX}"


def _segments(directory: Path) -> list[Path]:
    """A ring directory's segment files, oldest first."""
    return sorted(p for p in Path(directory).glob("*" + SUFFIX)
                  if p.name[:-len(SUFFIX)].isdigit())


def _disk_bytes(segments: list[Path]) -> int:
    total = 0
    for p in segments:
        with contextlib.suppress(FileNotFoundError):  # deleted by retention meanwhile
            total += p.stat().st_size
    return total


def read_records(data: bytes | memoryview) -> Iterator[tuple[int, int, bytes]]:
    """`(offset_after, seq, payload)` of the whole, checksummed records at the start of `data`;
    stops at the first torn or corrupt one."""
    pos, end = 0, len(data)
    view = memoryview(data)
    while pos + RECORD.size <= end:
        length, crc, seq = RECORD.unpack_from(view, pos)
        stop = pos + RECORD.size + length
        if length > MAX_PAYLOAD or stop > end:
            return
        payload = bytes(view[pos + RECORD.size:stop])
        if zlib.crc32(payload, zlib.crc32(SEQ.pack(seq))) != crc:
            return
        yield stop, seq, payload
        pos = stop


class SegmentRing:
    """One ring directory. Not thread-safe: one writer thread owns it; `read` may run in another
    thread (it only opens files by name and tolerates one disappearing under it)."""

    def __init__(self, directory: Path, config: RingConfig = RingConfig(), *,
                 clock=time.time, count: Count | None = None) -> None:
        self.dir = Path(directory)
        self.config = config
        self.clock = clock
        self.count = count or _one
        self.dir.mkdir(parents=True, exist_ok=True)
        self._fd = -1
        self._active: Path | None = None
        self._size = 0
        self.next_seq = 0
        self.truncated_bytes = 0  # torn tail removed at open
        self._free_until, self._free_short = 0.0, False  # the last free-space check
        self._open()

    # ------------------------------------------------------------------ state

    def segments(self) -> list[Path]:
        return _segments(self.dir)

    def disk_bytes(self) -> int:
        return _disk_bytes(self.segments())

    def first_seq(self) -> int:
        segs = self.segments()
        return int(segs[0].name[:-len(SUFFIX)]) if segs else self.next_seq

    def _open(self) -> None:
        segs = self.segments()
        if not segs:
            self._start_segment(0)
            return
        last = segs[-1]
        data = last.read_bytes()
        good, next_seq = 0, int(last.name[:-len(SUFFIX)])
        count = self.count
        for stop, seq, payload in read_records(data):
            good, next_seq = stop, seq + count(payload)
        if good < len(data):
            self.truncated_bytes = len(data) - good
            log.warning("%s: dropped a torn tail of %d bytes (records after seq %d)", last,
                        len(data) - good, next_seq - 1)
            with open(last, "r+b") as f:
                f.truncate(good)
                os.fsync(f.fileno())
        self.next_seq = next_seq
        self._active, self._size = last, good
        self._fd = os.open(last, os.O_WRONLY | os.O_APPEND)

    def _start_segment(self, first_seq: int) -> None:
        if self._fd >= 0:
            os.fsync(self._fd)
            os.close(self._fd)
        path = self.dir / _seg_name(first_seq)
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        self._active, self._size = path, 0
        fsync_dir(self.dir)

    # ------------------------------------------------------------------ writing

    def append(self, payloads: list[bytes], counts: list[int] | None = None) -> int:
        """Append records (a new segment whenever the active one is full); return the seq of the
        first. `counts`: the items of each record, for a ring made with `count` (else 1 each).
        Raises `RingFull`: the records of the failed write are not on disk."""
        first = self.next_seq
        limit = self.config.segment_bytes
        total = sum(map(len, payloads)) + RECORD.size * len(payloads)
        if self._size + total <= limit:  # the common case: the batch fits
            if payloads:
                self._append(payloads, counts, total)
            return first
        start = size = 0
        for i, p in enumerate(payloads):
            if i > start and self._size + size + len(p) > limit:
                self._append(payloads[start:i], counts and counts[start:i])
                start, size = i, 0
            size += RECORD.size + len(p)
        if start < len(payloads):
            self._append(payloads[start:], counts and counts[start:])
        return first

    def _append(self, payloads: list[bytes], counts: list[int] | None = None,
                batch: int | None = None) -> None:
        if batch is None:
            batch = sum(map(len, payloads)) + RECORD.size * len(payloads)
        if self._size and self._size + batch > self.config.segment_bytes:
            self._start_segment(self.next_seq)
            self.enforce()
        if self.config.min_free_bytes:
            now = time.monotonic()
            if now >= self._free_until or self._free_short:  # statvfs at most every 0.5 s
                st = os.statvfs(self.dir)
                self._free_short = st.f_bavail * st.f_frsize < self.config.min_free_bytes
                self._free_until = now + 0.5
            if self._free_short:
                raise RingFull(f"{self.dir}: less than {self.config.min_free_bytes} bytes free")
        seq = self.next_seq
        parts = []
        crc, pack, seq_pack = zlib.crc32, RECORD.pack, SEQ.pack
        for i, p in enumerate(payloads):
            parts.append(pack(len(p), crc(p, crc(seq_pack(seq))), seq))
            parts.append(p)
            seq += counts[i] if counts else 1
        blob = b"".join(parts)
        view, written = memoryview(blob), 0
        try:
            while written < len(blob):
                written += os.write(self._fd, view[written:])
        except OSError as e:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, self._size)
            raise RingFull(f"{self._active}: {e.strerror or e}") from None
        self._size += len(blob)
        self.next_seq = seq

    def sync(self) -> None:
        if self._fd >= 0:
            os.fsync(self._fd)

    def enforce(self) -> int:
        """Delete whole segments, oldest first, over the size or age cap; return how many."""
        segs = self.segments()
        now = self.clock()
        sizes = {}
        for p in segs:
            with contextlib.suppress(FileNotFoundError):
                sizes[p] = p.stat()
        total = sum(s.st_size for s in sizes.values())
        removed = 0
        for p in segs[:-1]:  # never the active one
            st = sizes.get(p)
            if st is None:
                continue
            if total <= self.config.max_bytes and now - st.st_mtime <= self.config.max_age_s:
                break
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                for side in p.parent.glob(p.name + ".*"):
                    side.unlink(missing_ok=True)
            total -= st.st_size
            removed += 1
        return removed

    def close(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1

    # ------------------------------------------------------------------ reading

    def read(self, cursor: int, max_records: int = 10_000, max_bytes: int = 4 << 20) -> Batch:
        """Records holding items >= `cursor`, oldest first, up to either cap (`max_records`
        counts items)."""
        return read_ring(self.dir, cursor, max_records, max_bytes, self.count)


def read_ring(directory: Path, cursor: int, max_records: int = 10_000,
              max_bytes: int = 4 << 20, count: Count | None = None) -> Batch:
    """`SegmentRing.read` without a writer: for tools and other threads (`count` as the
    ring's)."""
    count = count or _one
    segs = _segments(directory)
    firsts = [int(p.name[:-len(SUFFIX)]) for p in segs]
    out: list[tuple[int, bytes]] = []
    size, items, gap, nxt = 0, 0, 0, cursor
    start = 0
    for i, first in enumerate(firsts):
        if first <= cursor:
            start = i
    for i in range(start, len(segs)):
        try:
            data = segs[i].read_bytes()
        except FileNotFoundError:  # deleted by retention while we read
            continue
        for _, seq, payload in read_records(data):
            n = count(payload)
            if seq + n <= nxt:
                continue
            if not out and seq > nxt:
                gap += seq - nxt
            out.append((seq, payload))
            size += len(payload) + RECORD.size
            items += seq + n - max(seq, nxt)
            nxt = seq + n
            if items >= max_records or size >= max_bytes:
                return Batch(out, nxt, gap)
    return Batch(out, nxt, gap)


class RingView:
    """A ring read by a process that does not write it (the agent, whose log writer runs in a
    process of its own): `first_seq()`, `next_seq`, `read` and `disk_bytes()`, from the
    files."""

    def __init__(self, directory: Path, count: Count | None = None) -> None:
        self.dir = Path(directory)
        self.count = count or _one

    def first_seq(self) -> int:
        segs = _segments(self.dir)
        return int(segs[0].name[:-len(SUFFIX)]) if segs else 0

    @property
    def next_seq(self) -> int:
        """The seq the next record will get (the newest segment's whole records counted)."""
        for last in reversed(_segments(self.dir)):
            try:
                data = last.read_bytes()
            except FileNotFoundError:
                continue
            nxt = int(last.name[:-len(SUFFIX)])
            for _, seq, payload in read_records(data):
                nxt = seq + self.count(payload)
            return nxt
        return 0

    def disk_bytes(self) -> int:
        return _disk_bytes(_segments(self.dir))

    def read(self, cursor: int, max_records: int = 10_000, max_bytes: int = 4 << 20) -> Batch:
        return read_ring(self.dir, cursor, max_records, max_bytes, self.count)
