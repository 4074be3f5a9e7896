"""A fleet in one process: N virtual devices, each with its own MQTT connection, its own model
store in a directory of its own, and the real device code (command verification, download,
install state machine with a real ONNX Runtime self-test, the link). For testing and
benchmarking a controller at hundreds of devices on one machine.

    sim = Simulator(SimConfig(devices=500, root=tmp, mqtt=MqttConfig(port=...),
                              keyring=Path("keyring")),
                    faults={"sim-0003": DeviceFaults(self_test_failure=True)})
    sim.start()
    sim.wait_connected(timeout=20)
    ...                                   # drive it with fleet.transport.FleetController
    sim.stop()

Network I/O: with `driver="selector"` (default) one thread drives every device's MQTT socket
(fleet.transport.SelectorLoop, epoll); `driver="threads"` gives each device paho's own network
thread (`loop_start`), as the agent does. paho's loop waits with select(), which cannot watch a
file descriptor above 1023, so that driver stalls at about 250 devices in one process.

Light mode (`SimConfig(light=True)`), for scale runs: every device still speaks real MQTT, verifies
every signed command, downloads and checks the bundle, verifies its signature, unpacks it into its
store and moves the pointers with fsync (so its state, events and store are real), but the ONNX
Runtime load and self-test are replaced by a sleep of their measured duration (the first three
installs in the process run them for real; `LightTimings`). Light devices report a static health
summary, hold no ONNX Runtime session and take no shadow commands; the ids in `full_devices` run
in full mode (real sessions, traffic and shadow scoring) among them, e.g. a rollout's canary.
`fleet/simprocs.py` spreads a fleet over several processes. Numbers: docs/scale.md.

Commands run on a shared pool of `workers` threads, one at a time per device. Faults per device
(`DeviceFaults`): the install step fails, the self-test fails (a real one: the latency limit is
set below anything a model can meet), the download is slow, or the device drops off the network
mid-install and comes back later.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import statistics
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import paho.mqtt.client as mqtt

from agent.download import DownloadConfig, download
from agent.install import InstallConfig, Installer, InstallFailed, IntegrityError, LatencyTooHigh
from agent.install import State as InstallState
from agent.keys import Keyring
from agent.link import DeviceLink, LinkConfig, MqttConfig, StaticHealth
from agent.shadow import ShadowHost
from agent.wire import Reason
from fleet.transport import SelectorLoop

__all__ = ["DeviceFaults", "LightInstaller", "LightTimings", "SimConfig", "SimDevice", "Simulator",
           "install_template"]


@dataclass(frozen=True)
class DeviceFaults:
    install_failure: bool = False  # the install step fails (as if the disk were full)
    self_test_failure: bool = False  # the model's self-test fails on this device
    slow_download_bps: float | None = None  # the download crawls at this many bytes/s
    offline_mid_install_s: float | None = None  # drop off the network this long once the
    # download has started (the install goes on; events are queued)


@dataclass(frozen=True)
class SimConfig:
    devices: int
    root: Path  # one directory per device below it
    mqtt: MqttConfig
    keyring: Path
    prefix: str = "edgefleet"
    id_format: str = "sim-{:04d}"
    driver: str = "selector"  # or "threads"
    workers: int = 4  # threads running commands, shared by all devices
    state_interval_s: float = 30.0  # the agent's default
    # per device id, a state interval other than `state_interval_s` (e.g. the devices whose
    # health a short bake judges)
    state_intervals: Mapping[str, float] = field(default_factory=dict)
    download: DownloadConfig = field(default_factory=lambda: DownloadConfig(
        timeout_s=5, attempts=8, backoff_s=0.2, backoff_max_s=2.0))
    groups: tuple[str, ...] = ("canary", "wave-1", "wave-2", "wave-3")
    # Rollout simulation (fleet/simtraffic.py): each device scores dies with its live model
    # (and its shadow candidate) and reports health from them; `preinstall` puts a bundle in
    # every device's store before it starts (installed once, the store copied to the others).
    traffic: Any = None  # a fleet.simtraffic.TrafficConfig
    preinstall: Path | None = None
    sites: int = 1  # labels site=s0..s<sites-1> (round-robin) instead of site=sim
    site: str | None = None  # or every device site=<site> (one simulator per site broker)
    light: bool = False  # light mode (see the module docstring)
    full_devices: frozenset[str] = frozenset()  # in light mode, these run in full mode
    offset: int = 0  # this simulator's devices are offset .. offset + devices - 1

    def indices(self) -> range:
        return range(self.offset, self.offset + self.devices)

    def state_interval(self, device_id: str) -> float:
        return self.state_intervals.get(device_id, self.state_interval_s)

    def is_light(self, device_id: str) -> bool:
        return self.light and device_id not in self.full_devices

    def device_id(self, i: int) -> str:
        return self.id_format.format(i)

    def labels(self, i: int) -> dict[str, str]:
        site = self.site or ("sim" if self.sites <= 1 else f"s{i % self.sites}")
        return {"site": site,
                "tester": f"t{i % 8}",
                "group": self.groups[0] if i == 0 else self.groups[1 + i % (len(self.groups) - 1)]}


class _Network:
    """A device's network: `cut(seconds)` drops the connection (no DISCONNECT, so the broker
    sends the will) and refuses reconnects until the time is up."""

    def __init__(self, client: mqtt.Client) -> None:
        self.client = client
        self.offline_until = 0.0
        self._reconnect = client.reconnect
        client.reconnect = self._gated  # type: ignore[method-assign]

    def _gated(self) -> Any:
        if time.monotonic() < self.offline_until:
            raise ConnectionRefusedError("simulated network outage")
        return self._reconnect()

    def cut(self, seconds: float) -> None:
        self.offline_until = time.monotonic() + seconds
        sock = self.client.socket()
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


class _FailingInstaller:
    """The real installer, except that `install` fails the way a full disk would."""

    def __init__(self, real: Installer) -> None:
        self._real = real

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def install(self, bundle: Path, **kw: Any) -> Any:
        raise InstallFailed("install", None, "unpack", "OSError",
                            f"[Errno 28] No space left on device (simulated) unpacking {bundle}",
                            Reason.OS_ERROR)


class LightTimings:
    """The ONNX Runtime load and self-test durations a light installer stands in for: the first
    `samples` installs in the process run both for real (the first one also pays ONNX Runtime's
    one-time start-up), then every light install sleeps their median and reports the measured
    golden difference and latency."""

    def __init__(self, samples: int = 3) -> None:
        self.samples = samples
        self.loads: list[float] = []
        self.self_tests: list[tuple[float, float | None, float]] = []  # (s, golden, latency)
        self._lock = threading.Lock()

    @property
    def measured(self) -> bool:
        return min(len(self.loads), len(self.self_tests)) >= self.samples

    def add_load(self, seconds: float) -> None:
        with self._lock:
            self.loads.append(seconds)

    def add_self_test(self, seconds: float, golden: float | None, latency: float) -> None:
        with self._lock:
            self.self_tests.append((seconds, golden, latency))

    @property
    def load_s(self) -> float:
        return statistics.median(self.loads)

    @property
    def self_test(self) -> tuple[float, float | None, float]:
        """(seconds, golden max difference, latency) of the median self-test."""
        return sorted(self.self_tests)[len(self.self_tests) // 2]

    def to_json(self) -> dict[str, Any]:
        if not self.measured:
            return {"measured": False}
        seconds, golden, latency = self.self_test
        return {"measured": True, "samples": self.samples, "load_s": round(self.load_s, 5),
                "self_test_s": round(seconds, 5), "golden_max_diff": golden,
                "latency_s": latency}


class LightInstaller(Installer):
    """The real installer (verify, unpack, pointers, history, recovery) with the ONNX Runtime
    steps replaced by their measured duration once `timings` has them. No session is held: a
    light device serves nothing, and start-up checks the active version's files only."""

    timings: LightTimings

    def _load(self, job: Any) -> InstallState:
        t = self.timings
        if not t.measured:  # real, until enough jobs have measured both steps
            t0 = time.perf_counter()
            state = Installer._load(self, job)
            t.add_load(time.perf_counter() - t0)
            return state
        if job.op != "install":  # a retained version: checked at rest, as the real one is
            problems = self.store.check_integrity(job.id)
            if problems:
                raise IntegrityError(f"{job.id}: " + "; ".join(problems))
            job.manifest = self.store.manifest(job.id)
        time.sleep(t.load_s)
        return InstallState.SELF_TEST

    def _self_test(self, job: Any) -> InstallState:
        t = self.timings
        if job.engine is not None:  # this job loaded a real session: test it for real
            t0 = time.perf_counter()
            try:
                return Installer._self_test(self, job)
            finally:
                if job.latency_s is not None:
                    t.add_self_test(time.perf_counter() - t0, job.golden_max_diff,
                                    job.latency_s)
        seconds, job.golden_max_diff, job.latency_s = t.self_test
        time.sleep(seconds)
        limit = self.config.max_latency_s
        if limit is not None and job.latency_s > limit:
            raise LatencyTooHigh(f"{job.id}: median single-row latency "
                                 f"{job.latency_s * 1000:.2f} ms (measured before), "
                                 f"limit {limit * 1000:.2f} ms")
        return InstallState.COMMIT

    def _check_active(self, *, load: bool, on_commit: Any, notify: bool = True) -> Any:
        return Installer._check_active(self, load=False, on_commit=on_commit, notify=notify)

    _STEPS: ClassVar[dict[InstallState, Callable[..., InstallState]]] = {
        **Installer._STEPS, InstallState.LOAD: _load,
        InstallState.SELF_TEST: _self_test}


