"""A long-running controller holds nothing per finished rollout (issue 18: every event used to
stay in memory forever, ~14 KB per device per rollout). Sizes of the structures, not RSS: after
two rollouts one after the other, driven in one process over one MQTT connection, no tracked
command, duplicate-filter key, unclaimed event, listener or driver is left. Real Mosquitto,
simulated devices (real device code)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fleet.inventory import open_controller
from fleet.rollout import drive
from tests.broker_fixtures import Broker, FleetKeys
from tests.fleet.rollout_helpers import floor, plan, start_rollout, wait_reporting

pytestmark = [pytest.mark.timeout(90)]


def test_bookkeeping_returns_to_zero_after_each_rollout(tmp_path: Path, broker: Broker,
                                                        fleet_keys: FleetKeys) -> None:
    n = 4
    p = plan(canary="1", waves=(100,), bake_s=0, wave_bake_s=0, shadow=False)  # no bake
    with floor(tmp_path, broker, fleet_keys, n) as fl, \
            open_controller(fl.mqtt, fleet_key=fl.fleet_key, client_id="ctl-b") as ctl:
        wait_reporting(ctl, n)
        empty = ctl.bookkeeping()
        assert empty == {"commands": 0, "seen_events": 0, "orphan_events": 0, "listeners": 0}
        for bundle in ("v2", "v3"):
            rid = start_rollout(fl, ctl, p, bundle)
            row = drive(fl.db, rid, ctl, actor="tester")
            assert row.state == "succeeded", row.reason
            assert ctl.bookkeeping() == empty  # every event was claimed and let go of
        assert set(fl.actives().values()) == {fl.pubs["v3"].digest}
