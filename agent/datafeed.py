"""The data feed: what `edgefleet fleet collect` pulls from a device (captured rows, fails,
labels, predictions), over HTTPS with mutual TLS, read from the prediction log's rings.

    GET /v1/info                                     device, site, tester, models, streams
    GET /v1/stream/<name>?cursor=N&max_records=M     records with seq >= N, oldest first

`name` is one of STREAMS. Answers are JSON: `{"device", "stream", "cursor", "next", "gap",
"records": [...]}`; `next` is the cursor of the following call (resumable: the collector keeps
it), `gap` counts records retention deleted before they were pulled. A capture record carries
its input row as base64 of little-endian float32 (`params_f32`, NaN = not measured). Each answer
is capped at `MAX_RECORDS` records and about `MAX_BYTES` bytes whatever the caller asks.

Authentication, both ways, with the fleet's own PKI (fleet/certs.py, the certificates the MQTT
link already uses: EDGEFLEET_MQTT_CA, EDGEFLEET_MQTT_CERT, EDGEFLEET_MQTT_KEY):
- the device requires a client certificate issued by the fleet CA whose common name is the
  controller's (`CONTROLLER_NAME`, EDGEFLEET_DATA_CLIENT overrides it); anything else gets 403;
- the device presents its own certificate (CN = device id). Those certificates are issued for
  client authentication only, so the collector checks it itself (`verify_device_cert`): issued
  by the CA, within its validity, extended key usage clientAuth, CN = the device it meant to
  reach. The TLS handshake proves the device holds the key.
Captured data therefore only ever leaves a box inside the fleet's TLS boundary, to the
controller's certificate.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import logging
import math
import os
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from agent.errors import EdgefleetError
from agent.predlog import PredictionLog, decode_capture, read_predictions
from agent.segring import read_ring

log = logging.getLogger("edgefleet.agent")

CONTROLLER_NAME = "edgefleet-controller"  # fleet/certs.py issues the controller's cert so
STREAMS = ("capture", "labels", "predictions")
MAX_RECORDS = 10_000
MAX_BYTES = 8 << 20

__all__ = ["CONTROLLER_NAME", "MAX_RECORDS", "STREAMS", "DataFeed", "FeedError",
           "decode_stream_record", "verify_device_cert"]


class FeedError(EdgefleetError):
    """The device's certificate is not what the collector expects."""


def decode_stream_record(stream: str, seq: int, payload: bytes | dict[str, Any]
                         ) -> dict[str, Any]:
    """One record as the JSON the feed sends (a prediction comes decoded from its block)."""
    if stream == "labels":
        out = json.loads(payload)
    elif stream == "capture":
        out, row = decode_capture(payload)
        out["params_f32"] = base64.b64encode(row.astype("<f4").tobytes()).decode("ascii")
    else:
        out = dict(payload)  # type: ignore[arg-type]
    for key in ("score", "threshold", "confidence"):
        v = out.get(key)
        if isinstance(v, float) and not math.isfinite(v):
            out[key] = None  # JSON has no NaN
    out["seq"] = seq
    return out


