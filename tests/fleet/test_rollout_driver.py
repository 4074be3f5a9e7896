"""The rollout driver (fleet/driver.py) carrying out the decision core's rules end to end, in
milliseconds: a real SQLite state store and the real driver, with the time passed in (the
driver's `clock`) and a scripted fleet in place of the broker. What the rules decide is
tests/fleet/test_rollout_decide.py; here, what the driver makes of them: which commands go
out, how each stage and the rollout end, and the reason an operator reads. A timeout, an
offline wait or a health grace is a step of the test's clock, not a wait.

The scripted fleet stands in for `FleetController` (fleet/transport.py) only: the commands, the
events and the states on the wire are real-broker tests (tests/fleet/test_rollout.py, with the
simulator; test_rollout_agents.py, with real agents)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent.commands import Command
from fleet.driver import Bundle, RolloutDriver
from fleet.inventory import Device, Inventory
from fleet.rollout import NewRollout, Plan, assign, create
from fleet.state import StateDB

NEW, OLD = "ab" * 32, "cd" * 32
BUNDLE = Bundle(NEW, 10, "http://artifacts/sha256/" + NEW, 2, "m", "2")


class _Acked:
    """paho's message info for a command the broker took at once."""

    @staticmethod
    def is_published() -> bool:
        return True


class ScriptedFleet:
    """The devices as the driver sees them: their latest states, their events, and what was
    published to them. Each device answers a command as its behaviour says, when the test
    calls `answer()`: "ok" (goes live, healthy), "fail" (os-error), "silent" (never answers),
    "sick" (goes live in fallback), "offline" (not connected), "rolled back by hand" (runs the
    old model whatever its retained state said)."""

    def __init__(self, n: int, clock: Callable[[], float],
                 behaviour: dict[str, str] | None = None) -> None:
        self.clock = clock
        self.behaviour = behaviour or {}
        self.connected = threading.Event()
        self.connected.set()
        self.devices = [f"box-{i:02d}" for i in range(n)]
        self.states = {d: self._doc(d, OLD) for d in self.devices}
        self.sent: list[Command] = []
        self._queue: list[Command] = []
        self._listeners: list[Callable[[str, str, dict[str, Any]], None]] = []
        self._seq = 0

    def _doc(self, d: str, active: str, health: str = "ok") -> dict[str, Any]:
        i = self.devices.index(d)
        return {"device_id": d, "online": self.behaviour.get(d) != "offline",
                "labels": {"site": f"s{i % 2}"}, "_received": self.clock(),
                "model": {"active": {"digest": active, "version": "2" if active == NEW
                                     else "1"}},
                "health": {"status": health,
                           "reason": "model error" if health != "ok" else None},
                "summary": {"requests": 100}}

    def inventory(self) -> Inventory:
        return Inventory(Device.from_state(s) for s in self.states.values())

    # -- what the driver calls (FleetController's interface) -------------------------------

    def add_listener(self, fn: Callable[[str, str, dict[str, Any]], None]) -> None:
        self._listeners.append(fn)

    def orphan_events(self) -> list[dict[str, Any]]:
        return []

    def remove_listener(self, fn: Callable[[str, str, dict[str, Any]], None]) -> None:
        self._listeners.remove(fn)

    def state(self, device: str) -> dict[str, Any] | None:
        return self.states.get(device)

    state_of = state  # the latest state itself (a new dict replaces it on every change)

    def publish(self, cmd: Command, track: bool = True) -> _Acked:
        self.sent.append(cmd)
        self._queue.append(cmd)
        return _Acked()

    # -- the devices ---------------------------------------------------------------------

    def answer(self) -> None:
        """Every device that got a command answers it (or not) as its behaviour says."""
        queue, self._queue = self._queue, []
        for cmd in queue:
            d, how = cmd.device_id, self.behaviour.get(cmd.device_id, "ok")
            if how in ("silent", "offline"):
                continue
            if how == "fail":
                self._event(cmd, "failed", reason="os-error", detail="disk full")
                continue
            active = self.states[d]["model"]["active"]["digest"]
            step = {"install": "live", "rollback": "rolled-back",
                    "report-now": "reported"}[cmd.type]
            active = {"install": NEW, "rollback": OLD}.get(cmd.type, active)
            if how == "rolled back by hand":  # its retained state is older than that
                active = NEW if cmd.type == "install" else OLD
            self.states[d] = self._doc(d, active, "fallback" if how == "sick" else "ok")
            self.states[d]["last_command"] = {"id": cmd.id, "result": step}
            for fn in self._listeners:
                fn("state", d, self.states[d])
            self._event(cmd, step)

    def _event(self, cmd: Command, step: str, **kw: Any) -> None:
        self._seq += 1
        doc = {"device_id": cmd.device_id, "boot": "b", "seq": self._seq,
               "command_id": cmd.id, "rollout_id": cmd.rollout_id, "type": cmd.type,
               "step": step, **kw}
        for fn in self._listeners:
            fn("event", cmd.device_id, doc)

    def installs(self) -> set[str]:
        return {c.device_id for c in self.sent if c.type == "install"}


