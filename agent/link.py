"""The device's MQTT link to the fleet controller: report state, take signed commands, report
every step. Runs inside the agent process, off the serving path (its own threads; nothing here is
called by a request).

Contract (docs/fleet-protocol.md), under a configurable prefix (default `edgefleet`):

    <prefix>/device/<id>/state   device -> all   retained, QoS 0, republished on every connect,
                                                 every change and every `state_interval_s`;
                                                 the broker's will (retained, QoS 1) marks the
                                                 device offline
    <prefix>/device/<id>/cmd     controller -> device   QoS 1, signed (agent/commands.py)
    <prefix>/device/<id>/event   device -> controller   QoS 1, one per step of a command

A command goes through, in order: verify (signature by a `fleet` key, addressee, validity
window), replay guard (recorded durably, then the MQTT message is acknowledged), then the steps

    install:     received -> downloading -> verified -> installing -> self-test -> live
    rollback:    received -> installing -> self-test -> rolled-back
    report-now:  received -> reported
    any step:    -> failed (reason, detail); the box is as it was before the command

The install itself is `agent.install.Installer`'s state machine (verify, unpack, load, self-test,
commit, each state on disk first); this module only fetches the bundle and reports. Commands run
one at a time on the link's worker; the MQTT network thread only queues them.

The MQTT session is persistent (MQTT 5, clean_start=False, session expiry `session_expiry_s`),
so QoS 1 commands sent while the box was offline are delivered when it comes back; events
published while the broker is unreachable are queued in memory (bounded) and sent on reconnect.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import re
import secrets
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent import __version__
from agent.commands import (
    Command,
    CommandError,
    InstallSpec,
    Replayed,
    ReplayGuard,
    valid_device_id,
    verify_command,
)
from agent.digest import bundle_digest, cached_bundle_digest
from agent.download import Cancel, DownloadCancelled, DownloadConfig, DownloadError, download
from agent.errors import EdgefleetError, UsageError
from agent.fsio import atomic_write
from agent.handlers import HANDLERS
from agent.keys import Keyring, LiveKeyring
from agent.manifest import format_time, utc_now
from agent.wire import (
    CANCELLING,
    HEALTH_STATUSES,
    PROTOCOL_VERSION,
    CommandType,
    Reason,
    Step,
    Topics,
)

_LOG = logging.getLogger("edgefleet.link")

__all__ = [
    "DeviceLink",
    "HealthProvider",
    "LinkConfig",
    "MqttConfig",
    "StaticHealth",
    "bundle_digest",
]


# -- broker and link configuration ----------------------------------------------------


@dataclass(frozen=True)
class MqttConfig:
    """How to reach the broker; shared by the device link and the controller. TLS is on when
    `ca_file` is set; `cert_file`/`key_file` are the client's certificate (its CN is the MQTT
    user name the broker's ACL sees)."""

    host: str = "localhost"
    port: int = 1883
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    keepalive_s: int = 30
    reconnect_min_s: float = 1.0
    reconnect_max_s: float = 30.0
    session_expiry_s: int = 7 * 24 * 3600  # how long the broker keeps an offline session
    max_queued: int = 1000  # QoS 1 messages kept in memory while the broker is unreachable
    connect_timeout_s: float = 5.0

    @property
    def tls(self) -> bool:
        return self.ca_file is not None

    def ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(self.ca_file))
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.cert_file is not None:
            ctx.load_cert_chain(str(self.cert_file),
                                str(self.key_file) if self.key_file else None)
        return ctx

    def new_client(self, client_id: str, *, manual_ack: bool = False) -> mqtt.Client:
        """A paho client (MQTT 5, callback API v2) with TLS, queue limits and backoff set, and
        `connect_async` already called: start it with `loop_start()` or an external loop."""
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                             protocol=mqtt.MQTTv5, manual_ack=manual_ack)
        if self.tls:
            client.tls_set_context(self.ssl_context())
        client.max_queued_messages_set(self.max_queued)
        client.reconnect_delay_set(max(1, int(self.reconnect_min_s)),
                                   max(1, int(self.reconnect_max_s)))
        client.connect_timeout = self.connect_timeout_s
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self.session_expiry_s
        client.connect_async(self.host, self.port, keepalive=self.keepalive_s,
                             clean_start=False, properties=props)
        return client

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> MqttConfig:
        """EDGEFLEET_MQTT_HOST, _PORT, _CA, _CERT, _KEY, then explicit overrides."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for key, name, conv in (("host", "HOST", str), ("port", "PORT", int),
                                ("ca_file", "CA", Path), ("cert_file", "CERT", Path),
                                ("key_file", "KEY", Path)):
            if env.get(f"EDGEFLEET_MQTT_{name}"):
                values[key] = conv(env[f"EDGEFLEET_MQTT_{name}"])
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


@dataclass(frozen=True)
class LinkConfig:
    """One device's link settings (env: EDGEFLEET_DEVICE_ID, EDGEFLEET_TOPIC_PREFIX,
    EDGEFLEET_LINK_DIR, EDGEFLEET_LABELS="site=fab2,tester=t5,group=canary",
    EDGEFLEET_STATE_INTERVAL_S, and MqttConfig's and DownloadConfig's)."""

    device_id: str
    data_dir: Path  # replay record, link record, nothing large
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    prefix: str = "edgefleet"
    labels: Mapping[str, str] = field(default_factory=dict)
    state_interval_s: float = 30.0  # republish when the health summary changed
    download: DownloadConfig = field(default_factory=DownloadConfig)
    replay_capacity: int = 1024
    # HOST:PORT where `fleet collect` reaches this device's data feed, reported in the state
    # (EDGEFLEET_DATA_FEED; else the agent's data_addr when it names a host, not 0.0.0.0)
    data_feed: str | None = None

    def __post_init__(self) -> None:
        if not valid_device_id(self.device_id):
            raise UsageError(f"device id {self.device_id!r}: 1-64 chars of [A-Za-z0-9._-]")
        Topics(self.prefix)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> LinkConfig:
        env = os.environ if env is None else env
        values: dict[str, Any] = {"mqtt": MqttConfig.from_env(env),
                                  "download": DownloadConfig.from_env(dict(env))}
        if env.get("EDGEFLEET_DEVICE_ID"):
            values["device_id"] = env["EDGEFLEET_DEVICE_ID"]
        else:
            values["device_id"] = re.sub(r"[^A-Za-z0-9._-]", "-", platform.node())[:64] or "box"
        if env.get("EDGEFLEET_TOPIC_PREFIX"):
            values["prefix"] = env["EDGEFLEET_TOPIC_PREFIX"]
        if env.get("EDGEFLEET_LINK_DIR"):
            values["data_dir"] = Path(env["EDGEFLEET_LINK_DIR"])
        if env.get("EDGEFLEET_LABELS"):
            values["labels"] = dict(kv.split("=", 1) for kv in env["EDGEFLEET_LABELS"].split(",")
                                    if "=" in kv)
        if env.get("EDGEFLEET_STATE_INTERVAL_S"):
            values["state_interval_s"] = float(env["EDGEFLEET_STATE_INTERVAL_S"])
        values["data_feed"] = env.get("EDGEFLEET_DATA_FEED") or \
            _advertised(env.get("EDGEFLEET_AGENT_DATA_ADDR"))
        values.update({k: v for k, v in overrides.items() if v is not None})
        if "data_dir" not in values:
            raise UsageError("the link needs a data directory",
                             hint="set EDGEFLEET_LINK_DIR or pass --link-dir")
        return cls(**values)


def _advertised(addr: str | None) -> str | None:
    """A data feed address others can use: `addr` unless its host is a wildcard."""
    if not addr:
        return None
    host = addr.rpartition(":")[0].strip("[]")
    return None if host in ("", "0.0.0.0", "::") else addr


class HealthProvider(Protocol):
    """What the link needs from the serving agent, computed over a recent window:

        {"status": "ok" | "degraded" | "fallback", "reason": str | None,
         "window_s": float, "requests": int, "errors": int, "fallback": int,
         "p99_ms": float | None, "fail_rate": float | None, "max_psi": float | None}

    Called from the link's worker thread, about every `state_interval_s`; must not block."""

    def health_summary(self) -> dict[str, Any]: ...


