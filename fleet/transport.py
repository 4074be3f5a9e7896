"""Controller-side MQTT: send signed commands, follow device state and events.

    ctl = FleetController(MqttConfig(host, port, ca_file=..., cert_file=..., key_file=...),
                          fleet_key=Path("keys/fleet.key"))
    ctl.start()                                   # connects, subscribes, retained states arrive
    cmd = ctl.install("box-001", url=url, sha256=digest, size=size, sequence=7,
                      rollout_id="r-42")          # signed, QoS 1, not retained
    final = ctl.wait_command(cmd.id, timeout=120)  # the terminal event (live, failed, ...)
    ctl.devices()["box-001"]["model"]["active"]["digest"] == digest

`FleetController` keeps the latest state of every device (merging will messages by `seq`, see
docs/fleet-protocol.md) and the events of the commands it tracks, and wakes waiters on each
change. Its MQTT session is persistent, so events published while the controller was down
arrive when it is back.

Trust: an event counts for a command only when it came from the device the command was for
(the topic's device id, which the broker's ACL binds to the client certificate); anything else
is dropped as forged. Bookkeeping is bounded and per command: a tracked command's events
(and the keys that drop their QoS 1 duplicates) are kept until `forget`; an event of a command
nobody tracks goes to the listeners (a rollout driver folds in its own and lets go of them once
the step is final) and is kept, in a fixed-size list, only if no listener claimed it.

The broker configuration lives in fleet/broker_config.py and the many-client selector loop in
fleet/selector_loop.py; both are re-exported here for older imports.
"""

from __future__ import annotations

import collections
import functools
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.commands import Command, InstallSpec, sign_command
from agent.errors import EdgefleetError
from agent.keys import key_id, load_private_key
from agent.link import MqttConfig
from agent.wire import TERMINAL_STEPS, Topics
from fleet.broker_config import REPO_BROKER_DIR, render_acl, render_broker_config
from fleet.selector_loop import ReadAheadClient, SelectorLoop

_LOG = logging.getLogger("edgefleet.fleet")
_SEEN_MAX = 65536  # (device, boot, seq) keys of tracked commands' events (QoS 1 duplicates)
_ORPHANS_MAX = 1000  # unmatched, unclaimed events kept for `orphan_events`
_TOPICS_MAX = 65536  # parsed topics remembered (two a device)

__all__ = [
    "REPO_BROKER_DIR",
    "FleetController",
    "SelectorLoop",
    "render_acl",
    "render_broker_config",
]


# -- the controller -------------------------------------------------------------------------


@dataclass
class CommandTrack:
    """Everything seen about one command: the command and its events in device order."""

    command: Command
    events: list[dict[str, Any]] = field(default_factory=list)
    keys: list[tuple[str, str, int]] = field(default_factory=list)  # its duplicate filter keys

    @property
    def terminal(self) -> dict[str, Any] | None:
        for ev in reversed(self.events):
            if ev.get("step") in TERMINAL_STEPS:
                return ev
        return None


