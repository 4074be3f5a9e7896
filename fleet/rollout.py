"""Rollouts: move a fleet to a new model in stages, judge every stage on what the devices
report, and undo what was done when a stage fails. Everything is persisted (fleet/state.py), so
a controller killed at any moment resumes where it stopped and commands no device twice.

Plan (`Plan`): a label selector picks the devices; the canary (a count or a percentage, spread
over sites/labels) goes first, then waves (cumulative percentages ending at 100). Stages:

    shadow   canary devices install the candidate as a *shadow*: it scores the same live dies
             after the answer went out and never changes a decision; shadow gates compare it
             with the live model (agreement, fail-rate change, score shift) once `min dies`
             were scored. Too little evidence within `shadow_timeout_s` is *inconclusive*:
             the rollout pauses, it never passes. A failing shadow stops every shadow and the
             rollout fails: no device ever answered with the candidate.
    canary   the canary devices promote the candidate to live (atomic on the device), then
             bake for `bake_s` while bake gates watch their health against the old model.
    wave-N   the next devices (at most `max_parallel` installing at once), each wave followed
             by a bake of `wave_bake_s`, except the last.

A device's step succeeds when it is *live and healthy* (its state shows the new digest active
and health `ok`), not when the bundle was written; a step with no final answer within
`step_timeout_s` counts as failed. More failures in a stage than its budget (`max_failures`),
or a failing gate, triggers the policy: `pause`, or `rollback` (every device this rollout moved
goes back, every shadow stops).

The rollout's states (`RolloutRow.state`) and how each is left:

    pending       -> running                    (the driver starts)
    running       -> running (next stage/phase) stage deployed, or bake passed
                  -> succeeded                  last stage deployed within its budget
                  -> paused                     inconclusive gates, budget exceeded or gate
                                                failed with policy pause, operator pause
                  -> rolling-back               gate failed or budget exceeded with policy
                                                rollback, operator rollback
                  -> failed                     shadow gates failed (shadows stopped)
                  -> aborted                    operator abort (devices left as they are)
    paused        -> running                    operator resume (the bake restarts; failures
                                                so far are accepted)
                  -> rolling-back | aborted     operator rollback | abort
    rolling-back  -> rolled-back | failed       every moved device rolled back | some did not

Within `running`, `phase` is `deploy` (send commands, collect outcomes) or `bake` (gates).

Each device step (`steps` table): pending -> sending (committed *before* the command is
published) -> sent (the broker acknowledged it) -> done | failed | timeout (or skipped: an
offline device under `offline=skip`). The command id is `<rollout>:<device>:<step>`: a resumed
controller re-publishes a `sending` step only when the device shows no sign of it, and then with
the same id, which a device refuses to run twice.
"""

from __future__ import annotations

import collections
import contextlib
import json
import math
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from agent.commands import Command, InstallSpec, sign_command
from agent.errors import EdgefleetError, UsageError
from fleet import gates as G
from fleet.inventory import Device, Inventory, Selector, spread
from fleet.prometheus import PrometheusClient
from fleet.state import (
    ABORTED,
    FAILED,
    PAUSED,
    PENDING,
    ROLLED_BACK,
    ROLLING_BACK,
    RUNNING,
    S_DONE,
    S_FAILED,
    S_PENDING,
    S_SENDING,
    S_SENT,
    S_SKIPPED,
    S_TIMEOUT,
    STEP_BAD,
    STEP_FINAL,
    SUCCEEDED,
    TERMINAL,
    RolloutRow,
    StateDB,
    StepRow,
)
from fleet.transport import FleetController

__all__ = [
    "Engine",
    "Plan",
    "StagePlan",
    "assign",
    "command_id",
    "new_rollout_id",
    "parse_amount",
    "snapshot",
]

# step -> command type, and the device step that means it worked
STEP_COMMAND = {"shadow": "shadow", "install": "install", "rollback": "rollback",
                "shadow-stop": "shadow-stop"}
SUCCESS = {"shadow": "shadowing", "install": "live", "rollback": "rolled-back",
           "shadow-stop": "shadow-stopped"}
_IGNORED_REASONS = ("replayed",)  # a refusal of a duplicate says nothing about the first
_TERMINAL = ("live", "failed", "rolled-back", "reported", "shadowing", "shadow-stopped")


def command_id(rollout_id: str, device_id: str, step: str) -> str:
    """Stable: the same rollout, device and step always give the same command id."""
    return f"{rollout_id}:{device_id}:{step}"


def new_rollout_id() -> str:
    return f"r-{datetime.now(UTC):%y%m%d}-{secrets.token_hex(3)}"


def parse_amount(text: str, what: str) -> tuple[float, bool]:
    """`10` -> (10, False); `5%` -> (5.0, True). Raises `UsageError`."""
    t = str(text).strip()
    pct = t.endswith("%")
    try:
        v = float(t[:-1] if pct else t)
    except ValueError:
        raise UsageError(f"{what} {text!r}: expected a count (10) or a percentage (5%)") from None
    if not math.isfinite(v) or v < 0 or (pct and v > 100) or (not pct and v != int(v)):
        raise UsageError(f"{what} {text!r}: expected a whole count >= 0 or a percentage "
                         "between 0% and 100%")
    return v, pct


def _amount_of(text: str, n: int, *, round_up: bool) -> int:
    v, pct = parse_amount(text, "amount")
    if not pct:
        return int(v)
    x = v * n / 100.0
    return math.ceil(x - 1e-9) if round_up else math.floor(x + 1e-9)


