"""The rollout's decisions, as pure functions of what is known (the plan, the steps, the
devices' latest states, the gates' verdict) and the time, passed in. Nothing here reads a
clock, the network or the database: fleet/driver.py gathers the inputs, calls these, and
carries out what they return. So every rule is a millisecond unit test
(tests/fleet/test_rollout_decide.py).

    resolve_step(step, device, seen, ctx, now)     -> StepChange | None   (one command's fate)
    decide_deploy(stage, steps, devices, ctx, now)  -> Deploy               (what to send, skip)
    decide_bake(kind, started, length, verdict, now) -> BakeOutcome
    left_behind(targets, steps, devices, digest)    -> [(device, why)]      (honest success)
    rollback_steps(targets, steps, devices, digest) -> [(device, step)]

Rules, in one place:
- a step succeeds when the device's *state* shows it where the step should leave it (new
  digest active and health `ok` for an install), within `health_grace_s` of the success event;
- a step with no final answer `step_timeout_s` after it was sent has timed out;
- a device is skipped as "already there" only on a *fresh* state (reported live after the
  rollout began); otherwise it is asked to report (`report-now`) first;
- an offline device is skipped (offline=skip) or waited for up to `offline_wait_s` from its
  stage's start, then failed (offline=wait);
- a stage is over budget when more than `max_failures` (+ failures an operator accepted) of
  its devices failed; what is in flight finishes first;
- only events from the device a command was for count (`accept_event`).
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from agent.wire import DUPLICATE_REASONS, TERMINAL_STEPS, CommandType, Health, Step
from agent.wire import SUCCESS as WIRE_SUCCESS
from fleet import gates as G
from fleet.machine import IN_FLIGHT, STEP_BAD, StepStatus
from fleet.plan import Plan, amount_of

__all__ = [
    "BakeEvidence",
    "BakeOutcome",
    "Ctx",
    "Deploy",
    "DeviceView",
    "Seen",
    "StepChange",
    "StepView",
    "accept_event",
    "bake_inputs",
    "bake_side",
    "budget",
    "decide_bake",
    "decide_deploy",
    "left_behind",
    "resolve_step",
    "rollback_steps",
]

# a rollout step -> the command type it sends, and the device step that means it worked
STEP_COMMAND = {"shadow": CommandType.SHADOW, "install": CommandType.INSTALL,
                "rollback": CommandType.ROLLBACK, "shadow-stop": CommandType.SHADOW_STOP,
                "report": CommandType.REPORT_NOW}
SUCCESS = {step: WIRE_SUCCESS[ctype] for step, ctype in STEP_COMMAND.items()}
UNDO_STEPS = ("rollback", "shadow-stop")


@dataclass(frozen=True)
class DeviceView:
    """What a decision needs of a device's latest state."""

    online: bool = False
    active: str | None = None
    shadow: str | None = None
    health: str = "unknown"
    health_reason: str | None = None
    received: float | None = None  # controller time of its last live (not retained) report
    last_command: Mapping[str, Any] = field(default_factory=dict)
    busy: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_state(cls, st: Mapping[str, Any] | None) -> DeviceView:
        if not st:
            return _NOBODY
        model = st.get("model") or {}
        health = st.get("health") or {}
        return cls(online=bool(st.get("online")),
                   active=(model.get("active") or {}).get("digest"),
                   shadow=(model.get("shadow") or {}).get("digest"),
                   health=health.get("status") or "unknown",
                   health_reason=health.get("reason"), received=st.get("_received"),
                   last_command=st.get("last_command") or {}, busy=st.get("busy") or {})

    def fresh(self, since: float) -> bool:
        return self.received is not None and self.received >= since


_NOBODY = DeviceView()


@dataclass
class Seen:
    """What this controller saw of one command's events."""

    last: str | None = None  # the latest step reported
    terminal: Mapping[str, Any] | None = None
    first_ok: float | None = None  # when the success step was first seen (health grace)
    keys: set[tuple[Any, Any]] = field(default_factory=set)  # (boot, seq): QoS 1 duplicates


