"""Final-test labels: what a die turned out to be, joined to what the agent decided about it.

Two ways in, one queue (bounded; full = dropped and counted, the sender is never slowed):

- the tester, over the agent's Unix socket: the `label` op, as a JSON line or a binary LABEL
  frame (docs/protocol.md, "label: final-test outcomes"); `handle_json` and `handle_frame`;
- the MES, as CSV files dropped into `<labels_dir>/incoming/` (`die_id,label[,time]`, header
  row required; label `pass`/`fail` or `0`/`1`, 1 = fail; time in Unix seconds or ISO 8601).
  Only names ending in `.csv` are read, so an exporter writes `name.csv.tmp` and renames. A file
  is all or nothing: every row valid, its labels queued and written to the label log, then it
  moves to `done/`; one bad row and it moves to `rejected/` beside a `<name>.reason` file naming
  the line. A crash between the two re-reads the file at the next start (at least once).

The writer thread of the prediction log (agent/predlog.py) calls `tick` every pass: it reads
the drop directory (every `poll_interval_s`), then joins the queued labels by die id against the
log's index (the newest prediction of that die) and appends one record per label to the label
ring (`<log dir>/labels`, JSON payloads, what `fleet collect` pulls). The outcome of each label
is counted by source: `joined`, `unknown_die` (not in the log: never screened here, or dropped
by retention long ago), `expired` (logged, but the ring has since dropped it; told apart for one
more retention span), `invalid`, `dropped` (queue full). Nothing is lost silently.

Metrics (per model `digest`, the bundle digest; `predicted` is the device's decision, `actual`
the label): `edgefleet_label_joins_total{digest,predicted,actual}` - so a central Prometheus
computes realized false-fail (predicted fail, actual pass / actual pass) and recall (predicted
fail, actual fail / actual fail) per model, site and tester over any window - and
`edgefleet_labels_total{source,result}`.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import struct
import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from agent.dieindex import die_key, die_text
from agent.fsio import atomic_write, fsync_dir
from agent.protocol import (
    HEADER,
    MAGIC,
    PROTOCOL_VERSION,
    ErrorCode,
    FrameType,
    ProtocolError,
    json_id,
)

log = logging.getLogger("edgefleet.agent")

LABEL_RECORD = struct.Struct("<QdB7x")  # die id, time (0 = when received), label (0 pass, 1 fail)
LABELED_BLOCK = struct.Struct("<II")  # accepted, dropped
LABEL_NAMES = ("pass", "fail")
MAX_LABELS_PER_REQUEST = 65536
MAX_FILE_BYTES = 64 << 20
SOURCES = ("socket", "file")
RESULTS = ("joined", "unknown_die", "expired", "invalid", "dropped")

__all__ = ["LabelConfig", "LabelDesk", "encode_label_frame", "parse_label_csv"]


@dataclass(frozen=True)
class LabelConfig:
    drop_dir: Path | None = None  # <drop_dir>/incoming, done, rejected
    max_pending: int = 100_000
    poll_interval_s: float = 2.0
    # A dropped file naming a die the log does not hold yet waits this long (polled again)
    # before its labels are joined: the agent hands its answers to the log's writer every
    # 0.2 s, so an MES export dropped right after its dies were screened could otherwise find
    # none of them and count every label `unknown_die`. 0: join at once.
    unknown_grace_s: float = 10.0


@dataclass(frozen=True)
class Label:
    die_id: str
    label: int  # 0 pass, 1 fail
    time: float | None  # when the final test ran (None: unknown)
    source: str


# ---------------------------------------------------------------------------- parsing (pure)


def _label_value(v: Any, where: str) -> int:
    if v in ("pass", 0, "0"):
        return 0
    if v in ("fail", 1, "1"):
        return 1
    shown = json.dumps(v)[:40] if isinstance(v, (str, int, float, bool, type(None))) else "?"
    raise ProtocolError(ErrorCode.BAD_VALUE, f"{where}label: expected \"pass\" or \"fail\", "
                        f"found {shown}", field="label")


def _time_value(v: Any, where: str) -> float | None:
    if v is None or v == "":
        return None
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0:
        return float(v)
    if isinstance(v, str):
        try:
            return float(v) if v.replace(".", "", 1).isdigit() else datetime.fromisoformat(
                v.replace("Z", "+00:00")).timestamp()
        except ValueError:
            pass
    raise ProtocolError(ErrorCode.BAD_VALUE, f"{where}time: expected Unix seconds or ISO 8601, "
                        f"found {str(v)[:40]!r}", field="time")


def _die_id(v: Any, where: str) -> str:
    if isinstance(v, str) and v:
        return v
    if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
        return die_text(v)
    raise ProtocolError(ErrorCode.BAD_VALUE, f"{where}die_id: expected a non-empty string or a "
                        "non-negative integer", field="die_id")


def parse_label_request(obj: dict) -> list[tuple[str, int, float | None]]:
    """The labels of a JSON `label` request: one (`die_id`, `label`, optional `time`) or a
    list under `labels`. Raises `ProtocolError` naming the field (and item)."""
    items = obj.get("labels")
    if items is None:
        items, one = [obj], True
    else:
        one = False
        if not isinstance(items, list) or not items:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "labels: expected a non-empty array",
                                field="labels")
        if len(items) > MAX_LABELS_PER_REQUEST:
            raise ProtocolError(ErrorCode.TOO_LARGE, f"labels: at most "
                                f"{MAX_LABELS_PER_REQUEST} per request", field="labels")
    out = []
    for i, item in enumerate(items):
        where = "" if one else f"labels[{i}]."
        if not isinstance(item, dict):
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"{where[:-1] or 'request'}: expected an "
                                "object", field="labels", index=None if one else i)
        out.append((_die_id(item.get("die_id"), where), _label_value(item.get("label"), where),
                    _time_value(item.get("time"), where)))
    return out


def parse_label_payload(payload: bytes | memoryview, rows: int
                        ) -> list[tuple[str, int, float | None]]:
    """The records of a LABEL frame (`rows` x 24 bytes: u64 die id, f64 time, u8 label)."""
    out = []
    for i in range(rows):
        die, t, label = LABEL_RECORD.unpack_from(payload, i * LABEL_RECORD.size)
        if label > 1:
            raise ProtocolError(ErrorCode.BAD_VALUE, f"record {i}: label expected 0 (pass) or "
                                f"1 (fail), found {label}", field="label", row=i)
        if not (math.isfinite(t) and t >= 0):
            raise ProtocolError(ErrorCode.BAD_VALUE, f"record {i}: time expected Unix seconds "
                                "or 0", field="time", row=i)
        out.append((str(die), label, t or None))
    return out


def encode_label_frame(die_ids: Iterable[int], labels: Iterable[int],
                       times: Iterable[float] | None = None, tag: int = 0) -> bytes:
    """A LABEL frame (client side)."""
    ids, labs = list(die_ids), list(labels)
    ts = list(times) if times is not None else [0.0] * len(ids)
    body = b"".join(LABEL_RECORD.pack(d, t, v) for d, t, v in zip(ids, ts, labs, strict=True))
    return HEADER.pack(MAGIC, PROTOCOL_VERSION, FrameType.LABEL, 0, tag, len(ids), 0,
                       len(body)) + body


def encode_labeled(accepted: int, dropped: int, tag: int) -> bytes:
    return HEADER.pack(MAGIC, PROTOCOL_VERSION, FrameType.LABELED, 0, tag, 0, 0,
                       LABELED_BLOCK.size) + LABELED_BLOCK.pack(accepted, dropped)


def parse_label_csv(text: str) -> list[tuple[str, int, float | None]]:
    """An MES export: header `die_id,label[,time]` (any column order, extra columns ignored).
    Raises `ValueError` naming the line."""
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        return _parse_csv(reader)
    except csv.Error as e:
        raise ValueError(f"line {reader.line_num}: {e}") from None


def _parse_csv(reader: csv.DictReader) -> list[tuple[str, int, float | None]]:
    fields = [f.strip() for f in reader.fieldnames or []]
    if "die_id" not in fields or "label" not in fields:
        raise ValueError(f"line 1: header must name die_id and label, found {fields}")
    reader.fieldnames = fields
    out = []
    for row in reader:
        line = reader.line_num
        try:
            die = (row.get("die_id") or "").strip()
            if not die:
                raise ValueError("die_id is empty")
            label = _label_value((row.get("label") or "").strip().lower(), "")
            t = _time_value((row.get("time") or "").strip() or None, "")
        except ProtocolError as e:
            raise ValueError(f"line {line}: {e.message}") from None
        except ValueError as e:
            raise ValueError(f"line {line}: {e}") from None
        out.append((die, label, t))
    return out


# ---------------------------------------------------------------------------- the desk


class LabelInbox:
    """The socket side of labels: answers the `label` op (JSON and binary) and hands the valid
    labels to `offer`, counting the invalid ones. `LabelDesk` joins them where they arrive; the
    agent's writer-process link (agent/predlog_proc.py) forwards them to the desk there."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.results = {(s, r): 0 for s in SOURCES for r in RESULTS}

    def offer(self, labels: list[tuple[str, int, float | None]], source: str) -> tuple[int, int]:
        """Queue labels; return (accepted, dropped). Never blocks."""
        raise NotImplementedError

    def handle_json(self, obj: dict) -> dict[str, Any]:
        """Answer a JSON `label` request (the dispatcher's `op == "label"` branch)."""
        rid = json_id(obj, "id")
        try:
            labels = parse_label_request(obj)
        except ProtocolError as e:
            with self._lock:
                self.results[("socket", "invalid")] += 1
            return {"id": rid, "error": e.to_json()}
        accepted, dropped = self.offer(labels, "socket")
        return {"id": rid, "ok": dropped == 0, "accepted": accepted, "dropped": dropped}

    def handle_frame(self, buf: bytes | bytearray, offset: int, tag: int, rows: int) -> bytes:
        """Answer a LABEL frame whose header at `offset` was checked (its payload is complete)."""
        from agent.protocol import HEADER_SIZE, encode_error_frame

        try:
            labels = parse_label_payload(memoryview(buf)[offset + HEADER_SIZE:], rows)
        except ProtocolError as e:
            with self._lock:
                self.results[("socket", "invalid")] += 1
            return encode_error_frame(e, tag)
        return encode_labeled(*self.offer(labels, "socket"), tag)