class Clock:
    def __init__(self) -> None:
        import time

        self.now = time.time()  # the rollout's creation time is real; from there, ours

    def __call__(self) -> float:
        return self.now


def run(tmp_path: Path, n: int, behaviour: dict[str, str] | None = None, *,
        step_s: float = 1.0, max_rounds: int = 2000,
        before: Callable[[ScriptedFleet], None] | None = None, **plan: Any):
    """Create and drive a rollout to where it stops needing a driver; the clock moves
    `step_s` per round; `before` sets the fleet up first. Returns (db, rollout id, fleet)."""
    clock = Clock()
    fleet = ScriptedFleet(n, clock, behaviour)
    if before is not None:
        before(fleet)
    db = StateDB(tmp_path / "rollouts.db")
    p = Plan(**{"shadow": False, "bake_s": 0, "wave_bake_s": 0, "step_timeout_s": 30,
                "health_grace_s": 5, "offline_wait_s": 20, "max_parallel": 50, **plan})
    rid = create(db, p, NewRollout(BUNDLE, fleet.inventory(), "tester", "r-1"))
    assert db.acquire(rid, "test") is None  # the driver's writes are fenced by this lease
    driver = RolloutDriver(db, rid, fleet, owner="test", clock=clock)  # type: ignore[arg-type]
    for _ in range(max_rounds):
        if not driver.tick():
            break
        fleet.answer()
        clock.now += step_s
    else:
        raise AssertionError(f"still driving after {max_rounds} rounds: {db.rollout(rid)}")
    driver.flush()
    return db, rid, fleet


def planned(n: int, **plan: Any) -> dict[str, tuple[str, ...]]:
    """Which device lands in which stage (it depends only on ids and labels)."""
    p = Plan(**{"shadow": False, **plan})
    return {s.name: s.devices for s in assign(p, ScriptedFleet(n, Clock()).inventory())}


def _stages(db: StateDB, rid: str) -> list[tuple[str, int, str]]:
    return [(s.name, s.devices, s.state) for s in db.stages(rid)]


def test_a_healthy_fleet_succeeds_stage_by_stage_one_command_each(tmp_path: Path):
    db, rid, fleet = run(tmp_path, 10, canary="2", waves=(50, 100))
    assert db.rollout(rid).state == "succeeded"
    assert _stages(db, rid) == [("canary", 2, "passed"), ("wave-1", 3, "passed"),
                                ("wave-2", 5, "passed")]
    assert sorted(c.device_id for c in fleet.sent) == fleet.devices


