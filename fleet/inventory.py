"""The fleet as the controller sees it: every device's retained state, label selectors, and the
choice of devices for a canary spread across sites.

    with open_controller(mqtt) as ctl:                       # epoll-driven FleetController
        inv = Inventory.from_states(ctl.devices())
    inv.select(Selector.parse("site=fab2,tester in (t5k,t7)"))
    spread(devices, 10, keys=("site", "tester"))             # 10 devices, round-robin over sites

Selectors follow kubectl's syntax (comma = AND): `k=v`, `k==v`, `k!=v`, `k in (a,b)`,
`k notin (a,b)`, `k` (label present), `!k` (label absent). The empty selector matches every
device. Unlike kubectl, an empty value (`k=`) is refused as the likely typo it is; `!k` selects
devices without the label.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import re
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.errors import EdgefleetError, UsageError
from agent.link import MqttConfig
from fleet.transport import FleetController, SelectorLoop

__all__ = [
    "Device",
    "Inventory",
    "Requirement",
    "Selector",
    "device_history",
    "device_view",
    "devices_table",
    "open_controller",
    "spread",
    "table",
]

_KEY_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._/-]{0,62}[A-Za-z0-9])?$")
_VALUE_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?$")
_OPS = ("=", "!=", "in", "notin", "exists", "!")


# -- selectors --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Requirement:
    """One term of a selector: `key op values`."""

    key: str
    op: str  # one of _OPS ("=" also stands for "==")
    values: tuple[str, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        v = labels.get(self.key)
        if self.op == "=":
            return v == self.values[0]
        if self.op == "!=":
            return v != self.values[0]
        if self.op == "in":
            return v in self.values
        if self.op == "notin":
            return v not in self.values
        if self.op == "exists":
            return v is not None
        return v is None  # "!"

    def __str__(self) -> str:
        if self.op in ("=", "!="):
            return f"{self.key}{self.op}{self.values[0]}"
        if self.op in ("in", "notin"):
            return f"{self.key} {self.op} ({','.join(self.values)})"
        return self.key if self.op == "exists" else f"!{self.key}"


@dataclass(frozen=True)
class Selector:
    """A conjunction of label requirements (kubectl syntax)."""

    requirements: tuple[Requirement, ...] = ()

    @classmethod
    def parse(cls, text: str | None) -> Selector:
        """Parse `-l` syntax; raises `UsageError` naming the bad term."""
        text = (text or "").strip()
        if not text:
            return cls()
        reqs = [_parse_term(term.strip(), text) for term in _split_terms(text)]
        return cls(tuple(reqs))

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(r.matches(labels) for r in self.requirements)

    def __str__(self) -> str:
        return ",".join(str(r) for r in self.requirements)

    def __bool__(self) -> bool:
        return bool(self.requirements)


def _split_terms(text: str) -> list[str]:
    """Split on commas outside parentheses."""
    terms, depth, cur = [], 0, []
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth < 0:
                raise UsageError(f"label selector {text!r}: unbalanced ')'")
        if ch == "," and depth == 0:
            terms.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth:
        raise UsageError(f"label selector {text!r}: unbalanced '('")
    terms.append("".join(cur))
    return terms


_SET_RE = re.compile(r"^(\S+)\s+(in|notin)\s*\((.*)\)$")
_EQ_RE = re.compile(r"^([^=!\s]+)\s*(==|=|!=)\s*(\S*)$")


def _parse_term(term: str, whole: str) -> Requirement:
    def bad(why: str) -> UsageError:
        return UsageError(f"label selector {whole!r}: term {term!r}: {why}",
                          hint="use k=v, k!=v, 'k in (a,b)', 'k notin (a,b)', k or !k, "
                               "joined by commas")

    def key(k: str) -> str:
        if not _KEY_RE.match(k):
            raise bad(f"{k!r} is not a label key")
        return k

    def value(v: str) -> str:
        if not _VALUE_RE.match(v):
            raise bad(f"{v!r} is not a label value")
        return v

    if not term:
        raise bad("empty term")
    m = _SET_RE.match(term)
    if m:
        values = tuple(value(v.strip()) for v in m.group(3).split(","))
        if not values or any(v == "" for v in values):
            raise bad("empty value in the set")
        return Requirement(key(m.group(1)), m.group(2), values)
    m = _EQ_RE.match(term)
    if m:
        op = "=" if m.group(2) in ("=", "==") else "!="
        return Requirement(key(m.group(1)), op, (value(m.group(3)),))
    if term.startswith("!"):
        return Requirement(key(term[1:].strip()), "!")
    return Requirement(key(term), "exists")


# -- devices ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Device:
    """One device from its retained state (docs/fleet-protocol.md, "Device state")."""

    id: str
    online: bool
    labels: dict[str, str]
    model_id: str | None
    model_name: str | None
    model_version: str | None
    model_digest: str | None
    sequence: int | None
    health: str
    health_reason: str | None
    last_seen: str | None  # the state's `ts` (device clock, RFC 3339)
    summary: dict[str, Any] = field(default_factory=dict)
    busy: dict[str, Any] | None = None
    shadow: dict[str, Any] | None = None  # model.shadow, when the device runs a shadow model
    data_feed: str | None = None  # HOST:PORT of its data feed (fleet collect), when reported
    state: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_state(cls, doc: Mapping[str, Any]) -> Device:
        model = doc.get("model") or {}
        active = model.get("active") or {}
        health = doc.get("health") or {}
        labels = doc.get("labels") or {}
        return cls(
            id=str(doc.get("device_id")),
            online=bool(doc.get("online")),
            labels={str(k): str(v) for k, v in labels.items()} if isinstance(labels, dict)
            else {},
            model_id=active.get("id"),
            model_name=active.get("name"),
            model_version=active.get("version"),
            model_digest=active.get("digest"),
            sequence=active.get("sequence"),
            health=str(health.get("status") or "unknown"),
            health_reason=health.get("reason"),
            last_seen=doc.get("ts"),
            summary=dict(doc.get("summary") or {}),
            busy=doc.get("busy"),
            shadow=model.get("shadow"),
            data_feed=doc["data_feed"] if isinstance(doc.get("data_feed"), str) else None,
            state=dict(doc),
        )

    @property
    def shown_health(self) -> str:
        """The health to show: `unknown` while the device is offline (its last report says
        how it was, not how it is)."""
        return self.health if self.online else "unknown"

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("state")
        d["health"], d["reported_health"] = self.shown_health, self.health
        return d


class Inventory:
    """Every known device, by id."""

    def __init__(self, devices: Iterable[Device]) -> None:
        self.devices = {d.id: d for d in devices}

    @classmethod
    def from_states(cls, states: Mapping[str, Mapping[str, Any]]) -> Inventory:
        return cls(Device.from_state(s) for s in states.values() if s.get("device_id"))

    def select(self, selector: Selector) -> list[Device]:
        """The devices matching `selector`, sorted by id."""
        return sorted((d for d in self.devices.values() if selector.matches(d.labels)),
                      key=lambda d: d.id)

    def __len__(self) -> int:
        return len(self.devices)

    def __iter__(self) -> Iterator[Device]:
        return iter(sorted(self.devices.values(), key=lambda d: d.id))


def _stable_rank(device_id: str) -> str:
    """A fixed pseudo-random order of devices (so picks are not just the lowest ids)."""
    return hashlib.sha256(device_id.encode()).hexdigest()


def spread(devices: Sequence[Device], n: int, keys: Sequence[str] = ("site",),
           *, prefer: Iterable[str] = ()) -> list[Device]:
    """Order `devices` so that any prefix of the result is spread as evenly as possible over
    the values of `keys[0]` (round-robin over its groups), within each group over `keys[1]`,
    and so on; then take the first `n`. Within the last level, devices named in `prefer`, then
    online and healthy ones come first. Deterministic: the same devices give the same pick,
    and it is not simply the lowest ids."""
    preferred = set(prefer)

    def order(devs: list[Device], rest: Sequence[str]) -> list[Device]:
        if not rest:
            return sorted(devs, key=lambda d: (d.id not in preferred, not d.online,
                                               d.health != "ok", _stable_rank(d.id)))
        groups: dict[str, list[Device]] = {}
        for d in devs:
            groups.setdefault(d.labels.get(rest[0], ""), []).append(d)
        queues = [order(groups[g], rest[1:]) for g in
                  sorted(groups, key=lambda g: hashlib.sha256(g.encode()).hexdigest())]
        out: list[Device] = []
        while any(queues):
            for q in queues:
                if q:
                    out.append(q.pop(0))
        return out

    return order(list(devices), tuple(keys))[:n]


# -- a controller connection ------------------------------------------------------------------


@contextlib.contextmanager
def open_controller(mqtt: MqttConfig, *, fleet_key: Ed25519PrivateKey | Path | None = None,
                    prefix: str = "edgefleet", client_id: str | None = None,
                    connect_timeout: float = 10.0, settle_s: float = 0.5
                    ) -> Iterator[FleetController]:
    """A `FleetController` whose socket is driven by an epoll `SelectorLoop` (paho's own loop
    uses select(), which stalls above descriptor 1023). Without `client_id` the session is
    throw-away (a random id, session expiry 0): reading the fleet must not leave a session on
    the broker or take over the rollout controller's. Waits until the retained states have
    arrived (no new device for `settle_s`) before yielding."""
    if client_id is None:
        client_id = f"edgefleet-cli-{uuid.uuid4().hex[:8]}"
        mqtt = dataclasses.replace(mqtt, session_expiry_s=0)
    key = fleet_key if fleet_key is not None else Ed25519PrivateKey.generate()
    ctl = FleetController(mqtt, fleet_key=key, prefix=prefix, client_id=client_id)
    loop = SelectorLoop(reconnect_min_s=mqtt.reconnect_min_s,
                        reconnect_max_s=mqtt.reconnect_max_s, tick_s=1.0,
                        name="fleet-controller", batch_s=0.1)
    loop.add(ctl.client)
    loop.start()
    try:
        if not ctl.connected.wait(connect_timeout):
            raise EdgefleetError(
                f"cannot reach the MQTT broker at {mqtt.host}:{mqtt.port} within "
                f"{connect_timeout:.0f} s",
                hint="is the broker running, and are --mqtt-host/--mqtt-port and the "
                     "certificates right?")
        ctl.subscribed.wait(connect_timeout)  # the retained states come after the SUBACK
        wait_settled(ctl, settle_s)
        yield ctl
    finally:
        loop.disconnect(ctl.client)
        loop.stop()


def wait_settled(ctl: FleetController, settle_s: float, max_s: float = 120.0) -> None:
    """Wait until no new device appeared for `settle_s` (the retained states' burst is over),
    at most `max_s`. New devices, not new messages: live state reports keep coming from a
    large fleet, and a burst of 10,000 retained states takes seconds to parse on a loaded
    host (a rollout started after a 5 s cap saw 6,500 of 10,000 devices); waiting for a quiet
    `settle_s` of all messages never ends on a fleet that reports all the time."""
    deadline = time.monotonic() + max_s
    last = -1
    quiet_since = time.monotonic()
    while time.monotonic() < deadline:
        n = ctl.device_count()
        if n != last:
            last, quiet_since = n, time.monotonic()
        elif time.monotonic() - quiet_since >= settle_s:
            return
        time.sleep(0.05)


# -- output -----------------------------------------------------------------------------------


def _ago(ts: str | None, now: datetime | None = None) -> str:
    if not ts:
        return "-"
    try:
        t = datetime.fromisoformat(ts.replace("Z", "+00:00"))
    except ValueError:
        return ts
    secs = max(0, int(((now or datetime.now(UTC)) - t).total_seconds()))
    if secs < 120:
        ago = f"{secs}s"
    elif secs < 7200:
        ago = f"{secs // 60}m"
    elif secs < 172800:
        ago = f"{secs // 3600}h"
    else:
        ago = f"{secs // 86400}d"
    return f"{ts} ({ago} ago)"


def devices_table(devices: Sequence[Device], *, wide: bool = False) -> str:
    """The `fleet devices` table for people; `wide` adds the bundle digest, the agent's
    version and what the device is busy with (kubectl's `-o wide`)."""
    head = ("DEVICE", "ONLINE", "MODEL", "SEQ", "HEALTH", "LABELS", "LAST SEEN")
    rows = [head + (("DIGEST", "AGENT", "BUSY") if wide else ())]
    for d in devices:
        model = f"{d.model_name} {d.model_version}" if d.model_version else "-"
        health = d.shown_health
        if d.online and d.health_reason:
            health = f"{health} ({d.health_reason[:40]})"
        row = (d.id, "yes" if d.online else "no", model,
               str(d.sequence) if d.sequence is not None else "-", health,
               ",".join(f"{k}={v}" for k, v in sorted(d.labels.items())) or "-",
               _ago(d.last_seen))
        if wide:
            row += (d.model_digest[:12] if d.model_digest else "-",
                    str(d.state.get("agent_version") or "-"),
                    str((d.busy or {}).get("type") or "-"))
        rows.append(row)
    return table(rows)


def table(rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns, two spaces apart, as kubectl prints them."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in rows)


def device_history(db: Any, device_id: str, limit: int = 50) -> list[dict[str, Any]]:
    """The steps of the last `limit` rollouts that targeted `device_id` (rollout database
    `db`, a fleet.state.StateDB), newest rollout first: what was sent to it and how it ended."""
    out = []
    for r in db.rollouts(limit):
        for st in db.steps(r.id):
            if st.device_id == device_id:
                out.append({"rollout": r.id, "rollout_state": r.state,
                            "bundle_digest": r.bundle_digest,
                            "model": f"{r.model_name} {r.model_version}", "step": st.step,
                            "status": st.status, "result": st.result, "reason": st.reason,
                            "created": st.created, "finished": st.finished})
    return out


def device_view(d: Device, history: Sequence[Mapping[str, Any]] | None) -> str:
    """`fleet devices NAME` for people: state, labels, models, last command, then the install
    and rollout history (None: no rollout database was found)."""
    def model(m: Mapping[str, Any] | None) -> str:
        if not m:
            return "-"
        if m.get("error"):
            return f"{m.get('id')} (unreadable: {m['error']})"
        return (f"{m.get('name')} {m.get('version')} (sequence {m.get('sequence')}, "
                f"bundle sha256:{m.get('digest')})")

    models = d.state.get("model") or {}
    last = d.state.get("last_command") or {}
    health = d.shown_health + (f" ({d.health_reason})" if d.online and d.health_reason else "")
    if not d.online:
        health += f"; last reported {d.health}"
    lines = [
        f"Device:        {d.id}",
        f"Online:        {'yes' if d.online else 'no'}",
        f"Last seen:     {_ago(d.last_seen)}",
        f"Health:        {health}",
        f"Labels:        {', '.join(f'{k}={v}' for k, v in sorted(d.labels.items())) or '-'}",
        f"Agent:         {d.state.get('agent_version') or '-'} ({d.state.get('arch') or '-'})",
        f"Active model:  {model(models.get('active'))}",
        f"Previous:      {model(models.get('previous'))}",
    ]
    if d.shadow:
        lines.append(f"Shadow:        {model(d.shadow)}")
    if last:
        lines.append(f"Last command:  {last.get('type', '-')} {last.get('id', '')} -> "
                     f"{last.get('result') or last.get('status') or '-'}")
    if history is None:
        lines.append("History:       no rollout database (pass --store or --db)")
    elif not history:
        lines.append("History:       no rollout has targeted this device")
    else:
        lines += ["History (rollouts, newest first):", table(
            [("ROLLOUT", "STATE", "BUNDLE", "MODEL", "STEP", "STATUS", "REASON")]
            + [(h["rollout"], h["rollout_state"], h["bundle_digest"][:12], h["model"],
                h["step"], h["status"], (h["reason"] or "-")[:60]) for h in history])]
    return "\n".join(lines)