# -- the plan ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """How to roll out: who, in which stages, judged by which gates, and what to do on failure.
    Durations in seconds. Serialized as JSON into the rollout record."""

    selector: str = ""
    canary: str = "1"  # count or percentage of the selected devices
    spread: tuple[str, ...] = ("site", "tester")  # labels the canary and waves are spread over
    shadow: bool = True
    shadow_min_dies: int = 1000
    shadow_timeout_s: float = 600.0
    shadow_gates: tuple[str, ...] = ()  # empty: G.DEFAULT_SHADOW_GATES; else per-metric override
    bake_s: float = 300.0
    wave_bake_s: float | None = None  # None: bake_s
    waves: tuple[float, ...] = (10.0, 50.0, 100.0)  # cumulative percentages
    max_parallel: int = 50
    max_failures: str = "5%"  # per stage: a count or a percentage of its devices
    on_failure: str = "pause"  # or rollback
    offline: str = "wait"  # or skip
    offline_wait_s: float = 600.0
    step_timeout_s: float = 300.0
    health_grace_s: float = 30.0  # after `live`, how long health may take to read `ok`
    gates: tuple[str, ...] = ()  # empty: G.DEFAULT_BAKE_GATES; else per-metric override
    min_requests: int = 100
    prom_gates: tuple[str, ...] = ()
    prometheus: str | None = None
    measure_interval_s: float = 2.0

    def __post_init__(self) -> None:
        for name in ("spread", "shadow_gates", "waves", "gates", "prom_gates"):
            v = getattr(self, name)
            if isinstance(v, str):
                v = tuple(x for x in v.split(",") if x) if name in ("spread", "waves") else (v,)
            object.__setattr__(self, name, tuple(v))
        try:
            waves = tuple(float(str(w).strip().rstrip("%")) for w in self.waves)
        except ValueError:
            raise UsageError(f"wave plan {','.join(map(str, self.waves))}: expected "
                             "percentages, e.g. 10%,50%,100%") from None
        object.__setattr__(self, "waves", waves)

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> Plan:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(doc) - known)
        if unknown:
            raise UsageError(f"plan: unknown field {unknown[0]!r}",
                             hint=f"fields: {', '.join(sorted(known))}")
        return cls(**doc)

    @classmethod
    def load(cls, path: Path) -> Plan:
        try:
            doc = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise UsageError(f"plan file {path} does not exist") from None
        except ValueError as e:
            raise UsageError(f"plan file {path}: not valid JSON: {e}") from None
        if not isinstance(doc, dict):
            raise UsageError(f"plan file {path}: expected a JSON object")
        return cls.from_json(doc)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d

    @property
    def bake_gates(self) -> tuple[G.Gate, ...]:
        explicit = [G.parse_gate(t, G.BAKE_METRICS) for t in self.gates]
        return G.with_defaults(explicit, G.DEFAULT_BAKE_GATES)

    @property
    def shadow_gate_list(self) -> tuple[G.Gate, ...]:
        explicit = [G.parse_gate(t, G.SHADOW_METRICS, "shadow gate") for t in self.shadow_gates]
        return G.with_defaults(explicit, G.DEFAULT_SHADOW_GATES)

    @property
    def prom_gate_list(self) -> tuple[G.PromGate, ...]:
        return tuple(G.parse_prom_gate(t) for t in self.prom_gates)

    @property
    def wave_bake(self) -> float:
        return self.bake_s if self.wave_bake_s is None else self.wave_bake_s

    def validate(self) -> Plan:
        """Raise `UsageError` naming the first thing wrong; returns self."""
        Selector.parse(self.selector)
        if not self.waves:
            raise UsageError("wave plan is empty", hint="e.g. --waves 10%,50%,100%")
        prev = 0.0
        for w in self.waves:
            if not 0 < w <= 100:
                raise UsageError(f"wave plan {_pcts(self.waves)}: {w:g}% is not between 0% "
                                 "and 100%")
            if w <= prev:
                raise UsageError(f"wave plan {_pcts(self.waves)}: waves are cumulative and "
                                 "must grow")
            prev = w
        if self.waves[-1] != 100:
            raise UsageError(f"wave plan {_pcts(self.waves)} does not end at 100%",
                             hint="the last wave must take every selected device, e.g. "
                                  "--waves 10%,50%,100%")
        v, _ = parse_amount(self.canary, "--canary")
        if v <= 0:
            raise UsageError(f"--canary {self.canary}: at least one device must go first")
        parse_amount(self.max_failures, "--max-failures")
        if self.on_failure not in ("pause", "rollback"):
            raise UsageError(f"--on-failure {self.on_failure!r}: expected pause or rollback")
        if self.offline not in ("wait", "skip"):
            raise UsageError(f"--offline {self.offline!r}: expected wait or skip")
        for name in ("step_timeout_s", "measure_interval_s"):
            if not getattr(self, name) > 0:
                raise UsageError(f"{name} must be > 0, not {getattr(self, name)}")
        for name in ("bake_s", "offline_wait_s", "health_grace_s", "shadow_timeout_s"):
            if getattr(self, name) < 0:
                raise UsageError(f"{name} must be >= 0, not {getattr(self, name)}")
        if self.wave_bake_s is not None and self.wave_bake_s < 0:
            raise UsageError(f"wave_bake_s must be >= 0, not {self.wave_bake_s}")
        if self.max_parallel < 1:
            raise UsageError(f"--max-parallel {self.max_parallel}: at least 1")
        if self.shadow_min_dies < 1:
            raise UsageError(f"--shadow-min-dies {self.shadow_min_dies}: at least 1 die is "
                             "needed before a verdict")
        if self.min_requests < 0:
            raise UsageError(f"--min-requests {self.min_requests}: must be >= 0")
        G.check_consistent(self.bake_gates, G.BAKE_METRICS, "gates")
        G.check_consistent(self.shadow_gate_list, G.SHADOW_METRICS, "shadow gates")
        G.check_consistent(self.prom_gate_list, None, "PromQL gates")
        if self.prom_gates and not self.prometheus:
            raise UsageError("PromQL gates need --prometheus URL")
        if self.prometheus:
            try:
                PrometheusClient(self.prometheus)
            except EdgefleetError as e:
                raise UsageError(str(e)) from None
        return self


def _pcts(waves: Sequence[float]) -> str:
    return ",".join(f"{w:g}%" for w in waves)


@dataclass(frozen=True)
class StagePlan:
    name: str
    kind: str  # shadow | install
    devices: tuple[str, ...]


def assign(plan: Plan, inventory: Inventory) -> list[StagePlan]:
    """Which devices go in which stage. Deterministic for the same plan and devices. Raises
    `UsageError` when the selector matches nothing or the canary is larger than the fleet."""
    selector = Selector.parse(plan.selector)
    targets = inventory.select(selector)
    if not targets:
        raise UsageError(f"selector {str(selector) or '(all)'!r} matches no device "
                         f"({len(inventory)} known)",
                         hint="see: edgefleet fleet devices")
    n = len(targets)
    canary_n = _amount_of(plan.canary, n, round_up=True)
    if canary_n > n:
        raise UsageError(f"--canary {plan.canary}: the selector matches only {n} devices")
    canary_n = max(1, canary_n)
    ordered = spread(targets, n, keys=plan.spread)
    stages: list[StagePlan] = []
    canary = tuple(d.id for d in ordered[:canary_n])
    if plan.shadow:
        stages.append(StagePlan("shadow", "shadow", canary))
    stages.append(StagePlan("canary", "install", canary))
    done = canary_n
    for w in plan.waves:
        upto = max(done, min(n, math.ceil(w * n / 100.0 - 1e-9)))
        if upto > done:
            stages.append(StagePlan(f"wave-{sum(s.name.startswith('wave') for s in stages) + 1}",
                                    "install", tuple(d.id for d in ordered[done:upto])))
            done = upto
    return stages


# -- the engine -------------------------------------------------------------------------------


class _Stop(Exception):
    """Leave the driving loop: the rollout is paused, finished, or taken over."""


@dataclass
class _Seen:
    last: str | None = None  # the latest step reported
    terminal: dict[str, Any] | None = None
    first_ok: float | None = None  # when the success step was first seen (health grace)


@dataclass
class Bundle:
    digest: str
    size: int
    url: str
    sequence: int
    name: str
    version: str


@dataclass
class EngineOptions:
    actor: str = "controller"
    tick_s: float = 0.1
    commit_every_s: float = 0.25
    heartbeat_s: float = 1.0
    resend_grace_s: float = 5.0  # on resume: how long to look for a sign of a `sending` step
    rollback_timeout_s: float | None = None  # default: step timeout
    progress: Callable[[dict[str, Any]], None] | None = None
    progress_every_s: float = 0.5
    prometheus_timeout_s: float = 5.0


class Engine:
    """Drives one rollout with a connected `FleetController` until it is paused or finished.

        engine = Engine(db, rollout_id, ctl, EngineOptions(actor="alice@host"))
        row = engine.run()       # returns the rollout's row when it stops driving
    """

    def __init__(self, db: StateDB, rollout_id: str, ctl: FleetController,
                 options: EngineOptions | None = None) -> None:
        self.db, self.rid, self.ctl = db, rollout_id, ctl
        self.opt = options or EngineOptions()
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self._inbox: collections.deque[tuple[str, str, dict[str, Any]]] = collections.deque()
        self._wake = threading.Event()
        self._seen: dict[str, _Seen] = {}
        self._infos: dict[str, Any] = {}
        self._dirty: set[tuple[str, str]] = set()
        self._taken_by: str | None = None
        self._last_commit = self._last_beat = self._last_progress = 0.0
        self._last_pump = self._last_request_check = 0.0
        self._resuming = False
        self._started_at = time.monotonic()
        ctl.add_listener(self._on_message)

    # -- messages (network thread) ----------------------------------------------------------

    def _on_message(self, kind: str, device_id: str, doc: dict[str, Any]) -> None:
        """Network thread: keep this rollout's events; any message wakes the loop (states are
        read from the controller when needed)."""
        if kind == "event" and doc.get("rollout_id") == self.rid:
            self._inbox.append((kind, device_id, doc))
        self._wake.set()

    # -- loading ----------------------------------------------------------------------------

    def _load(self) -> None:
        self.row = self.db.rollout(self.rid)
        self.plan = Plan.from_json(self.row.plan)
        self.bundle = Bundle(self.row.bundle_digest, self.row.bundle_size, self.row.bundle_url,
                             self.row.sequence or 0, self.row.model_name or "",
                             self.row.model_version or "")
        self.stages = self.db.stages(self.rid)
        self.targets = {t["device_id"]: t for t in self.db.targets(self.rid)}
        self.steps: dict[tuple[str, str], StepRow] = {
            (s.device_id, s.step): s for s in self.db.steps(self.rid)}
        self.by_stage: dict[int, list[str]] = collections.defaultdict(list)
        for t in self.targets.values():
            self.by_stage[t["stage"]].append(t["device_id"])
        self.by_cid = {s.command_id: s for s in self.steps.values()}
        self._prom = PrometheusClient(self.plan.prometheus, self.opt.prometheus_timeout_s) \
            if self.plan.prometheus else None

    # -- driving ----------------------------------------------------------------------------

    def run(self) -> RolloutRow:
        """Drive the rollout until it is paused or reaches a final state; returns its row."""
        holder = self.db.acquire(self.rid, self.owner)
        if holder is not None:
            raise EdgefleetError(f"rollout {self.rid} is being driven by {holder}",
                                 hint="pause, abort or roll it back from here; it acts on the "
                                      "request")
        try:
            self._load()
            for ev in self.ctl.orphan_events():  # delivered before our listener existed
                if ev.get("rollout_id") == self.rid:
                    self._inbox.append(("event", str(ev.get("device_id")), ev))
            self._resuming = any(s.status in (S_SENDING, S_SENT) for s in self.steps.values())
            if self.row.state == PENDING:
                self._set_state(RUNNING, audit="running")
            while self.row.state not in TERMINAL and self.row.state != PAUSED:
                try:
                    if self.row.state == ROLLING_BACK:
                        self._roll_back(FAILED if self.row.phase == "shadow-stop"
                                        else ROLLED_BACK)
                    elif self.row.phase == "deploy":
                        self._deploy(self.row.stage)
                    else:
                        self._bake(self.row.stage)
                except _Interrupt:
                    continue
                except _Stop:
                    break
            if self._taken_by is None:
                with contextlib.suppress(_Stop):
                    self._commit(force=True)
            if self._taken_by is not None:
                raise EdgefleetError(f"rollout {self.rid}: another controller ({self._taken_by})"
                                     " took it over while this one was not heard from; "
                                     "stopping here")
            self._report()
            return self.db.rollout(self.rid)
        finally:
            self.db.release(self.rid, self.owner)

    def _set_state(self, state: str, *, reason: str | None = None, audit: str | None = None,
                   detail: dict[str, Any] | None = None, **extra: Any) -> None:
        """Persist a rollout transition (with the dirty steps) and its audit record."""
        fields_ = {"state": state, "reason": reason, **extra}
        if state in TERMINAL:
            fields_["finished"] = time.time()
        with self.db.tx() as c:
            self.db.save_steps([self.steps[k] for k in self._dirty], c)
            self._dirty.clear()
            self.db.update(self.rid, c, **fields_)
            if audit:
                self.db.audit(self.rid, self.opt.actor, audit,
                              {"reason": reason, **(detail or {})}, c)
        self.row = self.db.rollout(self.rid)

    def _stage_update(self, idx: int, **fields_: Any) -> None:
        with self.db.tx() as c:
            self.db.update_stage(self.rid, idx, c, **fields_)
        self.stages = self.db.stages(self.rid)

    # -- the pump: messages in, outcomes out, requests, heartbeat ---------------------------

    def _pump(self) -> None:
        """One round: wait for messages (at most `tick_s`, at least a few ms so a message
        storm does not spin the loop), fold them in, commit, report, check requests."""
        self._wake.wait(self.opt.tick_s)
        rest = self._last_pump + 0.05 - time.monotonic()
        if rest > 0:
            time.sleep(rest)
        self._last_pump = time.monotonic()
        self._wake.clear()
        now = time.time()
        while self._inbox:
            kind, _, doc = self._inbox.popleft()
            if kind == "event":
                cid = doc.get("command_id")
                step = self.by_cid.get(cid or "")
                if step is None:
                    continue
                if doc.get("step") == "failed" and doc.get("reason") in _IGNORED_REASONS:
                    continue
                seen = self._seen.setdefault(cid, _Seen())
                seen.last = doc.get("step")
                if doc.get("step") in _TERMINAL:
                    seen.terminal = doc
        for cid, info in list(self._infos.items()):
            step = self.by_cid[cid]
            if step.status == S_SENDING:
                try:
                    acked = info.is_published()
                except ValueError:  # paho's queue was full: never queued; send it again
                    step.status, step.sent = S_PENDING, None
                    acked = False
                except RuntimeError:  # published while disconnected: paho sends it after the
                    acked = bool(getattr(info, "_published", False))  # reconnect
                if acked:
                    step.status = S_SENT
                self._dirty.add((step.device_id, step.step))
            if step.status != S_SENDING:
                del self._infos[cid]
        self._commit()
        if now - self._last_progress >= self.opt.progress_every_s:
            self._report()
        if now - self._last_request_check >= 0.5:
            self._last_request_check = now
            self._check_requests()

    def _commit(self, force: bool = False) -> None:
        now = time.time()
        beat = now - self._last_beat >= self.opt.heartbeat_s
        if not force and not beat and (not self._dirty or
                                       now - self._last_commit < self.opt.commit_every_s):
            return
        with self.db.tx() as c:
            if self._dirty:
                self.db.save_steps([self.steps[k] for k in self._dirty], c)
                self._dirty.clear()
            c.execute("UPDATE rollouts SET heartbeat=? WHERE id=? AND owner=?",
                      (now, self.rid, self.owner))
            owner = c.execute("SELECT owner FROM rollouts WHERE id=?", (self.rid,)).fetchone()
        self._last_commit = self._last_beat = now
        if owner is not None and owner[0] not in (None, self.owner):
            self._taken_by = owner[0]
            raise _Stop  # another process took the rollout over (our lease had lapsed)

    def _report(self) -> None:
        self._last_progress = time.time()
        if self.opt.progress is not None:
            with contextlib.suppress(Exception):
                self.opt.progress(snapshot(self.db, self.rid))

    def _check_requests(self) -> None:
        row = self.db.rollout(self.rid)
        req = row.request
        if not req:
            return
        with self.db.tx() as c:
            self.db.update(self.rid, c, request=None)
        if req == "pause" and self.row.state == RUNNING:
            self._set_state(PAUSED, reason=f"paused by an operator ({_by(self.db, self.rid)})",
                            audit="paused")
            raise _Stop
        if req == "abort":
            self._set_state(ABORTED, reason=f"aborted by an operator ({_by(self.db, self.rid)})",
                            audit="aborted")
            raise _Stop
        if req == "rollback" and self.row.state != ROLLING_BACK:
            self._set_state(ROLLING_BACK, reason=f"rollback requested by an operator "
                            f"({_by(self.db, self.rid)})", audit="rolling-back")
            raise _Interrupt

    # -- device steps -----------------------------------------------------------------------

    def _state(self, device: str) -> dict[str, Any]:
        return self.ctl.state(device) or {}

    def _resolve(self, step: StepRow, now: float) -> None:
        """Move one step on from what its events and its device's state say."""
        if step.status in STEP_FINAL or step.status == S_PENDING:
            return
        cid = step.command_id
        st = self._state(step.device_id)
        seen = self._seen.get(cid)
        last = st.get("last_command") or {}
        busy = st.get("busy") or {}
        key = (step.device_id, step.step)
        if step.status == S_SENDING and (seen is not None or last.get("id") == cid
                                         or busy.get("command_id") == cid):
            step.status = S_SENT  # the device has it: the broker had it
            self._dirty.add(key)
        outcome = reason = detail = None
        if seen is not None and seen.terminal is not None:
            outcome = seen.terminal.get("step")
            reason, detail = seen.terminal.get("reason"), seen.terminal.get("detail")
        elif last.get("id") == cid and last.get("result"):
            outcome, reason, detail = last.get("result"), last.get("reason"), last.get("detail")
        progress = (seen.last if seen else None) or (busy.get("step") if
                                                     busy.get("command_id") == cid else None)
        if progress and step.result != progress and outcome is None:
            step.result = progress
            self._dirty.add(key)
        if outcome == "failed":
            self._finish(step, S_FAILED, "failed", reason or "failed", detail)
        elif outcome in _TERMINAL and outcome != SUCCESS[step.step]:  # an agent that does
            self._finish(step, S_FAILED, outcome, "unsupported",  # not know this command
                         f"the device answered {outcome!r} to a {STEP_COMMAND[step.step]} "
                         "command: its agent does not support it")
        elif outcome == SUCCESS[step.step]:
            ok, why = self._settled(step, st)
            seen = self._seen.setdefault(cid, _Seen())
            seen.first_ok = seen.first_ok or now
            if ok:
                self._finish(step, S_DONE, outcome, None, None)
            elif now - seen.first_ok > self.plan.health_grace_s:
                self._finish(step, S_FAILED, outcome, "unhealthy", why)
        elif step.sent is not None and now - step.sent > self._timeout(step):
            self._finish(step, S_TIMEOUT, step.result, "timeout",
                         f"no final step within {self._timeout(step):g} s (last step: "
                         f"{step.result or 'none'})")

    def _timeout(self, step: StepRow) -> float:
        if step.step in ("rollback", "shadow-stop"):
            return self.opt.rollback_timeout_s or self.plan.step_timeout_s
        return self.plan.step_timeout_s

    def _settled(self, step: StepRow, st: Mapping[str, Any]) -> tuple[bool, str | None]:
        """Is the device where the step should have left it (and healthy)?"""
        model = st.get("model") or {}
        active = (model.get("active") or {}).get("digest")
        shadow = (model.get("shadow") or {}).get("digest")
        health = st.get("health") or {}
        if step.step == "install":
            if active != self.bundle.digest:
                return False, f"reported live, but its state shows model {active} active"
            if health.get("status") != "ok":
                return False, (f"live, but health is {health.get('status')}: "
                               f"{health.get('reason')}")
            return True, None
        if step.step == "shadow":
            if shadow != self.bundle.digest and active != self.bundle.digest:
                return False, "reported shadowing, but its state shows no such shadow"
            return True, None
        if step.step == "rollback":
            if active == self.bundle.digest:
                return False, "reported rolled back, but still runs the new model"
            return True, None
        return (shadow != self.bundle.digest), "still shadowing"

    def _finish(self, step: StepRow, status: str, result: str | None, reason: str | None,
                detail: str | None) -> None:
        step.status, step.result, step.reason = status, result, reason
        step.detail = detail[:500] if detail else None
        step.finished = time.time()
        self._dirty.add((step.device_id, step.step))

    def _send(self, steps: Sequence[StepRow]) -> None:
        """Record the intent (committed), then publish; the broker's PUBACK marks them sent."""
        if not steps:
            return
        now = time.time()
        for s in steps:
            s.status, s.sent, s.attempts = S_SENDING, now, s.attempts + 1
            self._dirty.add((s.device_id, s.step))
        self._commit(force=True)
        for s in steps:
            self._publish(s)

    def _publish(self, s: StepRow) -> None:
        ctype = STEP_COMMAND[s.step]
        spec = InstallSpec(self.bundle.url, self.bundle.digest, self.bundle.size,
                           self.bundle.sequence) if ctype in ("install", "shadow") else None
        ttl = timedelta(seconds=self._timeout(s) + 120 + (
            self.plan.offline_wait_s if self.plan.offline == "wait" else 0))
        cmd = Command.new(ctype, s.device_id, id=s.command_id, rollout_id=self.rid, ttl=ttl,
                          install=spec)
        # Published directly (not FleetController.send) to keep paho's message info: its
        # PUBACK is what turns `sending` into `sent`. While the broker is unreachable paho
        # queues QoS 1 messages and sends them on reconnect.
        info = self.ctl.client.publish(self.ctl.topics.cmd(s.device_id),
                                       sign_command(cmd, self.ctl.key), qos=1)
        self._infos[s.command_id] = info

    def _recover_sending(self, steps: Sequence[StepRow]) -> None:
        """After a restart: a `sending` step with no sign on the device within the grace is
        published again (same id: a device that did get it refuses the copy)."""
        pending = [s for s in steps if s.status == S_SENDING]
        if not pending:
            return
        deadline = time.monotonic() + self.opt.resend_grace_s
        while time.monotonic() < deadline:
            self._pump()
            now = time.time()
            for s in pending:
                self._resolve(s, now)
            pending = [s for s in pending if s.status == S_SENDING]
            if not pending:
                return
        for s in pending:
            st = self._state(s.device_id)
            if not st.get("online"):
                continue  # the broker may hold it for the device; the timeout decides
            s.attempts += 1
            s.sent = time.time()
            self._dirty.add((s.device_id, s.step))
            self.db.audit(self.rid, self.opt.actor, "resent",
                          {"command_id": s.command_id, "why": "no sign of it on the device "
                           "after the controller restarted"})
            self._publish(s)

    # -- deploy -----------------------------------------------------------------------------

    def _stage_steps(self, idx: int) -> list[StepRow]:
        stage = self.stages[idx]
        name = "shadow" if stage.kind == "shadow" else "install"
        return [self.steps[(d, name)] for d in sorted(self.by_stage_for(idx))]

    def by_stage_for(self, idx: int) -> list[str]:
        """Devices of stage `idx` (the shadow stage has the canary's devices)."""
        stage = self.stages[idx]
        if stage.kind == "shadow":
            return self.by_stage[idx + 1]
        return self.by_stage[idx]

    def _budget(self, idx: int) -> int:
        n = len(self.by_stage_for(idx))
        return _amount_of(self.plan.max_failures, n, round_up=False) + \
            self.stages[idx].failures_accepted

    def _already(self, step: StepRow) -> bool:
        """The device is already where this step would take it: no command needed."""
        st = self._state(step.device_id)
        model = st.get("model") or {}
        active = (model.get("active") or {}).get("digest")
        healthy = (st.get("health") or {}).get("status") == "ok"
        if step.step == "install":
            return active == self.bundle.digest and healthy and bool(st.get("online"))
        if step.step == "shadow":
            return active == self.bundle.digest or \
                (model.get("shadow") or {}).get("digest") == self.bundle.digest
        return False

    def _deploy(self, idx: int) -> None:
        stage = self.stages[idx]
        if stage.started is None or stage.state == "pending":
            self._stage_update(idx, state="deploying", started=stage.started or time.time())
            self.db.audit(self.rid, self.opt.actor, "stage", {"stage": stage.name,
                                                               "phase": "deploy"})
        steps = self._stage_steps(idx)
        if self._resuming:
            self._recover_sending(steps)
            self._resuming = False
        started = self.stages[idx].started or time.time()
        budget = self._budget(idx)
        while True:
            self._pump()
            now = time.time()
            for s in steps:
                if s.status in (S_SENDING, S_SENT):
                    self._resolve(s, now)
            bad = [s for s in steps if s.status in STEP_BAD]
            in_flight = [s for s in steps if s.status in (S_SENDING, S_SENT)]
            pending = [s for s in steps if s.status == S_PENDING]
            if len(bad) > budget:
                if in_flight:
                    continue  # let what is running finish (or time out) first
                self._over_budget(idx, bad, budget)
                return
            if not in_flight and not pending:
                self._commit(force=True)
                self._stage_deployed(idx)
                return
            if not self.ctl.connected.is_set():
                continue
            room = self.plan.max_parallel - len(in_flight)
            batch = []
            for s in pending:
                if room <= 0:
                    break
                if self._already(s):
                    self._finish(s, S_DONE, "unchanged", None, "already there; no command")
                    continue
                if not self._state(s.device_id).get("online"):
                    if self.plan.offline == "skip":
                        self._finish(s, S_SKIPPED, None, "offline", "offline when its stage "
                                     "started; skipped (offline=skip)")
                    elif now - started > self.plan.offline_wait_s:
                        self._finish(s, S_FAILED, None, "offline",
                                     f"offline for the {self.plan.offline_wait_s:g} s its "
                                     "stage waited (offline=wait)")
                    continue
                batch.append(s)
                room -= 1
            self._send(batch)

    def _stage_deployed(self, idx: int) -> None:
        stage = self.stages[idx]
        now = time.time()
        last = idx == len(self.stages) - 1
        bake = self._bake_time(idx)
        self.db.audit(self.rid, self.opt.actor, "stage-deployed", {
            "stage": stage.name, **self._counts(self._stage_steps(idx))})
        if bake <= 0 and stage.kind == "install":  # no bake: no gates either
            self._stage_update(idx, state="passed", deployed=now, finished=now)
            if last:
                self._succeed()
            else:
                with self.db.tx() as c:
                    self.db.update(self.rid, c, stage=idx + 1, phase="deploy")
                self.row = self.db.rollout(self.rid)
            return
        self._stage_update(idx, state="baking", deployed=now, bake_started=now)
        with self.db.tx() as c:
            self.db.update(self.rid, c, phase="bake")
        self.row = self.db.rollout(self.rid)

    def _bake_time(self, idx: int) -> float:
        stage = self.stages[idx]
        if stage.kind == "shadow":
            return self.plan.shadow_timeout_s
        if idx == len(self.stages) - 1:
            return 0.0
        first_install = next(i for i, s in enumerate(self.stages) if s.kind == "install")
        return self.plan.bake_s if idx == first_install else self.plan.wave_bake

    def _over_budget(self, idx: int, bad: Sequence[StepRow], budget: int) -> None:
        stage = self.stages[idx]
        shown = ", ".join(f"{s.device_id} ({s.reason})" for s in bad[:5])
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        reason = (f"{stage.name}: {len(bad)} of {len(self.by_stage_for(idx))} devices failed, "
                  f"budget {budget}: {shown}{more}")
        self._stage_update(idx, state="failed", finished=time.time())
        self._on_failure(reason, {"stage": stage.name, "failed": [s.device_id for s in bad]},
                         shadow=stage.kind == "shadow")

    def _on_failure(self, reason: str, detail: dict[str, Any], *, shadow: bool) -> None:
        if shadow:  # nothing answered with the candidate: stop the shadows, the rollout failed
            self._set_state(ROLLING_BACK, reason=reason, audit="shadow-failed", detail=detail,
                            phase="shadow-stop")
            raise _Interrupt
        if self.plan.on_failure == "rollback":
            self._set_state(ROLLING_BACK, reason=reason, audit="rolling-back", detail=detail)
            raise _Interrupt
        self._set_state(PAUSED, reason=reason, audit="paused", detail=detail)
        raise _Stop

    def _succeed(self) -> None:
        """Every stage passed. A canary device whose promotion failed still runs the candidate
        as a shadow: stop it (best effort), then record the success."""
        left = []
        for d in self.targets:
            shd, inst = self.steps.get((d, "shadow")), self.steps.get((d, "install"))
            if shd is not None and shd.status == S_DONE and \
                    (inst is None or inst.status != S_DONE) and \
                    ((self._state(d).get("model") or {}).get("shadow") or {}).get("digest") \
                    == self.bundle.digest:
                left.append((d, "shadow-stop", command_id(self.rid, d, "shadow-stop")))
        if left:
            with self.db.tx() as c:
                self.db.add_steps(self.rid, left, c)
            for s in self.db.steps(self.rid):
                self.steps.setdefault((s.device_id, s.step), s)
                self.by_cid.setdefault(s.command_id, s)
            todo = [self.steps[(d, st)] for d, st, _ in left]
            self._send([s for s in todo if s.status == S_PENDING])
            while not all(s.status in STEP_FINAL for s in todo):
                self._pump()
                now = time.time()
                for s in todo:
                    self._resolve(s, now)
        self._set_state(SUCCEEDED, reason=self._summary_reason(), audit="succeeded",
                        detail=self._failures_detail())

    # -- bake -------------------------------------------------------------------------------

    def _moved(self) -> list[str]:
        """Devices this rollout made run the new model (their install step is done)."""
        return [d for (d, step), s in self.steps.items() if step == "install"
                and s.status == S_DONE]

    def _bake(self, idx: int) -> None:
        stage = self.stages[idx]
        started = stage.bake_started or time.time()
        length = self._bake_time(idx)
        shadow = stage.kind == "shadow"
        next_measure = 0.0
        verdict: G.Verdict | None = None
        while True:
            self._pump()
            now = time.time()
            if now >= next_measure:
                next_measure = now + self.plan.measure_interval_s
                verdict = self._measure(idx)
                self._stage_update(idx, verdict=verdict.to_json())
                if verdict.verdict == G.FAIL:
                    self._stage_update(idx, state="failed", finished=now)
                    self._on_failure(f"{stage.name}: gates failed: {verdict.explain()}",
                                     {"stage": stage.name, "verdict": verdict.to_json()},
                                     shadow=shadow)
                if shadow and verdict.verdict == G.PASS:
                    break
            if now - started >= length and verdict is not None:
                break
        assert verdict is not None
        if verdict.verdict != G.PASS:
            self._stage_update(idx, state="paused")
            why = "not enough evidence" if shadow else "gates inconclusive"
            self._set_state(PAUSED, reason=f"{stage.name}: {why}: {verdict.explain()}",
                            audit="paused", detail={"verdict": verdict.to_json()})
            raise _Stop
        self._stage_update(idx, state="passed", finished=time.time())
        self.db.audit(self.rid, self.opt.actor, "stage-passed",
                      {"stage": stage.name, "verdict": verdict.to_json()})
        if idx + 1 >= len(self.stages):
            self._succeed()
            return
        with self.db.tx() as c:
            self.db.update(self.rid, c, stage=idx + 1, phase="deploy")
        self.row = self.db.rollout(self.rid)

    def _measure(self, idx: int) -> G.Verdict:
        stage = self.stages[idx]
        if stage.kind == "shadow":
            shadows = []
            for s in self._stage_steps(idx):
                if s.status != S_DONE:
                    continue
                st = self._state(s.device_id)
                sh = (st.get("summary") or {}).get("shadow") or {}
                if sh.get("digest") == self.bundle.digest:
                    shadows.append(sh)
            return G.evaluate_shadow(self.plan.shadow_gate_list, shadows,
                                     min_dies=self.plan.shadow_min_dies)
        moved = set(self._moved())
        new, old, baseline = [], [], []
        for d, t in self.targets.items():
            st = self._state(d)
            if not st.get("online"):
                continue
            summary = dict(st.get("summary") or {})
            summary["_health"] = (st.get("health") or {}).get("status", "unknown")
            active = ((st.get("model") or {}).get("active") or {}).get("digest")
            if d in moved and active == self.bundle.digest:
                new.append(summary)
                baseline.append(t.get("baseline") or {})
            elif d not in moved and active != self.bundle.digest:
                old.append(summary)
        verdict = G.evaluate_bake(self.plan.bake_gates, new, old,
                                  min_requests=self.plan.min_requests, baseline=baseline)
        if self.plan.prom_gates:
            verdict = verdict.merge(G.evaluate_prometheus(
                self.plan.prom_gate_list, self._prom,
                {"rollout": self.rid, "digest": self.bundle.digest,
                 "version": self.bundle.version, "model": self.bundle.name}))
        return verdict

    # -- rolling back -----------------------------------------------------------------------

    def _roll_back(self, final: str = ROLLED_BACK) -> None:
        """Let running steps finish, then roll back every device on the new model and stop
        every shadow of the candidate; no install is sent any more."""
        reason = self.row.reason
        work = [s for s in self.steps.values() if s.step in ("install", "shadow")
                and s.status in (S_SENDING, S_SENT)]
        if self._resuming:
            self._recover_sending(work)
        while True:
            now = time.time()
            for s in work:
                self._resolve(s, now)
            work = [s for s in work if s.status in (S_SENDING, S_SENT)]
            if not work:
                break
            self._pump()
        new_steps = []
        for d in self.targets:
            st = self._state(d)
            model = st.get("model") or {}
            active = (model.get("active") or {}).get("digest")
            shadow = (model.get("shadow") or {}).get("digest")
            inst = self.steps.get((d, "install"))
            shd = self.steps.get((d, "shadow"))
            if active == self.bundle.digest or (inst is not None and inst.status == S_DONE
                                                and inst.result != "unchanged"):
                if inst is not None and inst.result == "unchanged":
                    continue  # it ran this model before the rollout: leave it
                new_steps.append((d, "rollback", command_id(self.rid, d, "rollback")))
            elif shadow == self.bundle.digest or (shd is not None and shd.status == S_DONE):
                new_steps.append((d, "shadow-stop", command_id(self.rid, d, "shadow-stop")))
        with self.db.tx() as c:
            self.db.add_steps(self.rid, new_steps, c)
        for s in self.db.steps(self.rid):
            key = (s.device_id, s.step)
            if key not in self.steps:
                self.steps[key] = s
                self.by_cid[s.command_id] = s
        todo = [self.steps[(d, st)] for d, st, _ in new_steps]
        if self._resuming:
            self._recover_sending(todo)
        self._send([s for s in todo if s.status == S_PENDING])
        while True:
            self._pump()
            now = time.time()
            for s in todo:
                self._resolve(s, now)
            if all(s.status in STEP_FINAL for s in todo):
                break
        bad = [s for s in todo if s.status != S_DONE]
        if bad:
            shown = ", ".join(f"{s.device_id} ({s.reason})" for s in bad[:5])
            self._set_state(FAILED, reason=f"{reason}; rollback failed on {len(bad)} "
                            f"devices: {shown}", audit="rollback-failed",
                            detail={"failed": [s.device_id for s in bad]})
        else:
            self._set_state(final, reason=reason, audit=final,
                            detail={"rolled_back": sum(s.step == "rollback" for s in todo),
                                    "shadows_stopped": sum(s.step == "shadow-stop"
                                                           for s in todo)})

    # -- reporting helpers ------------------------------------------------------------------

    @staticmethod
    def _counts(steps: Sequence[StepRow]) -> dict[str, int]:
        c = collections.Counter(s.status for s in steps)
        return {k: c.get(k, 0) for k in (S_DONE, S_FAILED, S_TIMEOUT, S_SKIPPED)}

    def _failures(self) -> list[StepRow]:
        return [s for s in self.steps.values() if s.status in (*STEP_BAD, S_SKIPPED)]

    def _failures_detail(self) -> dict[str, Any]:
        return {"failed": sorted(f"{s.device_id}" for s in self._failures()
                                 if s.status in STEP_BAD),
                "skipped": sorted(s.device_id for s in self._failures()
                                  if s.status == S_SKIPPED)}

    def _summary_reason(self) -> str | None:
        f = self._failures_detail()
        parts = []
        if f["failed"]:
            parts.append(f"{len(f['failed'])} devices failed within the budget: "
                         + ", ".join(f["failed"][:10]) + (" ..." if len(f["failed"]) > 10
                                                          else ""))
        if f["skipped"]:
            parts.append(f"{len(f['skipped'])} offline devices skipped: "
                         + ", ".join(f["skipped"][:10]))
        return "; ".join(parts) or None


