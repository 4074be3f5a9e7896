"""The site artifact cache (k3s/overlays/site-example/artifact-cache/default.conf) on Debian's
nginx, in front of the real artifact server (fleet/artifacts.py) standing for the central one:
many devices of a site fetch a bundle with the device's own downloader, at once, some resuming
with a Range request, and the bundle crosses the 'WAN' (the origin) once."""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.download import DownloadConfig, download
from fleet.artifacts import ArtifactServer, add_artifact
from tests.conftest import REPO
from tests.deploy_helpers import http_get, nginx_serving

CONF = REPO / "k3s" / "overlays" / "site-example" / "artifact-cache" / "default.conf"
pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def cache(tmp_path: Path) -> Iterator[tuple[str, ArtifactServer]]:
    """(the cache's URL, the origin) with nginx running the shipped configuration."""
    origin = ArtifactServer(tmp_path / "origin").start()
    try:
        with nginx_serving(tmp_path, CONF, {
                "http://artifacts.central.example:8080": origin.base_url,
                "/var/cache/nginx/artifacts": str(tmp_path / "cache")}) as url:
            yield url, origin
    finally:
        origin.stop()


def test_a_bundle_crosses_the_wan_once_for_many_devices_of_a_site(tmp_path: Path, cache):
    url, origin = cache
    payload = os.urandom(2_000_000)
    digest = add_artifact(origin.root, payload)
    devices = 24
    errors: list[BaseException] = []
    start = threading.Barrier(devices)

    def device(i: int) -> None:
        dest = tmp_path / f"dev-{i}" / "bundle.efb"
        dest.parent.mkdir()
        if i % 4 == 0:  # resuming a transfer cut off earlier: a Range request
            dest.with_name("bundle.efb.part").write_bytes(payload[: 1000 * (i + 1)])
        start.wait()
        try:
            download(f"{url}/sha256/{digest}", dest, sha256=digest, size=len(payload),
                     config=DownloadConfig(attempts=2, timeout_s=30))
            assert hashlib.sha256(dest.read_bytes()).hexdigest() == digest
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=device, args=(i,)) for i in range(devices)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors[:3]
    assert origin.requests == 1  # every device served, one fetch across the WAN
    log = (tmp_path / "access.log").read_text()
    assert log.count(f"GET /sha256/{digest} HTTP/1.1\" 206 ") == devices // 4

    # A second bundle: one more fetch; the first is still served from the cache.
    other = add_artifact(origin.root, os.urandom(50_000))
    for _ in range(3):
        assert http_get(f"{url}/sha256/{other}")[0] == 200
        assert http_get(f"{url}/sha256/{digest}", timeout=10)[0] == 200
    assert origin.requests == 2
    # Nothing but bundles passes through: no listing, no other path, no write.
    for path in (f"/sha256/{'0' * 64}", "/sha256/", "/", f"/sha256/{digest[:10]}"):
        assert http_get(url + path)[0] == 404, path
    assert origin.requests == 3  # the unknown digest was asked of the origin (and not cached)
