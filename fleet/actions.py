"""Operator actions on a stored rollout: pause, resume, abort, rollback, promote, retry,
supersede. Each one is a transition of the table in fleet/machine.py applied to the database
(fleet/state.py) in one transaction; the process that drives the rollout (the controller
service, or a one-shot `--once` run) applies them from the request queue, and reloads. So
there is one implementation whoever asks and whoever drives.

    ok, message = apply(db, "r-42", "pause", "alice@host")
    seq = db.add_request("r-42", "retry", "alice@host")   # for the live driver, in order
    apply(db, "r-42", "pause", "controller", lease=(owner, epoch))  # fenced (see below)

A controller applies them under the rollout's lease (`lease`: the owner and epoch it holds the
rollout at): each action's transaction checks it first (`StateDB.fence`), so a controller that
lost the rollout to another (shared PostgreSQL store, it stalled past its lease) changes
nothing and gets `fleet.state.LeaseLost`, as its driver's writes do.

What each does beyond the state change:

    pause      the driver stops sending; steps in flight finish (their outcome is recorded
               when the rollout is driven again)
    resume     a paused stage accepts the failures it has so far (its budget counts only new
               ones) and a paused bake bakes again from now; paused at the final check, it
               checks again (a device may have caught up), accepting the devices left behind
               only when asked (`allow_partial`: they are listed in the end state)
    abort      final; devices stay as they are (see rollback)
    rollback   every device the rollout moved goes back, every shadow of it stops
    promote    a bake ends now as passed; with `full`, every remaining wave merges into the last
               stage (no more bakes)
    retry      failed, timed-out and skipped devices get their command again (a new command
               id: a device refuses to run the same id twice); the rollout goes back to the
               first stage that had one, which bakes again
    supersede  final: a newer rollout of the same devices took over (`--replace`)
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

from fleet.machine import (
    STEP_BAD,
    TERMINAL,
    Phase,
    RolloutState,
    StageState,
    StepStatus,
    Trigger,
    allowed,
    next_state,
)
from fleet.plan import command_id
from fleet.state import StateDB

__all__ = ["apply", "overlapping"]


Tx = Callable[[], contextlib.AbstractContextManager[Any]]


def apply(db: StateDB, rid: str, action: str, who: str,
          args: dict[str, Any] | None = None, *,
          lease: tuple[str, int] | None = None) -> tuple[bool, str]:
    """Apply an operator action to rollout `rid`; returns (done, one line saying what
    happened or why not). Nothing is changed when the transition table refuses it, or (raising
    `LeaseLost`) when `lease` (owner, epoch) no longer holds the rollout."""
    args = args or {}
    try:
        trigger = Trigger(action)
    except ValueError:
        trigger = None
    if trigger not in _DO:
        return False, f"unknown action {action!r}"
    row = db.rollout(rid)
    new = next_state(row.state, trigger)
    if new is None:
        can = ", ".join(a for a in allowed(row.state) if a in _OPERATOR) or "nothing"
        return False, f"rollout {rid} is {row.state}: cannot {action} it (possible: {can})"

    @contextlib.contextmanager
    def tx() -> Iterator[Any]:
        with db.tx() as c:
            if lease is not None:
                db.fence(c, rid, *lease)
            yield c

    return _DO[trigger](db, tx, rid, row, new, who, args)  # type: ignore[index]


def _simple(db: StateDB, tx: Tx, rid: str, row: Any, new: RolloutState, who: str,
            args: dict[str, Any], action: str, reason: str, **fields: Any) -> tuple[bool, str]:
    if new in TERMINAL:
        fields.setdefault("finished", time.time())
    with tx() as c:
        db.update(rid, c, state=new, reason=reason, **fields)
        db.audit(rid, who, action, {"was": row.state, "reason": reason, **args}, c)
    return True, f"rollout {rid}: {new}"


def _pause(db: StateDB, tx: Tx, rid: str, row: Any, new: RolloutState, who: str,
           args: dict[str, Any]) -> tuple[bool, str]:
    return _simple(db, tx, rid, row, new, who, args, "paused",
                   args.get("reason") or f"paused by an operator ({who}); next: edgefleet "
                   f"fleet rollout resume {rid}")


def _abort(db: StateDB, tx: Tx, rid: str, row: Any, new: RolloutState, who: str,
           args: dict[str, Any]) -> tuple[bool, str]:
    return _simple(db, tx, rid, row, new, who, args, "aborted",
                   f"aborted by an operator ({who}); devices left as they are")


def _supersede(db: StateDB, tx: Tx, rid: str, row: Any, new: RolloutState, who: str,
               args: dict[str, Any]) -> tuple[bool, str]:
    return _simple(db, tx, rid, row, new, who, args, "superseded",
                   f"superseded by rollout {args.get('by', '?')} (--replace, {who}); "
                   "its devices are that rollout's now")


def _rollback(db: StateDB, tx: Tx, rid: str, row: Any, new: RolloutState, who: str,
              args: dict[str, Any]) -> tuple[bool, str]:
    reason = f"rollback requested by an operator ({who})" + (
        f"; was {row.state}: {row.reason}" if row.reason else "")
    return _simple(db, tx, rid, row, new, who, args, "rolling-back", reason,
                   phase=Phase.ROLLBACK, finished=None)


def _resume(db: StateDB, tx: Tx, rid: str, row: Any, new: RolloutState, who: str,
            args: dict[str, Any]) -> tuple[bool, str]:
    stages = db.stages(rid)
    detail: dict[str, Any] = {"paused_because": row.reason, "phase": row.phase}
    plan = dict(row.plan)
    with tx() as c:
        if row.phase == Phase.FINISH or row.stage >= len(stages):
            if args.get("allow_partial"):  # the devices named in the reason are accepted
                plan["allow_partial"] = True
                detail["accepted_left_behind"] = True
        else:
            step, devices = _stage_devices(db, rid, row.stage)
            mine = set(devices)
            bad = sum(1 for s in db.steps(rid) if s.step == step and s.device_id in mine
                      and s.status in STEP_BAD)
            fields: dict[str, Any] = {"failures_accepted": bad}
            if row.phase == Phase.BAKE:
                fields.update(bake_started=time.time(), state=StageState.BAKING)
            else:
                fields["state"] = StageState.DEPLOYING
            db.update_stage(rid, row.stage, c, **fields)
            detail.update(stage=stages[row.stage].name, accepted_failures=bad)
        db.update(rid, c, state=new, reason=None, plan=_json(plan))
        db.audit(rid, who, "resumed", detail, c)
    return True, f"rollout {rid}: {new}"


def _promote(db: StateDB, tx: Tx, rid: str, row: Any, new: RolloutState, who: str,
             args: dict[str, Any]) -> tuple[bool, str]:
    stages = db.stages(rid)
    detail: dict[str, Any] = {"stage": stages[row.stage].name if row.stage < len(stages)
                              else None, "full": bool(args.get("full"))}
    with tx() as c:
        if args.get("full") and row.stage < len(stages) - 1:
            last = len(stages) - 1
            first = row.stage + 1
            c.execute("UPDATE targets SET stage=? WHERE rollout_id=? AND stage>=? AND stage<?",
                      (last, rid, first, last))
            n = c.execute("SELECT COUNT(*) FROM targets WHERE rollout_id=? AND stage=?",
                          (rid, last)).fetchone()[0]
            for i in range(first, last):
                db.update_stage(rid, i, c, state=StageState.MERGED, devices=0)
            db.update_stage(rid, last, c, devices=n)
            detail["merged"] = [s.name for s in stages[first:last]]
        fields: dict[str, Any] = {"state": new, "reason": None}
        if row.phase == Phase.BAKE:
            fields["request"] = "promote"  # the driver passes the bake on its next round
            if row.stage < len(stages):
                db.update_stage(rid, row.stage, c, state=StageState.BAKING)
        elif row.phase == Phase.DEPLOY and row.stage < len(stages):
            # still deploying: the stage's bake passes as soon as it starts (a promote that
            # came early was lost, and the stage baked its full length)
            fields["request"] = "promote"
            detail["when"] = "deployed"
        db.update(rid, c, **fields)
        db.audit(rid, who, "promote", detail, c)
    when = " once deployed" if detail.get("when") else ""
    return True, f"rollout {rid}: {new} (promoted{when})"


def _retry(db: StateDB, tx: Tx, rid: str, row: Any, new: RolloutState, who: str,
           args: dict[str, Any]) -> tuple[bool, str]:
    again = [s for s in db.steps(rid) if s.step in ("install", "shadow")
             and s.status in (*STEP_BAD, StepStatus.SKIPPED)]
    if not again:
        return False, f"rollout {rid}: no failed or skipped device to retry"
    stage_of = {t["device_id"]: t["stage"] for t in db.targets(rid)}
    stages = db.stages(rid)

    def stage_idx(step: str, device: str) -> int:
        i = stage_of[device]
        return i - 1 if step == "shadow" else i

    first = min(stage_idx(s.step, s.device_id) for s in again)
    with tx() as c:
        for s in again:
            cid = command_id(rid, s.device_id, f"{s.step}.{s.attempts + 1}")
            c.execute("UPDATE steps SET status=?, command_id=?, result=NULL, reason=NULL, "
                      "detail=NULL, sent=NULL, finished=NULL WHERE rollout_id=? AND "
                      "device_id=? AND step=?", (StepStatus.PENDING, cid, rid, s.device_id,
                                                 s.step))
        for i in range(first, len(stages)):
            if stages[i].state != StageState.MERGED:
                db.update_stage(rid, i, c, state=StageState.PENDING, finished=None)
        db.update(rid, c, state=new, reason=None, request=None, stage=first,
                  phase=Phase.DEPLOY, finished=None)
        db.audit(rid, who, "retry", {"devices": sorted(s.device_id for s in again),
                                     "from_stage": stages[first].name}, c)
    return True, f"rollout {rid}: {new} (retrying {len(again)} devices from {stages[first].name})"


def _stage_devices(db: StateDB, rid: str, idx: int) -> tuple[str, list[str]]:
    stages = db.stages(rid)
    kind = stages[idx].kind
    own = idx + 1 if kind == "shadow" else idx
    devices = [t["device_id"] for t in db.targets(rid) if t["stage"] == own]
    return ("shadow" if kind == "shadow" else "install"), devices


def _json(doc: dict[str, Any]) -> str:
    import json

    return json.dumps(doc)


def overlapping(db: StateDB, devices: set[str], *, besides: str | None = None
                ) -> list[tuple[str, str, list[str]]]:
    """Non-final rollouts that target any of `devices`: (id, state, shared devices)."""
    out = []
    for r in db.active():
        if r.id == besides:
            continue
        shared = sorted(devices & set(db.target_ids(r.id)))
        if shared:
            out.append((r.id, r.state, shared))
    return out


_OPERATOR = {t.value for t in (Trigger.PAUSE, Trigger.RESUME, Trigger.ABORT, Trigger.ROLLBACK,
                               Trigger.PROMOTE, Trigger.RETRY)}
_DO = {Trigger.PAUSE: _pause, Trigger.ABORT: _abort, Trigger.SUPERSEDE: _supersede,
       Trigger.ROLLBACK: _rollback, Trigger.RESUME: _resume, Trigger.PROMOTE: _promote,
       Trigger.RETRY: _retry}
