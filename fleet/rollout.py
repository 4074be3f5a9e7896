"""Rollouts: move a fleet to a new model in stages, judge every stage on what the devices
report, and undo what was done when a stage fails. Everything is persisted (fleet/state.py),
so a controller killed at any moment resumes where it stopped and commands no device twice.

The parts, one job each:

    fleet/plan.py        the plan: selector, canary, waves, gates, budgets, timeouts; stages
    fleet/machine.py     states, phases, step statuses as enums; the one transition table
    fleet/decide.py      the pure decision core (deploy, bake, gates, budget, timeout,
                         offline, the honest end) as functions of steps, devices, plan, time
    fleet/driver.py      carries out one rollout's decisions: publishes, persists
    fleet/actions.py     operator actions (pause, resume, abort, rollback, promote, retry,
                         supersede), through the transition table
    fleet/controller.py  the loop that drives every rollout (`edgefleet fleet controller`), or
                         one (`--once`)
    this module          creating a rollout (one rollout per device), driving one in this
                         process, and the `status` snapshot

Stages (see docs/rollouts.md): shadow (the canary scores the candidate on live dies, never
answering with it), canary (promoted, then a bake with gates), waves (cumulative shares, a
shorter bake after each but the last). A device's step succeeds when its state shows it live
and healthy; more failures than the stage's budget, or a failing gate, triggers the policy
(pause or rollback). A rollout succeeds only when every targeted device runs the bundle, or
with `allow_partial`, listing the ones left behind.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from agent.errors import UsageError
from fleet.actions import apply as apply_action
from fleet.actions import overlapping
from fleet.controller import Controller, ControllerOptions
from fleet.driver import Bundle, DriverOptions
from fleet.inventory import Inventory
from fleet.machine import DRIVEN, STEP_BAD
from fleet.plan import (
    Plan,
    StagePlan,
    assign,
    command_id,
    new_rollout_id,
    parse_amount,
    plan_targets,
    replace_plan,
)
from fleet.state import (
    S_DONE,
    S_FAILED,
    S_PENDING,
    S_SENDING,
    S_SENT,
    S_SKIPPED,
    S_TIMEOUT,
    RolloutRow,
    StateDB,
)
from fleet.transport import FleetController

__all__ = [
    "Bundle",
    "NewRollout",
    "Plan",
    "StagePlan",
    "assign",
    "command_id",
    "create",
    "drive",
    "new_rollout_id",
    "parse_amount",
    "plan_targets",
    "replace_plan",
    "snapshot",
]


# -- creating a rollout -------------------------------------------------------------------------


@dataclass
class NewRollout:
    """What `create` needs besides the plan: the published bundle and the fleet."""

    bundle: Bundle
    inventory: Inventory
    actor: str
    rollout_id: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def create(db: StateDB, plan: Plan, new: NewRollout, *, replace: bool = False,
           stale_s: float = 10.0) -> str:
    """Persist a new rollout (pending) with its stages, targets and steps; returns its id.
    One rollout per device: a non-final rollout that targets any of the same devices makes
    this raise `UsageError`, unless `replace`, which supersedes it (it ends `superseded`,
    naming this one; a live driver is asked to, through the request queue)."""
    plan.validate()
    stages, targets = plan_targets(plan, new.inventory)
    rid = new.rollout_id or new_rollout_id()
    clash = overlapping(db, {t["device_id"] for t in targets})
    if clash and not replace:
        other, state, shared = clash[0]
        raise UsageError(f"rollout {other} ({state}) already targets {len(shared)} of these "
                         f"devices ({', '.join(shared[:3])}{' ...' if len(shared) > 3 else ''})",
                         hint=f"one rollout per device: wait for it, abort {other}, or pass "
                              "--replace to supersede it")
    steps = []
    for st in stages:
        name = "shadow" if st.kind == "shadow" else "install"
        steps += [(d, name, command_id(rid, d, name)) for d in st.devices]
    b = new.bundle
    db.create(id=rid, created_by=new.actor, bundle_digest=b.digest, bundle_size=b.size,
              bundle_url=b.url, model_name=b.name, model_version=b.version,
              sequence=b.sequence, plan=plan.to_json(),
              stages=[(s.name, s.kind, len(s.devices)) for s in stages], targets=targets,
              steps=steps)
    for other, _, _ in clash:
        if db.holder(other, stale_s) is not None or db.lease(stale_s=stale_s)["live"]:
            db.add_request(other, "supersede", new.actor, {"by": rid})
        else:
            apply_action(db, other, "supersede", new.actor, {"by": rid})
    return rid


# -- driving one rollout in this process ----------------------------------------------------


def drive(db: StateDB, rid: str, ctl: FleetController, *, actor: str = "controller",
          progress: Callable[[dict[str, Any]], None] | None = None,
          stop: threading.Event | None = None,
          driver: DriverOptions | None = None) -> RolloutRow:
    """Drive rollout `rid` from this process (one-shot mode) until it no longer needs
    driving (paused or final); returns its row. Operator requests for it are applied here.
    `stop` set from elsewhere pauses it, saying its driver stopped."""
    opts = driver or DriverOptions(actor=actor)
    if progress is not None:
        opts.progress = progress
    loop = Controller(db, ctl, ControllerOptions(actor=actor, only=frozenset({rid}),
                                                 driver=opts))
    stop = stop or threading.Event()
    rounds = [0]

    def finished() -> bool:
        rounds[0] += 1
        return rounds[0] > 1 and rid not in loop.drivers and \
            db.rollout(rid).state not in DRIVEN and not db.open_requests(rid)

    loop.run(stop, finished)
    return db.rollout(rid)


# -- status -----------------------------------------------------------------------------------


def snapshot(db: StateDB, rid: str) -> dict[str, Any]:
    """Everything `rollout status` shows, from the database alone."""
    row = db.rollout(rid)
    stages = db.stages(rid)
    steps = db.steps(rid)
    targets = db.targets(rid)
    stage_of = {t["device_id"]: t["stage"] for t in targets}
    out_stages = []
    for st in stages:
        devs_stage = st.idx + 1 if st.kind == "shadow" else st.idx
        name = "shadow" if st.kind == "shadow" else "install"
        mine = [s for s in steps if s.step == name and stage_of.get(s.device_id) == devs_stage]
        c = collections.Counter(s.status for s in mine)
        out_stages.append({
            "name": st.name, "kind": st.kind, "state": st.state, "devices": st.devices,
            "done": c.get(S_DONE, 0), "failed": c.get(S_FAILED, 0) + c.get(S_TIMEOUT, 0),
            "skipped": c.get(S_SKIPPED, 0),
            "in_flight": c.get(S_SENDING, 0) + c.get(S_SENT, 0), "pending": c.get(S_PENDING, 0),
            "started": st.started, "deployed": st.deployed, "bake_started": st.bake_started,
            "finished": st.finished,
            "deploy_s": round(st.deployed - st.started, 3) if st.deployed and st.started
            else None,
            "verdict": st.verdict,
        })
    rollback = [s for s in steps if s.step in ("rollback", "shadow-stop")]
    problems = [{"device": s.device_id, "step": s.step, "status": s.status, "reason": s.reason,
                 "detail": s.detail} for s in steps if s.status in (*STEP_BAD, S_SKIPPED)]
    current = stages[row.stage].name if row.stage < len(stages) else None
    return {
        "id": row.id, "state": row.state, "stage": current, "phase": row.phase,
        "reason": row.reason, "request": row.request, "created": row.created,
        "created_by": row.created_by, "updated": row.updated, "finished": row.finished,
        "driver": _driver(db, row),
        "bundle": {"digest": row.bundle_digest, "size": row.bundle_size, "url": row.bundle_url,
                   "name": row.model_name, "version": row.model_version,
                   "sequence": row.sequence},
        "plan": row.plan, "devices": len(targets), "stages": out_stages,
        "rollback": {"devices": len(rollback),
                     "done": sum(s.status == S_DONE for s in rollback),
                     "failed": sum(s.status in STEP_BAD for s in rollback)} if rollback else None,
        "problems": problems,
    }


def _driver(db: StateDB, row: RolloutRow, stale_s: float = 10.0) -> dict[str, Any]:
    """Who drives the rollout and when it was last heard from; `live` False for a rollout
    that needs a driver and has none (a dead one, or none yet)."""
    now = db.now()  # heartbeats are written by the database's clock, not a host's
    holder = db.holder(row.id, stale_s)
    lease = db.lease(stale_s=stale_s)
    return {"owner": row.owner, "heartbeat": row.heartbeat,
            "heartbeat_age_s": round(now - row.heartbeat, 1) if row.heartbeat else None,
            "live": holder is not None, "needs_driver": row.state in DRIVEN,
            "controller": lease["owner"] if lease["live"] else None,
            "controller_heartbeat_age_s": round(lease["age_s"], 1)
            if lease["age_s"] is not None else None}
