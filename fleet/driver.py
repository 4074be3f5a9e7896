"""The rollout driver: carries out what fleet/decide.py decides for one rollout, publishes
commands, and persists every change (fleet/state.py). It holds no rules of its own: each
`tick` folds in the events that arrived, resolves the steps in flight, asks the decision core
what the current phase needs, and does it. State changes go through the transition table
(fleet/machine.py); nothing is decided by raising.

    driver = RolloutDriver(db, rollout_id, ctl, owner="host:pid:tok")
    while driver.tick():          # True while the rollout still needs driving
        time.sleep(0.2)           # the controller's tick: messages are folded by the round

Intent first: a step is committed `sending` before its command is published, with a command
id derived from the rollout, the device and the step; a driver loaded after a crash publishes
a `sending` step again (same id, which a device refuses to run twice) only if the device
shows no sign of it within `resend_grace_s`.

Fencing: the driver remembers the lease epoch of its rollout when it is created, and every
write it makes checks, in the same transaction, that it still holds the rollout at that epoch
(`StateDB.fence`); one that lost the lease (its controller stalled past it and another took
over) gets `LeaseLost` before it can record or publish anything more.

Cost, linear in devices and events, not in ticks: a tick resolves only the steps in flight
whose device sent something since the last one (all of them, at most `max_parallel`, every
`sweep_s`, for timeouts and the health grace); a deploy round reads the stage's counters and
its pending steps from a cursor, as far as the room to send goes; progress is counters per
stage, updated when a step changes, so nothing is rebuilt from the database while driving; a
command's events are dropped once its step is final, and `close` lets go of everything.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from agent.commands import Command, InstallSpec
from fleet import decide as D
from fleet import gates as G
from fleet.label_gates import evaluate_label_gates
from fleet.machine import (
    DRIVEN,
    IN_FLIGHT,
    STEP_BAD,
    STEP_FINAL,
    Phase,
    RolloutState,
    StageState,
    StepStatus,
    Trigger,
    next_state,
)
from fleet.plan import Plan, command_id
from fleet.prometheus import PrometheusClient
from fleet.state import RolloutRow, StateDB, StepRow
from fleet.transport import FleetController

__all__ = ["Bundle", "DriverOptions", "RolloutDriver"]

_LOG = logging.getLogger("edgefleet.fleet")


@dataclass
class Bundle:
    digest: str
    size: int
    url: str
    sequence: int
    name: str
    version: str


@dataclass
class DriverOptions:
    actor: str = "controller"
    commit_every_s: float = 0.25
    resend_grace_s: float = 5.0  # after a restart: how long to look for a sign of a step
    rollback_timeout_s: float | None = None  # default: the plan's step timeout
    prometheus_timeout_s: float = 5.0
    sweep_s: float = 1.0  # every step in flight re-resolved this often (timeouts, grace)
    progress: Callable[[dict[str, Any]], None] | None = None


class RolloutDriver:
    """Drives one rollout; see the module docstring. Not thread-safe except `on_message`
    (called on the network thread), which only queues."""

    def __init__(self, db: StateDB, rollout_id: str, ctl: FleetController, owner: str,
                 options: DriverOptions | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.db, self.rid, self.ctl, self.owner = db, rollout_id, ctl, owner
        self.opt = options or DriverOptions()
        self.clock = clock
        self._inbox: collections.deque[tuple[str, dict[str, Any]]] = collections.deque()
        self._touched: collections.deque[str] = collections.deque()  # devices with news
        self._next_sweep = 0.0
        self._seen: dict[str, D.Seen] = {}
        self._infos: dict[str, Any] = {}  # command id -> paho message info (until acked)
        self._dirty: set[tuple[str, str]] = set()
        self._last_commit = self._last_send = 0.0
        self._next_measure = 0.0
        self.verdict: G.Verdict | None = None
        self.forged = 0
        self._load(first=True)

    # -- loading ------------------------------------------------------------------------

    def _load(self, first: bool = False) -> None:
        now = self.clock()
        self.row: RolloutRow = self.db.rollout(self.rid)
        self.plan = Plan.from_json(self.row.plan)
        self.bundle = Bundle(self.row.bundle_digest, self.row.bundle_size, self.row.bundle_url,
                             self.row.sequence or 0, self.row.model_name or "",
                             self.row.model_version or "")
        self.ctx = D.Ctx(self.plan, self.bundle.digest, self.row.created,
                         self.opt.rollback_timeout_s)
        self.stages = self.db.stages(self.rid)
        self.kinds = [s.kind for s in self.stages]
        self.targets = {t["device_id"]: t for t in self.db.targets(self.rid)}
        self.steps: dict[tuple[str, str], StepRow] = {}
        self.by_cid: dict[str, StepRow] = {}
        self.reports: dict[str, StepRow] = {}  # report-now steps, by device
        for s in self.db.steps(self.rid):
            self._index(s)
            if s.status == StepStatus.SENDING and s.command_id not in self._infos:
                s.resend_after = now + self.opt.resend_grace_s  # published by a dead driver
        self.stage_of: dict[str, int] = {d: t["stage"] for d, t in self.targets.items()}
        self.by_stage: dict[int, list[str]] = collections.defaultdict(list)
        for d in sorted(self.stage_of):
            self.by_stage[self.stage_of[d]].append(d)
        self._cursor: dict[int, int] = {}  # stage -> its first step that may still be pending
        self._next_sweep = 0.0
        self._sweep_all = True  # the first sweep resolves every step in flight
        self._count()
        self._prom = PrometheusClient(self.plan.prometheus, self.opt.prometheus_timeout_s) \
            if self.plan.prometheus else None
        if first:
            self.ctl.add_listener(self.on_message)
            for ev in self.ctl.orphan_events():  # delivered before our listener existed
                if ev.get("rollout_id") == self.rid:
                    self._inbox.append((str(ev.get("device_id")), ev))
        self.views = _Views(self.ctl, self.targets)
        self._undo: list[StepRow] | None = None
        self._evidence: D.BakeEvidence | None = None  # built at the first bake measure
        self._evidence_stale: set[str] = set()  # devices whose part changed since the last
        if first:
            self.epoch = self.row.epoch  # the lease this driver was created under (fencing)

    def close(self) -> None:
        """This driver is done (its rollout released): stop listening, drop what it held."""
        self.ctl.remove_listener(self.on_message)
        self._inbox.clear()
        self._seen.clear()
        self._infos.clear()
        self._evidence = None
        self._evidence_stale.clear()

    def reload(self) -> None:
        """Re-read the rollout after an operator action changed it in the database; what was
        seen and published by this driver is kept."""
        self.flush()
        self._load()

    def _index(self, s: StepRow) -> None:
        self.steps[(s.device_id, s.step)] = s
        self.by_cid[s.command_id] = s
        if s.step == "report":
            self.reports[s.device_id] = s

    def _stage_step(self, s: StepRow) -> int | None:
        """The stage whose progress this step counts for (None: an undo or report step)."""
        if s.step == "install":
            return self.stage_of.get(s.device_id)
        if s.step == "shadow":
            idx = self.stage_of.get(s.device_id)
            return idx - 1 if idx is not None and idx > 0 and \
                self.kinds[idx - 1] == "shadow" else None
        return None

    def _count(self) -> None:
        self.counts: dict[int, collections.Counter] = collections.defaultdict(
            collections.Counter)
        self.in_flight: set[tuple[str, str]] = set()
        self.installed: set[str] = set()  # devices whose install step is done (bake evidence)
        for key, s in self.steps.items():
            if s.step == "install" and s.status == StepStatus.DONE:
                self.installed.add(s.device_id)
            idx = self._stage_step(s)
            if idx is not None:
                self.counts[idx][s.status] += 1
            if s.status in IN_FLIGHT:
                self.in_flight.add(key)

    # -- messages (network thread) ------------------------------------------------------

    def on_message(self, kind: str, device_id: str, doc: dict[str, Any]) -> bool:
        """Queue this rollout's events (claimed: True) and note its devices' new states."""
        if kind == "event" and doc.get("rollout_id") == self.rid:
            self._inbox.append((device_id, doc))
            return True
        if kind == "state" and device_id in self.targets:
            self.views.touch(device_id)
            self._touched.append(device_id)
        return False

    def _fold_inbox(self) -> None:
        while self._inbox:
            device, doc = self._inbox.popleft()
            cid = doc.get("command_id") or ""
            step = self.by_cid.get(cid)
            if step is None or step.status in STEP_FINAL:
                continue
            if not D.accept_event(step.device_id, device, doc):
                if step.device_id != device:
                    self.forged += 1
                    _LOG.warning("rollout %s: dropped an event from %s for %s's command %s",
                                 self.rid, device, step.device_id, cid)
                continue
            D.fold_event(self._seen.setdefault(cid, D.Seen()), doc)
            self._touched.append(step.device_id)

    def _resolve_touched(self, now: float) -> None:
        """Resolve the steps in flight of the devices with news since the last round and,
        every `sweep_s`, those whose time has come (a timeout, the end of a health grace, a
        resend after a restart: news of no device); every step in flight at the first sweep
        after a load. The rest would resolve to what they are: a sweep used to resolve every
        step in flight, up to `max_parallel` a second through a deploy, most of them
        resolved moments earlier on their device's news."""
        devices = set()
        while self._touched:
            devices.add(self._touched.popleft())
        if self._evidence is not None:  # their part of the bake's evidence, at the next measure
            self._evidence_stale |= devices
        if now >= self._next_sweep:
            self._next_sweep = now + self.opt.sweep_s
            every, self._sweep_all = self._sweep_all, False
            for key in list(self.in_flight):
                s = self.steps[key]
                if every or key[0] in devices or self._due(s, now):
                    self._resolve(s, now)
            return
        for d in devices:
            for name in D.STEP_COMMAND:
                if (d, name) in self.in_flight:
                    self._resolve(self.steps[(d, name)], now)

    def _due(self, s: StepRow, now: float) -> bool:
        """Whether an in-flight step with no news may change by the clock alone: past its
        timeout, in a health grace (`Seen.first_ok`), or due to be published again."""
        if s.sent is not None and now - s.sent > self.ctx.timeout(s.step):
            return True
        if s.resend_after is not None and now >= s.resend_after:
            return True
        seen = self._seen.get(s.command_id)
        return seen is not None and seen.first_ok is not None

    # -- one round ----------------------------------------------------------------------

    @property
    def driving(self) -> bool:
        return self.row.state in DRIVEN

    def tick(self) -> bool:
        """One round; returns whether the rollout still needs driving."""
        now = self.clock()
        self._fold_inbox()
        self._acks()
        self._resolve_touched(now)
        state, phase = self.row.state, self.row.phase
        if state == RolloutState.PENDING:
            self._move(Trigger.START, audit="running")
        elif state == RolloutState.RUNNING:
            if self.row.stage >= len(self.stages) or phase == Phase.FINISH:
                self._finish_phase(now)
            elif phase == Phase.BAKE:
                self._bake(self.row.stage, now)
            else:
                self._deploy(self.row.stage, now)
        elif state == RolloutState.ROLLING_BACK:
            self._roll_back(now)
        self._commit()
        return self.driving

    def next_round(self, now: float) -> float:
        """When this driver next needs a round: `now` while anything moves (any phase but a
        bake; steps in flight; events, acknowledgements or writes waiting; an operator's
        request), else, in a quiet bake, at its next measure or the bake's end. The states its
        devices report meanwhile are folded in by that round, as a measure reads them."""
        row = self.row
        if row.state != RolloutState.RUNNING or row.phase != Phase.BAKE or row.request or \
                self.in_flight or self._inbox or self._dirty or self._infos or \
                row.stage >= len(self.stages):
            return now
        stage = self.stages[row.stage]
        if stage.bake_started is None:
            return now
        return max(now, min(self._next_measure,
                            stage.bake_started + D.bake_time(self.plan, self.kinds, row.stage)))

    # -- steps --------------------------------------------------------------------------

    def _set(self, s: StepRow, change: D.StepChange, now: float) -> None:
        key = (s.device_id, s.step)
        if change.status is not None and change.status != s.status:
            idx = self._stage_step(s)
            if idx is not None:
                self.counts[idx][s.status] -= 1
                self.counts[idx][change.status] += 1
                if change.status == StepStatus.PENDING:  # back to pending: look from the start
                    self._cursor.pop(idx, None)
            s.status = change.status
            if s.step == "install":
                if s.status == StepStatus.DONE:
                    self.installed.add(s.device_id)
                else:
                    self.installed.discard(s.device_id)
                if self._evidence is not None:
                    self._evidence_stale.add(s.device_id)
            if s.status in IN_FLIGHT:
                self.in_flight.add(key)
            else:
                self.in_flight.discard(key)
            if s.status in STEP_FINAL:
                s.finished = now
                s.reason = change.reason
                s.detail = change.detail[:500] if change.detail else None
                self._seen.pop(s.command_id, None)  # forgotten once applied
                self._infos.pop(s.command_id, None)
        if change.result is not None:
            s.result = change.result
        self._dirty.add(key)

    def _resolve(self, s: StepRow, now: float) -> None:
        change = D.resolve_step(s, self.views.get(s.device_id, D.DeviceView()),  # type: ignore[arg-type]
                                self._seen.get(s.command_id), self.ctx, now)
        if change is None:
            return
        if change.resend:
            s.attempts += 1
            s.sent, s.resend_after = now, None
            self._dirty.add((s.device_id, s.step))
            self._audit("resent", {  # fenced: a driver that lost the lease publishes nothing
                "command_id": s.command_id,
                "why": "no sign of it on the device after the controller restarted"})
            self._publish(s)
            return
        self._set(s, change, now)

    def _acks(self) -> None:
        """The broker's PUBACK turns `sending` into `sent`."""
        for cid, info in list(self._infos.items()):
            s = self.by_cid[cid]
            if s.status != StepStatus.SENDING:
                del self._infos[cid]
                continue
            try:
                acked = info.is_published()
            except ValueError:  # paho's queue was full: never queued; send it again
                del self._infos[cid]
                self._set(s, D.StepChange(StepStatus.PENDING), self.clock())
                s.sent = None
                continue
            except RuntimeError:  # published while disconnected: sent after the reconnect
                acked = bool(getattr(info, "_published", False))
            if acked:
                del self._infos[cid]
                self._set(s, D.StepChange(StepStatus.SENT), self.clock())

    def _add_steps(self, pairs: list[tuple[str, str]]) -> list[StepRow]:
        new = [(d, st, command_id(self.rid, d, st)) for d, st in pairs
               if (d, st) not in self.steps]
        if new:
            with self._tx() as c:
                added = self.db.add_steps(self.rid, new, c)
            for s in added:  # not the rollout's every step read back: a round costs what it adds
                self._index(s)
        return [self.steps[p] for p in pairs]

    def _send(self, steps: list[StepRow]) -> None:
        """Record the intent (committed), then publish."""
        if not steps:
            return
        now = self._last_send = self.clock()
        for s in steps:
            s.sent, s.attempts = now, s.attempts + 1
            self._set(s, D.StepChange(StepStatus.SENDING), now)
        self._commit(force=True)
        for s in steps:
            self._publish(s)

    def _publish(self, s: StepRow) -> None:
        ctype = D.STEP_COMMAND[s.step]
        spec = InstallSpec(self.bundle.url, self.bundle.digest, self.bundle.size,
                           self.bundle.sequence) if ctype in ("install", "shadow") else None
        ttl = timedelta(seconds=self.ctx.timeout(s.step) + 120 + (
            self.plan.offline_wait_s if self.plan.offline == "wait" else 0))
        cmd = Command.new(ctype, s.device_id, id=s.command_id, rollout_id=self.rid, ttl=ttl,
                          install=spec)
        self._infos[s.command_id] = self.ctl.publish(cmd, track=False)

    # -- persistence --------------------------------------------------------------------

    @contextlib.contextmanager
    def _tx(self) -> Iterator[Any]:
        """A write transaction that holds only while this driver holds the rollout's lease
        (raises `fleet.state.LeaseLost` otherwise, writing nothing)."""
        with self.db.tx() as c:
            self.db.fence(c, self.rid, self.owner, self.epoch)
            yield c

    def _audit(self, action: str, detail: dict[str, Any]) -> None:
        with self._tx() as c:
            self.db.audit(self.rid, self.opt.actor, action, detail, c)

    def _commit(self, force: bool = False) -> None:
        now = self.clock()
        if not self._dirty or (not force and now - self._last_commit < self.opt.commit_every_s):
            return
        with self._tx() as c:
            self.db.save_steps([self.steps[k] for k in self._dirty], c)
        self._dirty.clear()
        self._last_commit = now

    def flush(self) -> None:
        self._commit(force=True)

    def _move(self, trigger: Trigger, *, reason: str | None = None, audit: str | None = None,
              detail: dict[str, Any] | None = None, **fields: Any) -> bool:
        """A rollout transition through the table, persisted with the dirty steps and its
        audit record in one transaction. Returns False (and changes nothing) when the table
        has no such move."""
        new = next_state(self.row.state, trigger)
        if new is None:
            _LOG.error("rollout %s: no transition %s from %s", self.rid, trigger,
                       self.row.state)
            return False
        return self._update(state=new, reason=reason, audit=audit, detail=detail, **fields)

    def _update(self, *, audit: str | None = None, detail: dict[str, Any] | None = None,
                **fields: Any) -> bool:
        if fields.get("state") in (RolloutState.SUCCEEDED, RolloutState.FAILED,
                                   RolloutState.ROLLED_BACK):
            fields["finished"] = self.clock()
        with self._tx() as c:
            self.db.save_steps([self.steps[k] for k in self._dirty], c)
            self._dirty.clear()
            self.db.update(self.rid, c, **fields)
            if audit:
                self.db.audit(self.rid, self.opt.actor, audit,
                              {"reason": fields.get("reason"), **(detail or {})}, c)
        self.row = self.db.rollout(self.rid)
        self._report()
        return True

    def _stage(self, idx: int, **fields: Any) -> None:
        with self._tx() as c:
            self.db.update_stage(self.rid, idx, c, **fields)
        self.stages = self.db.stages(self.rid)
        self._report()

    # -- deploy -------------------------------------------------------------------------

    def stage_devices(self, idx: int) -> list[str]:
        """Devices of stage `idx` (the shadow stage has the canary's devices)."""
        return self.by_stage[idx + 1 if self.kinds[idx] == "shadow" else idx]

    def _stage_steps(self, idx: int) -> list[StepRow]:
        name = "shadow" if self.kinds[idx] == "shadow" else "install"
        return [self.steps[(d, name)] for d in self.stage_devices(idx)]

    def _pending(self, idx: int) -> Iterator[StepRow]:
        """Stage `idx`'s pending steps in stage order, lazily, from a cursor past the prefix
        that has left `pending` (steps go back to pending only on a retry, which reloads, or
        a refused publish, which resets the cursor): a round costs what it sends."""
        devs = self.stage_devices(idx)
        name = "shadow" if self.kinds[idx] == "shadow" else "install"
        i = self._cursor.get(idx, 0)
        while i < len(devs) and self.steps[(devs[i], name)].status != StepStatus.PENDING:
            i += 1
        self._cursor[idx] = i
        for j in range(i, len(devs)):
            s = self.steps[(devs[j], name)]
            if s.status == StepStatus.PENDING:
                yield s

    def _deploy(self, idx: int, now: float) -> None:
        stage = self.stages[idx]
        if stage.state in (StageState.PENDING, StageState.PAUSED) or stage.started is None:
            self._stage(idx, state=StageState.DEPLOYING, started=stage.started or now)
            self._audit("stage", {"stage": stage.name, "phase": "deploy"})
            stage = self.stages[idx]
        name = "shadow" if self.kinds[idx] == "shadow" else "install"
        dec = D.decide_deploy((), self.views, self.ctx, now,  # type: ignore[arg-type]
                              stage_started=stage.started or now,
                              accepted=stage.failures_accepted,
                              reports=_Statuses(self.reports),
                              connected=self.ctl.connected.is_set(),
                              counts=self.counts[idx], pending=self._pending(idx))
        for d, change in dec.finish.items():
            self._set(self.steps[(d, name)], change, now)
        if dec.report:
            self._send(self._add_steps([(d, "report") for d in dec.report]))
        if dec.send and not self._hold_sends(len(dec.send), idx, now):
            self._send([self.steps[(d, name)] for d in dec.send])
        if dec.over_budget:
            steps = self._stage_steps(idx)
            bad = [s for s in steps if s.status in STEP_BAD]
            n_budget = D.budget(self.plan, len(steps), stage.failures_accepted)
            shown = ", ".join(f"{s.device_id} ({s.reason})" for s in bad[:5])
            more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
            self._stage(idx, state=StageState.FAILED, finished=now)
            self._on_failure(f"{stage.name}: {len(bad)} of {len(steps)} devices failed, "
                             f"budget {n_budget}: {shown}{more}",
                             {"stage": stage.name, "failed": [s.device_id for s in bad]},
                             shadow=stage.kind == "shadow")
        elif dec.deployed:
            self._commit(force=True)
            self._deployed(idx, now)

    def _hold_sends(self, n: int, idx: int, now: float) -> bool:
        """Whether to leave `n` sends for a later round: a few slots freed while most are
        still in flight are filled together, a tenth of `max_parallel` at a time or after
        `commit_every_s`, so a wave costs one committed intent per batch rather than one per
        round (each a durable commit: the intent is written before the publish)."""
        batch = self.plan.max_parallel // 10
        c = self.counts[idx]
        in_flight = c.get(StepStatus.SENDING, 0) + c.get(StepStatus.SENT, 0)
        return n < batch and in_flight > 0 and now - self._last_send < self.opt.commit_every_s

    def _deployed(self, idx: int, now: float) -> None:
        stage = self.stages[idx]
        c = self.counts[idx]
        self._audit("stage-deployed", {
            "stage": stage.name, **{k: c.get(k, 0) for k in (StepStatus.DONE, StepStatus.FAILED,
                                                             StepStatus.TIMEOUT,
                                                             StepStatus.SKIPPED)}})
        bake = D.bake_time(self.plan, self.kinds, idx)
        if bake <= 0 and stage.kind == "install":  # no bake: no gates either
            self._stage(idx, state=self._passed_state(idx), deployed=now, finished=now)
            self._advance(idx)
            return
        self._stage(idx, state=StageState.BAKING, deployed=now, bake_started=now)
        self._next_measure = 0.0
        self._update(phase=Phase.BAKE)

    def _passed_state(self, idx: int) -> StageState:
        """A stage with a failed or skipped device did not simply pass."""
        c = self.counts[idx]
        bad = sum(c.get(k, 0) for k in (*STEP_BAD, StepStatus.SKIPPED))
        return StageState.PARTIAL if bad else StageState.PASSED

    def _advance(self, idx: int) -> None:
        nxt = idx + 1
        while nxt < len(self.stages) and self.stages[nxt].state == StageState.MERGED:
            nxt += 1
        if nxt >= len(self.stages):
            self._update(phase=Phase.FINISH)
        else:
            self._update(stage=nxt, phase=Phase.DEPLOY)

    def _on_failure(self, reason: str, detail: dict[str, Any], *, shadow: bool) -> None:
        """The stage failed: an operator's promote of it (made while it deployed) goes too."""
        rid = self.rid
        if shadow:  # nothing answered with the candidate: stop the shadows; the rollout failed
            self._move(Trigger.ROLLBACK, reason=reason, audit="shadow-failed", detail=detail,
                       phase=Phase.SHADOW_STOP, request=None)
        elif self.plan.on_failure == "rollback":
            self._move(Trigger.ROLLBACK, reason=reason, audit="rolling-back", detail=detail,
                       phase=Phase.ROLLBACK, request=None)
        else:
            self._move(Trigger.PAUSE, reason=f"{reason}; next: edgefleet fleet rollout retry "
                       f"{rid} (command the failed devices again), resume {rid} (accept them "
                       f"and go on) or rollback {rid}", audit="paused", detail=detail,
                       request=None)

    # -- bake ---------------------------------------------------------------------------

    def moved(self) -> set[str]:
        """Devices this rollout made run the new model (their install step is done)."""
        return {d for (d, st), s in self.steps.items() if st == "install"
                and s.status == StepStatus.DONE and s.result != "unchanged"}

    def measure(self, idx: int) -> G.Verdict:
        if self.kinds[idx] == "shadow":
            shadows = []
            for s in self._stage_steps(idx):
                if s.status != StepStatus.DONE:
                    continue
                sh = ((self.ctl.state_of(s.device_id) or {}).get("summary") or {}).get(
                    "shadow") or {}
                if sh.get("digest") == self.bundle.digest:
                    shadows.append(sh)
            return G.evaluate_shadow(self.plan.shadow_gate_list, shadows,
                                     min_dies=self.plan.shadow_min_dies)
        verdict = self._bake_evidence().verdict(self.plan.bake_gates, self.plan.min_requests)
        if self.plan.prom_gates:
            verdict = verdict.merge(G.evaluate_prometheus(
                self.plan.prom_gate_list, self._prom,
                {"rollout": self.rid, "digest": self.bundle.digest,
                 "version": self.bundle.version, "model": self.bundle.name}))
        if self.plan.label_gates:
            verdict = verdict.merge(evaluate_label_gates(
                self.plan.label_gate_list, self._prom, self.bundle.digest,
                window_s=self.plan.label_window_s, min_good=self.plan.label_min_good,
                min_bad=self.plan.label_min_bad))
        return verdict

    def _bake_evidence(self) -> D.BakeEvidence:
        """The bake's evidence, brought up to date with the devices whose state or install
        step changed since the last measure (built from every target's state the first
        time)."""
        if self._evidence is None:
            self._evidence = D.BakeEvidence(self.targets, self.installed, _States(self.ctl),
                                            self.bundle.digest)
            self._evidence_stale.clear()
        for d in self._evidence_stale:
            if d in self.targets:
                self._evidence.update(d, d in self.installed, self.ctl.state_of(d))
        self._evidence_stale.clear()
        return self._evidence

    def _bake(self, idx: int, now: float) -> None:
        stage = self.stages[idx]
        shadow = stage.kind == "shadow"
        if self.row.request == "promote":  # an operator ended the bake early
            self._update(request=None, audit="promoted", detail={"stage": stage.name})
            self._bake_passed(idx, now, self.verdict, promoted=True)
            return
        if now >= self._next_measure:
            self._next_measure = now + self.plan.measure_interval_s
            self.verdict = self.measure(idx)
            self._stage(idx, verdict=self.verdict.to_json())
        length = D.bake_time(self.plan, self.kinds, idx)
        outcome = D.decide_bake(shadow, stage.bake_started or now, length, self.verdict, now)
        v = self.verdict
        if outcome == D.BakeOutcome.FAIL and v is not None:
            self._stage(idx, state=StageState.FAILED, finished=now)
            self._on_failure(f"{stage.name}: gates failed: {v.explain()}",
                             {"stage": stage.name, "verdict": v.to_json()}, shadow=shadow)
        elif outcome == D.BakeOutcome.INCONCLUSIVE and v is not None:
            self._stage(idx, state=StageState.PAUSED)
            why = "not enough evidence" if shadow else "gates inconclusive"
            hint = "" if shadow else D.explain_no_evidence(
                len(self.moved() & set(self.stage_devices(idx))), len(self.moved()),
                sum(1 for d in self.stage_devices(idx)
                    if (s := self.steps.get((d, "install"))) and s.result == "unchanged"))
            self._move(Trigger.PAUSE, reason=f"{stage.name}: {why}: {v.explain()}"
                       + (f" ({hint})" if hint else "")
                       + f"; next: edgefleet fleet rollout resume {self.rid} (bake again), "
                       f"promote {self.rid} (accept the stage) or rollback {self.rid}",
                       audit="paused", detail={"verdict": v.to_json()})
        elif outcome == D.BakeOutcome.PASS:
            self._bake_passed(idx, now, v)

    def _bake_passed(self, idx: int, now: float, verdict: G.Verdict | None,
                     promoted: bool = False) -> None:
        stage = self.stages[idx]
        state = StageState.PASSED if stage.kind == "shadow" else self._passed_state(idx)
        self._stage(idx, state=state, finished=now)
        self._audit("stage-passed", {
            "stage": stage.name, "promoted": promoted,
            "verdict": verdict.to_json() if verdict else None})
        self.verdict = None
        self._advance(idx)

    # -- finish: the honest end ---------------------------------------------------------

    def _finish_phase(self, now: float) -> None:
        if self.row.phase != Phase.FINISH:
            self._update(phase=Phase.FINISH)
        views = self.views
        targets = sorted(self.targets)
        leftovers = D.leftover_shadows(targets, self.steps, views,  # type: ignore[arg-type]
                                       self.bundle.digest)
        todo = self._add_steps([(d, "shadow-stop") for d in leftovers])
        self._send([s for s in todo if s.status == StepStatus.PENDING])
        if any(s.status not in STEP_FINAL for s in todo):
            return
        if any(k[1] == "report" for k in self.in_flight):
            return  # a report-now still out: end with every step final (its timeout bounds this)
        behind = D.left_behind(targets, self.steps, views,  # type: ignore[arg-type]
                               self.bundle.digest)
        detail = {"left_behind": [{"device": d, "why": w} for d, w in behind]}
        if not behind:
            self._move(Trigger.SUCCEED, reason=None, audit="succeeded", detail=detail)
            return
        shown = ", ".join(f"{d} ({w})" for d, w in behind[:10]) + \
            (f" and {len(behind) - 10} more" if len(behind) > 10 else "")
        if self.plan.allow_partial:
            self._move(Trigger.SUCCEED, reason=f"partial (allow_partial): {len(behind)} of "
                       f"{len(targets)} devices left behind: {shown}", audit="succeeded",
                       detail=detail)
            return
        self._move(Trigger.PAUSE, reason=f"{len(behind)} of {len(targets)} devices do not run "
                   f"the bundle: {shown}; next: edgefleet fleet rollout retry {self.rid} "
                   f"(command them again) or rollback {self.rid}", audit="paused",
                   detail=detail)

    # -- rolling back -------------------------------------------------------------------

    def _roll_back(self, now: float) -> None:
        """Let running installs and shadows finish, then roll back every device on the new
        model and stop every shadow of the candidate; no install is sent any more."""
        if any(k[1] in ("install", "shadow", "report") for k in self.in_flight):
            return
        if self._undo is None:  # once per driver: what this rollout moved, and past undo steps
            undo = D.rollback_steps(sorted(self.targets), self.steps,
                                    self.views, self.bundle.digest)  # type: ignore[arg-type]
            undo += [p for p in self.steps if p[1] in D.UNDO_STEPS and p not in undo]
            self._undo = self._add_steps(undo)
        todo = self._undo
        self._send([s for s in todo if s.status == StepStatus.PENDING])
        if any(s.status not in STEP_FINAL for s in todo):
            return
        bad = [s for s in todo if s.status != StepStatus.DONE]
        reason = self.row.reason
        if bad:
            shown = ", ".join(f"{s.device_id} ({s.reason})" for s in bad[:5])
            self._move(Trigger.FAIL, reason=f"{reason}; rollback failed on {len(bad)} "
                       f"devices: {shown}", audit="rollback-failed",
                       detail={"failed": [s.device_id for s in bad]})
        elif self.row.phase == Phase.SHADOW_STOP:
            self._move(Trigger.FAIL, reason=reason, audit="failed",
                       detail={"shadows_stopped": len(todo)})
        else:
            self._move(Trigger.ROLLED_BACK, reason=reason, audit="rolled-back",
                       detail={"rolled_back": sum(s.step == "rollback" for s in todo),
                               "shadows_stopped": sum(s.step == "shadow-stop" for s in todo)})

    # -- progress -----------------------------------------------------------------------

    def progress(self) -> dict[str, Any]:
        """Where the rollout stands, from the counters (no database read)."""
        stages = []
        for st in self.stages:
            c = self.counts.get(st.idx) or collections.Counter()  # may run on another thread
            stages.append({
                "name": st.name, "kind": st.kind, "state": st.state,
                "devices": len(self.stage_devices(st.idx)) if st.state != StageState.MERGED
                else 0,
                "done": c.get(StepStatus.DONE, 0),
                "failed": c.get(StepStatus.FAILED, 0) + c.get(StepStatus.TIMEOUT, 0),
                "skipped": c.get(StepStatus.SKIPPED, 0),
                "in_flight": c.get(StepStatus.SENDING, 0) + c.get(StepStatus.SENT, 0),
                "pending": c.get(StepStatus.PENDING, 0),
                "started": st.started, "bake_started": st.bake_started})
        cur = self.stages[self.row.stage].name if self.row.stage < len(self.stages) else None
        return {"id": self.rid, "state": self.row.state, "stage": cur, "stage_idx":
                self.row.stage, "phase": self.row.phase, "reason": self.row.reason,
                "devices": len(self.targets), "stages": stages,
                "verdict": self.verdict.to_json() if self.verdict else None}

    def _report(self) -> None:
        if self.opt.progress is not None:
            try:
                self.opt.progress(self.progress())
            except Exception:
                _LOG.exception("progress callback failed")


