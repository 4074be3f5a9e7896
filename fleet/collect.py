"""`edgefleet fleet collect`: pull captured rows, fails and labels from devices into a dataset
directory that `edgefleet optimize build --data DIR` reads.

Each device serves its prediction log over HTTPS with mutual TLS (agent/datafeed.py): the
collector presents the controller's certificate, and checks the device's (issued by the fleet
CA, clientAuth, CN = the device id it meant to reach) before it reads a byte.

Dataset directory (every file written atomically: temp, fsync, rename):

    DIR/devices/<id>.json                  provenance: device, site, tester, labels, models
    DIR/cursors/<id>.json                  per stream, the next seq to pull (resumable)
    DIR/<stream>/<id>/<first>-<last>.jsonl one JSON object per record, with its provenance:
                                           device, site, tester, digest (the bundle that
                                           decided), model_version, time, die_id, ...

Recent only: with `since` (Unix time; `--since 2h` or an ISO 8601 time on the command line),
records the device logged before it are skipped (answers and captured rows by answer time,
labels by when the device received them), and the cursor moves past them all the same: a
retrain on the dies after a process change takes only those.

Which devices: given as ID=HOST:PORT, or picked from the fleet inventory with a label selector
(`devices_from_inventory`): each device's retained state reports where its feed listens
(`data_feed`; agent/link.py); one that reports none is listed as not collected.

Resumable: a page is written, then the cursor moves past it; a run interrupted between the two
pulls the same page again into the same file name. Bounded: at most `max_records` records per
device and stream per run (`--max-records`), in pages of `page` records. A device that cannot
be reached, or whose certificate is wrong, is reported and skipped; the others are collected.
"""

from __future__ import annotations

import http.client
import json
import ssl
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.datafeed import MAX_RECORDS, STREAMS, FeedError, verify_device_cert
from agent.errors import EdgefleetError, UsageError
from agent.fsio import atomic_write

DEFAULT_STREAMS = ("capture", "labels")

__all__ = ["CollectTLS", "Device", "DeviceReport", "collect", "devices_from_inventory",
           "parse_device", "parse_since"]


class CollectError(EdgefleetError):
    """One device could not be collected (unreachable, refused, bad certificate, bad answer)."""


@dataclass(frozen=True)
class Device:
    id: str
    host: str
    port: int


@dataclass(frozen=True)
class CollectTLS:
    ca: Path
    cert: Path  # the controller's certificate (CN = edgefleet-controller)
    key: Path

    def context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        # device certificates are issued for client auth: `verify_device_cert` checks them
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        ctx.load_cert_chain(str(self.cert), str(self.key))
        return ctx


@dataclass
class DeviceReport:
    device: str
    ok: bool = True
    error: str | None = None
    pulled: dict[str, int] = field(default_factory=dict)
    gaps: dict[str, int] = field(default_factory=dict)
    cursors: dict[str, int] = field(default_factory=dict)
    more: dict[str, bool] = field(default_factory=dict)  # the bound stopped it, not the end

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def devices_from_inventory(inventory: Any, selector: Any) -> tuple[list[Device],
                                                                   list[DeviceReport]]:
    """The devices `selector` matches in `inventory` (fleet/inventory.py), at the data feed
    address each reports in its state (`data_feed`); one not-collected report for each that
    reports none."""
    found, missing = [], []
    for d in inventory.select(selector):
        if d.data_feed:
            found.append(parse_device(f"{d.id}={d.data_feed}"))
        else:
            missing.append(DeviceReport(d.id, ok=False, error="its state reports no data feed "
                                        "address (EDGEFLEET_DATA_FEED on the device)"))
    return found, missing


def parse_device(text: str) -> Device:
    """`ID=HOST:PORT` -> Device; raises UsageError."""
    ident, sep, addr = text.partition("=")
    host, _, port = addr.rpartition(":")
    if not sep or not ident or not host or not port.isdigit():
        raise UsageError(f"--device {text!r}: expected ID=HOST:PORT, e.g. box-a=10.0.0.5:9465")
    return Device(ident, host.strip("[]"), int(port))


class _Feed:
    """One device's feed over one TLS connection (reconnects once if the server closed it)."""

    def __init__(self, device: Device, tls: CollectTLS, ca_pem: bytes, timeout: float) -> None:
        self.device, self.tls, self.ca_pem, self.timeout = device, tls, ca_pem, timeout
        self.conn: http.client.HTTPSConnection | None = None

    def _connect(self) -> http.client.HTTPSConnection:
        conn = http.client.HTTPSConnection(self.device.host, self.device.port,
                                           context=self.tls.context(), timeout=self.timeout)
        conn.connect()
        der = conn.sock.getpeercert(binary_form=True)  # type: ignore[union-attr]
        if der is None:
            raise CollectError(f"device {self.device.id}: no certificate presented")
        verify_device_cert(der, self.ca_pem, self.device.id)
        return conn

    def get(self, path: str) -> dict[str, Any]:
        for attempt in (0, 1):
            if self.conn is None:
                self.conn = self._connect()
            try:
                self.conn.request("GET", path)
                resp = self.conn.getresponse()
                body = resp.read(64 << 20)
            except (http.client.HTTPException, ConnectionError) as e:
                self.close()
                if attempt:
                    raise CollectError(f"device {self.device.id}: {e}") from None
                continue
            if resp.status != 200:
                raise CollectError(f"device {self.device.id}: GET {path}: HTTP {resp.status} "
                                   f"{body[:200].decode('utf-8', 'replace')}")
            return json.loads(body)
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, data)