@dataclass
class StaticHealth:
    """A stand-in health provider (the simulator, tests, an agent without a server)."""

    status: str = "ok"
    reason: str | None = None
    requests: int = 0
    errors: int = 0
    fallback: int = 0
    p99_ms: float | None = None
    fail_rate: float | None = None
    max_psi: float | None = None
    window_s: float = 60.0

    def health_summary(self) -> dict[str, Any]:
        return dict(self.__dict__)


class ModelInstaller(Protocol):
    """The part of `agent.install.Installer` the link uses."""

    store: Any
    fallback_reason: str | None

    def install(self, bundle: Path) -> Any: ...

    def rollback(self) -> Any: ...


class _Serial:
    """Runs submitted callables one at a time, in order, on an executor (shared or own)."""

    def __init__(self, executor: Executor) -> None:
        self._executor = executor
        self._queue: deque[Callable[[], None]] = deque()
        self._lock = threading.Lock()
        self._running = False
        self._idle = threading.Event()
        self._idle.set()

    def submit(self, fn: Callable[[], None]) -> None:
        if self._enqueue(fn):
            self._executor.submit(self._drain)

    def run_or_submit(self, fn: Callable[[], None]) -> None:
        """Run `fn` in the calling thread if nothing is queued or running (then drain what
        arrives meanwhile), else queue it: the lane stays one-at-a-time either way, and a job
        that finds it idle does not wait for a worker of a shared executor."""
        if self._enqueue(fn):
            self._drain()

    def _enqueue(self, fn: Callable[[], None]) -> bool:
        """Queue `fn`; True if the caller must start draining (nobody is)."""
        with self._lock:
            self._queue.append(fn)
            self._idle.clear()
            if self._running:
                return False
            self._running = True
            return True

    def _drain(self) -> None:
        while True:
            with self._lock:
                if not self._queue:
                    self._running = False
                    self._idle.set()
                    return
                fn = self._queue.popleft()
            try:
                fn()
            except Exception:  # a bug in one job must not stop the link
                _LOG.exception("fleet link job failed")

    def wait_idle(self, timeout: float | None = None) -> bool:
        return self._idle.wait(timeout)

    def idle(self) -> bool:
        return self._idle.is_set()


