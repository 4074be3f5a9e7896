"""What the controller service shows Prometheus (`/metrics`) and its supervisor (`/healthz`).

Metrics (labels have bounded values: rollout ids only of rollouts that are not final, which
one rollout per device keeps few; stage names from the plan; states, statuses, gate metrics
and pause reasons from fixed sets):

    edgefleet_controller_up                                  1 while it holds the lease
    edgefleet_controller_store_up                            1 when this scrape read the state
                                                             store, 0 when it could not (the
                                                             two store-wide families below are
                                                             then left out; the rest is what
                                                             the controller holds in memory)
    edgefleet_controller_rollouts_driven                     rollouts it drives now
    edgefleet_rollouts{state}                                rollouts per state (all time)
    edgefleet_rollout_stage{rollout,stage,phase}             1: the current stage and phase
    edgefleet_rollout_stage_index{rollout}                   its position in the plan
    edgefleet_rollout_stage_seconds{rollout}                 time in the current stage
    edgefleet_rollout_devices{rollout,status}                targeted, done, failed, skipped,
                                                             in_flight, pending
    edgefleet_rollout_gate_value{rollout,gate}               the last verdict's values
    edgefleet_rollout_gate_passing{rollout,gate}             1 pass, 0 fail, -1 inconclusive
    edgefleet_rollout_paused{rollout,reason}                 1 per paused rollout; reason one
                                                             of PAUSE_REASONS

`/healthz` answers 200 while the controller holds its lease, is connected to the broker and
finished a round within the last 5 s; 503 with the reason otherwise.
"""

from __future__ import annotations

import selectors
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.metrics_core import GaugeMetricFamily, Metric

from fleet.machine import RolloutState
from fleet.state_backend import StoreUnavailable

if TYPE_CHECKING:
    from fleet.controller import Controller

__all__ = ["PAUSE_REASONS", "MetricsServer", "pause_reason"]

PAUSE_REASONS = ("operator", "driver-stopped", "budget", "gates-failed", "inconclusive",
                 "no-evidence", "left-behind", "other")
_GATE_VERDICT = {"pass": 1.0, "fail": 0.0, "inconclusive": -1.0}


def pause_reason(reason: str | None) -> str:
    """A paused rollout's reason as one of `PAUSE_REASONS` (a bounded label)."""
    r = reason or ""
    if "by an operator" in r:
        return "operator"
    if "driver stopped" in r:
        return "driver-stopped"
    if "budget" in r:
        return "budget"
    if "gates failed" in r:
        return "gates-failed"
    if "not enough evidence" in r:
        return "no-evidence"
    if "inconclusive" in r:
        return "inconclusive"
    if "do not run the bundle" in r:
        return "left-behind"
    return "other"


