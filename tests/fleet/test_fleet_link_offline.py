"""Offline operation: the broker restarts, the artifact server goes away mid-download; the box
keeps answering the tester, finishes (or fails) the install, and reports it when it is back."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from agent.client import Client
from agent.config import AgentConfig
from agent.download import DownloadConfig
from agent.install import InstallConfig, Installer
from agent.link import DeviceLink, LinkConfig
from agent.runtime import Runtime
from agent.server import AgentServer
from fleet.transport import FleetController
from tests.agent_support import wait_for
from tests.broker_fixtures import N_FEATURES, Broker, FleetKeys, make_real_bundle

pytestmark = pytest.mark.timeout(90)
STEPS_OK = ["received", "downloading", "verified", "installing", "self-test", "live"]


class _Tester:
    """A test head: predicts one die after another over the agent's socket, counting answers,
    error answers and latencies, until stopped."""

    def __init__(self, socket_path: Path) -> None:
        self.path = socket_path
        self.latencies: list[float] = []
        self.errors: list[str] = []
        self.versions: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        rng = np.random.default_rng(0)
        with Client(self.path) as c:
            while not self._stop.is_set():
                row = rng.normal(size=N_FEATURES).astype(np.float32)
                t0 = time.perf_counter()
                try:
                    r = c.predict(row)
                except Exception as e:
                    self.errors.append(f"{type(e).__name__}: {e}")
                    continue
                self.latencies.append(time.perf_counter() - t0)
                self.versions.add(str(r.model_version))
                time.sleep(0.001)  # a tester's pace, not a load test

    def __enter__(self) -> _Tester:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


@pytest.fixture
def agent(tmp_path: Path, broker: Broker, fleet_keys: FleetKeys):
    """The serving agent with its install state machine and its fleet link, in one process."""
    runtime = Runtime()
    server = AgentServer(AgentConfig(socket=tmp_path / "agent.sock", metrics_addr=""), runtime)
    installer = Installer.open(tmp_path / "store", fleet_keys.keyring,
                               InstallConfig(latency_rows=10, max_latency_s=None),
                               on_commit=runtime.swap, on_fallback=runtime.enter_fallback)
    installer.start()
    server.start()
    link = DeviceLink(
        LinkConfig("box-1", tmp_path / "link", broker.mqtt(),
                   download=DownloadConfig(timeout_s=2, attempts=30, backoff_s=0.1,
                                           backoff_max_s=0.5)),
        keyring=fleet_keys.keyring, installer=installer).start()
    yield server, installer, link
    link.stop()
    server.stop()
    installer.close()


@pytest.fixture
def ctl(broker: Broker, fleet_keys: FleetKeys):
    c = FleetController(broker.mqtt(), fleet_key=fleet_keys.fleet_key).start()
    yield c
    c.stop()


def _install(ctl: FleetController, url_sha_size: tuple[str, str, int], seq: int):
    url, sha, size = url_sha_size
    return ctl.install("box-1", url=url, sha256=sha, size=size, sequence=seq, rollout_id="r")


def test_broker_restart_during_install_completes_reports_and_never_fails_a_prediction(
        tmp_path: Path, agent, broker: Broker, ctl: FleetController, fleet_keys: FleetKeys,
        artifacts):
    server, installer, link = agent
    v1 = artifacts.add(make_real_bundle(tmp_path / "v1.efb", fleet_keys.release_key,
                                        sequence=1, seed=1))
    assert ctl.wait_command(_install(ctl, v1, 1).id, 20)["step"] == "live"
    v2 = artifacts.add(make_real_bundle(tmp_path / "v2.efb", fleet_keys.release_key,
                                        sequence=2, seed=2))
    artifacts.faults.bytes_per_s = v2[2] / 1.0  # the download takes about a second
    downloading = threading.Event()
    ctl.add_listener(lambda k, d, doc: doc.get("step") == "downloading" and downloading.set())
    with _Tester(server.path) as tester:
        wait_for(lambda: tester.versions)  # the tester is served by v1 before the install
        cmd = _install(ctl, v2, 2)
        assert downloading.wait(10)
        broker.stop()
        assert link.wait_idle(30)  # the install ran to its end with no broker
        assert installer.store.active().startswith("2-")
        broker.start()
        final = ctl.wait_command(cmd.id, 30)
        assert ctl.wait_for(lambda c: (c.state("box-1")["last_command"] or {}).get("id")
                            == cmd.id and c.state("box-1")["online"], 15)
        # answers from v2 too, and a fair number in all, however slow the machine
        wait_for(lambda: "1.2.2" in tester.versions and len(tester.latencies) > 100, 30)
    assert final["step"] == "live" and ctl.steps(cmd.id) == STEPS_OK
    assert ctl.state("box-1")["model"]["active"]["digest"] == v2[1]
    assert tester.errors == []
    assert len(tester.latencies) > 100
    assert tester.versions == {"1.1.1", "1.2.2"}  # served v1, then v2, never nothing


def test_artifact_server_down_mid_download_resumes_when_it_is_back(
        tmp_path: Path, agent, ctl: FleetController, fleet_keys: FleetKeys, artifacts):
    v1 = artifacts.add(make_real_bundle(tmp_path / "v1.efb", fleet_keys.release_key,
                                        sequence=1))
    artifacts.faults.bytes_per_s = v1[2] / 2.0
    cmd = _install(ctl, v1, 1)
    wait_for(lambda: artifacts.stats.bytes_sent >= v1[2] // 4, 30)
    artifacts.stop()
    artifacts.faults.bytes_per_s = None
    artifacts.start()
    assert ctl.wait_command(cmd.id, 30)["step"] == "live"
    assert artifacts.stats.range_requests >= 1


def test_a_download_that_cannot_finish_is_reported_after_the_broker_returns(
        tmp_path: Path, broker: Broker, fleet_keys: FleetKeys, ctl: FleetController,
        artifacts):
    installer = Installer.open(tmp_path / "store2", fleet_keys.keyring,
                               InstallConfig(latency_rows=10, max_latency_s=None))
    installer.start()
    link = DeviceLink(LinkConfig("box-2", tmp_path / "link2", broker.mqtt(),
                                 download=DownloadConfig(timeout_s=1, attempts=3,
                                                         backoff_s=0.2, backoff_max_s=0.2)),
                      keyring=fleet_keys.keyring, installer=installer).start()
    try:
        url, sha, size = artifacts.add(make_real_bundle(tmp_path / "v1.efb",
                                                        fleet_keys.release_key, sequence=1))
        artifacts.stop()  # the artifact server is gone for good
        received = threading.Event()
        ctl.add_listener(lambda k, d, doc: doc.get("step") == "downloading"
                         and received.set())
        cmd = ctl.install("box-2", url=url, sha256=sha, size=size, sequence=1, rollout_id="r")
        assert received.wait(10)
        broker.stop()  # and the broker too, while the device retries
        assert link.wait_idle(20)
        broker.start()
        final = ctl.wait_command(cmd.id, 30)
        assert final["step"] == "failed" and final["reason"] == "download-failed"
        assert "gave up after 3 attempts" in final["detail"]
        assert installer.store.version_ids() == []
    finally:
        link.stop()
        installer.close()
