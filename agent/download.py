"""Fetch a bundle over HTTP(S) for an install command: capped, hashed while streaming, resumable,
bounded in time, cancellable.

Nothing about the artifact server is trusted. The signed command states the bundle's exact size
and SHA-256; the download

 1. follows redirects only within the origin of the command's URL (same scheme, host and port;
    so never https -> http), at most MAX_REDIRECTS -> `RedirectRefused` (not retried);
 2. refuses a response that announces (Content-Length) or delivers more than `size` bytes
    -> `TooLarge` (not retried: the server is serving the wrong thing);
 3. hashes every byte as it arrives; when a transfer breaks off, resumes with `Range` where the
    server allows it (206 with a matching Content-Range), else starts over;
 4. retries connection errors, timeouts and 5xx answers with exponential backoff and jitter
    (`attempts`, `backoff_s` .. `backoff_max_s`), then raises `DownloadFailed`; 4xx answers
    other than 408/429 are final -> `HTTPStatusError`;
 5. ends by an overall deadline, retries and waits included: `grace_s + size / min_rate_bps`
    after it started, and never later than the caller's `deadline` (the command's expiry)
    -> `TooSlow`; a server trickling a byte now and then cannot hold a device for ever;
 6. stops at once when `cancel` is set (a rollback, shadow-stop or newer install arrived, or
    the agent is stopping) -> `DownloadCancelled`. For 5 and 6 a watchdog thread shuts the
    connection's socket down, so a read blocked on a silent server returns right away;
 7. checks the complete file against `size` and `sha256` -> `DigestMismatch` (a file pieced
    together from several requests is fetched once more from the start before giving up);
 8. only then renames `<dest>.part` to `dest`: a file under the final name is always verified.

Only the bundle's own verification (signature, member digests) makes it trusted; this step just
guarantees the bytes are the ones the controller signed for.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import random
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin, urlsplit

from agent.errors import EdgefleetError
from agent.wire import Reason

_CHUNK = 64 * 1024
_RANGE_RE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")
_REDIRECTS = (301, 302, 303, 307, 308)
_WATCH_S = 0.1  # how often the watchdog looks at the cancel flag
MAX_REDIRECTS = 5

__all__ = [
    "MAX_REDIRECTS",
    "Cancel",
    "DigestMismatch",
    "DownloadCancelled",
    "DownloadConfig",
    "DownloadError",
    "DownloadFailed",
    "HTTPStatusError",
    "RedirectRefused",
    "TooLarge",
    "TooSlow",
    "download",
]


class DownloadError(EdgefleetError):
    """A bundle could not be fetched. `reason` is a stable code for device events."""

    reason = Reason.DOWNLOAD_FAILED


class TooLarge(DownloadError):
    reason = Reason.TOO_LARGE


class DigestMismatch(DownloadError):
    reason = Reason.DIGEST_MISMATCH


class HTTPStatusError(DownloadError):
    reason = Reason.HTTP_ERROR


class DownloadFailed(DownloadError):
    reason = Reason.DOWNLOAD_FAILED


class DownloadCancelled(DownloadError):
    reason = Reason.CANCELLED


class TooSlow(DownloadError):
    """The overall deadline passed: minimum rate, or the command's expiry."""

    reason = Reason.TOO_SLOW


class RedirectRefused(DownloadError):
    """A redirect to another origin (scheme, host, port), or too many redirects."""

    reason = Reason.REDIRECT_REFUSED