class _Interrupt(_Stop):
    """Leave the current stage function; the main loop continues in the new state."""


def _by(db: StateDB, rid: str) -> str:
    log = db.audit_log(rid, 1)
    return log[-1]["actor"] if log else "unknown"


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
        "driver": row.owner,
        "bundle": {"digest": row.bundle_digest, "size": row.bundle_size, "url": row.bundle_url,
                   "name": row.model_name, "version": row.model_version,
                   "sequence": row.sequence},
        "plan": row.plan, "devices": len(targets), "stages": out_stages,
        "rollback": {"devices": len(rollback),
                     "done": sum(s.status == S_DONE for s in rollback),
                     "failed": sum(s.status in STEP_BAD for s in rollback)} if rollback else None,
        "problems": problems,
    }


# -- creating a rollout -------------------------------------------------------------------------


@dataclass
class NewRollout:
    """What `create` needs besides the plan: the published bundle and the fleet."""

    bundle: Bundle
    inventory: Inventory
    actor: str
    rollout_id: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def plan_targets(plan: Plan, inventory: Inventory) -> tuple[list[StagePlan], list[dict]]:
    stages = assign(plan, inventory)
    targets = []
    for i, st in enumerate(stages):
        if st.kind == "shadow":
            continue
        for d in st.devices:
            dev: Device = inventory.devices[d]
            targets.append({"device_id": d, "stage": i, "from_digest": dev.model_digest,
                            "from_version": dev.model_version, "labels": dev.labels,
                            "baseline": {k: v for k, v in dev.summary.items()
                                         if k != "shadow"}})
    return stages, targets


