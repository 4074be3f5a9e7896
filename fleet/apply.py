"""Declarative rollouts: a YAML document says which bundle a set of devices should run and how
to get there; `edgefleet fleet apply -f rollout.yaml` (or the controller following a Git
repository) makes it so, idempotently.

    apiVersion: edgefleet/v1
    kind: Rollout
    metadata:
      name: fab2-model               # the declaration; each change of its spec is a version
    spec:
      bundle: sha256:<digest>        # a published bundle (edgefleet fleet publish)
      selector: site=fab2
      exclude: [box-017]
      strategy:
        shadow: {enabled: true, minDies: 1000, timeout: 10m, gates: ["agreement>=0.99"]}
        canary: 5%
        bake: 5m
        waves: [10%, 50%, 100%]
        waveBake: 2m
        maxParallel: 50
        spread: [site, tester]
      gates: ["error_rate<=0.01"]
      minRequests: 100
      prometheus: http://prometheus:9090
      promGates: ["sum(rate(x[5m])) <= 1"]
      labelGates: {gates: ["false_fail_rate<=0.02"], window: 1d, minGood: 200, minBad: 20}
      budgets: {maxFailures: 5%, onFailure: pause, allowPartial: false}
      timeouts: {step: 5m, healthGrace: 30s, offline: wait, offlineWait: 10m,
                 measureInterval: 2s}

Applying a document (`apply_doc`), by its spec's hash against the declaration's history
(`declared` table):
- the same spec as the latest version: nothing to do (`unchanged`);
- the spec of the version before the latest (a revert): the latest version's rollout is
  rolled back (its devices return to what they ran before it);
- any other spec: a new rollout `<name>-<version>`, superseding a non-final rollout of the
  same devices (one rollout per device).
A declaration that disappears from a followed repository is rolled back the same way.
`plan_doc` is the same decision without acting, for `--dry-run`: it says what would change
on which devices.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.errors import EdgefleetError, UsageError
from fleet.cli_options import parse_duration
from fleet.inventory import Inventory
from fleet.machine import RolloutState
from fleet.plan import Plan, plan_targets
from fleet.state import StateDB

__all__ = ["Change", "GitFollower", "apply_doc", "load_docs", "plan_doc", "spec_plan"]

API_VERSION = "edgefleet/v1"
WITHDRAWN = "withdrawn"  # the spec hash recorded when a declaration disappears

# spec key -> (Plan field, converter); nested sections flatten into the same plan
_DURATION = "duration"
_FIELDS: dict[str, tuple[str, Any]] = {
    "selector": ("selector", str), "exclude": ("exclude", tuple),
    "gates": ("gates", tuple), "minRequests": ("min_requests", int),
    "prometheus": ("prometheus", str), "promGates": ("prom_gates", tuple),
    "labelGates.gates": ("label_gates", tuple), "labelGates.window": ("label_window_s", _DURATION),
    "labelGates.minGood": ("label_min_good", int), "labelGates.minBad": ("label_min_bad", int),
    "strategy.canary": ("canary", str), "strategy.bake": ("bake_s", _DURATION),
    "strategy.waves": ("waves", tuple), "strategy.waveBake": ("wave_bake_s", _DURATION),
    "strategy.maxParallel": ("max_parallel", int), "strategy.spread": ("spread", tuple),
    "strategy.shadow.enabled": ("shadow", bool),
    "strategy.shadow.minDies": ("shadow_min_dies", int),
    "strategy.shadow.timeout": ("shadow_timeout_s", _DURATION),
    "strategy.shadow.gates": ("shadow_gates", tuple),
    "budgets.maxFailures": ("max_failures", str), "budgets.onFailure": ("on_failure", str),
    "budgets.allowPartial": ("allow_partial", bool),
    "timeouts.step": ("step_timeout_s", _DURATION),
    "timeouts.healthGrace": ("health_grace_s", _DURATION),
    "timeouts.offline": ("offline", str), "timeouts.offlineWait": ("offline_wait_s", _DURATION),
    "timeouts.measureInterval": ("measure_interval_s", _DURATION),
}


def _flatten(doc: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in doc.items():
        key = f"{prefix}{k}"
        if key == "strategy.shadow" and not isinstance(v, Mapping):
            out["strategy.shadow.enabled"] = v  # `shadow: false` for short
        elif isinstance(v, Mapping):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def spec_plan(spec: Mapping[str, Any], where: str) -> tuple[str, Plan]:
    """(bundle reference, validated plan) from a document's `spec`; `UsageError` naming the
    first unknown or bad field."""
    flat = _flatten({k: v for k, v in spec.items() if k != "bundle"})
    unknown = sorted(set(flat) - set(_FIELDS))
    if unknown:
        raise UsageError(f"{where}: unknown field spec.{unknown[0]}",
                         hint="fields: " + ", ".join(sorted(_FIELDS)))
    bundle = spec.get("bundle")
    if not isinstance(bundle, str) or not bundle:
        raise UsageError(f"{where}: spec.bundle is required (sha256:<digest> of a published "
                         "bundle)")
    kw: dict[str, Any] = {}
    for key, value in flat.items():
        name, conv = _FIELDS[key]
        if conv == _DURATION:
            kw[name] = parse_duration(str(value), f"{where}: spec.{key}")
        elif conv is tuple:
            kw[name] = tuple(str(v) for v in (value if isinstance(value, list) else [value]))
        else:
            kw[name] = conv(value)
    return bundle, Plan(**kw).validate()


def load_docs(text: str, where: str) -> list[dict[str, Any]]:
    """The Rollout documents of a YAML stream, each checked for apiVersion, kind and name."""
    import yaml

    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as e:
        raise UsageError(f"{where}: not valid YAML: {e}") from None
    for d in docs:
        if not isinstance(d, dict) or d.get("apiVersion") != API_VERSION or \
                d.get("kind") != "Rollout":
            raise UsageError(f"{where}: expected apiVersion: {API_VERSION}, kind: Rollout")
        name = (d.get("metadata") or {}).get("name")
        if not isinstance(name, str) or not name.replace("-", "").isalnum():
            raise UsageError(f"{where}: metadata.name must be letters, digits and '-'")
        if not isinstance(d.get("spec"), dict):
            raise UsageError(f"{where}: {name}: spec is required")
    return docs


def _hash(bundle_digest: str, plan: Plan) -> str:
    canon = json.dumps({"bundle": bundle_digest, "plan": plan.to_json()}, sort_keys=True)
    return hashlib.sha256(canon.encode()).hexdigest()


@dataclass
class Change:
    """What applying one document does (or would do)."""

    name: str
    action: str  # unchanged | create | rollback
    rollout_id: str | None = None
    detail: str = ""
    devices: list[tuple[str, str | None, str]] = field(default_factory=list)  # id, from, to

    def text(self) -> str:
        lines = [f"rollout {self.name}: {self.action}"
                 + (f" {self.rollout_id}" if self.rollout_id else "")
                 + (f" ({self.detail})" if self.detail else "")]
        for d, old, new in self.devices[:50]:
            lines.append(f"  {d}: {old or '-'} -> {new}")
        if len(self.devices) > 50:
            lines.append(f"  ... {len(self.devices) - 50} more")
        return "\n".join(lines)


@dataclass
class Resolved:
    """A document with its bundle found and verified."""

    name: str
    plan: Plan
    bundle: Any  # fleet.driver.Bundle
    spec_hash: str
    spec: dict[str, Any]


def resolve(doc: Mapping[str, Any], *, store: Path, keyring: Path, artifact_url: str,
            where: str) -> Resolved:
    """Find the document's bundle among the published ones and verify it as a device
    would (it may have expired or its key been revoked since it was published)."""
    from agent.bundle import verify_bundle
    from agent.keys import Keyring
    from fleet.artifacts import find_published
    from fleet.driver import Bundle

    name = doc["metadata"]["name"]
    ref, plan = spec_plan(doc["spec"], f"{where}: {name}")
    pub = find_published(store, ref)
    verify_bundle(pub.path, Keyring.load(keyring))
    bundle = Bundle(pub.digest, pub.size, f"{artifact_url.rstrip('/')}/sha256/{pub.digest}",
                    pub.sequence, pub.name, pub.version)
    return Resolved(name, plan, bundle, _hash(pub.digest, plan), dict(doc["spec"]))


def _version(inventory: Inventory, device: str) -> str | None:
    d = inventory.devices.get(device)
    return d.model_version if d is not None else None


def plan_doc(db: StateDB, r: Resolved, inventory: Inventory) -> Change:
    """What applying `r` would do, and to which devices (the diff against the fleet)."""
    history = db.declared(r.name)
    latest = history[-1] if history else None
    if latest is not None and latest["spec_hash"] == r.spec_hash:
        return Change(r.name, "unchanged", latest["rollout_id"],
                      f"version {latest['seq']} is applied")
    if latest is not None and latest["spec_hash"] != WITHDRAWN and len(history) >= 2 and \
            history[-2]["spec_hash"] == r.spec_hash:
        rid = latest["rollout_id"]
        devices = [(t["device_id"], _version(inventory, t["device_id"]),
                    t["from_version"] or "-") for t in db.targets(rid)]
        return Change(r.name, "rollback", rid, f"revert to version {history[-2]['seq']}",
                      devices)
    _, targets = plan_targets(r.plan, inventory)
    moves = [(t["device_id"], _version(inventory, t["device_id"]), r.bundle.version)
             for t in targets
             if inventory.devices[t["device_id"]].model_digest != r.bundle.digest]
    seq = (latest["seq"] if latest else 0) + 1
    return Change(r.name, "create", f"{r.name}-{seq}",
                  f"{r.bundle.name} {r.bundle.version}: {len(moves)} of {len(targets)} "
                  "devices would change", moves)


def apply_doc(db: StateDB, r: Resolved, inventory: Inventory, who: str,
              source: str | None = None) -> Change:
    """Make the fleet match `r` (see the module docstring); returns what was done."""
    from fleet.rollout import NewRollout, create

    change = plan_doc(db, r, inventory)
    if change.action == "unchanged":
        return change
    if change.action == "rollback":
        rid = change.rollout_id or ""
        if db.rollout(rid).state not in (RolloutState.ROLLING_BACK, RolloutState.ROLLED_BACK):
            _ask(db, rid, "rollback", who, {"why": f"declaration {r.name}: {change.detail}"})
        with db.tx() as c:
            db.declare(r.name, rid, r.spec_hash, r.spec, source, c)
        return change
    rid = change.rollout_id or ""
    create(db, r.plan, NewRollout(r.bundle, inventory, who, rid), replace=True)
    with db.tx() as c:
        db.declare(r.name, rid, r.spec_hash, r.spec, source, c)
    return change


def withdraw(db: StateDB, name: str, who: str, source: str | None = None) -> Change | None:
    """A declaration that is gone: roll its latest rollout back (once)."""
    history = db.declared(name)
    if not history or history[-1]["spec_hash"] == WITHDRAWN:
        return None
    rid = history[-1]["rollout_id"]
    if db.rollout(rid).state not in (RolloutState.ROLLING_BACK, RolloutState.ROLLED_BACK):
        _ask(db, rid, "rollback", who, {"why": f"declaration {name} removed"})
    with db.tx() as c:
        db.declare(name, rid, WITHDRAWN, {}, source, c)
    return Change(name, "rollback", rid, "declaration removed")


def _ask(db: StateDB, rid: str, action: str, who: str, args: dict[str, Any]) -> None:
    """An operator action through whoever drives the rollout (queued), or here."""
    from fleet import actions

    if db.holder(rid) is not None or db.lease()["live"]:
        db.add_request(rid, action, who, args)
    else:
        actions.apply(db, rid, action, who, args)


# -- following a Git repository -------------------------------------------------------------


def _git(*args: str, cwd: Path | None = None) -> str:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True,
                             timeout=120, check=True)
    except subprocess.CalledProcessError as e:
        raise EdgefleetError(f"git {' '.join(args)}: {e.stderr.strip()}") from None
    return out.stdout


class GitFollower:
    """Apply the Rollout documents under `path` on `branch` of a Git repository, every time
    the branch moves (checked every `interval_s`); runs as the controller's `on_apply`."""

    def __init__(self, repo: str, branch: str, path: str, db: StateDB, *, store: Path,
                 keyring: Path, artifact_url: str, workdir: Path,
                 interval_s: float = 30.0, who: str = "git") -> None:
        self.repo, self.branch, self.path = repo, branch, path.strip("/")
        self.db, self.store, self.keyring, self.artifact_url = db, store, keyring, artifact_url
        self.workdir, self.interval_s, self.who = Path(workdir), interval_s, who
        self.applied: str | None = None  # the commit last applied
        self.error: str | None = None
        self._next = 0.0

    def _fetch(self) -> str:
        if not (self.workdir / ".git").exists():
            self.workdir.parent.mkdir(parents=True, exist_ok=True)
            _git("clone", "--quiet", "--no-checkout", self.repo, str(self.workdir))
        _git("fetch", "--quiet", "origin", self.branch, cwd=self.workdir)
        return _git("rev-parse", "FETCH_HEAD", cwd=self.workdir).strip()

    def poll(self, controller: Any) -> list[Change]:
        """Fetch; if the branch moved, apply every document at its head and withdraw the
        declarations (from this repository) that are gone."""
        now = time.monotonic()
        if now < self._next:
            return []
        self._next = now + self.interval_s
        rev = self._fetch()
        if rev == self.applied:
            return []
        names = _git("ls-tree", "--name-only", f"{rev}:{self.path}", cwd=self.workdir) \
            if self._has_path(rev) else ""
        inventory = Inventory.from_states(controller.ctl.devices())
        source = f"git:{self.repo}@{rev[:12]}"
        seen, changes = set(), []
        for fname in sorted(n for n in names.split() if n.endswith((".yaml", ".yml"))):
            where = f"{self.path}/{fname}@{rev[:12]}"
            text = _git("show", f"{rev}:{self.path}/{fname}", cwd=self.workdir)
            for doc in load_docs(text, where):
                r = resolve(doc, store=self.store, keyring=self.keyring,
                            artifact_url=self.artifact_url, where=where)
                seen.add(r.name)
                changes.append(apply_doc(self.db, r, inventory, self.who, source))
        for name in self.db.declared_names():
            hist = self.db.declared(name)
            if name not in seen and (hist[-1]["source"] or "").startswith(
                    f"git:{self.repo}@"):
                gone = withdraw(self.db, name, self.who, source)
                if gone is not None:
                    changes.append(gone)
        self.applied = rev
        return changes

    def _has_path(self, rev: str) -> bool:
        try:
            _git("cat-file", "-e", f"{rev}:{self.path}", cwd=self.workdir)
        except EdgefleetError:
            return False
        return True
