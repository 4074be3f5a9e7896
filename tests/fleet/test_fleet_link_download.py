"""The bundle download against the real artifact server: capped by the signed size, hashed
while streaming, resumed where the server allows, retried with backoff, never left half-visible."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from pathlib import Path

import pytest

from agent.download import (
    DigestMismatch,
    DownloadConfig,
    DownloadFailed,
    HTTPStatusError,
    TooLarge,
    download,
)
from fleet.artifacts import ArtifactServer

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
    while srv.stats.bytes_sent < 50_000:  # wait for the transfer to be under way
        time.sleep(0.01)
    srv.stop()  # the artifact server goes away mid-download ...
    srv.faults.bytes_per_s = None
    srv.start()  # ... and comes back on the same port
    t.join(20)
    assert result and Path(result[0]).read_bytes() == DATA
    assert srv.stats.range_requests >= 1  # resumed, not restarted
