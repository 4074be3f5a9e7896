"""The agent process, assembled from its configuration: the serving socket, the model store and
its installer, the admin socket, the integrity monitor and (when a broker is configured) the
fleet link. `run(config)` is what `edgefleet agent serve` ends up calling.

Start-up order matters: the store recovers an interrupted install and self-tests the active
model *before* the socket accepts its first request, so the tester never sees a half-installed
model; the admin socket and the fleet link start last, once there is something to report.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import sys
import threading
from dataclasses import dataclass, field
from typing import Any

from agent.config import AgentConfig
from agent.errors import UsageError
from agent.memory import limit_arenas
from agent.runtime import Runtime
from agent.server import AgentServer

log = logging.getLogger("edgefleet.agent")


@dataclass
class Agent:
    """Everything one agent process runs; `start()` and `stop()` in dependency order."""

    config: AgentConfig
    server: AgentServer
    installer: Any = None  # agent.install.Installer when a store is configured
    services: list[Any] = field(default_factory=list)  # each with start() and stop()

    @property
    def runtime(self) -> Runtime:
        return self.server.runtime

    def start(self) -> Agent:
        self.server.start()
        started = []
        try:
            for s in self.services:
                s.start()
                started.append(s)
        except BaseException:
            for s in reversed(started):
                s.stop()
            self.server.stop()
            raise
        return self

    def stop(self) -> None:
        """The server first: once it answers nothing more, the services after it (the
        prediction log's writer, the calibration's last save) hold every answer it gave.
        Stopping them first lost the answers given in between from the log."""
        self.server.stop()
        for s in reversed(self.services):
            try:
                s.stop()
            except Exception:
                log.exception("stopping %s failed", type(s).__name__)
        if self.installer is not None:
            self.installer.close()


def build(config: AgentConfig) -> Agent:
    """An agent from its configuration. Nothing listens until `start()`; the model store (if
    any) is recovered and its active model loaded and self-tested here."""
    from agent.fallback import RuleSet
    from agent.predictor import Limits

    limits = Limits(max_missing_share=config.max_missing_share,
                    fallback_retry_s=config.fallback_retry_s, drift_window=config.drift_window,
                    drift_top_k=config.drift_top_k, drift_interval_s=config.drift_interval_s)
    rules = RuleSet.load(config.rules) if config.rules else None
    hub = _calibration_hub(config)
    runtime = Runtime(limits, rules, calibration=hub)
    agent = Agent(config, AgentServer(config, runtime))
    if hub is not None:
        from agent.calibration import CalibrationCollector, CalibrationKeeper

        agent.services.append(CalibrationKeeper(hub, config.calibration_save_s))
        agent.server.metrics.registry.register(CalibrationCollector(hub))
    if config.store is not None:
        _attach_store(agent)
    runtime.log_state()
    from agent.predlog import attach as attach_predlog

    attach_predlog(agent)  # prediction log, capture, labels (docs/operations.md)
    return agent


def _calibration_hub(config: AgentConfig) -> Any:
    """Per-tester calibration (agent/calibration.py), its state beside the store; None when
    configured off."""
    if config.calibration != "on":
        return None
    from agent.calibration import CalibrationHub

    state_dir = config.calibration_dir or (config.store.parent / "calibration"
                                           if config.store else None)
    return CalibrationHub(state_dir)


def _attach_store(agent: Agent) -> None:
    from agent.admin import AdminServer
    from agent.health import HealthWindow, InstallCollector
    from agent.install import InstallConfig, Installer, IntegrityMonitor
    from agent.keys import Keyring

    cfg, runtime = agent.config, agent.runtime
    if cfg.keyring is None:
        raise UsageError("a model store needs a keyring to verify its models",
                         hint="pass --keyring DIR")
    keyring = Keyring.load(cfg.keyring)
    installer = Installer.open(cfg.store, keyring,
                               InstallConfig.from_env(engine_threads=cfg.threads))
    agent.installer = installer
    start = installer.start()
    if start.recovered:
        log.warning("recovered an interrupted %s (state %s)", start.recovered.get("op"),
                    start.recovered.get("state"))
    if start.engine is not None:
        runtime.swap(start.engine, start.manifest)
    elif start.manifest is not None:  # the model is unusable but its manifest is intact
        runtime.rules_of(start.manifest, start.fallback_reason or "active model unusable")
    # on_prepare: the new snapshot is built while loading, the commit only switches to it
    installer.attach(on_commit=runtime.swap, on_fallback=runtime.enter_fallback,
                     on_prepare=runtime.prepare)
    agent.server.metrics.registry.register(InstallCollector(installer))

    admin_path = cfg.admin_socket or cfg.socket.with_name("admin.sock")
    agent.services.append(AdminServer(admin_path, installer, mode=cfg.admin_socket_mode))
    agent.services.append(_Monitor(IntegrityMonitor(installer)))
    if os.environ.get("EDGEFLEET_MQTT_HOST"):
        from agent.link import DeviceLink, LinkConfig
        from agent.shadow import ShadowHost, ShadowScorer

        link_dir = cfg.store.parent / "link" if not os.environ.get("EDGEFLEET_LINK_DIR") else None
        link_cfg = LinkConfig.from_env(data_dir=link_dir)
        # rollouts' shadow stage: a candidate scores the answered rows off the hot path
        rate = os.environ.get("EDGEFLEET_SHADOW_MAX_ROWS_PER_S")
        scorer = ShadowScorer(**({"max_rows_per_s": float(rate) or None} if rate else {}))
        agent.server.dispatch.shadow = scorer
        link = DeviceLink(link_cfg, keyring=keyring, installer=installer,
                          health=HealthWindow(agent.server.metrics, runtime, installer),
                          shadow=ShadowHost(scorer, link_cfg.data_dir / "shadow",
                                            engine_threads=cfg.threads))
        agent.services.append(link)


class _Monitor:
    """Adapts `IntegrityMonitor` (whose start returns itself) to the start/stop interface."""

    def __init__(self, monitor: Any) -> None:
        self.monitor = monitor

    def start(self) -> None:
        self.monitor.start()

    def stop(self) -> None:
        self.monitor.stop()


def run(config: AgentConfig) -> None:
    """Serve until SIGTERM or SIGINT (the CLI's `agent serve`)."""
    sys.setswitchinterval(config.switch_interval_s)
    limit_arenas()
    from prometheus_client import disable_created_metrics

    disable_created_metrics()  # no *_created series: they double the exposition for nothing
    agent = build(config)
    stop = threading.Event()

    def _on_signal(signum: int, frame: Any) -> None:
        log.info("signal %d: shutting down", signum)
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    agent.start()
    # What start-up built (the model, numpy, ONNX Runtime, metrics: ~50k objects) goes to the
    # permanent generation: a full garbage collection then walks only what came after, instead
    # of stalling every connection for ~40 ms.
    gc.freeze()
    try:
        while not stop.wait(0.5):
            pass
    finally:
        agent.stop()