@dataclass(frozen=True)
class StepView:
    device_id: str
    step: str
    command_id: str
    status: str
    result: str | None = None
    sent: float | None = None
    # loaded as `sending` after a restart (fate unknown): published again, same id, if the
    # device shows no sign of it by then; None: this process published it
    resend_after: float | None = None


@dataclass(frozen=True)
class Ctx:
    """The rollout-wide inputs of a decision."""

    plan: Plan
    digest: str
    began: float  # when the rollout began (fresh state means reported after this)
    rollback_timeout_s: float | None = None

    def timeout(self, step: str) -> float:
        if step in UNDO_STEPS:
            return self.rollback_timeout_s or self.plan.step_timeout_s
        return self.plan.step_timeout_s


@dataclass(frozen=True)
class StepChange:
    """New values for a step (None: unchanged), or `resend` (publish again, same id)."""

    status: str | None = None
    result: str | None = None
    reason: str | None = None
    detail: str | None = None
    resend: bool = False


def accept_event(step_device: str | None, topic_device: str, doc: Mapping[str, Any]) -> bool:
    """Does an event count for the step it names? Only when it came from that step's own
    device (the topic's device id: the broker's ACL ties it to the client certificate), and
    is not a refusal of a duplicate (which says nothing about the first copy)."""
    if step_device is None or step_device != topic_device:
        return False
    return not (doc.get("step") == Step.FAILED and doc.get("reason") in DUPLICATE_REASONS)


def fold_event(seen: Seen, doc: Mapping[str, Any]) -> None:
    """Take one of the command's events into `seen`; a second copy (QoS 1 delivers at least
    once) changes nothing."""
    if doc.get("seq") is not None:
        key = (doc.get("boot"), doc.get("seq"))
        if key in seen.keys:
            return
        seen.keys.add(key)
    seen.last = doc.get("step")
    if seen.last in TERMINAL_STEPS:
        seen.terminal = doc


def settled(step: str, dev: DeviceView, digest: str) -> tuple[bool, str | None]:
    """Is the device where `step` should have left it (and, for an install, healthy)?"""
    if step == "install":
        if dev.active != digest:
            return False, f"reported live, but its state shows model {dev.active} active"
        if dev.health != Health.OK:
            return False, f"live, but health is {dev.health}: {dev.health_reason}"
        return True, None
    if step == "shadow":
        if dev.shadow != digest and dev.active != digest:
            return False, "reported shadowing, but its state shows no such shadow"
        return True, None
    if step == "rollback":
        if dev.active == digest:
            return False, "reported rolled back, but still runs the new model"
        return True, None
    if step == "report":
        return True, None
    return dev.shadow != digest, "still shadowing"


def resolve_step(step: StepView, dev: DeviceView, seen: Seen | None, ctx: Ctx,
                 now: float) -> StepChange | None:
    """Move one in-flight step on from its events and its device's state. May set
    `seen.first_ok` (the start of the health grace), the only state it keeps."""
    if step.status not in IN_FLIGHT:
        return None
    cid = step.command_id
    last = dev.last_command
    on_device = seen is not None or last.get("id") == cid or dev.busy.get("command_id") == cid
    status = StepStatus.SENT if step.status == StepStatus.SENDING and on_device else None
    outcome = reason = detail = None
    if seen is not None and seen.terminal is not None:
        outcome = seen.terminal.get("step")
        reason, detail = seen.terminal.get("reason"), seen.terminal.get("detail")
    elif last.get("id") == cid and last.get("result"):
        outcome, reason, detail = last.get("result"), last.get("reason"), last.get("detail")
    want = SUCCESS[step.step]
    if outcome == Step.FAILED:
        return StepChange(StepStatus.FAILED, Step.FAILED, reason or "failed", detail)
    if outcome in TERMINAL_STEPS and outcome != want:  # an agent that does not know it
        return StepChange(StepStatus.FAILED, outcome, "unsupported",
                          f"the device answered {outcome!r} to a {STEP_COMMAND[step.step]} "
                          "command: its agent does not support it")
    if outcome == want:
        ok, why = settled(step.step, dev, ctx.digest)
        if ok:
            return StepChange(StepStatus.DONE, outcome)
        if seen is not None:
            seen.first_ok = seen.first_ok or now
            if now - seen.first_ok > ctx.plan.health_grace_s:
                return StepChange(StepStatus.FAILED, outcome, "unhealthy", why)
        return StepChange(status) if status else None
    timeout = ctx.timeout(step.step)
    if step.sent is not None and now - step.sent > timeout:
        return StepChange(StepStatus.TIMEOUT, step.result, "timeout",
                          f"no final step within {timeout:g} s (last step: "
                          f"{step.result or 'none'})")
    progress = (seen.last if seen else None) or (
        dev.busy.get("step") if dev.busy.get("command_id") == cid else None)
    if status is None and not on_device and step.status == StepStatus.SENDING and \
            step.resend_after is not None and now >= step.resend_after and dev.online:
        return StepChange(resend=True)  # after a restart, no sign of it: again, same id
    if status or (progress and progress != step.result):
        return StepChange(status, progress if progress != step.result else None)
    return None