def test_over_budget_stops_the_rollout_where_it_is_and_rolls_back(tmp_path: Path):
    """The old broker test (60 simulated devices, 5% budget): 3 failures in a wave whose
    budget is 1 fail it; no later wave gets a command; what moved goes back."""
    stages = planned(20, canary="2", waves=(50, 100))
    bad = sorted(stages["wave-1"])[:3]
    db, rid, fleet = run(tmp_path, 20, dict.fromkeys(bad, "fail"), canary="2",
                         waves=(50, 100), max_failures="5%", on_failure="rollback")
    row = db.rollout(rid)
    assert row.state == "rolled-back", row.reason
    assert row.reason.startswith("wave-1: 3 of 8 devices failed, budget 0: ")
    assert not fleet.installs() & set(stages["wave-2"])
    assert {c.device_id for c in fleet.sent if c.type == "rollback"} == \
        fleet.installs() - set(bad)
    assert {s["model"]["active"]["digest"] for s in fleet.states.values()} == {OLD}


def test_within_budget_the_end_is_paused_naming_who_was_left_behind(tmp_path: Path):
    """Issue 14: "wave-1, whose only device failed, shows passed" and the rollout said
    SUCCEEDED with a device on the old model. A stage with a failure is `partial`; the end
    is paused, naming the device and what to run next; timeouts count as failures."""
    db, rid, _ = run(tmp_path, 6, {"box-05": "fail", "box-04": "silent"}, canary="1",
                         waves=(100,), max_failures="50%")
    row = db.rollout(rid)
    assert row.state == "paused", row.reason
    assert row.reason.startswith("2 of 6 devices do not run the bundle: ")
    assert "box-05 (failed: failed)" in row.reason and "box-04 (timeout" in row.reason
    assert f"next: edgefleet fleet rollout retry {rid}" in row.reason
    assert [s for _, _, s in _stages(db, rid)] == ["passed", "partial"]
    steps = {s.device_id: s for s in db.steps(rid)}
    assert (steps["box-05"].status, steps["box-05"].reason) == ("failed", "os-error")
    assert (steps["box-04"].status, steps["box-04"].reason) == ("timeout", "timeout")
    # with --allow-partial, the same fleet ends succeeded, the left-behind listed
    db2, rid2, _ = run(tmp_path / "partial", 6, {"box-05": "fail"}, canary="1", waves=(100,),
                       max_failures="50%", allow_partial=True)
    assert db2.rollout(rid2).state == "succeeded"
    assert "box-05" in (db2.rollout(rid2).reason or "")


def test_a_device_live_but_unhealthy_past_the_grace_has_failed(tmp_path: Path):
    (sick,) = planned(4, canary="1", waves=(100,))["canary"]
    db, rid, fleet = run(tmp_path, 4, {sick: "sick"}, canary="1", waves=(100,))
    row = db.rollout(rid)
    assert row.state == "paused"  # the canary's budget is 0 devices
    assert row.reason.startswith(f"canary: 1 of 1 devices failed, budget 0: {sick} "
                                 "(unhealthy)")
    step = next(s for s in db.steps(rid) if s.device_id == sick)
    assert (step.status, step.result, step.reason) == ("failed", "live", "unhealthy")
    assert "live, but health is fallback: model error" in step.detail
    assert fleet.installs() == {sick}  # no one else


def test_offline_devices_are_skipped_or_failed_after_the_wait(tmp_path: Path):
    db, rid, fleet = run(tmp_path, 6, {"box-03": "offline"}, canary="1", waves=(100,),
                         offline="skip", allow_partial=True)
    step = next(s for s in db.steps(rid) if s.device_id == "box-03")
    assert step.status == "skipped" and "box-03" not in fleet.installs()
    assert db.rollout(rid).state == "succeeded"
    # offline=wait: failed once its stage waited offline_wait_s (20 s of the test's clock)
    db, rid, fleet = run(tmp_path / "wait", 6, {"box-03": "offline"}, canary="1",
                         waves=(100,), offline="wait", max_failures="1")
    step = next(s for s in db.steps(rid) if s.device_id == "box-03")
    assert (step.status, step.reason) == ("failed", "offline")
    assert db.rollout(rid).state == "paused" and "box-03" in db.rollout(rid).reason