class DataFeed:
    """The HTTPS server (start/stop, like the agent's other services)."""

    def __init__(self, plog: PredictionLog, host: str, port: int, *, device_id: str,
                 provenance: dict[str, str], cert: Path, key: Path, ca: Path,
                 client_name: str = CONTROLLER_NAME) -> None:
        self.plog = plog
        self.device_id = device_id
        self.provenance = provenance
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(str(cert), str(key))
        ctx.load_verify_locations(str(ca))
        ctx.verify_mode = ssl.CERT_REQUIRED
        self.client_name = client_name
        self.httpd = ThreadingHTTPServer((host, port), _handler(self))
        self.httpd.daemon_threads = True
        self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        self.host, self.port = self.httpd.server_address[:2]
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="data-feed",
                                        kwargs={"poll_interval": 0.2}, daemon=True)

    @classmethod
    def from_env(cls, plog: PredictionLog, addr: str) -> DataFeed:
        """From `data_addr` (HOST:PORT) and the link's settings (device id, labels, TLS)."""
        from agent.errors import UsageError
        from agent.link import LinkConfig

        link = LinkConfig.from_env(data_dir=plog.dir)
        m = link.mqtt
        if m.ca_file is None or m.cert_file is None or m.key_file is None:
            raise UsageError("the data feed needs the device's TLS certificate",
                             hint="set EDGEFLEET_MQTT_CA, EDGEFLEET_MQTT_CERT, EDGEFLEET_MQTT_KEY")
        host, _, port = addr.rpartition(":")
        if not port.isdigit():
            raise UsageError(f"data_addr: expected HOST:PORT, found {addr!r}")
        return cls(plog, host or "0.0.0.0", int(port), device_id=link.device_id,
                   provenance=dict(link.labels), cert=m.cert_file, key=m.key_file,
                   ca=m.ca_file,
                   client_name=os.environ.get("EDGEFLEET_DATA_CLIENT", CONTROLLER_NAME))

    def start(self) -> None:
        self._thread.start()
        log.warning("data feed on https://%s:%d (mTLS, client %s)", self.host, self.port,
                    self.client_name)

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    # -- answers

    def info(self) -> dict[str, Any]:
        rings = {"predictions": self.plog.predictions, "capture": self.plog.capture}
        if self.plog.labels is not None:
            rings["labels"] = self.plog.labels.ring
        return {"device": self.device_id, "labels": self.provenance,
                "site": self.provenance.get("site"), "tester": self.provenance.get("tester"),
                "models": [m.to_json() for m in self.plog.models.models],
                "streams": {k: {"first": r.first_seq(), "next": r.next_seq}
                            for k, r in rings.items()}}

    def stream(self, name: str, cursor: int, max_records: int) -> dict[str, Any]:
        directory = self.plog.dir / name
        limit = min(max_records, MAX_RECORDS)
        if name == "predictions":  # blocks of answers: cut at the limit, resume after it
            batch, items = read_predictions(directory, cursor, limit, MAX_BYTES)
            items = items[:limit]
            nxt = items[-1][0] + 1 if len(items) == limit else batch.next_cursor
            return {"device": self.device_id, "stream": name, "cursor": cursor,
                    "next": nxt, "gap": batch.gap,
                    "records": [decode_stream_record(name, s, p) for s, p in items]}
        batch = read_ring(directory, cursor, limit, MAX_BYTES)
        return {"device": self.device_id, "stream": name, "cursor": cursor,
                "next": batch.next_cursor, "gap": batch.gap,
                "records": [decode_stream_record(name, s, p) for s, p in batch.records]}


def _handler(feed: DataFeed) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "edgefleet-data"

        def do_GET(self) -> None:
            peer = self.connection.getpeercert() or {}
            cn = dict(x[0] for x in peer.get("subject", ())).get("commonName")
            if cn != feed.client_name:
                self._json(403, {"error": f"client {cn!r} may not collect"})
                return
            url = urlsplit(self.path)
            q = parse_qs(url.query)
            try:
                if url.path == "/v1/info":
                    self._json(200, feed.info())
                    return
                parts = url.path.split("/")
                if len(parts) == 4 and parts[:3] == ["", "v1", "stream"] and parts[3] in STREAMS:
                    cursor = int(q.get("cursor", ["0"])[0])
                    limit = int(q.get("max_records", [str(MAX_RECORDS)])[0])
                    if cursor < 0 or limit < 1:
                        raise ValueError("cursor >= 0 and max_records >= 1")
                    self._json(200, feed.stream(parts[3], cursor, limit))
                    return
            except ValueError as e:
                self._json(400, {"error": f"bad query: {e}"})
                return
            self._json(404, {"error": f"try /v1/info or /v1/stream/{{{','.join(STREAMS)}}}"})

        def _json(self, status: int, doc: dict[str, Any]) -> None:
            body = json.dumps(doc, separators=(",", ":")).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args) -> None:
            log.debug("data feed: " + format, *args)

    return Handler


def verify_device_cert(der: bytes, ca_pem: bytes, device_id: str,
                       now: dt.datetime | None = None) -> None:
    """Check the certificate a device presented (DER) against the fleet CA; raise `FeedError`
    naming what is wrong. One level: fleet/certs.py issues device certificates from the CA."""
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    cert = x509.load_der_x509_certificate(der)
    ca = x509.load_pem_x509_certificate(ca_pem)
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as e:
        raise FeedError(f"device {device_id}: certificate not issued by the fleet CA ({e})"
                        ) from None
    now = now or dt.datetime.now(dt.UTC)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise FeedError(f"device {device_id}: certificate not valid now (valid "
                        f"{cert.not_valid_before_utc} .. {cert.not_valid_after_utc})")
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        eku = []
    if ExtendedKeyUsageOID.CLIENT_AUTH not in eku:
        raise FeedError(f"device {device_id}: certificate is not a device certificate "
                        "(no clientAuth usage)")
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    cn = names[0].value if names else None
    if cn != device_id:
        raise FeedError(f"expected device {device_id}, the certificate names {cn!r}")