def budget(plan: Plan, devices: int, accepted: int = 0) -> int:
    """How many of a stage's `devices` may fail before the failure policy applies."""
    return amount_of(plan.max_failures, devices, round_up=False) + accepted


def already_there(step: str, dev: DeviceView, digest: str) -> bool:
    """Does the device look like it is where `step` would take it (no command needed)?"""
    if step == "install":
        return dev.active == digest and dev.health == Health.OK and dev.online
    if step == "shadow":
        return dev.active == digest or dev.shadow == digest
    return False


@dataclass
class Deploy:
    """What to do in a stage's deploy phase this round."""

    send: list[str] = field(default_factory=list)  # devices to command now
    report: list[str] = field(default_factory=list)  # devices to ask for a fresh report first
    finish: dict[str, StepChange] = field(default_factory=dict)  # pending steps settled now
    over_budget: bool = False
    deployed: bool = False


def decide_deploy(steps: Sequence[StepView], devices: Mapping[str, DeviceView], ctx: Ctx,
                  now: float, *, stage_started: float, accepted: int = 0,
                  reports: Mapping[str, str] | None = None, connected: bool = True,
                  counts: Mapping[str, int] | None = None,
                  pending: Iterable[StepView] | None = None) -> Deploy:
    """One round of a stage's deploy: which pending devices get their command (at most
    `max_parallel` in flight), which are settled without one (fresh and already there:
    done/unchanged; offline: skipped or, past the wait, failed), which must report first,
    and whether the stage is over budget or fully deployed. `reports` maps a device to the
    status of its report-now step, if it has one.

    `counts` (the stage's steps per status) and `pending` (its pending steps in stage order,
    possibly a lazy iterator, read only as far as the room to send goes) spare a driver a
    pass over the whole stage every round; without them both come from `steps`."""
    plan, reports = ctx.plan, reports or {}
    out = Deploy()
    if counts is None:
        counts = collections.Counter(s.status for s in steps)
    total = sum(counts.values())
    bad = sum(counts.get(k, 0) for k in STEP_BAD)
    in_flight = sum(counts.get(k, 0) for k in IN_FLIGHT)
    if bad > budget(plan, total, accepted):
        out.over_budget = in_flight == 0  # let what is running finish (or time out) first
        return out
    if not in_flight and not counts.get(StepStatus.PENDING, 0):
        out.deployed = True
        return out
    if not connected:
        return out
    if pending is None:
        pending = (s for s in steps if s.status == StepStatus.PENDING)
    room = plan.max_parallel - in_flight
    for s in pending:
        if room <= 0:
            break
        dev = devices.get(s.device_id, _NOBODY)
        if already_there(s.step, dev, ctx.digest):
            report = reports.get(s.device_id)
            if dev.fresh(ctx.began):
                out.finish[s.device_id] = StepChange(StepStatus.DONE, "unchanged", None,
                                                     "already there (fresh report); no "
                                                     "command")
                continue
            if report is None:
                out.report.append(s.device_id)
                continue
            if report in IN_FLIGHT:
                continue  # waiting for the fresh report
            # asked, and still no fresh report: command it (a device already there answers
            # `live` at once)
        if not dev.online:
            if plan.offline == "skip":
                out.finish[s.device_id] = StepChange(
                    StepStatus.SKIPPED, None, "offline",
                    "offline when its stage started; skipped (offline=skip)")
            elif now - stage_started > plan.offline_wait_s:
                out.finish[s.device_id] = StepChange(
                    StepStatus.FAILED, None, "offline",
                    f"offline for the {plan.offline_wait_s:g} s its stage waited "
                    "(offline=wait)")
            continue
        out.send.append(s.device_id)
        room -= 1
    return out