class FleetController:
    """Sign and send commands; keep the latest device states and every command's events."""

    def __init__(self, mqtt_config: MqttConfig, *, fleet_key: Ed25519PrivateKey | Path,
                 prefix: str = "edgefleet", client_id: str = "edgefleet-controller",
                 default_ttl: timedelta = timedelta(hours=24)) -> None:
        self.topics = Topics(prefix)
        self.key = fleet_key if isinstance(fleet_key, Ed25519PrivateKey) \
            else load_private_key(Path(fleet_key))
        self.key_id = key_id(self.key.public_key())  # once, not per command signed
        self.default_ttl = default_ttl
        self.client = controller_client(mqtt_config, client_id)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_batch = self._on_batch
        self.client.on_subscribe = self._on_subscribe
        self._cond = threading.Condition()
        self._states: dict[str, dict[str, Any]] = {}
        self._commands: dict[str, CommandTrack] = {}
        # events for commands this process does not track (bounded; forged ones included)
        self._orphans: collections.deque[dict[str, Any]] = collections.deque(
            maxlen=_ORPHANS_MAX)
        self._seen_events: collections.OrderedDict[tuple[str, str, int], None] = \
            collections.OrderedDict()
        self.forged = 0  # events naming a command that was for another device
        self._listeners: list[Callable[[str, str, dict[str, Any]], bool | None]] = []
        # `Topics.parse` remembered per topic: a device's two topics come again and again
        self._parse_topic = functools.lru_cache(maxsize=_TOPICS_MAX)(self.topics.parse)
        self._subscribed = threading.Event()
        self.subscribed = threading.Event()  # the broker acknowledged (retained states follow)
        self.connected = threading.Event()
        self.messages = 0

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> FleetController:
        """Connect and subscribe to every device's state and events; returns once subscribed
        (raises `EdgefleetError` after `timeout`)."""
        self.client.loop_start()
        if not self._subscribed.wait(timeout):
            self.client.loop_stop()
            raise EdgefleetError(f"cannot reach the MQTT broker at {self.client.host}:"
                                 f"{self.client.port} within {timeout:.0f} s",
                                 hint="is the broker running, and are the certificates right?")
        return self

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def __enter__(self) -> FleetController:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def add_listener(self, fn: Callable[[str, str, dict[str, Any]], bool | None]) -> None:
        """`fn(kind, device_id, payload)` for every state and event (on the network thread);
        a listener returns True for an event it takes care of (it is then not kept among the
        `orphan_events`)."""
        self._listeners = [*self._listeners, fn]  # a new list: the network thread iterates

    def remove_listener(self, fn: Callable[[str, str, dict[str, Any]], bool | None]) -> None:
        """Stop calling `fn` (a finished rollout driver: nothing of it stays reachable)."""
        self._listeners = [f for f in self._listeners if f != fn]

    # -- sending --------------------------------------------------------------------------------

    def publish(self, cmd: Command, *, track: bool = True) -> mqtt.MQTTMessageInfo:
        """The one path every command takes: sign `cmd` with the fleet key and publish it
        (QoS 1, not retained); returns paho's message info (its PUBACK says the broker has
        it, and then holds it for an offline device). With `track`, its events are kept
        (see `track`, `wait_command`) until `forget`; a rollout driver follows its own
        commands through `add_listener` and does not track them."""
        if track:
            with self._cond:
                self._commands[cmd.id] = CommandTrack(cmd)
        return self.client.publish(self.topics.cmd(cmd.device_id),
                                   sign_command(cmd, self.key, kid=self.key_id), qos=1)

    def forget(self, command_id: str) -> None:
        """Drop a tracked command, its events and their duplicate filter keys (bookkeeping
        stays bounded)."""
        with self._cond:
            t = self._commands.pop(command_id, None)
            for key in t.keys if t is not None else ():
                self._seen_events.pop(key, None)

    def bookkeeping(self) -> dict[str, int]:
        """How much this controller holds besides device states (tests, /metrics): tracked
        commands, duplicate-filter keys, unclaimed events, listeners."""
        with self._cond:
            return {"commands": len(self._commands), "seen_events": len(self._seen_events),
                    "orphan_events": len(self._orphans), "listeners": len(self._listeners)}

    def send(self, cmd: Command, *, wait: bool = True, timeout: float = 10.0) -> Command:
        """`publish` and track `cmd`; with `wait`, return once the broker has accepted it."""
        info = self.publish(cmd)
        if wait:
            info.wait_for_publish(timeout)
        return cmd

    def install(self, device_id: str, *, url: str, sha256: str, size: int, sequence: int,
                rollout_id: str, ttl: timedelta | None = None, command_id: str | None = None,
                wait: bool = True) -> Command:
        return self.send(Command.new(
            "install", device_id, id=command_id or _new_id(), rollout_id=rollout_id,
            ttl=ttl or self.default_ttl, install=InstallSpec(url, sha256, size, sequence)),
            wait=wait)

    def rollback(self, device_id: str, *, rollout_id: str, ttl: timedelta | None = None,
                 command_id: str | None = None, wait: bool = True) -> Command:
        return self.send(Command.new("rollback", device_id, id=command_id or _new_id(),
                                     rollout_id=rollout_id, ttl=ttl or self.default_ttl),
                         wait=wait)

    def report_now(self, device_id: str, *, rollout_id: str = "report",
                   ttl: timedelta = timedelta(minutes=10), command_id: str | None = None,
                   wait: bool = True) -> Command:
        return self.send(Command.new("report-now", device_id, id=command_id or _new_id(),
                                     rollout_id=rollout_id, ttl=ttl), wait=wait)

    # -- observing ------------------------------------------------------------------------------

    def devices(self) -> dict[str, dict[str, Any]]:
        """device id -> latest state (a copy)."""
        with self._cond:
            return {k: dict(v) for k, v in self._states.items()}

    def device_count(self) -> int:
        """How many devices this controller holds a state of."""
        return len(self._states)

    def state(self, device_id: str) -> dict[str, Any] | None:
        with self._cond:
            s = self._states.get(device_id)
            return dict(s) if s else None

    def state_of(self, device_id: str) -> dict[str, Any] | None:
        """The latest state itself, not a copy: read it, never change it. (A stored state is
        never changed in place: a newer one, or a will's copy, replaces it.) For readers
        that look at thousands of states a second."""
        return self._states.get(device_id)

    def track(self, command_id: str) -> CommandTrack | None:
        with self._cond:
            t = self._commands.get(command_id)
            return CommandTrack(t.command, list(t.events)) if t else None

    def events(self, command_id: str) -> list[dict[str, Any]]:
        t = self.track(command_id)
        return t.events if t else []

    def steps(self, command_id: str) -> list[str]:
        return [e["step"] for e in self.events(command_id)]

    def orphan_events(self) -> list[dict[str, Any]]:
        """Events whose command id this controller did not send (e.g. refused forgeries)."""
        with self._cond:
            return list(self._orphans)

    def wait_for(self, predicate: Callable[[FleetController], bool],
                 timeout: float) -> bool:
        """Wait until `predicate(self)` is true (re-checked on every message)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(self):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 1.0))
        return True

    def wait_command(self, command_id: str, timeout: float) -> dict[str, Any]:
        """The terminal event (live, failed, rolled-back, reported) of a command; raises
        `TimeoutError` with the steps seen so far."""
        def done(_: FleetController) -> bool:
            t = self._commands.get(command_id)
            return t is not None and t.terminal is not None

        if not self.wait_for(done, timeout):
            raise TimeoutError(f"command {command_id}: no final step within {timeout} s "
                               f"(seen: {self.steps(command_id)})")
        t = self.track(command_id)
        assert t is not None and t.terminal is not None
        return t.terminal

    # -- MQTT callbacks -------------------------------------------------------------------------

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any,
                    properties: Any) -> None:
        if reason.is_failure:
            return
        client.subscribe([(self.topics.all("state"), 1), (self.topics.all("event"), 1)])
        self.connected.set()
        self._subscribed.set()

    def _on_subscribe(self, *args: Any) -> None:
        self.subscribed.set()

    def _on_disconnect(self, *args: Any) -> None:
        self.connected.clear()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        self._on_batch(client, userdata, [msg])

    def _on_batch(self, client: mqtt.Client, userdata: Any, msgs: list[mqtt.MQTTMessage]
                  ) -> None:
        """The messages of one read (`ReadAheadClient.on_batch`; one at a time through paho's
        own handling): parsed first, then taken in under one hold of the lock, with one
        wake-up of the waiters, then given to the listeners. A busy floor's states come in
        bursts of a hundred and more, and the lock, the wake-up and the topic's parse were
        per message."""
        docs = []
        for msg in msgs:
            parsed = self._parse_topic(msg.topic)
            if parsed is None:
                continue
            device, kind = parsed
            try:
                doc = _loads(msg.payload)
            except ValueError:
                if kind == "state" and not msg.payload:  # retained state cleared
                    docs.append((device, kind, None, True))
                continue
            if not isinstance(doc, dict) or doc.get("device_id") != device:
                continue  # the ACL stops this on a TLS broker; be as strict on a plain one
            docs.append((device, kind, doc, msg.retain))
        if not docs:
            return
        heard: list[tuple[str, str, dict[str, Any], bool]] = []
        with self._cond:
            now = time.time()
            for device, kind, doc, retained in docs:
                if doc is None:
                    self._states.pop(device, None)
                    continue
                self.messages += 1
                tracked: bool | None = False
                if kind == "state":
                    if not retained:  # a live report: fresh as of now (retained ones may be old)
                        doc["_received"] = now
                    self._merge_state(device, doc)
                elif kind == "event":
                    tracked = self._track_event(device, doc)
                    if tracked is None:
                        continue  # not an event, or a QoS 1 duplicate
                heard.append((kind, device, doc, bool(tracked)))
            self._cond.notify_all()
        orphans = []
        for kind, device, doc, tracked in heard:
            claimed = False
            for fn in self._listeners:
                try:
                    claimed = bool(fn(kind, device, doc)) or claimed
                except Exception:
                    _LOG.exception("listener failed")
            if kind == "event" and not tracked and not claimed:
                orphans.append(doc)
        if orphans:
            with self._cond:
                self._orphans.extend(orphans)

    def _track_event(self, device: str, doc: dict[str, Any]) -> bool | None:
        """Keep an event of a command this controller tracks (under the lock): True if kept,
        False if nobody tracks its command (or it is forged), None if it is no event (its
        `seq` is no integer) or a QoS 1 duplicate."""
        if not isinstance(doc.get("seq", -1), int):
            return None
        track = self._commands.get(doc.get("command_id") or "")
        if track is not None and track.command.device_id != device:
            self.forged += 1  # another device's command id: not this device's to answer
            _LOG.warning("dropped an event from %s for command %s (sent to %s)",
                         device, doc.get("command_id"), track.command.device_id)
            track = None
        if track is None:
            return False
        key = (device, str(doc.get("boot")), doc.get("seq", -1))
        if key in self._seen_events:
            return None  # a QoS 1 duplicate
        self._seen_events[key] = None
        if len(self._seen_events) > _SEEN_MAX:
            self._seen_events.popitem(last=False)
        track.keys.append(key)
        track.events.append(doc)
        boots = list(dict.fromkeys(e.get("boot") for e in track.events))
        track.events.sort(key=lambda e: (boots.index(e.get("boot")), e.get("seq", 0)))
        return True

    def _merge_state(self, device: str, doc: dict[str, Any]) -> None:
        """A will (`will: true`) from a device whose newer state we hold only flips `online`."""
        old = self._states.get(device)
        if doc.get("will") and old is not None and old.get("seq", 0) >= doc.get("seq", 0):
            old = dict(old)
            old["online"] = False
            old["will"] = True
            self._states[device] = old
        elif old is None or doc.get("seq", 0) >= old.get("seq", 0) or not old.get("online"):
            self._states[device] = doc


def controller_client(cfg: MqttConfig, client_id: str) -> mqtt.Client:
    """The controller's paho client: TLS, queue limit, backoff and `connect_async` as
    `MqttConfig.new_client` sets them for a device, but MQTT 3.1.1. The controller receives
    every device's events and states, and paho builds and clears an MQTT 5 properties object
    for each message it receives, about a third of its cost per message (docs/scale.md); the
    controller uses nothing of MQTT 5. Its session is persistent (events published while it is
    down wait for it) unless `session_expiry_s` is 0 (a throw-away CLI connection: clean
    session); a 3.1.1 session does not expire on its own, so a controller keeps one client id."""
    client = ReadAheadClient(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                             protocol=mqtt.MQTTv311, clean_session=cfg.session_expiry_s == 0)
    if cfg.tls:
        client.tls_set_context(cfg.ssl_context())
    client.max_queued_messages_set(cfg.max_queued)
    client.reconnect_delay_set(max(1, int(cfg.reconnect_min_s)), max(1, int(cfg.reconnect_max_s)))
    client.connect_timeout = cfg.connect_timeout_s
    client.connect_async(cfg.host, cfg.port, keepalive=cfg.keepalive_s)
    return client


def _loads(payload: bytes) -> Any:
    """A message's JSON: orjson (a few microseconds for a 1 KB state, several times less than
    json), or json for what orjson refuses and json reads (NaN, Infinity, integers past 64
    bits, which an agent's json.dumps can write): what is accepted does not change."""
    try:
        return orjson.loads(payload)
    except orjson.JSONDecodeError:
        return json.loads(payload)


def _new_id() -> str:
    return uuid.uuid4().hex[:20]