def create(db: StateDB, plan: Plan, new: NewRollout) -> str:
    """Persist a new rollout (pending) with its stages, targets and steps; returns its id."""
    plan.validate()
    stages, targets = plan_targets(plan, new.inventory)
    rid = new.rollout_id or new_rollout_id()
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
    return rid


def replace_plan(plan: Plan, **changes: Any) -> Plan:
    return replace(plan, **{k: v for k, v in changes.items() if v is not None})


# -- operator actions on a stored rollout (no driver running) -----------------------------------


def _stage_devices(db: StateDB, rid: str, idx: int) -> tuple[str, list[str]]:
    stages = db.stages(rid)
    kind = stages[idx].kind
    devs_stage = idx + 1 if kind == "shadow" else idx
    devices = [t["device_id"] for t in db.targets(rid) if t["stage"] == devs_stage]
    return ("shadow" if kind == "shadow" else "install"), devices


def resume(db: StateDB, rid: str, who: str) -> None:
    """Prepare a stopped rollout to be driven again. A paused one accepts the failures its
    stage has so far (the budget counts only new ones) and, if it paused in a bake, bakes
    again from now. One whose controller died just continues."""
    row = db.rollout(rid)
    if row.state in TERMINAL:
        raise EdgefleetError(f"rollout {rid} is already {row.state}; nothing to resume")
    if row.state != PAUSED:
        db.audit(rid, who, "resumed", {"after": "controller stopped", "state": row.state,
                                       "stage": row.stage, "phase": row.phase})
        return
    stages = db.stages(rid)
    with db.tx() as c:
        detail: dict[str, Any] = {"stage": None}
        if row.stage < len(stages):
            step, devices = _stage_devices(db, rid, row.stage)
            mine = set(devices)
            bad = sum(1 for s in db.steps(rid) if s.step == step and s.device_id in mine
                      and s.status in STEP_BAD)
            fields_: dict[str, Any] = {"failures_accepted": bad}
            if row.phase == "bake":
                fields_.update(bake_started=time.time(), state="baking")
            else:
                fields_["state"] = "deploying"
            db.update_stage(rid, row.stage, c, **fields_)
            detail = {"stage": stages[row.stage].name, "phase": row.phase,
                      "accepted_failures": bad, "paused_because": row.reason}
        db.update(rid, c, state=RUNNING, reason=None, request=None)
        db.audit(rid, who, "resumed", detail, c)


def request_rollback(db: StateDB, rid: str, who: str) -> None:
    """Mark a stored rollout for rollback (a driver then rolls back every device it moved)."""
    row = db.rollout(rid)
    if row.state == ROLLED_BACK:
        raise EdgefleetError(f"rollout {rid} is already rolled back")
    if row.state == ROLLING_BACK:
        db.audit(rid, who, "resumed", {"after": "controller stopped", "state": row.state})
        return
    with db.tx() as c:
        db.update(rid, c, state=ROLLING_BACK, finished=None, request=None,
                  reason=f"rollback requested by an operator ({who})"
                  + (f"; was {row.state}: {row.reason}" if row.reason else ""))
        db.audit(rid, who, "rolling-back", {"was": row.state}, c)