class _Collector:
    def __init__(self, controller: Controller) -> None:
        self.c = controller

    def collect(self) -> Iterator[Metric]:
        c = self.c
        ok, _ = c.healthy()
        up = GaugeMetricFamily("edgefleet_controller_up", "1 while the controller holds its "
                               "lease and drives")
        up.add_metric([], 1.0 if ok else 0.0)
        yield up
        n = GaugeMetricFamily("edgefleet_controller_rollouts_driven", "Rollouts it drives")
        n.add_metric([], float(len(c.drivers)))
        yield n
        try:  # the store may be unreachable (a PostgreSQL restart): say so, show the rest
            counts = {s.value: 0 for s in RolloutState}
            counts.update(c.db.state_counts())
            active = c.db.active()
        except StoreUnavailable:
            counts, active = {}, None
        store = GaugeMetricFamily("edgefleet_controller_store_up", "1 when this scrape read "
                                  "the state store")
        store.add_metric([], 0.0 if active is None else 1.0)
        yield store
        if active is not None:
            by_state = GaugeMetricFamily("edgefleet_rollouts", "Rollouts per state",
                                         labels=["state"])
            for state, k in counts.items():
                by_state.add_metric([state], float(k))
            yield by_state
        stage = GaugeMetricFamily("edgefleet_rollout_stage", "The current stage and phase",
                                  labels=["rollout", "stage", "phase"])
        index = GaugeMetricFamily("edgefleet_rollout_stage_index", "Current stage's position",
                                  labels=["rollout"])
        secs = GaugeMetricFamily("edgefleet_rollout_stage_seconds", "Time in the current "
                                 "stage", labels=["rollout"])
        devices = GaugeMetricFamily("edgefleet_rollout_devices", "Devices per status",
                                    labels=["rollout", "status"])
        gate_v = GaugeMetricFamily("edgefleet_rollout_gate_value", "Last gate values",
                                   labels=["rollout", "gate"])
        gate_p = GaugeMetricFamily("edgefleet_rollout_gate_passing", "1 pass, 0 fail, -1 "
                                   "inconclusive", labels=["rollout", "gate"])
        now = time.time()
        for rid, drv in list(c.drivers.items()):
            p = drv.progress()
            stage.add_metric([rid, p["stage"] or "-", p["phase"]], 1.0)
            index.add_metric([rid], float(p["stage_idx"]))
            cur = next((s for s in p["stages"] if s["name"] == p["stage"]), None)
            if cur is not None and cur["started"]:
                secs.add_metric([rid], now - cur["started"])
            totals: dict[str, int] = {"targeted": p["devices"]}
            for s in p["stages"]:
                if s["kind"] == "shadow":
                    continue
                for k in ("done", "failed", "skipped", "in_flight", "pending"):
                    totals[k] = totals.get(k, 0) + s[k]
            for k, v in totals.items():
                devices.add_metric([rid, k], float(v))
            for r in (p["verdict"] or {}).get("results", []):
                if r["value"] is not None:
                    gate_v.add_metric([rid, r["gate"]], float(r["value"]))
                gate_p.add_metric([rid, r["gate"]], _GATE_VERDICT.get(r["verdict"], -1.0))
        yield from (stage, index, secs, devices, gate_v, gate_p)
        if active is None:
            return
        paused = GaugeMetricFamily("edgefleet_rollout_paused", "Paused rollouts and why",
                                   labels=["rollout", "reason"])
        for row in active:
            if row.state == RolloutState.PAUSED:
                paused.add_metric([row.id, pause_reason(row.reason)], 1.0)
        yield paused


class MetricsServer:
    """`/metrics` and `/healthz` on a small threaded HTTP server."""

    def __init__(self, controller: Controller, host: str = "127.0.0.1", port: int = 9470
                 ) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(controller))  # type: ignore[arg-type]
        registry = self.registry

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.split("?")[0] == "/metrics":
                    self._send(200, generate_latest(registry), CONTENT_TYPE_LATEST)
                elif self.path == "/healthz":
                    ok, why = controller.healthy()
                    self._send(200 if ok else 503, (why + "\n").encode(), "text/plain")
                else:
                    self._send(404, b"not found: /metrics or /healthz\n", "text/plain")

            def _send(self, code: int, body: bytes, ctype: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self.httpd.timeout = 1.0  # `handle_request` gives up if the connection went meanwhile
        self.port = self.httpd.server_address[1]
        self._wake_r, self._wake_w = socket.socketpair()
        self._thread = threading.Thread(target=self._serve, daemon=True,
                                        name="controller-metrics")

    def start(self) -> MetricsServer:
        self._thread.start()
        return self

    def _serve(self) -> None:
        """Answer requests until `stop`: the thread sleeps until a connection or `stop`
        comes (`serve_forever` would wake twice a second to look for a shutdown, a cost the
        controller pays every second of its life)."""
        with selectors.DefaultSelector() as sel:
            sel.register(self.httpd.socket, selectors.EVENT_READ)
            sel.register(self._wake_r, selectors.EVENT_READ)
            while True:
                for key, _ in sel.select():
                    if key.fileobj is self._wake_r:
                        return
                    self.httpd.handle_request()  # ready: accepts, a thread answers it

    def stop(self) -> None:
        self._wake_w.send(b"\0")
        self._thread.join(10)
        self.httpd.server_close()
        self._wake_r.close()
        self._wake_w.close()