# -- one command while it runs --------------------------------------------------------------


class CommandContext:
    """One accepted command while it runs: everything a handler (agent/handlers.py) or the
    shadow host (agent/shadow.py) may read and do, and nothing else of the link.

    A command ends exactly once: `done` (its success step) or `fail`; later calls are ignored,
    so a download that was cancelled (the command already ended `failed`, `cancelled`) cannot
    end it again. `cancel` is set when another command supersedes this one's download, or when
    the link stops."""

    def __init__(self, link: DeviceLink, command: Command) -> None:
        self._link = link
        self.command = command
        self.cancel = Cancel()
        self.current = Step.RECEIVED  # the last step reported
        self.transferring = False  # a download of this command is queued or running
        self._ended = False

    # -- what a handler reads

    @property
    def installer(self) -> ModelInstaller:
        return self._link.installer

    @property
    def shadow(self) -> Any:
        """The `agent.shadow.ShadowHost`, or None when the agent runs no shadow models."""
        return self._link.shadow

    @property
    def ended(self) -> bool:
        return self._ended

    def keyring(self) -> Keyring:
        """The keyring as it is on disk now (a revoked key is refused from now on)."""
        return self._link.keyring_now()

    def model(self, pointer: str) -> dict[str, Any] | None:
        """The state document's entry for `active` or `previous`."""
        return self._link._model(pointer)

    def digest_of(self, version_id: str) -> str | None:
        """The bundle SHA-256 of a stored version (None if it cannot be read)."""
        return self._link._digest(version_id)

    # -- what a handler does

    def step(self, step: str, **extra: Any) -> None:
        """Report a progress step (not terminal)."""
        if not self._ended:
            self.current = step
            self._link._event(step, self.command, **extra)

    def done(self, step: str, *, record: Mapping[str, Any] | None = None,
             **extra: Any) -> None:
        """End the command with its success step (`extra` goes into the event, `record` into
        the state's `last_command`), and publish the state."""
        if self._end():
            self._link._event(step, self.command, **extra)
            self._link._finish(self, step, **(record or {}))

    def fail(self, reason: str, detail: str, **extra: Any) -> None:
        """End the command `failed`: the box is as it was before it."""
        if self._end():
            self._link._event(Step.FAILED, self.command, reason=reason, detail=detail, **extra)
            self._link._finish(self, Step.FAILED, reason, detail)

    def fetch(self, spec: InstallSpec, dest: Path,
              then: Callable[[Path, float], None]) -> None:
        """Report `downloading`, then download `spec` to `dest` on the transfer lane, within
        the command's expiry and the minimum rate (agent/download.py), and cancellable; then
        run `then(path, seconds)` on the control lane, unless the command ended meanwhile. A
        download that fails ends the command with the download's reason."""
        self.step(Step.DOWNLOADING, url=spec.url, size=spec.size)
        self.transferring = True
        self._link._transfer(self, spec, dest, then)

    def _end(self) -> bool:
        with self._link._lock:
            if self._ended:
                return False
            self._ended = True
            self.transferring = False
            return True