class LabelDesk(LabelInbox):
    """Receives labels (any thread), joins them (the prediction log's writer thread)."""

    def __init__(self, config: LabelConfig, directory: Path, *, clock=time.time) -> None:
        from agent.segring import RingConfig, SegmentRing

        super().__init__()
        self.config = config
        self.clock = clock
        self.ring = SegmentRing(Path(directory) / "labels", RingConfig(max_bytes=64 << 20,
                                                                       segment_bytes=4 << 20))
        self._pending: deque[Label] = deque()
        self.joins: dict[tuple[int, int, int], int] = {}  # (model, predicted, actual) -> n
        self._next_poll = 0.0
        self._plog: Any = None
        self._waiting: dict[str, float] = {}  # dropped file -> when first seen (monotonic)
        if config.drop_dir is not None:
            for sub in ("incoming", "done", "rejected"):
                (Path(config.drop_dir) / sub).mkdir(parents=True, exist_ok=True)

    # -- receiving (serving threads)

    def offer(self, labels: list[tuple[str, int, float | None]], source: str) -> tuple[int, int]:
        """Queue labels; return (accepted, dropped). Never blocks."""
        room = self.config.max_pending - len(self._pending)
        take = labels[:max(room, 0)]
        for die, value, t in take:
            self._pending.append(Label(die, value, t, source))
        dropped = len(labels) - len(take)
        if dropped:
            with self._lock:
                self.results[(source, "dropped")] += dropped
        return len(take), dropped

    # -- the MES drop directory

    def poll_files(self) -> int:
        """Process every `incoming/*.csv`; return how many files were handled."""
        if self.config.drop_dir is None:
            return 0
        root = Path(self.config.drop_dir)
        handled = 0
        paths = sorted((root / "incoming").glob("*.csv"))
        for name in set(self._waiting) - {p.name for p in paths}:
            del self._waiting[name]  # gone from incoming
        for path in paths:
            try:
                if path.stat().st_size > MAX_FILE_BYTES:
                    raise ValueError(f"file is larger than {MAX_FILE_BYTES} bytes")
                labels = parse_label_csv(path.read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError) as e:
                handled += 1
                self._reject(path, str(e))
                continue
            except FileNotFoundError:
                continue
            src = f"file:{path.name}"
            items = [Label(d, v, t, src) for d, v, t in labels]
            if self._wait_for_dies(path.name, items):
                continue
            self._waiting.pop(path.name, None)
            handled += 1
            # files are not subject to the socket queue's cap: they are already on disk
            self._join(items)
            self.ring.sync()
            os.replace(path, root / "done" / path.name)
            fsync_dir(root / "done")
            fsync_dir(root / "incoming")
            log.info("labels: %s: %d labels", path.name, len(labels))
        return handled

    def _wait_for_dies(self, name: str, items: list[Label]) -> bool:
        """Whether file `name` waits for a later poll: some of its dies are not in the log
        yet and it was first seen less than `unknown_grace_s` ago (monotonic: a clock step
        neither holds a file forever nor skips the wait)."""
        grace, plog = self.config.unknown_grace_s, self._plog
        if grace <= 0 or plog is None or not items:
            return False
        first = self._waiting.setdefault(name, time.monotonic())
        if time.monotonic() - first >= grace:
            return False
        keys = {die_key(x.die_id) for x in items}
        return len(plog.index.lookup(list(keys))) < len(keys)

    def _reject(self, path: Path, reason: str) -> None:
        root = Path(self.config.drop_dir)  # type: ignore[arg-type]
        atomic_write(root / "rejected" / (path.name + ".reason"), (reason + "\n").encode())
        os.replace(path, root / "rejected" / path.name)
        fsync_dir(root / "incoming")
        with self._lock:
            self.results[("file", "invalid")] += 1
        log.warning("labels: rejected %s: %s", path.name, reason)

    # -- joining (the prediction log's writer thread)

    def tick(self, plog: Any) -> None:
        self._plog = plog
        now = self.clock()
        if self.config.drop_dir is not None and now >= self._next_poll:
            self._next_poll = now + self.config.poll_interval_s
            self.poll_files()
        items = []
        while self._pending:
            items.append(self._pending.popleft())
        if items:
            self._join(items)

    def _join(self, items: list[Label]) -> None:
        plog = self._plog
        keys = [die_key(x.die_id) for x in items]
        hits = plog.index.lookup(keys)
        first = plog.predictions.first_seq()
        now = self.clock()
        records = []
        counts: dict[tuple[str, str], int] = {}
        joins: dict[tuple[int, int, int], int] = {}
        for x, k in zip(items, keys, strict=True):
            hit = hits.get(k)
            rec: dict[str, Any] = {"received": now, "die_id": x.die_id,
                                   "label": LABEL_NAMES[x.label], "time": x.time,
                                   "source": x.source}
            if hit is None:
                result = "unknown_die"
            elif hit.seq < first:
                result = "expired"
            else:
                result = "joined"
                info = plog.models.get(hit.model)
                rec.update(prediction_seq=hit.seq, predicted=LABEL_NAMES[hit.decision],
                           predicted_source="model" if hit.source == 0 else "fallback",
                           score=hit.score, predicted_at=hit.time,
                           digest=info.digest if info is not None else None)
                key = (hit.model, hit.decision, x.label)
                joins[key] = joins.get(key, 0) + 1
            rec["result"] = result
            src = "file" if x.source.startswith("file:") else "socket"
            counts[(src, result)] = counts.get((src, result), 0) + 1
            records.append(json.dumps(rec, separators=(",", ":")).encode())
        from agent.segring import RingFull

        try:
            self.ring.append(records)
        except RingFull as e:
            log.warning("labels: label log full, %d label records not kept: %s", len(records), e)
        with self._lock:
            for key, n in counts.items():
                self.results[key] += n
            for key, n in joins.items():
                self.joins[key] = self.joins.get(key, 0) + n

    # -- metrics

    def snapshot(self) -> dict[str, Any]:
        """The counts the metrics show (`label_families`), as JSON-able values."""
        with self._lock:
            return {"results": [[s, r, n] for (s, r), n in self.results.items()],
                    "joins": [[*k, n] for k, n in self.joins.items()],
                    "pending": len(self._pending)}


# ---------------------------------------------------------------------------- the server's hooks

_NOT_ENABLED = "labels are not enabled on this agent (it keeps no prediction log)"


def answer_label_json(desk: LabelInbox | None, obj: dict) -> dict[str, Any]:
    """The answer to a JSON `label` request (agent/dispatch.py)."""
    if desk is None:
        return {"id": json_id(obj, "id"),
                "error": ProtocolError(ErrorCode.UNAVAILABLE, _NOT_ENABLED).to_json()}
    return desk.handle_json(obj)


def answer_label_frame(desk: LabelInbox | None, buf: bytes | bytearray, offset: int, tag: int,
                       rows: int) -> bytes:
    """The answer to a LABEL frame whose header was checked (agent/server.py)."""
    from agent.protocol import encode_error_frame

    if desk is None:
        return encode_error_frame(ProtocolError(ErrorCode.UNAVAILABLE, _NOT_ENABLED), tag)
    return desk.handle_frame(buf, offset, tag, rows)