class BakeOutcome(StrEnum):
    CONTINUE = "continue"
    PASS = "pass"
    FAIL = "fail"
    INCONCLUSIVE = "inconclusive"


def decide_bake(shadow: bool, started: float, length: float, verdict: G.Verdict | None,
                now: float) -> BakeOutcome:
    """A failing verdict fails at once; a shadow stage passes as soon as its gates pass; a
    bake passes when its time is up with a passing verdict, and is inconclusive (pause,
    never pass) with any other."""
    if verdict is None:
        return BakeOutcome.CONTINUE
    if verdict.verdict == G.FAIL:
        return BakeOutcome.FAIL
    if shadow and verdict.verdict == G.PASS:
        return BakeOutcome.PASS
    if now - started < length:
        return BakeOutcome.CONTINUE
    return BakeOutcome.PASS if verdict.verdict == G.PASS else BakeOutcome.INCONCLUSIVE


def bake_time(plan: Plan, kinds: Sequence[str], idx: int) -> float:
    """How long stage `idx` bakes: the shadow stage up to its timeout, the first install
    stage `bake_s`, later ones `wave_bake`, the last none."""
    if kinds[idx] == "shadow":
        return plan.shadow_timeout_s
    if idx == len(kinds) - 1:
        return 0.0
    first_install = kinds.index("install")
    return plan.bake_s if idx == first_install else plan.wave_bake


def bake_side(moved: bool, st: Mapping[str, Any] | None, digest: str
              ) -> tuple[str | None, Mapping[str, Any] | None]:
    """Where one targeted device's state puts it in a bake's evidence: ("new", its summary
    with its health status under `_health`) when this rollout moved it (`moved`) and it runs
    `digest`, ("old", its summary) when it was not moved and runs something else, (None,
    None) otherwise or when it is offline."""
    st = st or {}
    if not st.get("online"):
        return None, None
    active = ((st.get("model") or {}).get("active") or {}).get("digest")
    if moved and active == digest:
        summary = dict(st.get("summary") or {})
        summary["_health"] = (st.get("health") or {}).get("status", "unknown")
        return "new", summary
    if not moved and active != digest:
        return "old", st.get("summary") or {}  # read only: the stored state's own dict
    return None, None


def bake_inputs(targets: Mapping[str, Mapping[str, Any]], moved: set[str],
                states: Mapping[str, Mapping[str, Any]], digest: str
                ) -> tuple[list[dict], list[dict], list[dict]]:
    """The bake gates' evidence: summaries of online devices this rollout moved to the new
    model, of those still on the old one, and the moved ones' baselines."""
    new, old, baseline = [], [], []
    for d, t in targets.items():
        side, summary = bake_side(d in moved, states.get(d), digest)
        if side == "new":
            new.append(summary)
            baseline.append(t.get("baseline") or {})
        elif side == "old":
            old.append(summary)
    return new, old, baseline  # type: ignore[return-value]


