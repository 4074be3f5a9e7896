"""A rollout's plan: which devices (a label selector), in which stages (shadow on the canary,
canary, cumulative waves), judged by which gates, with which budgets, timeouts and failure
policy. Pure: a plan and the inventory give the stages; nothing here touches the network or
the database.

    plan = Plan(selector="site=fab2", canary="5%", waves=(10, 50, 100)).validate()
    stages = assign(plan, inventory)   # [StagePlan("shadow", ...), StagePlan("canary", ...), ...]

`exclude` names devices the selector matches but this rollout must leave alone; every other
selected device is *targeted*, and a rollout succeeds only when each of them runs the bundle
(or `allow_partial`, with the ones left behind listed).
"""

from __future__ import annotations

import json
import math
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from agent.errors import EdgefleetError, UsageError
from fleet import gates as G
from fleet.inventory import Device, Inventory, Selector, spread
from fleet.label_gates import LABEL_METRICS
from fleet.prometheus import PrometheusClient

__all__ = [
    "Plan",
    "StagePlan",
    "amount_of",
    "assign",
    "command_id",
    "new_rollout_id",
    "parse_amount",
    "plan_targets",
    "replace_plan",
]

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


def amount_of(text: str, n: int, *, round_up: bool) -> int:
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
    # label gates (fleet/label_gates.py): realized false-fail / recall of the new bundle from
    # the final-test labels joined on the devices, read from --prometheus over label_window_s
    label_gates: tuple[str, ...] = ()
    label_window_s: float = 86400.0
    label_min_good: int = 200
    label_min_bad: int = 20
    measure_interval_s: float = 2.0
    exclude: tuple[str, ...] = ()  # device ids the selector matches but this rollout skips
    allow_partial: bool = False  # succeed with devices left behind (listed), else pause

    def __post_init__(self) -> None:
        for name in ("spread", "shadow_gates", "waves", "gates", "prom_gates", "label_gates",
                     "exclude"):
            v = getattr(self, name)
            if isinstance(v, str):
                v = tuple(x for x in v.split(",") if x) \
                    if name in ("spread", "waves", "exclude") else (v,)
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
    def label_gate_list(self) -> tuple[G.Gate, ...]:
        return tuple(G.parse_gate(t, LABEL_METRICS, "label gate") for t in self.label_gates)

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
        self._validate_label_gates()
        if self.prometheus:
            try:
                PrometheusClient(self.prometheus)
            except EdgefleetError as e:
                raise UsageError(str(e)) from None
        return self

    def _validate_label_gates(self) -> None:
        G.check_consistent(self.label_gate_list, LABEL_METRICS, "label gates")
        if self.label_gates and not self.prometheus:
            raise UsageError("label gates need --prometheus URL (they read "
                             "edgefleet_label_joins_total from it)")
        if not self.label_window_s > 0:
            raise UsageError(f"--label-window must be > 0, not {self.label_window_s}")
        for name in ("label_min_good", "label_min_bad"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} {getattr(self, name)}: at least "
                                 "1 labelled die is needed before a verdict")


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
    excluded = set(plan.exclude)
    targets = [d for d in inventory.select(selector) if d.id not in excluded]
    if not targets:
        raise UsageError(f"selector {str(selector) or '(all)'!r} matches no device "
                         f"({len(inventory)} known)",
                         hint="see: edgefleet fleet devices")
    n = len(targets)
    canary_n = amount_of(plan.canary, n, round_up=True)
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


def plan_targets(plan: Plan, inventory: Inventory) -> tuple[list[StagePlan], list[dict]]:
    """The stages and, per targeted device, its stage and where it starts from (model,
    labels, the health summary that is its baseline)."""
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


def replace_plan(plan: Plan, **changes: Any) -> Plan:
    return replace(plan, **{k: v for k, v in changes.items() if v is not None})