def test_a_device_already_there_is_skipped_only_after_a_fresh_report(tmp_path: Path):
    """Issue 14: a device rolled back by hand just before the rollout was taken as "already
    there" from its retained state. Its state from before the rollout began is asked again
    (report-now); only the fresh answer decides: there, no install; rolled back, installed."""
    def stale(fleet: ScriptedFleet) -> None:
        for d in ("box-00", "box-01"):  # retained states from before: NEW, but stale
            fleet.states[d] = fleet._doc(d, NEW)
            fleet.states[d]["_received"] = fleet.clock() - 2
        fleet.behaviour["box-01"] = "rolled back by hand"  # its fresh report says OLD

    db, rid, fleet = run(tmp_path, 4, before=stale, canary="1", waves=(100,))
    assert db.rollout(rid).state == "succeeded"
    reports = {c.device_id for c in fleet.sent if c.type == "report-now"}
    assert reports == {"box-00", "box-01"}
    steps = {(s.device_id, s.step): s for s in db.steps(rid)}
    assert (steps["box-00", "install"].status, steps["box-00", "install"].result) == (
        "done", "unchanged")
    assert "box-00" not in fleet.installs() and "box-01" in fleet.installs()


def test_a_device_view_follows_its_latest_state_made_only_when_read():
    """The driver's views (`fleet.driver._Views`): a state report only marks the device; the
    view is made from the latest state when read, once per new state, and a report that
    arrives after a read is seen by the next one."""
    from fleet.driver import _Views

    fleet = ScriptedFleet(2, Clock())
    reads: list[str] = []

    def state_of(d: str) -> dict[str, Any] | None:
        reads.append(d)
        return fleet.states.get(d)

    fleet.state_of = state_of  # type: ignore[method-assign]
    views = _Views(fleet, {d: {} for d in fleet.devices})  # type: ignore[arg-type]
    assert reads == [] and len(views) == 2 and list(views) == fleet.devices
    assert views["box-00"].active == OLD and views.get("box-00").active == OLD
    assert reads == ["box-00"]  # made once, then kept
    assert views.get("box-99") is None  # not a target
    fleet.states["box-00"] = fleet._doc("box-00", NEW)
    views.touch("box-00")
    views.touch("box-00")  # two reports before a read: one view, of the latest
    assert views["box-00"].active == NEW and reads == ["box-00", "box-00"]


def test_a_promote_while_the_stage_deploys_ends_its_bake_as_soon_as_it_starts(tmp_path: Path):
    """The controller-kill test's flake (tests/fleet/test_rollout_controller.py, at a load of
    17 to 53): its operator promoted the canary while the canary was still deploying, the
    promote changed nothing, and the canary then baked its full 10 minutes. A promote that
    comes during the deploy now passes the stage's bake as soon as it starts."""
    from fleet.actions import apply

    clock = Clock()
    fleet = ScriptedFleet(10, clock)
    db = StateDB(tmp_path / "rollouts.db")
    p = Plan(shadow=False, canary="2", waves=(100,), bake_s=600, wave_bake_s=0,
             step_timeout_s=30, health_grace_s=5, max_parallel=50)
    rid = create(db, p, NewRollout(BUNDLE, fleet.inventory(), "tester", "r-1"))
    assert db.acquire(rid, "test") is None
    driver = RolloutDriver(db, rid, fleet, owner="test", clock=clock)  # type: ignore[arg-type]
    start = clock.now
    while not fleet.installs():
        driver.tick()  # starts, then sends the canary's installs
    assert db.rollout(rid).phase == "deploy" and fleet.installs()  # the canary's, in flight
    driver.flush()  # as the controller applies a request: flush, apply (fenced), reload
    ok, msg = apply(db, rid, "promote", "alice", lease=("test", driver.epoch))
    assert ok and msg == f"rollout {rid}: running (promoted once deployed)"
    driver.reload()
    while driver.tick():
        fleet.answer()
        clock.now += 1
        assert clock.now - start < 120, db.rollout(rid)
    row = db.rollout(rid)
    assert row.state == "succeeded" and row.request is None
    actions = [a["action"] for a in db.audit_log(rid)]
    assert actions.index("promoted") < actions.index("succeeded")


