"""A slow artifact server never freezes a device (real Mosquitto, the real artifact server
trickling one byte every 0.5 s, the real install state machine): other commands run while a
download crawls, `rollback` and `shadow-stop` cancel it, a newer install supersedes it, and no
download outlives its command's expiry."""

from __future__ import annotations

import threading
from datetime import timedelta
from pathlib import Path

import pytest

from agent.commands import Command, InstallSpec
from agent.shadow import ShadowHost, ShadowScorer
from fleet.artifacts import ArtifactServer
from fleet.transport import FleetController
from tests.broker_fixtures import Box, Broker, FleetKeys, make_box, make_real_bundle

pytestmark = pytest.mark.timeout(90)
TRICKLE = 2.0  # bytes per second: a bundle of some 10 KB would take more than an hour


@pytest.fixture
def ctl(broker: Broker, fleet_keys: FleetKeys):
    c = FleetController(broker.mqtt(), fleet_key=fleet_keys.fleet_key).start()
    yield c
    c.stop()


@pytest.fixture
def box(tmp_path: Path, broker: Broker, fleet_keys: FleetKeys, ctl: FleetController):
    b = make_box(tmp_path / "boxes", broker, fleet_keys,
                 shadow=ShadowHost(ShadowScorer(threaded=False), tmp_path / "shadow"))
    assert ctl.wait_for(lambda c: (c.state("box-1") or {}).get("online"), 10)
    yield b
    b.stop()


def _bundle(tmp_path: Path, keys: FleetKeys, artifacts, seq: int) -> tuple[str, str, int]:
    return artifacts.add(make_real_bundle(tmp_path / f"b{seq}.efb", keys.release_key,
                                          sequence=seq, seed=seq))


def _live(ctl: FleetController, tmp_path: Path, keys: FleetKeys, artifacts, seq: int) -> None:
    url, sha, size = _bundle(tmp_path, keys, artifacts, seq)
    cmd = ctl.install("box-1", url=url, sha256=sha, size=size, sequence=seq, rollout_id="r")
    assert ctl.wait_command(cmd.id, 30)["step"] == "live"


def _crawling(ctl: FleetController, command_id: str) -> threading.Event:
    """Set once the device reports that it started downloading `command_id`."""
    seen = threading.Event()
    ctl.add_listener(lambda kind, dev, doc: kind == "event" and doc.get("command_id")
                     == command_id and doc.get("step") == "downloading" and seen.set())
    return seen


def test_report_now_and_rollback_run_while_a_download_crawls_and_rollback_cancels_it(
        tmp_path: Path, box: Box, ctl: FleetController, fleet_keys: FleetKeys, artifacts):
    _live(ctl, tmp_path, fleet_keys, artifacts, 1)
    _live(ctl, tmp_path, fleet_keys, artifacts, 2)
    assert ctl.wait_for(lambda c: c.state("box-1")["model"]["previous"] is not None, 10)
    v1 = ctl.state("box-1")["model"]["previous"]
    url, sha, size = _bundle(tmp_path, fleet_keys, artifacts, 3)
    artifacts.faults.bytes_per_s = TRICKLE
    sent_before = artifacts.stats.bytes_sent
    crawling = _crawling(ctl, "slow-install")
    ctl.install("box-1", url=url, sha256=sha, size=size, sequence=3, rollout_id="r",
                command_id="slow-install")
    assert crawling.wait(20)

    rep = ctl.report_now("box-1")
    assert ctl.wait_command(rep.id, 20)["step"] == "reported"  # not queued behind it
    assert ctl.wait_for(lambda c: (c.state("box-1")["busy"] or {}).get("command_id")
                        == "slow-install", 10)  # still downloading, and the state says so

    rb = ctl.rollback("box-1", rollout_id="r")
    cancelled = ctl.wait_command("slow-install", 20)
    assert (cancelled["step"], cancelled["reason"]) == ("failed", "cancelled"), cancelled
    assert cancelled["cancelled_by"] == rb.id
    assert ctl.wait_command(rb.id, 30)["step"] == "rolled-back"
    assert ctl.wait_for(lambda c: c.state("box-1")["model"]["active"]["id"] == v1["id"]
                        and c.state("box-1")["busy"] is None, 10)
    assert box.link.wait_idle(20)  # the download really stopped
    assert artifacts.stats.bytes_sent - sent_before < size
    assert [e["step"] for e in ctl.events("slow-install")].count("failed") == 1


def test_a_download_never_outlives_its_command(
        tmp_path: Path, box: Box, ctl: FleetController, fleet_keys: FleetKeys, artifacts):
    url, sha, size = _bundle(tmp_path, fleet_keys, artifacts, 1)
    artifacts.faults.bytes_per_s = TRICKLE
    cmd = ctl.install("box-1", url=url, sha256=sha, size=size, sequence=1, rollout_id="r",
                      ttl=timedelta(seconds=3))
    final = ctl.wait_command(cmd.id, 30)
    assert (final["step"], final["reason"]) == ("failed", "too-slow"), final
    assert "expiry" in final["detail"]
    assert box.installer.store.version_ids() == []


def test_shadow_stop_cancels_a_shadow_download_and_a_new_install_supersedes_one(
        tmp_path: Path, box: Box, ctl: FleetController, fleet_keys: FleetKeys, artifacts):
    _live(ctl, tmp_path, fleet_keys, artifacts, 1)
    url, sha, size = _bundle(tmp_path, fleet_keys, artifacts, 2)
    artifacts.faults.bytes_per_s = TRICKLE
    crawling = _crawling(ctl, "slow-shadow")
    ctl.send(Command.new("shadow", "box-1", id="slow-shadow", rollout_id="r",
                         install=InstallSpec(url, sha, size, 2)))
    assert crawling.wait(20)
    stop = ctl.send(Command.new("shadow-stop", "box-1", id="stop", rollout_id="r"))
    assert (ctl.wait_command("slow-shadow", 20)["reason"], ctl.wait_command(stop.id, 20)["step"]) \
        == ("cancelled", "shadow-stopped")

    crawling = _crawling(ctl, "slow-2")
    ctl.install("box-1", url=url, sha256=sha, size=size, sequence=2, rollout_id="r",
                command_id="slow-2")
    assert crawling.wait(20)
    fast = ArtifactServer(tmp_path / "fast").start()  # the newer install finds a fast server
    try:
        url3, sha3, size3 = _bundle(tmp_path, fleet_keys, fast, 3)
        newer = ctl.install("box-1", url=url3, sha256=sha3, size=size3, sequence=3,
                            rollout_id="r")
        assert ctl.wait_command("slow-2", 20)["reason"] == "cancelled"
        assert ctl.wait_command(newer.id, 30)["step"] == "live"
        assert ctl.wait_for(lambda c: c.state("box-1")["model"]["active"]["digest"] == sha3,
                            10)
    finally:
        fast.stop()
