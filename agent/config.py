"""The agent's configuration: one frozen dataclass, from CLI flags, then environment
(`EDGEFLEET_AGENT_<FIELD>`, e.g. `EDGEFLEET_AGENT_MAX_MISSING_SHARE=0.1`), then a TOML file
(`--config FILE`, keys as the field names), then the defaults below, in that precedence.

    # agent.toml
    socket = "/run/edgefleet/agent.sock"
    socket_mode = "0660"
    socket_group = "tester"
    store = "/var/lib/edgefleet/store"
    keyring = "/etc/edgefleet/keyring"
    metrics_addr = "0.0.0.0:9464"
    max_missing_share = 0.2
"""

from __future__ import annotations

import dataclasses
import json
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from agent.errors import UsageError

ENV_PREFIX = "EDGEFLEET_AGENT_"


@dataclass(frozen=True)
class AgentConfig:
    socket: Path | None = None
    socket_mode: int = 0o660
    socket_group: str | None = None
    store: Path | None = None
    keyring: Path | None = None
    admin_socket: Path | None = None  # install/rollback/list; default: admin.sock beside socket
    admin_socket_mode: int = 0o600
    rules: Path | None = None  # standalone fallback rules (JSON), for a box without a model
    metrics_addr: str | None = "127.0.0.1:9464"  # "" disables the HTTP endpoint
    threads: int = 1  # ONNX Runtime intra-op threads
    max_missing_share: float = 0.2  # more missing values than this share of a row: error
    max_line_bytes: int = 4 << 20
    max_frame_bytes: int = 64 << 20
    max_connections: int = 64  # when all are taken, the longest idle (>= 1 s) makes room
    max_connections_per_peer: int = 16  # from one process (its pid, by SO_PEERCRED)
    idle_timeout_s: float = 300.0  # no message for this long: closed (0: never)
    message_timeout_s: float = 10.0  # a message must arrive whole within this, from its start
    io_timeout_s: float = 10.0  # an answer the client does not take within this: closed
    fallback_retry_s: float = 5.0  # after the session raises, try the model again after this
    drift_window: int = 2048
    drift_top_k: int = 5
    drift_interval_s: float = 10.0
    # per-tester threshold calibration (agent/calibration.py, docs/model.md)
    calibration: str = "on"  # "off": every die is judged against the bundle's fixed threshold
    calibration_dir: Path | None = None  # default: <store>/../calibration (no store: memory)
    calibration_save_s: float = 30.0
    switch_interval_s: float = 0.0005  # sys.setswitchinterval for the serving process
    # prediction log, capture and labels (agent/predlog.py, agent/labels.py, docs/operations.md)
    predlog: str = "on"  # "off": no log, no capture, no label op
    predlog_dir: Path | None = None  # default: <store>/../predlog (no store: no log)
    predlog_max_mb: int = 256
    predlog_max_age_h: float = 720.0
    predlog_fsync_s: float = 1.0
    predlog_queue: int = 65536
    predlog_tap: str = "auto"  # "c": agent/_tapfast.c or fail; "python": the pure-Python tap
    predlog_writer_idle: int = 1  # the log's writer at SCHED_IDLE; 0: nice 10 only
    capture_rate: float = 0.01  # share of answered dies whose input row is kept (and every fail)
    capture_fails: int = 1
    capture_max_mb: int = 256
    labels_dir: Path | None = None  # MES drop directory (incoming/, done/, rejected/)
    data_addr: str | None = None  # HOST:PORT of the mTLS data feed `fleet collect` pulls from
    log_level: str = "info"
    log_format: str = "text"  # or json (agent/logfmt.py)

    def to_json(self) -> str:
        return json.dumps({k: (str(v) if isinstance(v, Path) else v)
                           for k, v in dataclasses.asdict(self).items()})

    @classmethod
    def from_json(cls, text: str) -> AgentConfig:
        """The inverse of `to_json` (every field present, already validated)."""
        known = {f.name: f.type for f in fields(cls)}
        data = json.loads(text)
        cfg = cls(**{k: _coerce(k, known[k], v, "config") for k, v in data.items()})
        _check(cfg)
        return cfg

    def metrics_host_port(self) -> tuple[str, int] | None:
        if not self.metrics_addr:
            return None
        host, sep, port = self.metrics_addr.rpartition(":")
        if not sep or not port.isdigit():
            raise UsageError(f"metrics_addr: expected HOST:PORT, found {self.metrics_addr!r}")
        return host or "0.0.0.0", int(port)