# -- the link -------------------------------------------------------------------------------


class DeviceLink:
    """One device's connection to the fleet. `start()`, then `stop()` at shutdown.

    `installer` is the agent's `agent.install.Installer` (already `start()`ed by the server);
    `keyring` its keyring (followed on disk: see `agent.keys.LiveKeyring`); `health` supplies
    the health summary; `executor` (optional) runs this link's two lanes (the simulator shares
    one across devices); `driver` (optional, see fleet.transport.SelectorLoop) runs the MQTT
    network I/O instead of paho's own thread; `clock` is the device's clock (tests).
    """

    def __init__(
        self,
        config: LinkConfig,
        *,
        keyring: Keyring | Path,
        installer: ModelInstaller,
        health: HealthProvider | None = None,
        executor: Executor | None = None,
        fetch: Callable[..., Path] = download,
        agent_version: str = __version__,
        arch: str | None = None,
        shadow: Any = None,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self.config = config
        self.topics = Topics(config.prefix)
        self.keyring = LiveKeyring(keyring)  # re-read when the directory changes
        self.installer = installer
        self.health = health or StaticHealth()
        self.fetch = fetch
        self.agent_version = agent_version
        self.arch = arch or platform.machine()
        self.shadow = shadow  # agent.shadow.ShadowHost: `shadow`/`shadow-stop` commands
        self.clock = clock
        self.boot = secrets.token_hex(4)
        self.connected = threading.Event()
        self.stopping = threading.Event()
        self.connects = 0  # successful connections so far
        config.data_dir.mkdir(parents=True, exist_ok=True)
        self.replay = ReplayGuard(config.data_dir / "commands-seen.json",
                                  capacity=config.replay_capacity, clock=clock)
        self._record_path = config.data_dir / "link.json"
        self._record = self._load_record()
        self._own_executor = executor is None
        self._executor = executor or ThreadPoolExecutor(2, thread_name_prefix="fleet-link")
        self._jobs = _Serial(self._executor)  # the control lane
        self._transfers = _Serial(self._executor)  # the transfer lane
        self._lock = threading.Lock()
        self._event_seq = 0
        self._state_seq = 0
        self._running: dict[str, CommandContext] = {}  # accepted, not ended, oldest first
        self._last_published: dict[str, Any] | None = None
        self._last_publish_t = 0.0
        self._ticker: threading.Thread | None = None
        self._driver: Any = None
        self.client = config.mqtt.new_client(config.device_id, manual_ack=True)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self, driver: Any = None) -> DeviceLink:
        """Set the will, then connect in the background (retrying with backoff for ever).
        Without a `driver`, paho's own network thread and one ticker thread run the link."""
        self._set_will()
        self._recover_in_flight()
        if driver is None:
            self.client.loop_start()
            self._ticker = threading.Thread(target=self._tick_loop, daemon=True,
                                            name=f"fleet-link-tick-{self.config.device_id}")
            self._ticker.start()
        else:
            self._driver = driver
            driver.add(self.client, tick=self.tick)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Publish the offline state (so the retained state says why), disconnect cleanly
        (the will is not sent), and stop the threads. A download in progress is cancelled;
        commands still queued are dropped; the broker keeps them for the next start
        (persistent session)."""
        self.stopping.set()
        with self._lock:
            for ctx in self._running.values():
                ctx.cancel.set()
        if self.connected.is_set():
            info = self.client.publish(self.topics.state(self.config.device_id),
                                       json.dumps(self.state(online=False)), qos=1, retain=True)
            with contextlib.suppress(RuntimeError, ValueError):
                info.wait_for_publish(timeout)
        self.client.disconnect()
        if self._driver is not None:
            deadline = time.monotonic() + 1.0  # let the driver flush the DISCONNECT
            while self.client.socket() is not None and time.monotonic() < deadline:
                time.sleep(0.005)
            self._driver.remove(self.client)
        else:
            self.client.loop_stop()
        if self._ticker is not None:
            self._ticker.join(timeout)
        self.wait_idle(timeout)
        if self._own_executor:
            self._executor.shutdown(wait=False, cancel_futures=True)

    def wait_idle(self, timeout: float | None = None) -> bool:
        """True once no command is queued or running on either lane (tests, the simulator)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not (self._transfers.wait_idle(left) and self._jobs.wait_idle(left)):
                return False
            if self._transfers.idle() and self._jobs.idle():  # neither refilled the other
                return True

    def tick(self) -> None:
        """Called about once a second by the driver: republish the state when the summary
        changed and `state_interval_s` passed."""
        if (self.connected.is_set() and not self.stopping.is_set()
                and time.monotonic() - self._last_publish_t >= self.config.state_interval_s):
            self._last_publish_t = time.monotonic()  # one job queued per interval at most
            self._jobs.submit(lambda: self.publish_state(only_if_changed=True))

    def _tick_loop(self) -> None:
        while not self.stopping.wait(1.0):
            self.tick()

    # -- MQTT callbacks (network thread: never block here) -----------------------------------

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: mqtt.ConnectFlags,
                    reason: Any, properties: Any) -> None:
        if reason.is_failure:
            _LOG.warning("broker refused the connection: %s", reason)
            return
        self.connects += 1
        client.subscribe(self.topics.cmd(self.config.device_id), qos=1)
        self.connected.set()
        self._jobs.submit(lambda: self.publish_state(force=True))

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any,
                       properties: Any) -> None:
        self.connected.clear()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        payload, mid, qos, dup = bytes(msg.payload), msg.mid, msg.qos, bool(msg.dup)
        self._jobs.submit(lambda: self._handle(payload, mid, qos, dup))

    # -- state ----------------------------------------------------------------------------------

    def _set_will(self) -> None:
        """The broker publishes this (retained) if the connection dies without a DISCONNECT:
        the state as of now with online=false and will=true. Consumers holding a newer state of
        the same device (higher `seq`) take only `online` from it (docs/fleet-protocol.md)."""
        doc = self.state(online=False)
        doc["will"] = True
        self.client.will_set(self.topics.state(self.config.device_id), json.dumps(doc),
                             qos=1, retain=True)

    def state(self, *, online: bool = True) -> dict[str, Any]:
        """The state document (docs/fleet-protocol.md)."""
        with self._lock:
            self._state_seq = max(self._state_seq + 1, time.time_ns() // 1_000_000)
            seq = self._state_seq
            first = next(iter(self._running.values()), None)  # the oldest command running
            busy = {"command_id": first.command.id, "rollout_id": first.command.rollout_id,
                    "type": first.command.type, "step": first.current} if first else None
            last = self._record.get("last_command")
        try:
            summary = dict(self.health.health_summary())
        except Exception as e:  # a broken provider must not silence the device
            summary = {"status": "degraded", "reason": f"health summary unavailable: {e}"}
        status = summary.pop("status", "ok")
        reason = summary.pop("reason", None)
        model = {"active": self._model("active"), "previous": self._model("previous")}
        if self.shadow is not None:  # the candidate scoring live dies, and its counters
            model["shadow"] = self.shadow.model_info()
            summary["shadow"] = self.shadow.summary()
        if getattr(self.installer, "fallback_reason", None):
            status, reason = "fallback", self.installer.fallback_reason
        doc = {
            "v": PROTOCOL_VERSION,
            "device_id": self.config.device_id,
            "online": online,
            "will": False,
            "seq": seq,
            "boot": self.boot,
            "ts": format_time(utc_now()),
            "agent_version": self.agent_version,
            "arch": self.arch,
            "labels": dict(self.config.labels),
            "model": model,
            "health": {"status": status if status in HEALTH_STATUSES else "degraded",
                       "reason": reason},
            "summary": summary,
            "busy": busy,
            "last_command": last,
        }
        if self.config.data_feed:
            doc["data_feed"] = self.config.data_feed
        return doc

    def _model(self, pointer: str) -> dict[str, Any] | None:
        store = self.installer.store
        vid = store.active() if pointer == "active" else store.previous()
        if vid is None:
            return None
        try:
            m = store.manifest(vid)
            digest = cached_bundle_digest(store.version_dir(vid), m)
        except (EdgefleetError, OSError, ValueError, KeyError) as e:
            return {"id": vid, "error": str(e)}
        return {"id": vid, "name": m.name, "version": m.version, "sequence": m.sequence,
                "digest": digest, "model_sha256": m.model_digest}

    def _digest(self, vid: str) -> str | None:
        """The bundle SHA-256 of a stored version (agent.digest's cache: the install computed
        it while unpacking)."""
        try:
            return cached_bundle_digest(self.installer.store.version_dir(vid))
        except (EdgefleetError, OSError, ValueError, KeyError):
            return None

    def publish_state(self, *, force: bool = False, only_if_changed: bool = False) -> None:
        """Publish the state (retained, QoS 0: a lost one is superseded by the republish on the
        next connect). With `only_if_changed`, skip when nothing but time and seq changed."""
        doc = self.state()
        self._last_publish_t = time.monotonic()
        if only_if_changed and not force and self._last_published is not None:
            def key(d: dict) -> dict:
                return {k: v for k, v in d.items() if k not in ("seq", "ts")}
            if key(doc) == key(self._last_published):
                return
        if not self.connected.is_set():
            return  # republished on connect
        self.client.publish(self.topics.state(self.config.device_id), json.dumps(doc),
                            qos=0, retain=True)
        self._last_published = doc

    # -- events ---------------------------------------------------------------------------------

    def _event(self, step: str, cmd: Command | None = None, *, command_id: str | None = None,
               rollout_id: str | None = None, ctype: str | None = None, **extra: Any) -> None:
        with self._lock:
            self._event_seq += 1
            seq = self._event_seq
        doc = {
            "v": PROTOCOL_VERSION, "device_id": self.config.device_id, "boot": self.boot,
            "seq": seq, "ts": format_time(utc_now()),
            "command_id": cmd.id if cmd else command_id,
            "rollout_id": cmd.rollout_id if cmd else rollout_id,
            "type": cmd.type if cmd else ctype, "step": step,
            **{k: v for k, v in extra.items() if v is not None},
        }
        # QoS 1, queued by paho while the broker is unreachable and sent on reconnect.
        self.client.publish(self.topics.event(self.config.device_id), json.dumps(doc), qos=1)

    # -- commands -------------------------------------------------------------------------------

    def _ack(self, mid: int, qos: int) -> None:
        if qos > 0:
            self.client.ack(mid, qos)

    def _handle(self, payload: bytes, mid: int, qos: int, dup: bool) -> None:
        """Verify, record, acknowledge, cancel what it supersedes, run its handler. Runs on
        the control lane."""
        try:
            cmd = verify_command(payload, self.keyring_now(), device_id=self.config.device_id,
                                 now=self.clock())
            self.replay.record(cmd)
        except Replayed as e:
            self._ack(mid, qos)
            if not dup:  # a redelivery after a crash between record and ack is not news
                self._event(Step.FAILED, command_id=e.command_id, rollout_id=e.rollout_id,
                            reason=e.reason, detail=str(e))
            return  # a replay never changes the device's reported last command
        except CommandError as e:
            self._ack(mid, qos)
            self._event(Step.FAILED, command_id=e.command_id, rollout_id=e.rollout_id,
                        reason=e.reason, detail=str(e))
            self._save_record(last_command=self._last_command(
                e.command_id, e.rollout_id, None, Step.FAILED, e.reason, str(e)))
            self.publish_state()
            return
        except EdgefleetError as e:  # keyring unreadable: refuse, say why
            self._ack(mid, qos)
            self._event(Step.FAILED, reason=Reason.KEYRING, detail=str(e))
            return
        self._ack(mid, qos)  # durable in the replay record: the broker may forget it now
        ctx = CommandContext(self, cmd)
        self._event(Step.RECEIVED, cmd)
        self._supersede(cmd)
        with self._lock:
            self._running[cmd.id] = ctx
            if self.stopping.is_set():
                ctx.cancel.set()
        self._save_in_flight()
        self.publish_state()
        self._run(ctx, lambda: HANDLERS[cmd.type](ctx))

    def _run(self, ctx: CommandContext, job: Callable[[], None]) -> None:
        """Run part of a command's work; never leave the command without a terminal event."""
        try:
            job()
        except Exception as e:
            _LOG.exception("command %s failed unexpectedly", ctx.command.id)
            ctx.fail(Reason.INTERNAL, f"{type(e).__name__}: {e}")

    def _supersede(self, cmd: Command) -> None:
        """Cancel the downloads `cmd` supersedes (agent.wire.CANCELLING): their commands end
        `failed`, `cancelled`, now, and the download stops at once."""
        kinds = CANCELLING.get(cmd.type, ())
        with self._lock:
            victims = [c for c in self._running.values()
                       if c.transferring and c.command.type in kinds]
        for victim in victims:
            victim.cancel.set()
            victim.fail(Reason.CANCELLED, f"download cancelled by {cmd.type} command {cmd.id}",
                        cancelled_by=cmd.id)

    def _transfer(self, ctx: CommandContext, spec: InstallSpec, dest: Path,
                  then: Callable[[Path, float], None]) -> None:
        """`CommandContext.fetch`: the download on the transfer lane, the rest back on the
        control lane."""
        expires_in = (ctx.command.expires - self.clock()).total_seconds()
        deadline = time.monotonic() + max(0.0, expires_in)
        last_report = [time.monotonic()]

        def progress(have: int, total: int) -> None:
            if time.monotonic() - last_report[0] >= 5.0:
                last_report[0] = time.monotonic()
                ctx.step(Step.DOWNLOADING, bytes=have, size=total)

        def fetch() -> None:
            t0 = time.monotonic()
            try:
                if ctx.ended:
                    raise DownloadCancelled("cancelled before it started")
                path = self.fetch(spec.url, dest, sha256=spec.sha256, size=spec.size,
                                  config=self.config.download, progress=progress,
                                  cancel=ctx.cancel, deadline=deadline)
            except DownloadError as e:
                error = e
                self._jobs.run_or_submit(lambda: self._transfer_ended(ctx, dest, error))
                return
            except Exception as e:  # a bug in the downloader: the command must still end
                _LOG.exception("download for command %s failed", ctx.command.id)
                error = DownloadError(f"{type(e).__name__}: {e}")
                self._jobs.run_or_submit(lambda: self._transfer_ended(ctx, dest, error))
                return
            seconds = time.monotonic() - t0
            # on to verify and install: right here if the control lane is idle
            self._jobs.run_or_submit(
                lambda: self._transfer_ended(ctx, path, None, then, seconds))

        self._transfers.submit(fetch)

    def _transfer_ended(self, ctx: CommandContext, path: Path, error: DownloadError | None,
                        then: Callable[[Path, float], None] | None = None,
                        seconds: float = 0.0) -> None:
        """Back on the control lane after a download: go on, or end the command."""
        ctx.transferring = False
        if ctx.ended:  # cancelled (and reported) meanwhile: drop what arrived
            if error is None:
                path.unlink(missing_ok=True)
            return
        if error is not None:
            ctx.fail(error.reason, str(error))
        elif then is not None:
            self._run(ctx, lambda: then(path, seconds))

    def keyring_now(self) -> Keyring:
        """The keyring as it is on disk now, for every command: rotation and revocation apply
        without a restart (a keyring given as a loaded `Keyring` is followed to its
        directory)."""
        return self.keyring.current()

    def _finish(self, ctx: CommandContext, result: str, reason: str | None = None,
                detail: str | None = None, **extra: Any) -> None:
        """A command ended: record it as the last command, forget it, publish the state."""
        cmd = ctx.command
        with self._lock:
            self._running.pop(cmd.id, None)
        self._save_record(in_flight=self._in_flight(), last_command=self._last_command(
            cmd.id, cmd.rollout_id, cmd.type, result, reason, detail, **extra))
        self.publish_state()

    @staticmethod
    def _last_command(cid: str | None, rid: str | None, ctype: str | None, result: str,
                      reason: str | None, detail: str | None, **extra: Any) -> dict[str, Any]:
        return {"id": cid, "rollout_id": rid, "type": ctype, "result": result,
                "reason": reason, "detail": detail[:500] if detail else None,
                "ts": format_time(utc_now()), **extra}

    def _in_flight(self) -> dict[str, Any] | None:
        """The oldest running command that changes the model, for `_recover_in_flight`."""
        with self._lock:
            return next((c.command.body() for c in self._running.values()
                         if c.command.type != CommandType.REPORT_NOW), None)

    def _save_in_flight(self) -> None:
        body = self._in_flight()
        if body != self._record.get("in_flight"):
            self._save_record(in_flight=body)

    # -- the link record ------------------------------------------------------------------------

    def _load_record(self) -> dict[str, Any]:
        try:
            return json.loads(self._record_path.read_bytes())
        except FileNotFoundError:
            return {}
        except ValueError:
            return {}  # a record is rewritten atomically; an unreadable one is just forgotten

    def _save_record(self, **changes: Any) -> None:
        with self._lock:
            self._record.update(changes)
            data = json.dumps(self._record).encode()
        atomic_write(self._record_path, data)

    def _recover_in_flight(self) -> None:
        """A command that was running when the agent stopped: the installer's start-up recovery
        has finished or undone it; report which, once connected."""
        body = self._record.get("in_flight")
        if not body:
            return
        cid, rid, ctype = body.get("id"), body.get("rollout_id"), body.get("type")
        want = (body.get("install") or {}).get("sha256")
        active = self._model("active")
        if ctype == CommandType.INSTALL and active and active.get("digest") == want:
            result, reason = Step.LIVE, None
            self._event(result, command_id=cid, rollout_id=rid, ctype=ctype, model=active,
                        recovered=True)
        else:
            result, reason = Step.FAILED, Reason.INTERRUPTED
            self._event(result, command_id=cid, rollout_id=rid, ctype=ctype,
                        reason=reason, detail="the agent stopped while the command ran; "
                        "start-up recovery finished or undid it", recovered=True)
        self._save_record(in_flight=None, last_command=self._last_command(
            cid, rid, ctype, result, reason, None))