def _load_json(path: Path, default: Any) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return default


def _provenance(info: dict[str, Any], models: dict[int, dict[str, Any]], rec: dict[str, Any]
                ) -> dict[str, Any]:
    model = models.get(rec.get("model", -1)) or {}
    out = {"device": info["device"], "site": info.get("site"), "tester": info.get("tester")}
    if "model" in rec:
        out["digest"] = model.get("digest")
        out["model_version"] = model.get("version")
    return {**out, **rec}


def _logged_at(rec: dict[str, Any]) -> float:
    """When the device logged a record: a label when it arrived, anything else when answered."""
    t = rec.get("received", rec.get("time"))
    return float(t) if isinstance(t, int | float) else 0.0


def parse_since(text: str | None, now: float) -> float | None:
    """`--since`: a duration back from `now` (`90m`, `2h`, `7d`) or an ISO 8601 time (UTC when
    it names no zone) -> Unix time; raises UsageError."""
    import datetime as dt

    from fleet.cli_options import parse_duration

    if text is None:
        return None
    try:
        return now - float(parse_duration(text, "--since") or 0.0)
    except UsageError:
        pass
    try:
        when = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise UsageError(f"--since {text!r}: expected a duration (90m, 2h, 7d) or an ISO 8601 "
                         "time (2026-12-04T21:30:00Z)") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.timestamp()


def collect_device(device: Device, out: Path, tls: CollectTLS, *,
                   streams: Iterable[str] = DEFAULT_STREAMS, max_records: int = 50_000,
                   page: int = 5_000, timeout: float = 15.0,
                   since: float | None = None) -> DeviceReport:
    report = DeviceReport(device.id)
    feed = _Feed(device, tls, Path(tls.ca).read_bytes(), timeout)
    try:
        info = feed.get("/v1/info")
        if info.get("device") != device.id:
            raise CollectError(f"device {device.id}: the feed says it is {info.get('device')!r}")
        _write(out / "devices" / f"{device.id}.json",
                     json.dumps(info, indent=1, sort_keys=True).encode())
        models = {m["index"]: m for m in info.get("models", [])}
        cursor_path = out / "cursors" / f"{device.id}.json"
        cursors: dict[str, int] = _load_json(cursor_path, {})
        for stream in streams:
            pulled, kept, gap, cursor = 0, 0, 0, int(cursors.get(stream, 0))
            while pulled < max_records:
                want = min(page, max_records - pulled, MAX_RECORDS)
                doc = feed.get(f"/v1/stream/{stream}?"
                               + urllib.parse.urlencode({"cursor": cursor, "max_records": want}))
                records = doc.get("records") or []
                gap += int(doc.get("gap") or 0)
                if not records:
                    break
                rows = [_provenance(info, models, r) for r in records
                        if since is None or _logged_at(r) >= since]
                first, last = records[0]["seq"], records[-1]["seq"]
                if rows:
                    body = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in rows)
                    _write(out / stream / device.id / f"{first:020d}-{last:020d}.jsonl",
                           body.encode())
                cursor = int(doc["next"])
                cursors[stream] = cursor
                _write(cursor_path, json.dumps(cursors, sort_keys=True).encode())
                pulled += len(records)
                kept += len(rows)
            report.pulled[stream], report.gaps[stream] = kept, gap
            report.cursors[stream] = cursor
            report.more[stream] = pulled >= max_records
    except (CollectError, FeedError, OSError, ValueError, KeyError) as e:
        report.ok, report.error = False, str(e)
    finally:
        feed.close()
    return report


def collect(devices: Iterable[Device], out: Path, tls: CollectTLS, *,
            streams: Iterable[str] = DEFAULT_STREAMS, max_records: int = 50_000,
            page: int = 5_000, timeout: float = 15.0,
            since: float | None = None) -> list[DeviceReport]:
    """Collect every device in turn (one failing does not stop the others); `since`: only
    records logged at or after that Unix time."""
    streams = tuple(streams)
    for s in streams:
        if s not in STREAMS:
            raise UsageError(f"unknown stream {s!r}", hint=f"one of {', '.join(STREAMS)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    return [collect_device(d, out, tls, streams=streams, max_records=max_records, page=page,
                           timeout=timeout, since=since) for d in devices]
