"""Operator actions on a stored rollout (fleet/actions.py) and one rollout per device
(fleet/rollout.create), against each real state store (SQLite, PostgreSQL); no broker: what
they change in the database is the whole of their job (the driver reads it back)."""

from __future__ import annotations

import pytest

from agent.errors import UsageError
from fleet.actions import apply
from fleet.inventory import Device, Inventory
from fleet.rollout import Bundle, NewRollout, Plan, create
from fleet.state import LeaseLost, StateDB

B = Bundle("ab" * 32, 10, "http://x/sha256/ab", 2, "m", "2")


def _inv(n: int) -> Inventory:
    return Inventory(Device.from_state({
        "device_id": f"box-{i:03d}", "online": True, "health": {"status": "ok"},
        "labels": {"site": f"fab{i % 2}"}}) for i in range(n))


def _new(db: StateDB, rid: str, n: int = 10, **plan) -> str:
    p = Plan(**{"canary": "2", "waves": (30, 60, 100), "shadow": False, **plan})
    return create(db, p, NewRollout(B, _inv(n), "tester", rid))


def test_an_overlapping_rollout_is_refused_or_supersedes_with_replace(state_db: StateDB):
    """Issue 14: a second rollout of the same devices ran while the first baked."""
    db = state_db
    _new(db, "r-1")
    with pytest.raises(UsageError, match=r"rollout r-1 \(pending\) already targets 10 of "
                                         r"these devices .*--replace"):
        _new(db, "r-2")
    assert [r.id for r in db.rollouts()] == ["r-1"]
    create(db, Plan(canary="2", waves=(100,), shadow=False),
           NewRollout(B, _inv(10), "tester", "r-2"), replace=True)
    old = db.rollout("r-1")
    assert old.state == "superseded" and old.finished
    assert old.reason.startswith("superseded by rollout r-2 (--replace, tester)")
    assert [r.id for r in db.active()] == ["r-2"]
    # a rollout of other devices is not affected
    p = Plan(canary="1", waves=(100,), shadow=False, selector="site=fab0")
    assert db.rollout("r-2").state == "pending"
    with pytest.raises(UsageError, match="already targets 5"):
        create(db, p, NewRollout(B, _inv(10), "tester", "r-3"))


def test_an_action_under_a_lease_taken_over_changes_nothing(state_db: StateDB):
    """A controller applies requests under the rollout's lease: one that lost the rollout to
    another (it stalled past its lease on a shared store) writes nothing."""
    db = state_db
    _new(db, "r-1")
    assert db.acquire("r-1", "ctl-a") is None
    lease_a = ("ctl-a", db.rollout("r-1").epoch)
    assert apply(db, "r-1", "pause", "alice", lease=lease_a)[0]
    assert apply(db, "r-1", "resume", "alice", lease=lease_a)[0]
    assert db.acquire("r-1", "ctl-b", stale_s=0.0) is None  # ctl-a went quiet: ctl-b took it
    with pytest.raises(LeaseLost, match="lease lost: ctl-a held it"):
        apply(db, "r-1", "abort", "alice", lease=lease_a)
    row = db.rollout("r-1")
    assert row.state == "running" and row.owner == "ctl-b"
    assert [a["action"] for a in db.audit_log("r-1")][-1] == "resumed"
    assert apply(db, "r-1", "abort", "alice", lease=("ctl-b", row.epoch))[0]


def test_actions_go_through_the_transition_table_and_say_why_not(state_db: StateDB):
    db = state_db
    _new(db, "r-1")
    assert apply(db, "r-1", "resume", "alice") == (
        False, "rollout r-1 is pending: cannot resume it (possible: abort, pause)")
    assert apply(db, "r-1", "pause", "alice")[0]
    row = db.rollout("r-1")
    assert row.state == "paused" and row.reason == ("paused by an operator (alice); next: "
                                                    "edgefleet fleet rollout resume r-1")
    assert apply(db, "r-1", "abort", "alice") == (True, "rollout r-1: aborted")
    assert apply(db, "r-1", "rollback", "alice")[0]  # undo what an aborted rollout moved
    assert db.rollout("r-1").state == "rolling-back"
    assert apply(db, "r-1", "explode", "alice") == (False, "unknown action 'explode'")
    actions = [a["action"] for a in db.audit_log("r-1")]
    assert actions == ["start", "paused", "aborted", "rolling-back"]


def test_retry_commands_failed_and_skipped_devices_again_under_new_ids(state_db: StateDB):
    db = state_db
    rid = _new(db, "r-1")
    steps = {s.device_id: s for s in db.steps(rid)}
    stage_of = {t["device_id"]: t["stage"] for t in db.targets(rid)}
    bad = [d for d in sorted(steps) if stage_of[d] == 1][:1] + \
        [d for d in sorted(steps) if stage_of[d] == 3][:1]
    with db.tx() as c:
        for s in steps.values():
            s.status, s.attempts = "done", 1
        steps[bad[0]].status, steps[bad[1]].status = "failed", "skipped"
        db.save_steps(list(steps.values()), c)
        db.update(rid, c, state="paused", stage=3, phase="finish")
        for i in range(4):
            db.update_stage(rid, i, c, state="partial" if i in (1, 3) else "passed")
    ok, msg = apply(db, rid, "retry", "alice")
    assert ok and msg == "rollout r-1: running (retrying 2 devices from wave-1)"
    row = db.rollout(rid)
    assert (row.state, row.stage, row.phase) == ("running", 1, "deploy")
    again = {s.device_id: s for s in db.steps(rid)}
    assert {d for d, s in again.items() if s.status == "pending"} == set(bad)
    assert again[bad[0]].command_id == f"{rid}:{bad[0]}:install.2"
    assert [s.state for s in db.stages(rid)] == ["passed", "pending", "pending", "pending"]
    assert apply(db, rid, "retry", "alice") == (
        False, "rollout r-1: no failed or skipped device to retry")


def test_resume_at_the_final_check_accepts_devices_left_behind_only_when_asked(
        state_db: StateDB):
    db = state_db
    rid = _new(db, "r-1")
    with db.tx() as c:
        db.update(rid, c, state="paused", stage=3, phase="finish",
                  reason="1 of 10 devices do not run the bundle: box-001 (failed: failed)")
    assert apply(db, rid, "resume", "alice")[0]
    assert db.rollout(rid).plan.get("allow_partial") is False  # checks again, no more
    with db.tx() as c:
        db.update(rid, c, state="paused")
    assert apply(db, rid, "resume", "alice", {"allow_partial": True})[0]
    assert db.rollout(rid).plan["allow_partial"] is True
    assert db.audit_log(rid)[-1]["detail"]["accepted_left_behind"] is True


def test_promote_ends_a_bake_and_full_merges_the_remaining_waves(state_db: StateDB):
    db = state_db
    rid = _new(db, "r-1")
    with db.tx() as c:
        db.update(rid, c, state="running", stage=1, phase="bake")
    ok, _ = apply(db, rid, "promote", "alice", {"full": True})
    assert ok
    row = db.rollout(rid)
    assert row.request == "promote" and row.state == "running"
    stages = db.stages(rid)
    assert [(s.name, s.state, s.devices) for s in stages] == [
        ("canary", "pending", 2), ("wave-1", "baking", 1), ("wave-2", "merged", 0),
        ("wave-3", "pending", 7)]
    assert {t["stage"] for t in db.targets(rid)} == {0, 1, 3}