class _Views(Mapping[str, D.DeviceView]):
    """Each target's `DeviceView`, made from its latest state when read, once per new state:
    a state report costs a set insertion, and the view of a device that reports while nothing
    asks about it (its stage not yet or no longer deploying) is made only when asked. `touch`
    runs on the network thread, reads on the driver's: a state that arrives during a read
    leaves the device stale again, so the next read sees it."""

    def __init__(self, ctl: FleetController, targets: Mapping[str, Any]) -> None:
        self._state_of = ctl.state_of
        self._targets = targets
        self._views: dict[str, D.DeviceView] = {}
        self._stale: set[str] = set(targets)

    def touch(self, device_id: str) -> None:
        self._stale.add(device_id)

    def __getitem__(self, device_id: str) -> D.DeviceView:
        if device_id in self._stale:
            self._stale.discard(device_id)  # before the read: a newer state marks it again
            self._views[device_id] = D.DeviceView.from_state(self._state_of(device_id))
        return self._views[device_id]

    def __iter__(self) -> Iterator[str]:
        return iter(self._targets)

    def __len__(self) -> int:
        return len(self._targets)


class _Statuses(Mapping[str, str]):
    """device -> the status of its step in `steps`, read when asked: a deploy round looks up
    only the devices it considers, instead of copying every report step's status."""

    def __init__(self, steps: Mapping[str, StepRow]) -> None:
        self._steps = steps

    def __getitem__(self, device_id: str) -> str:
        return self._steps[device_id].status

    def __iter__(self) -> Iterator[str]:
        return iter(self._steps)

    def __len__(self) -> int:
        return len(self._steps)


class _States:
    """`FleetController.state_of` as the read-only mapping `bake_inputs` asks with `get`."""

    def __init__(self, ctl: FleetController) -> None:
        self.get = ctl.state_of