def test_a_driver_in_a_quiet_bake_needs_a_round_only_at_its_next_measure(tmp_path: Path):
    """`next_round`: now while anything moves (the deploy), in a quiet bake its next measure
    (the controller sleeps until then instead of ticking five times a second), and the
    bake's end when that comes first."""
    clock = Clock()
    fleet = ScriptedFleet(10, clock)
    doc = fleet._doc  # healthy devices whose summaries the default bake gates can judge
    fleet._doc = lambda *a: {**doc(*a), "summary": {"requests": 100,  # type: ignore[method-assign]
                                                    "fail_rate": 0.01}}
    fleet.states = {d: fleet._doc(d, OLD) for d in fleet.devices}
    db = StateDB(tmp_path / "rollouts.db")
    p = Plan(shadow=False, canary="2", waves=(100,), bake_s=30, wave_bake_s=0,
             step_timeout_s=30, health_grace_s=0, max_parallel=50, measure_interval_s=5,
             min_requests=1)
    rid = create(db, p, NewRollout(BUNDLE, fleet.inventory(), "tester", "r-1"))
    assert db.acquire(rid, "test") is None
    driver = RolloutDriver(db, rid, fleet, owner="test", clock=clock)  # type: ignore[arg-type]
    while driver.row.phase != "bake":
        driver.tick()
        assert driver.next_round(clock.now) == clock.now  # deploying: every round
        fleet.answer()
        clock.now += 1
    driver.tick()  # the bake's first measure
    baked = db.stages(rid)[0].bake_started
    assert driver.next_round(clock.now) == pytest.approx(clock.now + 5)  # the next measure
    clock.now = baked + 28
    driver.tick()
    assert driver.next_round(clock.now) == pytest.approx(baked + 30)  # the bake's end
    clock.now = baked + 30
    driver.tick()
    assert (driver.row.state, driver.row.phase, driver.row.reason) == ("running", "deploy", None)
    assert driver.next_round(clock.now) == clock.now


def test_a_sweep_resolves_only_the_steps_the_clock_can_change(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch):
    """A step in flight with no news from its device is resolved again only when the clock
    can change it (here: its timeout), not at every sweep: a sweep a second used to resolve
    every step in flight, up to `max_parallel` a second through a deploy."""
    from fleet import decide

    resolved: list[str] = []
    real = decide.resolve_step
    monkeypatch.setattr(decide, "resolve_step",
                        lambda step, *a: resolved.append(step.device_id) or real(step, *a))
    (quiet,) = planned(4, canary="1", waves=(100,))["canary"]
    clock = Clock()
    fleet = ScriptedFleet(4, clock, {quiet: "silent"})
    db = StateDB(tmp_path / "rollouts.db")
    plan = Plan(shadow=False, bake_s=0, wave_bake_s=0, step_timeout_s=30, canary="1",
                waves=(100,))
    rid = create(db, plan, NewRollout(BUNDLE, fleet.inventory(), "tester", "r-1"))
    assert db.acquire(rid, "test") is None
    driver = RolloutDriver(db, rid, fleet, owner="test", clock=clock)  # type: ignore[arg-type]
    for _ in range(29):  # a round and a sweep a second, 29 s with its command out
        driver.tick()
        clock.now += 1.0
    assert fleet.installs() == {quiet}
    assert resolved == []
    clock.now += 5.0  # past its timeout (its command went out in the second round)
    driver.tick()
    assert resolved == [quiet]
    driver.flush()
    step = next(s for s in db.steps(rid) if s.device_id == quiet)
    assert (step.status, step.reason) == ("timeout", "timeout")
