"""The bundle download against the real artifact server: capped by the signed size, hashed
while streaming, resumed where the server allows, retried with backoff, never left half-visible,
bounded by an overall deadline, cancellable, and kept to the origin the command names."""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from agent.download import (
    DigestMismatch,
    DownloadCancelled,
    DownloadConfig,
    DownloadFailed,
    HTTPStatusError,
    RedirectRefused,
    TooLarge,
    TooSlow,
    download,
)
from fleet.artifacts import ArtifactServer
from tests.agent_support import wait_for

pytestmark = pytest.mark.timeout(30)
FAST = DownloadConfig(timeout_s=2, attempts=4, backoff_s=0.05, backoff_max_s=0.2)
DATA = os.urandom(300_000)
SHA = hashlib.sha256(DATA).hexdigest()


@pytest.fixture
def served(artifacts: ArtifactServer) -> tuple[ArtifactServer, str]:
    url, sha, size = artifacts.add(DATA)
    assert (sha, size) == (SHA, len(DATA))
    return artifacts, url


def test_download_verifies_and_only_then_appears(served, tmp_path: Path):
    _, url = served
    seen = []
    out = download(url, tmp_path / "b.efb", sha256=SHA, size=len(DATA), config=FAST,
                   progress=lambda have, total: seen.append(have))
    assert out.read_bytes() == DATA and not (tmp_path / "b.efb.part").exists()
    assert seen[-1] == len(DATA) and seen == sorted(seen)


def test_a_cut_transfer_resumes_with_range(served, tmp_path: Path):
    srv, url = served
    srv.faults.cut_after, srv.faults.cut_count = 100_000, 1
    download(url, tmp_path / "b.efb", sha256=SHA, size=len(DATA), config=FAST)
    assert srv.stats.requests == 2 and srv.stats.range_requests == 1
    assert srv.stats.bytes_sent == len(DATA)  # nothing was sent twice


def test_without_range_support_the_download_starts_over(served, tmp_path: Path):
    srv, url = served
    srv.faults.cut_after, srv.faults.cut_count, srv.faults.no_range = 100_000, 1, True
    out = download(url, tmp_path / "b.efb", sha256=SHA, size=len(DATA), config=FAST)
    assert out.read_bytes() == DATA
    assert srv.stats.bytes_sent == 100_000 + len(DATA)


def test_more_bytes_than_the_command_allows_are_refused(served, tmp_path: Path):
    srv, url = served
    with pytest.raises(TooLarge, match="allows 1000"):
        download(url, tmp_path / "dl" / "b.efb", sha256=SHA, size=1000, config=FAST)
    assert srv.stats.requests == 1  # not retried
    assert list((tmp_path / "dl").iterdir()) == []


def test_wrong_digest_is_refused_and_nothing_is_left(served, tmp_path: Path):
    srv, url = served
    with pytest.raises(DigestMismatch, match=f"expected {'0' * 64}, found {SHA}"):
        download(url, tmp_path / "dl" / "b.efb", sha256="0" * 64, size=len(DATA), config=FAST)
    assert list((tmp_path / "dl").iterdir()) == [] and srv.stats.requests == 1


def test_not_found_is_final_and_5xx_is_retried(served, tmp_path: Path):
    srv, url = served
    with pytest.raises(HTTPStatusError, match="404"):
        download(url.replace(SHA, "1" * 64), tmp_path / "x", sha256=SHA, size=len(DATA),
                 config=FAST)
    assert srv.stats.requests == 1
    srv.faults.status = 503
    with pytest.raises(DownloadFailed, match="gave up after 4 attempts: HTTP 503"):
        download(url, tmp_path / "b.efb", sha256=SHA, size=len(DATA), config=FAST)
    assert srv.stats.requests == 5


def test_server_down_then_back_is_retried_with_backoff(served, tmp_path: Path):
    srv, url = served
    srv.faults.bytes_per_s = len(DATA) / 1.0  # slow enough to be cut mid-transfer
    cfg = DownloadConfig(timeout_s=2, attempts=20, backoff_s=0.1, backoff_max_s=0.3)
    result: list[object] = []
    t = threading.Thread(target=lambda: result.append(
        download(url, tmp_path / "b.efb", sha256=SHA, size=len(DATA), config=cfg)))
    t.start()
    wait_for(lambda: srv.stats.bytes_sent >= 50_000, 30)  # the transfer is under way
    srv.stop()  # the artifact server goes away mid-download ...
    srv.faults.bytes_per_s = None
    srv.start()  # ... and comes back on the same port
    t.join(20)
    assert result and Path(result[0]).read_bytes() == DATA
    assert srv.stats.range_requests >= 1  # resumed, not restarted


# -- deadline, cancellation, redirects --------------------------------------------------------

SMALL = os.urandom(4000)
SMALL_SHA = hashlib.sha256(SMALL).hexdigest()


def _trickle(srv: ArtifactServer) -> str:
    """A server that sends one byte every 0.5 s (it would take half an hour for SMALL)."""
    url, _, _ = srv.add(SMALL)
    srv.faults.bytes_per_s = 2
    return url


def test_a_trickling_server_cannot_hold_a_download_past_its_minimum_rate(
        artifacts: ArtifactServer, tmp_path: Path):
    url = _trickle(artifacts)
    cfg = DownloadConfig(timeout_s=30, min_rate_bps=4000, grace_s=1.0)  # deadline: 2 s
    with pytest.raises(TooSlow, match=r"minimum rate 4000 B/s") as e:
        download(url, tmp_path / "b.efb", sha256=SMALL_SHA, size=len(SMALL), config=cfg)
    assert e.value.reason == "too-slow"
    assert artifacts.stats.bytes_sent < len(SMALL) and not (tmp_path / "b.efb").exists()


