"""Controller-side MQTT: send signed commands, follow device state and events; plus the broker
configuration the project ships and a loop that drives many MQTT clients from one thread.

    ctl = FleetController(MqttConfig(host, port, ca_file=..., cert_file=..., key_file=...),
                          fleet_key=Path("keys/fleet.key"))
    ctl.start()                                   # connects, subscribes, retained states arrive
    cmd = ctl.install("box-001", url=url, sha256=digest, size=size, sequence=7,
                      rollout_id="r-42")          # signed, QoS 1, not retained
    final = ctl.wait_command(cmd.id, timeout=120)  # the terminal event (live, failed, ...)
    ctl.devices()["box-001"]["model"]["active"]["digest"] == digest

`FleetController` keeps the latest state of every device (merging will messages by `seq`, see
docs/fleet-protocol.md) and every event per command, and wakes waiters on each change. Its MQTT
session is persistent, so events published while the controller was down arrive when it is back.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import re
import selectors
import socket
import ssl
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.commands import Command, InstallSpec, sign_command
from agent.errors import EdgefleetError
from agent.keys import load_private_key
from agent.link import MqttConfig
from agent.wire import TERMINAL_STEPS, Topics

REPO_BROKER_DIR = Path(__file__).resolve().parents[1] / "broker"
_LOG = logging.getLogger("edgefleet.fleet")

__all__ = [
    "REPO_BROKER_DIR",
    "FleetController",
    "SelectorLoop",
    "render_acl",
    "render_broker_config",
]


# -- broker configuration -------------------------------------------------------------------


def _render(template: str, values: dict[str, Any]) -> str:
    out = template
    for key, value in values.items():
        out = out.replace("{{" + key + "}}", str(value))
    missing = re.search(r"\{\{[A-Z_]+\}\}", out)
    if missing:
        raise EdgefleetError(f"broker template still has {missing.group()} after rendering")
    return out


def render_acl(prefix: str = "edgefleet", controller: str = "edgefleet-controller",
               template_dir: Path = REPO_BROKER_DIR) -> str:
    """The per-device ACL (broker/acl.template) for a topic prefix and controller name."""
    Topics(prefix)
    return _render((template_dir / "acl.template").read_text(),
                   {"PREFIX": prefix, "CONTROLLER": controller})


def render_broker_config(out_dir: Path, *, port: int, tls: bool, bind: str = "127.0.0.1",
                         ca_file: Path | None = None, cert_file: Path | None = None,
                         key_file: Path | None = None, prefix: str = "edgefleet",
                         controller: str = "edgefleet-controller", user: str = "mosquitto",
                         template_dir: Path = REPO_BROKER_DIR) -> Path:
    """Write `mosquitto.conf` (and, with TLS, `acl`) into `out_dir` from the shipped templates
    (broker/mosquitto.conf, broker/mosquitto-tls.conf); returns the config path. The broker's
    persistence lives in `out_dir/data`. `user` is who mosquitto runs as when started as root
    (it must be able to read the key files)."""
    out_dir = Path(out_dir).resolve()
    data = out_dir / "data"
    data.mkdir(parents=True, exist_ok=True)
    values: dict[str, Any] = {"PORT": port, "BIND": bind, "DATA_DIR": data, "USER": user}
    if tls:
        if not (ca_file and cert_file and key_file):
            raise EdgefleetError("a TLS broker needs ca_file, cert_file and key_file")
        acl = out_dir / "acl"
        acl.write_text(render_acl(prefix, controller, template_dir))
        values.update(ACL_FILE=acl, CA_FILE=Path(ca_file).resolve(),
                      CERT_FILE=Path(cert_file).resolve(), KEY_FILE=Path(key_file).resolve())
    name = "mosquitto-tls.conf" if tls else "mosquitto.conf"
    conf = out_dir / "mosquitto.conf"
    conf.write_text(_render((template_dir / name).read_text(), values))
    return conf


# -- one thread for many clients ------------------------------------------------------------


@dataclass
class _Entry:
    client: mqtt.Client
    tick: Callable[[], None] | None
    sock: Any = None
    next_connect: float = 0.0
    delay: float = 0.0
    connected_since: float | None = None


class SelectorLoop:
    """Drives many paho clients (each with `connect_async` already called) from one thread with
    `selectors`, `loop_read`, `loop_write` and `loop_misc`, instead of one network thread per
    client (`loop_start`). Reconnects with exponential backoff and jitter. `tick` callables run
    on the loop thread about every `tick_s` seconds and must not block.

    `reconnect()` (TCP connect and TLS handshake) blocks the loop thread while it runs; against a
    broker on the local network that is milliseconds, and a refused connection returns at once.
    """

    def __init__(self, *, reconnect_min_s: float = 1.0, reconnect_max_s: float = 30.0,
                 tick_s: float = 1.0, name: str = "mqtt-selector") -> None:
        self.reconnect_min_s, self.reconnect_max_s, self.tick_s = (
            reconnect_min_s, reconnect_max_s, tick_s)
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._entries: dict[int, _Entry] = {}  # id(client) -> entry
        self._ops: deque[Callable[[], None]] = deque()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._connect_budget = 64  # new connections per loop iteration (spreads a start burst)

    def start(self) -> SelectorLoop:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wake()
        if self._thread.is_alive():
            self._thread.join(10)

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, client: mqtt.Client, tick: Callable[[], None] | None = None) -> None:
        entry = _Entry(client, tick)
        client.on_socket_open = lambda c, u, s: self._call(lambda: self._opened(entry, s))
        client.on_socket_close = lambda c, u, s: self._call(lambda: self._closed(entry, s))
        client.on_socket_register_write = lambda c, u, s: self._call(
            lambda: self._set_write(entry, True))
        client.on_socket_unregister_write = lambda c, u, s: self._call(
            lambda: self._set_write(entry, False))
        self._call(lambda: self._entries.__setitem__(id(client), entry))

    def remove(self, client: mqtt.Client) -> None:
        """Forget a client (call after `client.disconnect()`); the loop flushes nothing more."""
        done = threading.Event()

        def op() -> None:
            entry = self._entries.pop(id(client), None)
            if entry is not None and entry.sock is not None:
                with contextlib.suppress(KeyError, ValueError, OSError):
                    self._sel.unregister(entry.sock)
            done.set()

        self._call(op)
        if threading.current_thread() is not self._thread:
            done.wait(5)

    # -- loop thread ----------------------------------------------------------------------------

    def _call(self, op: Callable[[], None]) -> None:
        self._ops.append(op)
        if threading.current_thread() is not self._thread:
            self._wake()

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            self._wake_w.send(b"\0")

    def _opened(self, entry: _Entry, sock: Any) -> None:
        if id(entry.client) not in self._entries:
            return
        entry.sock = sock
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if entry.client.want_write()
                                         else 0)
        with contextlib.suppress(KeyError, ValueError, OSError):
            self._sel.register(sock, events, entry)

    def _closed(self, entry: _Entry, sock: Any) -> None:
        with contextlib.suppress(KeyError, ValueError, OSError):
            self._sel.unregister(sock)
        if entry.sock is sock:
            entry.sock = None
            entry.connected_since = None
            self._schedule_reconnect(entry)

    def _set_write(self, entry: _Entry, on: bool) -> None:
        if entry.sock is None or id(entry.client) not in self._entries:
            return
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if on else 0)
        with contextlib.suppress(KeyError, ValueError, OSError):
            self._sel.modify(entry.sock, events, entry)

    def _schedule_reconnect(self, entry: _Entry) -> None:
        entry.delay = min(max(entry.delay * 2, self.reconnect_min_s), self.reconnect_max_s)
        entry.next_connect = time.monotonic() + entry.delay * random.uniform(0.5, 1.0)

    def _run_ops(self) -> None:
        while self._ops:
            op = self._ops.popleft()
            try:
                op()
            except Exception:
                _LOG.exception("selector loop operation failed")

    def _run(self) -> None:
        next_tick = time.monotonic()
        while not self._stop.is_set():
            self._run_ops()
            timeout = max(0.0, min(next_tick - time.monotonic(), 0.25))
            for key, mask in self._sel.select(timeout):
                if key.data is None:
                    with contextlib.suppress(BlockingIOError, OSError):
                        self._wake_r.recv(4096)
                    continue
                self._service(key.data, mask)
            self._run_ops()
            now = time.monotonic()
            self._connect_due(now)
            if now >= next_tick:
                next_tick = now + self.tick_s
                for entry in list(self._entries.values()):
                    self._misc(entry, now)

    def _service(self, entry: _Entry, mask: int) -> None:
        client = entry.client
        if mask & selectors.EVENT_READ:
            rc = client.loop_read()
            sock = entry.sock
            # TLS: decrypted bytes may wait inside the SSL object where select cannot see them.
            while rc == mqtt.MQTT_ERR_SUCCESS and sock is not None and \
                    hasattr(sock, "pending") and sock.pending() > 0:
                rc = client.loop_read()
            if rc != mqtt.MQTT_ERR_SUCCESS:
                return
        if mask & selectors.EVENT_WRITE and entry.sock is not None:
            client.loop_write()

    def _misc(self, entry: _Entry, now: float) -> None:
        client = entry.client
        if entry.sock is not None:
            client.loop_misc()
            if client.is_connected():
                entry.connected_since = entry.connected_since or now
                if now - entry.connected_since > 10:
                    entry.delay = 0.0  # stable again: the next loss retries quickly
        if entry.tick is not None:
            try:
                entry.tick()
            except Exception:
                _LOG.exception("tick failed")

    def _connect_due(self, now: float) -> None:
        budget = self._connect_budget
        for entry in list(self._entries.values()):
            if budget <= 0:
                self._wake()  # more to connect: come straight back
                return
            if entry.sock is None and now >= entry.next_connect:
                budget -= 1
                try:
                    entry.client.reconnect()
                except (OSError, ValueError, ssl.SSLError) as e:
                    _LOG.debug("connect failed: %s", e)
                    if entry.sock is not None:
                        with contextlib.suppress(KeyError, ValueError, OSError):
                            self._sel.unregister(entry.sock)
                        entry.sock = None
                    self._schedule_reconnect(entry)
                else:
                    self._run_ops()  # register the new socket now


# -- the controller -------------------------------------------------------------------------


@dataclass
class CommandTrack:
    """Everything seen about one command: the command and its events in device order."""

    command: Command
    events: list[dict[str, Any]] = field(default_factory=list)

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
        self.default_ttl = default_ttl
        self.client = mqtt_config.new_client(client_id)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self._cond = threading.Condition()
        self._states: dict[str, dict[str, Any]] = {}
        self._commands: dict[str, CommandTrack] = {}
        self._orphans: list[dict[str, Any]] = []  # events for commands this process did not send
        self._seen_events: set[tuple[str, str, int]] = set()
        self._listeners: list[Callable[[str, str, dict[str, Any]], None]] = []
        self._subscribed = threading.Event()
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

    def add_listener(self, fn: Callable[[str, str, dict[str, Any]], None]) -> None:
        """`fn(kind, device_id, payload)` for every state and event (on the network thread)."""
        self._listeners.append(fn)

    # -- sending --------------------------------------------------------------------------------

    def send(self, cmd: Command, *, wait: bool = True, timeout: float = 10.0) -> Command:
        """Sign `cmd` with the fleet key and publish it (QoS 1, not retained). With `wait`,
        return once the broker has accepted it (it then holds it for an offline device)."""
        with self._cond:
            self._commands[cmd.id] = CommandTrack(cmd)
        info = self.client.publish(self.topics.cmd(cmd.device_id), sign_command(cmd, self.key),
                                   qos=1)
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

    def state(self, device_id: str) -> dict[str, Any] | None:
        with self._cond:
            s = self._states.get(device_id)
            return dict(s) if s else None

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

    def _on_disconnect(self, *args: Any) -> None:
        self.connected.clear()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        parsed = self.topics.parse(msg.topic)
        if parsed is None:
            return
        device, kind = parsed
        try:
            doc = json.loads(msg.payload)
        except ValueError:
            if kind == "state" and not msg.payload:  # retained state cleared
                with self._cond:
                    self._states.pop(device, None)
                    self._cond.notify_all()
            return
        if not isinstance(doc, dict) or doc.get("device_id") != device:
            return  # the ACL stops this on a TLS broker; be as strict on a plain one
        with self._cond:
            self.messages += 1
            if kind == "state":
                self._merge_state(device, doc)
            elif kind == "event":
                key = (device, str(doc.get("boot")), int(doc.get("seq", -1)))
                if key in self._seen_events:
                    return  # a QoS 1 duplicate
                self._seen_events.add(key)
                track = self._commands.get(doc.get("command_id") or "")
                if track is None:
                    self._orphans.append(doc)
                else:
                    track.events.append(doc)
                    boots = list(dict.fromkeys(e.get("boot") for e in track.events))
                    track.events.sort(key=lambda e: (boots.index(e.get("boot")),
                                                     e.get("seq", 0)))
            self._cond.notify_all()
        for fn in self._listeners:
            try:
                fn(kind, device, doc)
            except Exception:
                _LOG.exception("listener failed")

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


def _new_id() -> str:
    return uuid.uuid4().hex[:20]