def _coerce(name: str, kind: Any, value: Any, where: str) -> Any:
    if value is None:
        return None
    text = str(kind)
    try:
        if name.endswith("socket_mode"):
            return int(value, 8) if isinstance(value, str) else int(value)
        if "Path" in text:
            return Path(value)
        if text == "int":
            if isinstance(value, bool):
                raise ValueError("a boolean")
            return int(value)
        if text == "float":
            return float(value)
        return str(value)
    except (TypeError, ValueError) as e:
        raise UsageError(f"{where}: {name}: cannot use {value!r} ({e})") from None


def load_config(file: Path | None = None, env: Mapping[str, str] | None = None,
                **flags: Any) -> AgentConfig:
    """Merge file < environment < flags (flags set to None are ignored)."""
    env = os.environ if env is None else env
    known = {f.name: f.type for f in fields(AgentConfig)}
    values: dict[str, Any] = {}
    if file is not None:
        try:
            data = tomllib.loads(Path(file).read_text(encoding="utf-8"))
        except OSError as e:
            raise UsageError(f"cannot read config file {file}: {e.strerror}") from None
        except tomllib.TOMLDecodeError as e:
            raise UsageError(f"config file {file}: not valid TOML: {e}") from None
        for key, value in data.items():
            if key not in known:
                raise UsageError(f"config file {file}: unknown key {key!r}",
                                 hint=f"known keys: {', '.join(sorted(known))}")
            values[key] = _coerce(key, known[key], value, str(file))
    for name, kind in known.items():
        raw = env.get(ENV_PREFIX + name.upper())
        if raw is not None:
            values[name] = _coerce(name, kind, raw, ENV_PREFIX + name.upper())
    for name, value in flags.items():
        if name not in known:
            raise TypeError(f"unknown config field {name}")
        if value is not None:
            values[name] = _coerce(name, known[name], value, f"--{name.replace('_', '-')}")
    cfg = dataclasses.replace(AgentConfig(), **values)
    _check(cfg)
    return cfg


def _check(cfg: AgentConfig) -> None:
    if cfg.log_format not in ("text", "json"):
        raise UsageError(f"log_format must be text or json, not {cfg.log_format!r}")
    if not 0.0 <= cfg.max_missing_share <= 1.0:
        raise UsageError(f"max_missing_share must be in 0..1, found {cfg.max_missing_share}")
    for name in ("socket_mode", "admin_socket_mode"):
        if not 0 <= getattr(cfg, name) <= 0o777:
            raise UsageError(f"{name} must be an octal mode like 0660, "
                             f"found {getattr(cfg, name):o}")
    for name in ("max_line_bytes", "max_frame_bytes", "max_connections",
                 "max_connections_per_peer", "threads", "drift_window", "drift_top_k"):
        if getattr(cfg, name) < 1:
            raise UsageError(f"{name} must be at least 1, found {getattr(cfg, name)}")
    for name in ("message_timeout_s", "io_timeout_s"):
        if not getattr(cfg, name) > 0:
            raise UsageError(f"{name} must be more than 0, found {getattr(cfg, name)}")
    if cfg.idle_timeout_s < 0:
        raise UsageError(f"idle_timeout_s must be 0 (never) or more, found {cfg.idle_timeout_s}")
    cfg.metrics_host_port()
    if cfg.calibration not in ("on", "off"):
        raise UsageError(f"calibration must be on or off, found {cfg.calibration!r}")
    if not cfg.calibration_save_s > 0:
        raise UsageError(f"calibration_save_s must be more than 0, found "
                         f"{cfg.calibration_save_s}")
    if cfg.predlog not in ("on", "off"):
        raise UsageError(f"predlog must be on or off, found {cfg.predlog!r}")
    if cfg.predlog_tap not in ("auto", "c", "python"):
        raise UsageError(f"predlog_tap must be auto, c or python, found {cfg.predlog_tap!r}")
    if cfg.predlog_tap == "c" and cfg.predlog == "on":
        from agent.predlog_tap import compiled, not_compiled_reason

        if not compiled():
            raise UsageError(f"predlog_tap is c, but agent/_tapfast.c is {not_compiled_reason()}"
                             ": build it with scripts/build-tap.sh, or set predlog_tap to auto")
    if not 0.0 <= cfg.capture_rate <= 1.0:
        raise UsageError(f"capture_rate must be in 0..1, found {cfg.capture_rate}")
    for name in ("predlog_max_mb", "capture_max_mb", "predlog_queue"):
        if getattr(cfg, name) < 1:
            raise UsageError(f"{name} must be at least 1, found {getattr(cfg, name)}")
