"""The shadow stage on a simulated floor: canary devices score their live traffic with the
candidate too (real ONNX Runtime, agent/shadow.py through the real device link), the shadow gates
compare the two models on those dies, and nothing ever answers with a candidate before they
pass. Too little evidence pauses; it never passes."""

from __future__ import annotations

from pathlib import Path

import pytest

from fleet.actions import apply
from fleet.rollout import drive, snapshot
from tests.broker_fixtures import Broker, FleetKeys
from tests.fleet.rollout_helpers import (
    NO_BAKE,
    CommandSniffer,
    expected_stages,
    floor,
    plan,
    run_in_process,
)

pytestmark = [pytest.mark.timeout(90), pytest.mark.slow]


def test_candidate_shadows_then_is_promoted_without_a_second_download(
        tmp_path: Path, broker: Broker, fleet_keys: FleetKeys):
    n = 6
    p = plan(canary="3", waves=(100,), shadow_min_dies=300, **NO_BAKE)
    with floor(tmp_path, broker, fleet_keys, n) as fl:
        sniffer = CommandSniffer(fl.mqtt)
        rid, row = run_in_process(fl, p)
        sniffer.close()
        assert row.state == "succeeded", row.reason
        snap = snapshot(fl.db, rid)
        shadow = snap["stages"][0]
        assert (shadow["name"], shadow["state"], shadow["done"]) == ("shadow", "passed", 3)
        ev = shadow["verdict"]["evidence"]
        assert ev["dies"] >= 300 and ev["agree"] / ev["dies"] >= 0.98
        assert {r["gate"].split(">")[0].split("<")[0]: r["verdict"]
                for r in shadow["verdict"]["results"]} == {
            "agreement": "pass", "fail_rate_delta": "pass", "score_psi": "pass"}
        canary = set(expected_stages(p, n)["canary"])
        assert {c["device_id"] for c in sniffer.by_type("shadow")} == canary
        assert len(sniffer.by_type("install")) == n
        assert set(fl.actives().values()) == {fl.pubs["v2"].digest}
        # promotion used the bundle the shadow kept: one download per device in all
        assert fl.artifacts.stats.requests == n
        for d in canary:
            assert fl.sim.devices[d].link.state()["model"]["shadow"] is None


def test_a_candidate_that_disagrees_is_stopped_at_the_shadow_stage(
        tmp_path: Path, broker: Broker, fleet_keys: FleetKeys):
    n = 6
    p = plan(canary="3", shadow_min_dies=300)
    with floor(tmp_path, broker, fleet_keys, n) as fl:
        sniffer = CommandSniffer(fl.mqtt)
        rid, row = run_in_process(fl, p, bundle="bad")
        sniffer.close()
        assert row.state == "failed", row.reason
        assert row.reason.startswith("shadow: gates failed: agreement>=0.98: fail")
        snap = snapshot(fl.db, rid)
        assert snap["stages"][0]["state"] == "failed"
        assert all(s["state"] == "pending" for s in snap["stages"][1:])
        assert sniffer.by_type("install") == []  # no device ever answered with it
        canary = set(expected_stages(p, n)["canary"])
        assert {c["device_id"] for c in sniffer.by_type("shadow-stop")} == canary
        assert set(fl.actives().values()) == {fl.pubs["v1"].digest}
        for d in canary:
            st = fl.sim.devices[d].link.state()
            assert st["model"]["shadow"] is None and st["summary"]["shadow"] is None


def test_too_little_shadow_evidence_pauses_and_never_passes(
        tmp_path: Path, broker: Broker, fleet_keys: FleetKeys):
    n = 4
    p = plan(canary="2", shadow_min_dies=10**7, shadow_timeout_s=1)
    with floor(tmp_path, broker, fleet_keys, n) as fl:
        sniffer = CommandSniffer(fl.mqtt)
        rid, row = run_in_process(fl, p)
        assert row.state == "paused"
        assert "shadow: not enough evidence" in row.reason
        assert "dies scored by the candidate, 10000000 needed before any verdict" in row.reason
        sniffer.sync()  # all that was sent is in
        assert sniffer.by_type("install") == []
        # the operator gives up: rolling back stops the shadows
        assert apply(fl.db, rid, "rollback", "tester")[0]
        from fleet.inventory import open_controller

        with open_controller(fl.mqtt, fleet_key=fl.fleet_key, client_id="ctl-rb") as ctl:
            row = drive(fl.db, rid, ctl, actor="tester")
        sniffer.close()
        assert row.state == "rolled-back", row.reason
        assert len(sniffer.by_type("shadow-stop")) == 2 and sniffer.by_type("rollback") == []
        assert all(d.link.state()["model"]["shadow"] is None for d in fl.sim.devices.values())