@dataclass(frozen=True)
class DownloadConfig:
    """Timeouts, retries and the overall deadline (env: EDGEFLEET_DOWNLOAD_TIMEOUT_S,
    EDGEFLEET_DOWNLOAD_ATTEMPTS, EDGEFLEET_DOWNLOAD_MIN_RATE_BPS, EDGEFLEET_DOWNLOAD_GRACE_S)."""

    timeout_s: float = 15.0  # connect and per-read socket timeout
    attempts: int = 6  # tries in total, counting resumes after a broken transfer
    backoff_s: float = 0.5  # first wait between tries, doubled each time
    backoff_max_s: float = 30.0
    # overall deadline: grace_s + size / min_rate_bps (16 KiB/s: a 10 MiB bundle gets 11 min)
    min_rate_bps: float = 16 * 1024
    grace_s: float = 60.0
    ca_file: Path | None = None  # trust for https:// URLs (None: the system's)
    cert_file: Path | None = None  # client certificate, if the artifact server asks for one
    key_file: Path | None = None

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides) -> DownloadConfig:
        env = dict(os.environ if env is None else env)
        values: dict = {}
        if "EDGEFLEET_DOWNLOAD_TIMEOUT_S" in env:
            values["timeout_s"] = float(env["EDGEFLEET_DOWNLOAD_TIMEOUT_S"])
        if "EDGEFLEET_DOWNLOAD_ATTEMPTS" in env:
            values["attempts"] = int(env["EDGEFLEET_DOWNLOAD_ATTEMPTS"])
        if "EDGEFLEET_DOWNLOAD_MIN_RATE_BPS" in env:
            values["min_rate_bps"] = float(env["EDGEFLEET_DOWNLOAD_MIN_RATE_BPS"])
        if "EDGEFLEET_DOWNLOAD_GRACE_S" in env:
            values["grace_s"] = float(env["EDGEFLEET_DOWNLOAD_GRACE_S"])
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


Progress = Callable[[int, int], None]  # (bytes so far, total)


def download(
    url: str,
    dest: Path,
    *,
    sha256: str,
    size: int,
    config: DownloadConfig = DownloadConfig(),
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
    deadline: float | None = None,
) -> Path:
    """Fetch `url` to `dest` (see the module docstring). `deadline` is a `time.monotonic()`
    value the download must not outlive (the command's expiry). Returns `dest`. Raises a
    `DownloadError` subclass; `<dest>.part` is kept for a later resume after a transient
    failure, a deadline or a cancellation."""
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    context = _ssl_context(config) if url.startswith("https://") else None
    start = time.monotonic()
    by_rate = start + config.grace_s + size / max(config.min_rate_bps, 1.0)
    limit = by_rate if deadline is None else min(deadline, by_rate)
    why = (f"minimum rate {config.min_rate_bps:g} B/s ({limit - start:.0f} s for {size} bytes)"
           if limit == by_rate else "the command's expiry")
    watch = _Watchdog(cancel, limit)
    delay = config.backoff_s
    last_error = "no attempt made"
    fresh_retry_done = False
    state = _Partial.open(part, size)
    try:
        for attempt in range(1, max(config.attempts, 1) + 1):
            watch.check(url, why, state.have, size)
            try:
                _fetch(url, state, size, config.timeout_s, context, progress, watch)
            except _Transient as e:
                last_error = str(e)
            else:
                if state.have == size:
                    got = state.digest.hexdigest()
                    if got == sha256:
                        os.replace(part, dest)
                        return dest
                    resumed = state.resumed
                    state.reset()
                    if not resumed or fresh_retry_done or attempt == config.attempts:
                        raise DigestMismatch(
                            f"{url}: sha256 expected {sha256}, found {got} ({size} bytes)")
                    fresh_retry_done = True  # maybe a bad resume: one clean try from byte 0
                    continue
                last_error = f"transfer ended at {state.have} of {size} bytes"
            watch.check(url, why, state.have, size)  # a fired watchdog is not a transient
            if attempt < config.attempts:
                watch.sleep(min(delay, config.backoff_max_s) * random.uniform(0.5, 1.0))
                delay *= 2
        raise DownloadFailed(f"{url}: gave up after {config.attempts} attempts: {last_error}",
                             hint="is the artifact server reachable?")
    finally:
        watch.close()


class _Transient(Exception):
    """Worth another try: connection refused or reset, timeout, 5xx, 408, 429."""


class Cancel(threading.Event):
    """A cancel flag that also wakes the downloads watching it the moment it is set (a plain
    `threading.Event` works too: the watchdog then looks at it every `_WATCH_S`)."""

    def __init__(self) -> None:
        super().__init__()
        self._listeners: list[Callable[[], object]] = []
        self._listeners_lock = threading.Lock()

    def set(self) -> None:
        super().set()
        with self._listeners_lock:
            listeners = list(self._listeners)
        for fn in listeners:
            fn()

    def listen(self, fn: Callable[[], object]) -> Callable[[], None]:
        """Call `fn` when set (at once if it is); returns the function that stops it."""
        with self._listeners_lock:
            self._listeners.append(fn)
        if self.is_set():
            fn()

        def forget() -> None:
            with self._listeners_lock, contextlib.suppress(ValueError):
                self._listeners.remove(fn)
        return forget