def install_template(root: Path, keyring: Keyring, bundle: Path) -> Path:
    """Install `bundle` once (the real installer) into `root/.template-store`, the store every
    simulated device starts from (copied); returns that directory."""
    template = Path(root) / ".template-store"
    if not (template / "active").exists():
        inst = Installer.open(template, keyring, InstallConfig(latency_rows=5,
                                                               max_latency_s=None))
        try:
            inst.start()
            inst.install(bundle)
        finally:
            inst.close()
    return template


class _ThreadDriver:
    """paho's own network thread per client; one shared thread calls every device's tick."""

    def __init__(self, tick_s: float = 1.0) -> None:
        self._ticks: dict[int, Callable[[], None]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sim-ticks", daemon=True)
        self.tick_s = tick_s

    def start(self) -> _ThreadDriver:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def add(self, client: mqtt.Client, tick: Callable[[], None] | None = None) -> None:
        if tick is not None:
            self._ticks[id(client)] = tick
        client.loop_start()

    def remove(self, client: mqtt.Client) -> None:
        self._ticks.pop(id(client), None)
        client.loop_stop()

    def _run(self) -> None:
        while not self._stop.wait(self.tick_s):
            for tick in list(self._ticks.values()):
                tick()


@dataclass
class SimDevice:
    device_id: str
    installer: Any
    link: DeviceLink
    network: _Network
    faults: DeviceFaults
    traffic: Any = None  # fleet.simtraffic.DeviceTraffic, with SimConfig.traffic


class Simulator:
    """N virtual devices against one broker (see the module docstring)."""

    def __init__(self, config: SimConfig,
                 faults: Mapping[str, DeviceFaults] | None = None) -> None:
        if config.driver not in ("selector", "threads"):
            raise ValueError(f"driver must be 'selector' or 'threads', not {config.driver!r}")
        self.config = config
        self.faults = dict(faults or {})
        self.keyring = Keyring.load(config.keyring)
        self.devices: dict[str, SimDevice] = {}
        self._executor = ThreadPoolExecutor(config.workers, thread_name_prefix="sim-cmd")
        self._driver: SelectorLoop | _ThreadDriver = (
            SelectorLoop(reconnect_min_s=config.mqtt.reconnect_min_s,
                         reconnect_max_s=config.mqtt.reconnect_max_s)
            if config.driver == "selector" else _ThreadDriver())
        self._traffic: Any = None
        self._template: Path | None = None
        self.light_timings = LightTimings()

    def _make(self, i: int) -> SimDevice:
        cfg = self.config
        dev_id = cfg.device_id(i)
        faults = self.faults.get(dev_id, DeviceFaults())
        base = Path(cfg.root) / dev_id
        light = cfg.is_light(dev_id)
        traffic = None
        if cfg.traffic is not None and not light:
            from fleet.simtraffic import DeviceTraffic

            traffic = DeviceTraffic(cfg.traffic, i)
        if self._template is not None and not (base / "store").exists():
            shutil.copytree(self._template, base / "store", symlinks=True,
                            ignore=shutil.ignore_patterns("lock"))
        installer: Any = (LightInstaller if light else Installer).open(
            base / "store", self.keyring,
            InstallConfig(latency_rows=5,
                          max_latency_s=1e-9 if faults.self_test_failure else None),
            # a simulated box serves nothing, unless it simulates traffic
            on_commit=traffic.on_commit if traffic else lambda engine, manifest: None)
        if light:
            installer.timings = self.light_timings
        started = installer.start()
        if traffic is not None and started.engine is not None:
            traffic.on_commit(started.engine, started.manifest)
        if faults.install_failure:
            installer = _FailingInstaller(installer)
        holder: dict[str, Any] = {}
        link = DeviceLink(
            LinkConfig(dev_id, base / "link", cfg.mqtt, prefix=cfg.prefix,
                       labels=cfg.labels(i), state_interval_s=cfg.state_interval(dev_id),
                       download=cfg.download),
            keyring=self.keyring, installer=installer,
            health=traffic or StaticHealth(requests=1000 + i, p99_ms=0.2, fail_rate=0.01,
                                           max_psi=0.02),
            executor=self._executor,
            fetch=lambda *a, **kw: self._fetch(holder["dev"], *a, **kw),
            arch="sim",
            shadow=ShadowHost(traffic.shadow, base / "link" / "shadow") if traffic else None)
        dev = SimDevice(dev_id, installer, link, _Network(link.client), faults, traffic)
        holder["dev"] = dev
        return dev

    def _fetch(self, dev: SimDevice, url: str, dest: Path, **kw: Any) -> Path:
        f = dev.faults
        if f.offline_mid_install_s:
            dev.network.cut(f.offline_mid_install_s)
        if f.slow_download_bps:
            inner = kw.get("progress")
            last = [0]

            def crawl(have: int, total: int) -> None:
                time.sleep((have - last[0]) / f.slow_download_bps)
                last[0] = have
                if inner is not None:
                    inner(have, total)

            kw["progress"] = crawl
        return download(url, dest, **kw)

    def start(self) -> Simulator:
        """Create every device (store, installer, link) and start connecting them."""
        if self.config.preinstall is not None:
            self._template = install_template(self.config.root, self.keyring,
                                              Path(self.config.preinstall))
        self._driver.start()
        for i in self.config.indices():
            dev = self._make(i)
            self.devices[dev.device_id] = dev
            dev.link.start(driver=self._driver)
        if self.config.traffic is not None:
            from fleet.simtraffic import TrafficDriver

            self._traffic = TrafficDriver(
                lambda: [d.traffic for d in self.devices.values() if d.traffic is not None],
                self.config.traffic.interval_s).start()
        return self

    def connected(self) -> int:
        return sum(1 for d in self.devices.values() if d.link.connected.is_set())

    def wait_connected(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.connected() < len(self.devices):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def wait_idle(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        return all(d.link.wait_idle(max(0.0, deadline - time.monotonic()))
                   for d in self.devices.values())

    def actives(self) -> dict[str, str | None]:
        """Each device's active bundle digest (sha256 of the bundle file), None without one."""
        from agent.link import bundle_digest

        out: dict[str, str | None] = {}
        for d, dev in self.devices.items():
            vid = dev.installer.store.active()
            out[d] = bundle_digest(dev.installer.store.version_dir(vid)) if vid else None
        return out

    def stop(self) -> None:
        if self._traffic is not None:
            self._traffic.stop()
        for dev in self.devices.values():
            with contextlib.suppress(Exception):
                dev.link.stop(timeout=2)
        self._driver.stop()
        self._executor.shutdown(wait=True, cancel_futures=True)
        for dev in self.devices.values():
            dev.installer.close()

    def __enter__(self) -> Simulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