class BakeEvidence:
    """`bake_inputs` kept device by device: each targeted device's `gates.bake_part` on the
    side its state puts it (`bake_side`), recomputed by `update` when its state or its install
    step changed. A measure then judges the parts it holds (`verdict`) instead of reading
    every device's state and summary again: the driver's bake costs what changed, not the
    fleet's size times the number of measures."""

    def __init__(self, targets: Mapping[str, Mapping[str, Any]], moved: set[str],
                 states: Mapping[str, Mapping[str, Any]], digest: str) -> None:
        self.targets, self.digest = targets, digest
        self.new: dict[str, tuple[Any, ...]] = {}
        self.old: dict[str, tuple[Any, ...]] = {}
        self.baseline: dict[str, tuple[Any, ...]] = {}
        for d in targets:
            self.update(d, d in moved, states.get(d))

    def update(self, device: str, moved: bool, st: Mapping[str, Any] | None) -> None:
        self.new.pop(device, None)
        self.old.pop(device, None)
        side, summary = bake_side(moved, st, self.digest)
        if side == "new":
            self.new[device] = G.bake_part(summary)  # type: ignore[arg-type]
            if device not in self.baseline:  # a target's baseline never changes
                self.baseline[device] = G.bake_part(self.targets[device].get("baseline") or {})
        elif side == "old":
            self.old[device] = G.bake_part(summary)  # type: ignore[arg-type]

    def verdict(self, gates: Sequence[G.Gate], min_requests: int) -> G.Verdict:
        return G.judge_bake(gates, list(self.new.values()), list(self.old.values()),
                            min_requests=min_requests,
                            baseline=[self.baseline[d] for d in self.new])


def left_behind(targets: Sequence[str], steps: Mapping[tuple[str, str], StepView],
                devices: Mapping[str, DeviceView], digest: str) -> list[tuple[str, str]]:
    """Targeted devices that do not run the bundle, each with why (its install step's
    status and reason, or what its state shows)."""
    out = []
    for d in targets:
        s = steps.get((d, "install"))
        dev = devices.get(d, _NOBODY)
        if s is not None and s.status == StepStatus.DONE and dev.active in (digest, None):
            continue  # done, and its state (if any) agrees
        if s is None or s.status == StepStatus.DONE:
            why = f"its state shows model {dev.active} active"
        else:
            why = f"{s.status}" + (f": {s.result}" if s.result else "")
        out.append((d, why))
    return out


def rollback_steps(targets: Sequence[str], steps: Mapping[tuple[str, str], StepView],
                   devices: Mapping[str, DeviceView], digest: str) -> list[tuple[str, str]]:
    """What undoing the rollout takes: a rollback for each device it moved to the new model
    (not one that already ran it before: result `unchanged`), a shadow-stop for each still
    shadowing the candidate."""
    out = []
    for d in targets:
        dev = devices.get(d, _NOBODY)
        inst, shd = steps.get((d, "install")), steps.get((d, "shadow"))
        moved = inst is not None and inst.status == StepStatus.DONE
        if moved and inst is not None and inst.result == "unchanged":
            continue
        if dev.active == digest or moved:
            out.append((d, "rollback"))
        elif dev.shadow == digest or (shd is not None and shd.status == StepStatus.DONE):
            out.append((d, "shadow-stop"))
    return out


def leftover_shadows(targets: Sequence[str], steps: Mapping[tuple[str, str], StepView],
                     devices: Mapping[str, DeviceView], digest: str) -> list[str]:
    """Canary devices still shadowing the candidate though their promotion failed."""
    out = []
    for d in targets:
        shd, inst = steps.get((d, "shadow")), steps.get((d, "install"))
        if shd is not None and shd.status == StepStatus.DONE and \
                (inst is None or inst.status != StepStatus.DONE) and \
                devices.get(d, _NOBODY).shadow == digest:
            out.append(d)
    return out


def explain_no_evidence(new: int, moved: int, unchanged: int) -> str:
    """Why a bake saw nothing on the new model, in words an operator can act on."""
    if moved == 0 and unchanged:
        return (f"no device of this stage was moved by this rollout ({unchanged} were "
                "already there)")
    if new == 0 and moved:
        return f"none of the {moved} moved devices is online on the new model"
    return ""
