"""A minimal content-addressed artifact server: `GET /sha256/<hex>` serves the file whose SHA-256
is `<hex>`, with `Range` (resume), `HEAD` and `Content-Length`. Devices trust none of it: the
signed install command pins size and digest, and the bundle carries its own signature.

    <root>/sha256/<64 hex>     the artifacts, named by their digest, written atomically

For tests and small floors; a real deployment may serve the same layout from any web server.
`faults` lets tests make the server slow, cut transfers off, or answer with an error.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import shutil
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from agent.fsio import atomic_write

_PATH_RE = re.compile(r"^/sha256/([0-9a-f]{64})$")
_RANGE_RE = re.compile(r"^bytes=(\d+)-(\d*)$")
_CHUNK = 64 * 1024

__all__ = ["ArtifactServer", "Faults", "Published", "Stats", "add_artifact", "find_published",
           "list_published", "publish"]


@dataclass
class Stats:
    """Counters over the server's life (kept across stop/start)."""

    requests: int = 0
    range_requests: int = 0
    bytes_sent: int = 0


@dataclass
class Faults:
    """Fault injection, read on every request (change the fields while the server runs)."""

    bytes_per_s: float | None = None  # throttle every response body
    cut_after: int | None = None  # close the connection after this many body bytes ...
    cut_count: int = 0  # ... for this many more responses (then serve normally)
    status: int | None = None  # answer every request with this HTTP status instead
    no_range: bool = False  # ignore Range headers (always 200 with the whole file)


def add_artifact(root: Path, src: Path | bytes) -> str:
    """Copy a file (or bytes) into the store under its SHA-256; returns the digest."""
    root = Path(root)
    (root / "sha256").mkdir(parents=True, exist_ok=True)
    if isinstance(src, bytes):
        digest = hashlib.sha256(src).hexdigest()
        atomic_write(root / "sha256" / digest, src)
        return digest
    h = hashlib.sha256()
    with open(src, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    digest = h.hexdigest()
    target = root / "sha256" / digest
    if not target.exists():
        tmp = target.with_name(f".{digest}.tmp")
        shutil.copyfile(src, tmp)
        tmp.replace(target)
    return digest


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def setup(self) -> None:
        super().setup()
        with self.server.lock:
            self.server.connections.add(self.connection)

    def finish(self) -> None:
        with self.server.lock:
            self.server.connections.discard(self.connection)
        with contextlib.suppress(OSError):
            super().finish()

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def _serve(self, *, body: bool) -> None:
        faults = self.server.faults
        stats = self.server.stats
        with self.server.lock:
            stats.requests += 1
            if self.headers.get("Range"):
                stats.range_requests += 1
        if faults.status is not None:
            self._error(faults.status)
            return
        m = _PATH_RE.match(self.path.split("?", 1)[0])
        path = self.server.root / "sha256" / m.group(1) if m else None
        if path is None or not path.is_file():
            self._error(404)
            return
        size = path.stat().st_size
        start, end, status = 0, size - 1, 200
        rng = self.headers.get("Range")
        if rng and not faults.no_range:
            r = _RANGE_RE.match(rng.strip())
            if not r or int(r.group(1)) >= size:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            start = int(r.group(1))
            end = min(int(r.group(2)), size - 1) if r.group(2) else size - 1
            status = 206
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(end - start + 1))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        if not body:
            return
        cut = None
        with self.server.lock:
            if faults.cut_after is not None and faults.cut_count > 0:
                faults.cut_count -= 1
                cut = faults.cut_after
        sent = 0
        with open(path, "rb") as f:
            f.seek(start)
            remaining = end - start + 1
            while remaining > 0:
                n = min(_CHUNK, remaining)
                if faults.bytes_per_s:
                    n = max(1, min(n, int(faults.bytes_per_s / 20)))
                if cut is not None:
                    n = min(n, cut - sent)
                    if n <= 0:
                        self.close_connection = True
                        return
                chunk = f.read(n)
                try:
                    self.wfile.write(chunk)
                except (BrokenPipeError, ConnectionResetError):
                    return
                sent += len(chunk)
                remaining -= len(chunk)
                stats.bytes_sent += len(chunk)
                if faults.bytes_per_s:
                    time.sleep(len(chunk) / faults.bytes_per_s)

    def _error(self, code: int) -> None:
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256

    def __init__(self, addr: tuple[str, int], root: Path, faults: Faults, stats: Stats) -> None:
        self.root = root
        self.faults = faults
        self.stats = stats
        self.lock = threading.Lock()
        self.connections: set[socket.socket] = set()
        super().__init__(addr, _Handler)

    def drop_connections(self) -> None:
        """Cut every open transfer (the server went away mid-download)."""
        with self.lock:
            conns = list(self.connections)
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)