class _Watchdog:
    """Ends a download when `cancel` is set or `deadline` (monotonic) passes, by shutting the
    current connection's socket down: a read blocked on a trickling or silent server then
    returns at once. Runs in its own daemon thread for the download's lifetime."""

    def __init__(self, cancel: threading.Event | None, deadline: float) -> None:
        self.cancel = cancel
        self.deadline = deadline
        self.fired: str | None = None  # "cancelled" | "deadline"
        self._conn: http.client.HTTPConnection | None = None
        self._lock = threading.Lock()
        self._done = threading.Event()  # set by close() and by a `Cancel` being set
        # A `Cancel` wakes the watchdog itself: no polling (a fleet of simulated devices
        # downloading at once would otherwise wake the interpreter hundreds of times a second).
        self._poll = None if isinstance(cancel, Cancel) or cancel is None else _WATCH_S
        self._forget = cancel.listen(self._done.set) if isinstance(cancel, Cancel) else None
        self._thread = threading.Thread(target=self._run, daemon=True, name="download-watch")
        self._thread.start()

    def _run(self) -> None:
        while True:
            if self.cancel is not None and self.cancel.is_set():
                self._fire("cancelled")
                return
            if self._closed:
                return
            left = self.deadline - time.monotonic()
            if left <= 0:
                self._fire("deadline")
                return
            self._done.wait(left if self._poll is None else min(self._poll, left))

    def _fire(self, what: str) -> None:
        with self._lock:
            self.fired = what
            conn = self._conn
        sock = conn.sock if conn is not None else None
        if sock is not None:
            with contextlib.suppress(OSError):  # closed meanwhile
                sock.shutdown(socket.SHUT_RDWR)

    def attach(self, conn: http.client.HTTPConnection | None) -> None:
        with self._lock:
            self._conn = conn
            fired = self.fired
        if fired is not None and conn is not None:
            self._fire(fired)

    def timeout(self, per_read: float) -> float:
        """The socket timeout for the next connection: never past the deadline."""
        return max(0.05, min(per_read, self.deadline - time.monotonic()))

    def check(self, url: str, why: str, have: int, size: int) -> None:
        """Raise if the watchdog fired (or would now)."""
        if self.fired is None and self.cancel is not None and self.cancel.is_set():
            self.fired = "cancelled"
        if self.fired is None and time.monotonic() >= self.deadline:
            self.fired = "deadline"
        if self.fired == "cancelled":
            raise DownloadCancelled(f"download of {url} cancelled at {have} of {size} bytes")
        if self.fired == "deadline":
            raise TooSlow(f"{url}: {have} of {size} bytes when the deadline passed: {why}",
                          hint="is the artifact server overloaded, or the link that slow?")

    def sleep(self, seconds: float) -> None:
        """Back off between tries, waking early for a cancel or the deadline."""
        end = min(time.monotonic() + seconds, self.deadline)
        while (left := end - time.monotonic()) > 0 and self.fired is None:
            if self.cancel is not None and self.cancel.is_set():
                return
            self._done.wait(left if self._poll is None else min(self._poll, left))

    _closed = False

    def close(self) -> None:
        self._closed = True
        if self._forget is not None:
            self._forget()
        self._done.set()
        self.attach(None)
