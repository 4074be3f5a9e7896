"""Rollout plans without a broker: validation (each mistake named), which device goes in which
stage, stable command ids, the plan's JSON form, and the rollout database's schema rules."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.errors import UsageError
from fleet.inventory import Device, Inventory
from fleet.rollout import Plan, assign, command_id, parse_amount, plan_targets
from fleet.state import RolloutNotFound, StateDB
from tests.conftest import examples


def _inv(n: int, sites: int = 4) -> Inventory:
    return Inventory(Device.from_state({
        "device_id": f"box-{i:03d}", "online": True, "health": {"status": "ok"},
        "labels": {"site": f"fab{i % sites}", "tester": f"t{i % 7}"}}) for i in range(n))


@pytest.mark.parametrize("kw,message", [
    ({"waves": (10, 50)}, "wave plan 10%,50% does not end at 100%"),
    ({"waves": (50, 10, 100)}, "must grow"),
    ({"waves": (0, 100)}, "is not between 0% and 100%"),
    ({"waves": "10%,x"}, "expected percentages"),
    ({"canary": "0"}, "at least one device"),
    ({"canary": "1.5"}, "whole count"),
    ({"canary": "120%"}, "percentage between"),
    ({"on_failure": "retry"}, "expected pause or rollback"),
    ({"offline": "ignore"}, "expected wait or skip"),
    ({"gates": ("error_rate<=0.01", "error_rate>=0.05")}, "contradictory gates"),
    ({"shadow_gates": ("agreement>=0.99", "agreement<0.9")}, "contradictory shadow gates"),
    ({"gates": ("latency<=5",)}, "unknown metric 'latency'"),
    ({"prom_gates": ("up >= 1",)}, "need --prometheus"),
    ({"prometheus": "ftp://x", "prom_gates": ("up >= 1",)}, "expected http(s)://"),
    ({"shadow_min_dies": 0}, "at least 1 die"),
    ({"step_timeout_s": 0}, "step_timeout_s must be > 0"),
    ({"max_parallel": 0}, "at least 1"),
    ({"selector": "site in (a"}, "unbalanced"),
])
def test_bad_plans_are_refused_naming_the_problem(kw, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Plan(**kw).validate()


def test_plan_json_round_trips_and_refuses_unknown_fields(tmp_path: Path):
    p = Plan(canary="5%", waves=(20, 100), gates=("p99_ms<=3",), spread=("site",))
    assert Plan.from_json(p.to_json()) == p
    f = tmp_path / "plan.json"
    f.write_text('{"canary": "2", "waves": ["25%", "100%"], "bake": 3}')
    with pytest.raises(UsageError, match="unknown field 'bake'"):
        Plan.load(f)
    f.write_text('{"canary": "2", "waves": ["25%", "100%"]}')
    assert Plan.load(f).waves == (25.0, 100.0)


def test_explicit_gates_replace_only_their_metric_default():
    p = Plan(gates=("error_rate<=0.05", "p99_ms<=4"))
    names = [str(g) for g in p.bake_gates]
    assert "error_rate<=0.05" in names and "error_rate<=0.01" not in names
    assert "fallback_rate<=0.01" in names and "p99_ms<=4" in names


def test_stages_canary_spread_then_cumulative_waves():
    stages = assign(Plan(canary="8", waves=(10, 50, 100)).validate(), _inv(100))
    assert [(s.name, s.kind, len(s.devices)) for s in stages] == [
        ("shadow", "shadow", 8), ("canary", "install", 8), ("wave-1", "install", 2),
        ("wave-2", "install", 40), ("wave-3", "install", 50)]
    assert stages[0].devices == stages[1].devices
    inv = _inv(100)
    assert Counter(inv.devices[d].labels["site"] for d in stages[1].devices) == \
        {"fab0": 2, "fab1": 2, "fab2": 2, "fab3": 2}
    everyone = [d for s in stages[1:] for d in s.devices]
    assert sorted(everyone) == sorted(inv.devices) and len(set(everyone)) == 100


def test_percent_canary_rounds_up_and_empty_waves_are_dropped():
    stages = assign(Plan(canary="5%", waves=(1, 100), shadow=False).validate(), _inv(30))
    assert [(s.name, len(s.devices)) for s in stages] == [("canary", 2), ("wave-1", 28)]
    with pytest.raises(UsageError, match="matches only 30 devices"):
        assign(Plan(canary="31").validate(), _inv(30))
    with pytest.raises(UsageError, match="matches no device"):
        assign(Plan(selector="site=mars").validate(), _inv(30))


@settings(max_examples=examples(50), deadline=None)
@given(n=st.integers(1, 60), canary=st.integers(1, 60),
       waves=st.lists(st.integers(1, 99), max_size=4, unique=True))
def test_every_selected_device_is_in_exactly_one_stage(n, canary, waves):
    canary = min(canary, n)
    p = Plan(canary=str(canary), waves=(*sorted(waves), 100)).validate()
    stages, targets = plan_targets(p, _inv(n))
    assert sorted(t["device_id"] for t in targets) == sorted(_inv(n).devices)
    assert len(stages[1].devices) == canary
    assert assign(p, _inv(n)) == stages  # deterministic


def test_command_ids_are_stable_and_valid():
    assert command_id("r-261127-3f9a2c", "box-017", "install") == \
        "r-261127-3f9a2c:box-017:install"
    assert parse_amount("5%", "x") == (5.0, True) and parse_amount("10", "x") == (10.0, False)


def test_state_db_refuses_unknown_rollouts_and_keeps_an_audit(state_target: str):
    db = StateDB(state_target)  # SQLite, PostgreSQL
    with pytest.raises(RolloutNotFound, match="no rollout 'r-x'"):
        db.rollout("r-x")
    db.create(id="r-1", created_by="alice@host", bundle_digest="ab" * 32, bundle_size=10,
              bundle_url="http://x/sha256/ab", model_name="m", model_version="1", sequence=1,
              plan=Plan().to_json(), stages=[("canary", "install", 1)],
              targets=[{"device_id": "d1", "stage": 0}], steps=[("d1", "install", "r-1:d1:i")])
    with pytest.raises(UsageError, match="already exists"):
        db.create(id="r-1", created_by="x", bundle_digest="ab" * 32, bundle_size=10,
                  bundle_url="u", model_name="m", model_version="1", sequence=1, plan={},
                  stages=[], targets=[], steps=[])
    log = db.audit_log("r-1")
    assert [(a["action"], a["actor"]) for a in log] == [("start", "alice@host")]
    assert log[0]["detail"]["bundle_digest"] == "ab" * 32
    # a second process sees it (same store), and the lease keeps a second driver out
    other = StateDB(state_target)
    assert other.rollout("r-1").state == "pending"
    import os
    import socket
    me = f"{socket.gethostname()}:{os.getpid()}:a"
    assert db.acquire("r-1", me) is None
    assert other.acquire("r-1", f"{socket.gethostname()}:{os.getpid()}:b") == me
    db.release("r-1", me)
    assert other.acquire("r-1", f"{socket.gethostname()}:{os.getpid()}:b") is None


def test_a_command_published_while_disconnected_stays_sending_until_the_broker_has_it(
        tmp_path: Path):
    """paho's info for a QoS 1 publish made while the broker was away raises on
    `is_published()` although the message goes out after the reconnect; a full queue means it
    was never queued. Neither may stop the rollout. (A stand-in for FleetController: only
    the driver's bookkeeping is under test.)"""
    import threading

    from fleet.driver import RolloutDriver
    from fleet.rollout import Bundle, NewRollout, create
    from fleet.state import S_PENDING, S_SENDING, S_SENT

    db = StateDB(tmp_path / "r.db")
    rid = create(db, Plan(canary="1", waves=(100,), shadow=False), NewRollout(
        Bundle("ab" * 32, 10, "http://x/sha256/ab", 1, "m", "1"), _inv(2), "tester", "r-1"))

    class Ctl:
        connected = threading.Event()

        def add_listener(self, fn):
            pass

        def orphan_events(self):
            return []

        def state(self, device):
            return None

        state_of = state  # what the driver reads a device's latest state with

    class Info:
        def __init__(self, exc):
            self.exc, self._published = exc, False

        def is_published(self):
            raise self.exc("not connected")

    drv = RolloutDriver(db, rid, Ctl(), "me")
    a, b = (drv.steps[(d, "install")] for d in sorted(drv.targets))
    for step, exc in ((a, RuntimeError), (b, ValueError)):
        step.status, step.sent = S_SENDING, 1.0
        drv._infos[step.command_id] = info = Info(exc)
    drv._acks()
    assert a.status == S_SENDING  # paho sends it once reconnected
    assert b.status == S_PENDING and b.sent is None  # never queued: it goes out again
    info = Info(RuntimeError)
    info._published = True  # the PUBACK came after the reconnect
    drv._infos[a.command_id] = info
    drv._acks()
    assert a.status == S_SENT