class ArtifactServer:
    """`with ArtifactServer(root) as srv: srv.url_for(digest)`. Port 0 picks a free port; `stop`
    then `start` again reuses the same port (an artifact server that goes away and comes back).
    With `ssl_context`, serves HTTPS."""

    def __init__(self, root: Path, *, host: str = "127.0.0.1", port: int = 0,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.root = Path(root)
        (self.root / "sha256").mkdir(parents=True, exist_ok=True)
        self.host, self.port = host, port
        self.ssl_context = ssl_context
        self.faults = Faults()
        self.stats = Stats()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        scheme = "https" if self.ssl_context else "http"
        return f"{scheme}://{self.host}:{self.port}"

    def url_for(self, digest: str) -> str:
        return f"{self.base_url}/sha256/{digest}"

    def add(self, src: Path | bytes) -> tuple[str, str, int]:
        """Store an artifact; returns (url, sha256, size) as an install command wants them."""
        digest = add_artifact(self.root, src)
        return self.url_for(digest), digest, (self.root / "sha256" / digest).stat().st_size

    @property
    def requests(self) -> int:
        return self.stats.requests

    def start(self) -> ArtifactServer:
        server = _Server((self.host, self.port), self.root, self.faults, self.stats)
        if self.ssl_context is not None:
            server.socket = self.ssl_context.wrap_socket(server.socket, server_side=True)
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="artifact-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server.drop_connections()
            self._server = None
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __enter__(self) -> ArtifactServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- publishing (fleet publish) ----------------------------------------------------------------
#
#     <root>/sha256/<64 hex>       the bundle, named by its SHA-256 (served)
#     <root>/meta/<64 hex>.json    what it is: model name, version, sequence, size, when, who
#     <root>/incoming/             copies being verified (never served)


@dataclass(frozen=True)
class Published:
    """A verified bundle in the artifact store."""

    digest: str
    size: int
    name: str
    version: str
    sequence: int
    published: str  # RFC 3339
    published_by: str
    path: Path

    def to_json(self) -> dict:
        d = dict(self.__dict__)
        d["path"] = str(self.path)
        return d


def publish(root: Path, bundle: Path, keyring, *, who: str = "unknown") -> Published:
    """Verify `bundle` exactly as a device does (`agent.bundle.verify_bundle` against the
    device keyring: size limits, canonical archive, release signature, every file's digest,
    expiry, format), then place it in the store under its SHA-256.

    The bytes verified are the bytes stored: the bundle is first copied into `incoming/`
    (hashed while copying), the copy is verified, then renamed into `sha256/`. Publishing the
    same bundle twice is a no-op that returns the same record. Raises the `BundleError` of the
    first check that fails."""
    import json
    import os
    import uuid

    from agent.bundle import verify_bundle
    from agent.errors import EdgefleetError
    from agent.manifest import format_time, utc_now

    root = Path(root)
    for d in ("sha256", "meta", "incoming"):
        (root / d).mkdir(parents=True, exist_ok=True)
    tmp = root / "incoming" / f"{uuid.uuid4().hex}.efb"
    h = hashlib.sha256()
    try:
        with open(bundle, "rb") as src, open(tmp, "wb") as dst:
            while chunk := src.read(1 << 20):
                h.update(chunk)
                dst.write(chunk)
            dst.flush()
            os.fsync(dst.fileno())
        try:
            manifest = verify_bundle(tmp, keyring)
        except EdgefleetError as e:  # name the file the user gave, not our copy of it
            e.message = e.message.replace(str(tmp), str(bundle))
            raise
        digest = h.hexdigest()
        target = root / "sha256" / digest
        if target.exists():
            tmp.unlink()
        else:
            tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)
    meta_path = root / "meta" / f"{digest}.json"
    if meta_path.exists():
        return find_published(root, digest)
    meta = {"digest": digest, "size": target.stat().st_size, "name": manifest.name,
            "version": manifest.version, "sequence": manifest.sequence,
            "published": format_time(utc_now()), "published_by": who}
    atomic_write(meta_path, json.dumps(meta, indent=1).encode())
    return Published(**meta, path=target)


def find_published(root: Path, ref: str) -> Published:
    """The published bundle named by `ref`: a SHA-256 (`sha256:` optional) or a unique prefix
    of at least 8 hex digits. Raises `EdgefleetError` if there is none (or several)."""
    import json

    from agent.errors import EdgefleetError, UsageError

    root = Path(root)
    want = ref.removeprefix("sha256:").lower()
    if not re.fullmatch(r"[0-9a-f]{8,64}", want):
        raise UsageError(f"bundle {ref!r}: no such file, and not the SHA-256 of a published "
                         "bundle", hint="give a bundle file or sha256:<digest>")
    found = sorted(p for p in (root / "meta").glob(f"{want}*.json")) \
        if (root / "meta").is_dir() else []
    if not found:
        raise UsageError(f"bundle {ref!r}: no published bundle with that SHA-256 in {root}",
                         hint="publish it first: edgefleet fleet publish FILE")
    if len(found) > 1:
        raise UsageError(f"bundle {ref!r}: {len(found)} published bundles start with that; "
                         "give more digits")
    meta = json.loads(found[0].read_text())
    path = root / "sha256" / meta["digest"]
    if not path.is_file():
        raise EdgefleetError(f"bundle {ref!r}: {path} is missing from the artifact store")
    return Published(**meta, path=path)


def list_published(root: Path) -> list[Published]:
    import json

    metas = sorted((Path(root) / "meta").glob("*.json")) if (Path(root) / "meta").is_dir() \
        else []
    out = []
    for m in metas:
        doc = json.loads(m.read_text())
        out.append(Published(**doc, path=Path(root) / "sha256" / doc["digest"]))
    # oldest first; `published` has whole seconds, so bundles published within one second
    # are ordered by model and sequence (publish order for one model), not by file name
    return sorted(out, key=lambda p: (p.published, p.name, p.sequence))