class _Partial:
    """`<dest>.part` and the SHA-256 of the bytes in it, kept in step while streaming."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.digest = hashlib.sha256()
        self.have = 0
        self.resumed = False  # some bytes came from an earlier request

    @classmethod
    def open(cls, path: Path, size: int) -> _Partial:
        """Pick up a part file left by an earlier try (hashing it once), if it can be used."""
        p = cls(path)
        if path.exists() and path.stat().st_size <= size:
            with open(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    p.digest.update(chunk)
                    p.have += len(chunk)
            p.resumed = p.have > 0
        else:
            path.unlink(missing_ok=True)
        return p

    def reset(self) -> None:
        self.path.unlink(missing_ok=True)
        self.digest, self.have, self.resumed = hashlib.sha256(), 0, False


def _origin(url: str) -> tuple[str, str, int]:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    return scheme, (parts.hostname or "").lower(), parts.port or (443 if scheme == "https" else 80)


def _open(url: str, headers: dict[str, str], timeout: float, context: ssl.SSLContext | None,
          watch: _Watchdog) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    """GET `url`, following redirects that stay within its origin (step 1)."""
    origin, target = _origin(url), url
    for _ in range(MAX_REDIRECTS + 1):
        scheme, host, port = _origin(target)
        parts = urlsplit(target)
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        conn: http.client.HTTPConnection = (
            http.client.HTTPSConnection(host, port, timeout=watch.timeout(timeout),
                                        context=context)
            if scheme == "https" else
            http.client.HTTPConnection(host, port, timeout=watch.timeout(timeout)))
        try:
            conn.connect()
            watch.attach(conn)
            conn.request("GET", path, headers=headers)
            resp = conn.getresponse()
        except BaseException:
            conn.close()
            raise
        if resp.status not in _REDIRECTS:
            return conn, resp
        location = resp.getheader("Location") or ""
        resp.close()
        conn.close()
        following = urljoin(target, location)
        if _origin(following) != origin:
            raise RedirectRefused(
                f"{url}: redirected to {following}, another origin than "
                f"{origin[0]}://{origin[1]}:{origin[2]}",
                hint="serve bundles from the URL the command names (a cache in front is fine)")
        target = following
    raise RedirectRefused(f"{url}: more than {MAX_REDIRECTS} redirects")


def _fetch(url: str, state: _Partial, size: int, timeout: float,
           context: ssl.SSLContext | None, progress: Progress | None,
           watch: _Watchdog) -> None:
    """One HTTP request, appending to the part file from where it ends (or from byte 0 when the
    server does not resume), hashing as it writes."""
    if state.have == size:
        return
    headers = {"User-Agent": "edgefleet-agent"}
    if state.have:
        headers["Range"] = f"bytes={state.have}-"
    try:
        conn, resp = _open(url, headers, timeout, context, watch)
    except DownloadError:
        raise
    except (OSError, http.client.HTTPException) as e:
        raise _Transient(f"cannot reach {url}: {e}") from None
    try:
        _receive(url, state, size, resp, progress)
    finally:
        watch.attach(None)
        resp.close()
        conn.close()


def _receive(url: str, state: _Partial, size: int, resp: http.client.HTTPResponse,
             progress: Progress | None) -> None:
    if resp.status >= 400:
        if resp.status == 416 and state.have:  # our partial file is useless to this server
            state.reset()
            raise _Transient("HTTP 416 for a resume; starting over")
        if resp.status >= 500 or resp.status in (408, 429):
            raise _Transient(f"HTTP {resp.status} {resp.reason}")
        raise HTTPStatusError(f"{url}: HTTP {resp.status} {resp.reason}")
    if state.have and resp.status == 206:
        m = _RANGE_RE.match(resp.getheader("Content-Range") or "")
        if not m or int(m.group(1)) != state.have:
            state.reset()
            raise _Transient("server answered a resume with a different range")
        mode, state.resumed = "ab", True
    else:
        state.reset()  # 200: the server sends the whole file
        mode = "wb"
    announced = resp.getheader("Content-Length")
    if announced is not None and announced.isdigit() and state.have + int(announced) > size:
        total = state.have + int(announced)
        state.reset()
        raise TooLarge(f"{url}: server announces {total} bytes, the command allows {size}")
    try:
        with open(state.path, mode) as out:
            while True:
                chunk = resp.read1(min(_CHUNK, size + 1 - state.have))
                if not chunk:
                    break
                if state.have + len(chunk) > size:
                    out.close()
                    state.reset()
                    raise TooLarge(f"{url}: more than the {size} bytes the command allows")
                out.write(chunk)
                state.digest.update(chunk)
                state.have += len(chunk)
                if progress is not None:
                    progress(state.have, size)
            out.flush()
            os.fsync(out.fileno())
    except DownloadError:
        raise
    except Exception as e:  # OSError, timeouts, http.client.IncompleteRead, a shut socket
        raise _Transient(f"transfer of {url} broke off at {state.have} bytes: {e}") from None


def _ssl_context(config: DownloadConfig) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(config.ca_file) if config.ca_file else None)
    if config.cert_file:
        ctx.load_cert_chain(str(config.cert_file),
                            str(config.key_file) if config.key_file else None)
    return ctx
