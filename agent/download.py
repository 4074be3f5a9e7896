"""Fetch a bundle over HTTP(S) for an install command: capped, hashed while streaming, resumable.

Nothing about the artifact server is trusted. The signed command states the bundle's exact size
and SHA-256; the download

 1. refuses a response that announces (Content-Length) or delivers more than `size` bytes
    -> `TooLarge` (not retried: the server is serving the wrong thing);
 2. hashes every byte as it arrives; when a transfer breaks off, resumes with `Range` where the
    server allows it (206 with a matching Content-Range), else starts over;
 3. retries connection errors, timeouts and 5xx answers with exponential backoff and jitter
    (`attempts`, `backoff_s` .. `backoff_max_s`), then raises `DownloadFailed`; 4xx answers
    other than 408/429 are final -> `HTTPStatusError`;
 4. checks the complete file against `size` and `sha256` -> `DigestMismatch` (a file pieced
    together from several requests is fetched once more from the start before giving up);
 5. only then renames `<dest>.part` to `dest`: a file under the final name is always verified.

Only the bundle's own verification (signature, member digests) makes it trusted; this step just
guarantees the bytes are the ones the controller signed for.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from agent.errors import EdgefleetError
from agent.wire import Reason

_CHUNK = 64 * 1024
_RANGE_RE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")

__all__ = [
    "DigestMismatch",
    "DownloadCancelled",
    "DownloadConfig",
    "DownloadError",
    "DownloadFailed",
    "HTTPStatusError",
    "TooLarge",
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


@dataclass(frozen=True)
class DownloadConfig:
    """Timeouts and retries (env: EDGEFLEET_DOWNLOAD_TIMEOUT_S, EDGEFLEET_DOWNLOAD_ATTEMPTS)."""

    timeout_s: float = 15.0  # connect and per-read socket timeout
    attempts: int = 6  # tries in total, counting resumes after a broken transfer
    backoff_s: float = 0.5  # first wait between tries, doubled each time
    backoff_max_s: float = 30.0
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
) -> Path:
    """Fetch `url` to `dest` (see the module docstring). Returns `dest`. Raises a
    `DownloadError` subclass; `<dest>.part` is left for a later resume only after a transient
    failure."""
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    context = _ssl_context(config) if url.startswith("https://") else None
    delay = config.backoff_s
    last_error = "no attempt made"
    fresh_retry_done = False
    state = _Partial.open(part, size)
    for attempt in range(1, max(config.attempts, 1) + 1):
        if cancel is not None and cancel.is_set():
            raise DownloadCancelled(f"download of {url} cancelled")
        try:
            _fetch(url, state, size, config.timeout_s, context, progress, cancel)
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
        if attempt < config.attempts:
            wait = min(delay, config.backoff_max_s) * random.uniform(0.5, 1.0)
            if cancel is not None:
                if cancel.wait(wait):
                    raise DownloadCancelled(f"download of {url} cancelled")
            else:
                time.sleep(wait)
            delay *= 2
    raise DownloadFailed(f"{url}: gave up after {config.attempts} attempts: {last_error}",
                         hint="is the artifact server reachable?")


class _Transient(Exception):
    """Worth another try: connection refused or reset, timeout, 5xx, 408, 429."""


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


def _fetch(url: str, state: _Partial, size: int, timeout: float,
           context: ssl.SSLContext | None, progress: Progress | None,
           cancel: threading.Event | None) -> None:
    """One HTTP request, appending to the part file from where it ends (or from byte 0 when the
    server does not resume), hashing as it writes."""
    if state.have == size:
        return
    req = urllib.request.Request(url, headers={"User-Agent": "edgefleet-agent"})
    if state.have:
        req.add_header("Range", f"bytes={state.have}-")
    try:
        resp = urllib.request.urlopen(req, timeout=timeout, context=context)
    except urllib.error.HTTPError as e:
        e.close()
        if e.code == 416 and state.have:  # our partial file is useless to this server
            state.reset()
            raise _Transient("HTTP 416 for a resume; starting over") from None
        if e.code >= 500 or e.code in (408, 429):
            raise _Transient(f"HTTP {e.code} {e.reason}") from None
        raise HTTPStatusError(f"{url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        raise _Transient(f"cannot reach {url}: {getattr(e, 'reason', e)}") from None
    with resp:
        if state.have and resp.status == 206:
            m = _RANGE_RE.match(resp.headers.get("Content-Range", ""))
            if not m or int(m.group(1)) != state.have:
                state.reset()
                raise _Transient("server answered a resume with a different range")
            mode, state.resumed = "ab", True
        else:
            state.reset()  # 200: the server sends the whole file
            mode = "wb"
        announced = resp.headers.get("Content-Length")
        if announced is not None and announced.isdigit() \
                and state.have + int(announced) > size:
            total = state.have + int(announced)
            state.reset()
            raise TooLarge(f"{url}: server announces {total} bytes, the command allows {size}")
        try:
            with open(state.path, mode) as out:
                while True:
                    if cancel is not None and cancel.is_set():
                        raise DownloadCancelled(f"download of {url} cancelled")
                    chunk = resp.read(min(_CHUNK, size + 1 - state.have))
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
        except Exception as e:  # OSError, timeouts, http.client.IncompleteRead
            raise _Transient(f"transfer of {url} broke off at {state.have} bytes: {e}") from None


def _ssl_context(config: DownloadConfig) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(config.ca_file) if config.ca_file else None)
    if config.cert_file:
        ctx.load_cert_chain(str(config.cert_file),
                            str(config.key_file) if config.key_file else None)
    return ctx
