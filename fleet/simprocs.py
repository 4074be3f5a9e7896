"""A simulated fleet spread over several processes: one `fleet.sim.Simulator` per process, each
with its own selector loop, command workers and GIL, so a 2-core machine can hold thousands of
simulated devices (one process runs out of CPU first, not the broker).

    sim = ProcessSimulator(SimConfig(devices=5000, ..., light=True), procs=2).start()
    sim.wait_connected(timeout=120)
    ...                                   # drive it with a controller, as a Simulator
    sim.actives()                         # {device id: active bundle digest}
    sim.usage()                           # CPU seconds and peak RSS of each process
    sim.stop()

Process `k` of `procs` runs the devices `offset + k*n/procs ...` (the same ids, labels and faults
as one Simulator would give them). The shared template store (`SimConfig.preinstall`) is
installed once here, before the processes start. Processes are spawned (no fork of a threaded
parent) and driven over a pipe: one request at a time, answered in order.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import resource
import time
from collections.abc import Mapping
from dataclasses import replace
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from agent.keys import Keyring
from fleet.sim import DeviceFaults, SimConfig, Simulator, install_template

__all__ = ["ProcessSimulator", "usage"]


def usage() -> dict[str, float]:
    """This process's CPU seconds (user + system) and peak RSS in MB."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return {"cpu_s": round(ru.ru_utime + ru.ru_stime, 2),
            "max_rss_mb": round(ru.ru_maxrss / 1024, 1)}


def _serve(conn: Connection, config: SimConfig, faults: dict[str, DeviceFaults],
           log_level: int) -> None:
    """A child process: run one Simulator, answer the parent's requests until `stop`."""
    logging.getLogger("edgefleet").setLevel(log_level)
    sim = Simulator(config, faults)
    try:
        sim.start()
        conn.send(("ok", len(sim.devices)))
        while True:
            op, arg = conn.recv()
            if op == "stop":
                break
            if op == "connected":
                conn.send(("ok", sim.connected()))
            elif op == "actives":
                conn.send(("ok", sim.actives()))
            elif op == "idle":
                conn.send(("ok", sim.wait_idle(arg)))
            elif op == "usage":
                conn.send(("ok", {**usage(), "devices": len(sim.devices),
                                  "light_timings": sim.light_timings.to_json()}))
            else:
                conn.send(("error", f"unknown request {op!r}"))
    except Exception as e:  # reported to the parent, which raises it
        conn.send(("error", f"{type(e).__name__}: {e}"))
    finally:
        sim.stop()
        conn.send(("ok", usage()))
        conn.close()


class ProcessSimulator:
    """`config.devices` simulated devices over `procs` processes (see the module docstring)."""

    def __init__(self, config: SimConfig, faults: Mapping[str, DeviceFaults] | None = None,
                 procs: int = 2) -> None:
        if procs < 1:
            raise ValueError("procs must be at least 1")
        self.config = config
        self.faults = dict(faults or {})
        self.procs = min(procs, max(1, config.devices))
        self._children: list[tuple[Any, Connection]] = []
        self.final_usage: list[dict[str, float]] = []

    def shards(self) -> list[SimConfig]:
        """Each process's configuration: a contiguous slice of the device indices."""
        n, p, out = self.config.devices, self.procs, []
        for k in range(p):
            lo, hi = k * n // p, (k + 1) * n // p
            out.append(replace(self.config, devices=hi - lo, offset=self.config.offset + lo))
        return out

    @property
    def device_ids(self) -> list[str]:
        return [self.config.device_id(i) for i in self.config.indices()]

    def start(self) -> ProcessSimulator:
        if self.config.preinstall is not None:
            install_template(self.config.root, Keyring.load(self.config.keyring),
                             Path(self.config.preinstall))
        ctx = mp.get_context("spawn")
        level = logging.getLogger("edgefleet").getEffectiveLevel()
        for shard in self.shards():
            ids = {shard.device_id(i) for i in shard.indices()}
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_serve, name=f"sim-{shard.offset}", daemon=True,
                               args=(child, shard, {d: f for d, f in self.faults.items()
                                                    if d in ids}, level))
            proc.start()
            child.close()
            self._children.append((proc, parent))
        for _, conn in self._children:  # every process has created its devices
            self._answer(conn)
        return self

    @staticmethod
    def _answer(conn: Connection) -> Any:
        status, value = conn.recv()
        if status != "ok":
            raise RuntimeError(f"simulator process: {value}")
        return value

    def _ask(self, op: str, arg: Any = None) -> list[Any]:
        for _, conn in self._children:
            conn.send((op, arg))
        return [self._answer(conn) for _, conn in self._children]

    def connected(self) -> int:
        return sum(self._ask("connected"))

    def wait_connected(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.connected() < self.config.devices:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.2)
        return True

    def wait_idle(self, timeout: float) -> bool:
        return all(self._ask("idle", timeout))

    def actives(self) -> dict[str, str | None]:
        out: dict[str, str | None] = {}
        for part in self._ask("actives"):
            out.update(part)
        return out

    def usage(self) -> list[dict[str, Any]]:
        """Per process: CPU seconds so far, peak RSS, devices, the light-mode durations."""
        return self._ask("usage")

    def stop(self) -> None:
        """Stop every process (each stops its devices); `final_usage` keeps their last CPU and
        RSS figures."""
        for _, conn in self._children:
            try:
                conn.send(("stop", None))
            except OSError:
                continue
        self.final_usage = []
        for proc, conn in self._children:
            try:
                if conn.poll(60):
                    self.final_usage.append(self._answer(conn))
            except (EOFError, OSError, RuntimeError):
                pass
            proc.join(30)
            if proc.is_alive():
                proc.kill()
                proc.join()
            conn.close()
        self._children = []

    def __enter__(self) -> ProcessSimulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