def test_a_download_never_outlives_the_commands_expiry(artifacts: ArtifactServer,
                                                       tmp_path: Path):
    url = _trickle(artifacts)
    with pytest.raises(TooSlow, match="the command's expiry"):
        download(url, tmp_path / "b.efb", sha256=SMALL_SHA, size=len(SMALL),
                 config=DownloadConfig(timeout_s=30), deadline=time.monotonic() + 1.0)


class _Silent:
    """Accepts connections, answers the headers of a 4000-byte body, then sends nothing: only
    the per-read timeout (30 s here) would end a plain read."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/sha256/{SMALL_SHA}"
        self.connected = threading.Event()
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self.sock.accept()
                self.conns.append(conn)
                conn.recv(65536)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 4000\r\n\r\nx")
                self.connected.set()

    def close(self) -> None:
        for c in [*self.conns, self.sock]:
            c.close()


def test_cancel_ends_a_download_blocked_on_a_silent_server_at_once(tmp_path: Path):
    silent = _Silent()
    cancel = threading.Event()
    outcome: list[BaseException] = []

    def run() -> None:
        try:
            download(silent.url, tmp_path / "b.efb", sha256=SMALL_SHA, size=len(SMALL),
                     config=DownloadConfig(timeout_s=30), cancel=cancel)
        except BaseException as e:
            outcome.append(e)

    t = threading.Thread(target=run)
    t.start()
    try:
        assert silent.connected.wait(10)
        cancel.set()
        t.join(10)  # far less than the 30 s read timeout
        assert not t.is_alive(), "the download did not notice the cancel"
        assert isinstance(outcome[0], DownloadCancelled) and outcome[0].reason == "cancelled"
    finally:
        silent.close()


class _Redirector(ThreadingHTTPServer):
    """Answers every GET with a redirect to `location(path)`, or serves SMALL at /data."""

    daemon_threads = True

    def __init__(self, location) -> None:
        self.location = location
        self.requests = 0

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                self.server.requests += 1
                if self.path == "/data":
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(SMALL)))
                    self.end_headers()
                    self.wfile.write(SMALL)
                    return
                self.send_response(302)
                self.send_header("Location", self.server.location(self))
                self.send_header("Content-Length", "0")
                self.end_headers()

        super().__init__(("127.0.0.1", 0), Handler)
        self.port = self.server_address[1]
        threading.Thread(target=self.serve_forever, daemon=True).start()


@pytest.fixture
def redirector():
    servers: list[_Redirector] = []

    def make(location) -> _Redirector:
        servers.append(_Redirector(location))
        return servers[-1]
    yield make
    for s in servers:
        s.shutdown()
        s.server_close()


def test_redirects_are_followed_only_within_the_origin(redirector, served, tmp_path: Path):
    srv, elsewhere = served  # another port on the same host: another origin
    same = redirector(lambda h: "/data")
    out = download(f"http://127.0.0.1:{same.port}/start", tmp_path / "ok.efb",
                   sha256=SMALL_SHA, size=len(SMALL), config=FAST)
    assert out.read_bytes() == SMALL and same.requests == 2

    away = redirector(lambda h: elsewhere)
    with pytest.raises(RedirectRefused, match="another origin") as e:
        download(f"http://127.0.0.1:{away.port}/start", tmp_path / "x.efb", sha256=SHA,
                 size=len(DATA), config=FAST)
    assert e.value.reason == "redirect-refused"
    assert away.requests == 1 and srv.stats.requests == 0  # not retried, never followed

    other_scheme = redirector(lambda h: f"https://127.0.0.1:{h.server.port}/data")
    with pytest.raises(RedirectRefused):
        download(f"http://127.0.0.1:{other_scheme.port}/start", tmp_path / "y.efb",
                 sha256=SMALL_SHA, size=len(SMALL), config=FAST)

    loop = redirector(lambda h: "/again")
    with pytest.raises(RedirectRefused, match="more than 5 redirects"):
        download(f"http://127.0.0.1:{loop.port}/start", tmp_path / "z.efb",
                 sha256=SMALL_SHA, size=len(SMALL), config=FAST)


def test_https_is_never_redirected_to_http(tmp_path: Path, artifacts: ArtifactServer):
    """A real TLS server (the fleet PKI's server certificate) redirecting to plain http on
    the same host: refused."""
    import ssl

    from fleet.certs import init_ca, issue_server

    ca = init_ca(tmp_path / "pki")
    server_cert = issue_server(tmp_path / "pki", tmp_path / "pki")
    plain, _, _ = artifacts.add(SMALL)
    tls = _Redirector(lambda h: plain)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(server_cert.cert), str(server_cert.key))
    tls.socket = ctx.wrap_socket(tls.socket, server_side=True)
    try:
        with pytest.raises(RedirectRefused, match="another origin"):
            download(f"https://127.0.0.1:{tls.port}/start", tmp_path / "b.efb",
                     sha256=SMALL_SHA, size=len(SMALL),
                     config=DownloadConfig(timeout_s=5, attempts=1, ca_file=ca.cert))
        assert tls.requests == 1 and artifacts.stats.requests == 0
    finally:
        tls.shutdown()
        tls.server_close()
