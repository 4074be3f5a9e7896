"""Simulated test-floor traffic for the device simulator (fleet/sim.py): every device scores a
small batch of dies every `interval_s` with its live model (real ONNX Runtime), reports a health
summary over what it scored since its model last changed, and, while it holds a shadow
candidate, scores the same dies with the candidate (agent/shadow.py), so the rollout's shadow
gates see real agreement counters.

    SimConfig(..., traffic=TrafficConfig(interval_s=1.0, batch=32))

Dies: `n_features` normal measurements around `loc` (the distribution the test bundles are
fitted on), and a share `anomaly_share` of gross defects (a few parameters far out). One
generator per device, seeded, so runs repeat.
"""

from __future__ import annotations

import collections
import contextlib
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from agent.manifest import Manifest
from agent.shadow import ShadowScorer

__all__ = ["DeviceTraffic", "TrafficConfig", "TrafficDriver"]


@dataclass(frozen=True)
class TrafficConfig:
    interval_s: float = 1.0  # one batch per device per interval
    batch: int = 32  # dies per batch
    loc: float = 0.0
    anomaly_share: float = 0.02
    seed: int = 0
    window_s: float = 60.0  # the health summary covers at most this much


class DeviceTraffic:
    """One simulated device's traffic, health summary and shadow scorer."""

    def __init__(self, config: TrafficConfig, index: int) -> None:
        self.config = config
        self.shadow = ShadowScorer(threaded=False)
        self.engine: Any = None
        self.manifest: Manifest | None = None
        self._rng = np.random.default_rng(config.seed * 100003 + index)
        self._lock = threading.Lock()
        self._window: collections.deque[tuple[float, int, int, float]] = collections.deque()
        self.extra_latency_s = 0.0  # fault injection: added to every reported latency
        # fault injection: while one of these models (model.onnx SHA-256) is live, the device
        # reports its health as `fallback` (the rules answer), as a box whose model errors would
        self.sick_models: set[str] = set()

    def on_commit(self, engine: Any, manifest: Manifest) -> None:
        """The installer's `on_commit`: a new live model. The health window starts over."""
        with self._lock:
            self.engine, self.manifest = engine, manifest
            self._window.clear()

    def dies(self, n: int, rows: int) -> np.ndarray:
        x = self._rng.normal(loc=self.config.loc, size=(rows, n)).astype(np.float32)  # (rows, n)
        bad = self._rng.random(rows) < self.config.anomaly_share
        if bad.any():
            x[bad, : max(1, n // 4)] += 8.0
        return x

    def tick(self) -> None:
        engine, manifest = self.engine, self.manifest
        if engine is None or manifest is None:
            return
        x = self.dies(manifest.input.n_features, self.config.batch)
        t0 = time.perf_counter()
        scores = engine.predict(x).score  # (rows,)
        latency = time.perf_counter() - t0 + self.extra_latency_s
        fails = int((scores > manifest.threshold).sum())
        now = time.monotonic()
        with self._lock:
            if self.manifest is not manifest:
                return
            self._window.append((now, len(x), fails, latency))
            while self._window and now - self._window[0][0] > self.config.window_s:
                self._window.popleft()
        self.shadow.score(x, scores, manifest)

    def health_summary(self) -> dict[str, Any]:
        """agent.link.HealthProvider: over the batches scored since the model last changed."""
        with self._lock:
            w = list(self._window)
        requests = sum(n for _, n, _, _ in w)
        fails = sum(f for _, _, f, _ in w)
        lat = [x for *_, x in w]
        span = (w[-1][0] - w[0][0]) if len(w) > 1 else 0.0
        sick = self.manifest is not None and self.manifest.model_digest in self.sick_models
        return {"status": "fallback" if sick else "ok",
                "reason": "model error (simulated)" if sick else None,
                "window_s": round(span, 1),
                "requests": requests, "errors": 0, "fallback": 0,
                "p99_ms": round(float(np.percentile(lat, 99)) * 1000, 3) if lat else None,
                "fail_rate": round(fails / requests, 5) if requests else None,
                "max_psi": 0.01 if requests else None}


class TrafficDriver:
    """One thread ticking every device's traffic, spread over each interval."""

    def __init__(self, devices: Callable[[], Iterable[DeviceTraffic]], interval_s: float
                 ) -> None:
        self._devices = devices
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sim-traffic", daemon=True)

    def start(self) -> TrafficDriver:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.is_set():
            t0 = time.monotonic()
            for d in list(self._devices()):
                if self._stop.is_set():
                    return
                # a device's model may be swapped mid-batch: it scores again next tick
                with contextlib.suppress(Exception):
                    d.tick()
            self._stop.wait(max(0.0, self.interval_s - (time.monotonic() - t0)))
