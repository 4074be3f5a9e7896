"""A real Prometheus (Debian's package) for the tests: started on a free port with a given
configuration, read back through its HTTP API, stopped with SIGTERM. Used by the scrape test,
the documented-PromQL test, the dashboard test and the WAN-cut test (two processes).

If prometheus is not installed the tests fail (they never skip): `.ci/run` installs it.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.deploy_helpers import N_FEATURES, agent_process, free_port, http_get, make_site, wait_for

PROM_DIR = REPO / "k3s" / "prometheus"


def prometheus_binary() -> str:
    found = shutil.which("prometheus")
    if not found:
        pytest.fail("prometheus is not installed (apt-get install prometheus; .ci/run does this)",
                    pytrace=False)
    return found


def fast(text: str) -> str:
    """Second-scale intervals, so a test sees in seconds what production sees in minutes."""
    text = text.replace("scrape_interval: 15s", "scrape_interval: 1s")
    text = text.replace("evaluation_interval: 15s", "evaluation_interval: 1s")
    return text.replace("scrape_timeout: 5s", "scrape_timeout: 1s")


def static_config(agent_port: int, *, site: str = "fab1", device: str = "box-01") -> str:
    """A configuration that scrapes one agent the way the static job labels it."""
    return fast(
        "global:\n  scrape_interval: 15s\n  evaluation_interval: 15s\n"
        "scrape_configs:\n"
        "  - job_name: edgefleet-agent-static\n    scrape_timeout: 5s\n"
        f"    static_configs:\n      - targets: ['127.0.0.1:{agent_port}']\n"
        f"        labels: {{site: {site}, device: {device}}}\n")


@dataclass
class Prometheus:
    url: str
    proc: subprocess.Popen
    log: Path
    args: list[str] = field(default_factory=list)

    def _api(self, path: str) -> dict:
        status, body = http_get(self.url + path, timeout=10)
        reply = json.loads(body)
        assert status == 200 and reply["status"] == "success", (path, reply)
        return reply["data"]

    def query(self, expr: str) -> list[dict]:
        return self._api(f"/api/v1/query?query={urllib.parse.quote(expr)}")["result"]

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict]:
        q = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": step})
        return self._api(f"/api/v1/query_range?{q}")["result"]

    def parse_error(self, expr: str) -> str | None:
        """None when Prometheus accepts `expr`, else its error (bad_data)."""
        status, body = http_get(f"{self.url}/api/v1/query?query={urllib.parse.quote(expr)}")
        reply = json.loads(body)
        return None if status == 200 else reply.get("error", body.decode())

    def without_series(self, queries: list[tuple[str, str]], timeout: float = 60
                       ) -> list[tuple[str, str]]:
        """The (where, query) pairs that still return no series after waiting up to
        `timeout` s for them all (rate() needs two scrapes, drift its first computation)."""
        pending = list(queries)
        deadline = time.monotonic() + timeout
        while pending and time.monotonic() < deadline:
            died = self.alive()
            assert died is None, died
            pending = [(w, q) for w, q in pending if not self.query(q)]
            if pending:
                time.sleep(0.2)
        return pending  # the caller asserts on what is left, naming the queries

    def rules(self) -> list[dict]:
        return [r for g in self._api("/api/v1/rules")["groups"] for r in g["rules"]]

    def alerts(self, name: str, state: str | None = None) -> list[dict]:
        return [a for a in self._api("/api/v1/alerts")["alerts"]
                if a["labels"]["alertname"] == name and (state is None or a["state"] == state)]

    def alive(self) -> str | None:
        if self.proc.poll() is None:
            return None
        return f"prometheus exited with {self.proc.returncode}: {self.log.read_text()[-3000:]}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_prometheus(root: Path, config: Path, *extra: str, port: int | None = None,
                     ready: bool = True) -> Prometheus:
    """Run Prometheus with `config`, its data under `root`; wait until /-/ready answers."""
    port = port or free_port()
    log = root / f"prometheus-{port}.log"
    args = [prometheus_binary(), f"--config.file={config}",
            f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn", *extra]
    if not any(a.startswith(("--storage.tsdb.path", "--storage.agent.path")) for a in extra):
        args.append(f"--storage.tsdb.path={root / 'data'}")
    with open(log, "ab") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
    prom = Prometheus(f"http://127.0.0.1:{port}", proc, log, args)
    if ready:
        wait_for("Prometheus to be ready", lambda: http_get(prom.url + "/-/ready")[0] == 200,
                 60, prom.alive)
    return prom


@pytest.fixture(name="prometheus_procs")
def prometheus_procs_fixture() -> Iterator[Callable[..., Prometheus]]:
    """`start(root, config, *flags)` -> a running Prometheus, stopped at the end of the test."""
    procs: list[Prometheus] = []

    def start(*args, **kwargs) -> Prometheus:
        prom = start_prometheus(*args, **kwargs)
        procs.append(prom)
        return prom

    yield start
    for p in procs:
        p.stop()


@pytest.fixture(name="fed_prometheus")
def fed_prometheus_fixture(tmp_path: Path, prometheus_procs) -> Iterator[tuple[Prometheus, str]]:
    """A Prometheus scraping one real agent (`edgefleet agent serve`, a signed model that ships
    a drift threshold) that has screened 1,024 dies; yields it and the served bundle's digest.
    Queries may need a few scrapes before rate() and drift answer: wait on them."""
    import numpy as np

    from agent.client import Client
    from tests.agent_support import short_tmp

    site = make_site(tmp_path / "box", drift_alert_psi=0.5)
    port = free_port()
    root = tmp_path / "prom"
    root.mkdir()
    (root / "prometheus.yml").write_text(static_config(port))
    prom = prometheus_procs(root, root / "prometheus.yml")
    with short_tmp() as d, agent_process(d / "agent.sock", port, store=site.store,
                                         keyring=site.keyring, rules=site.rules,
                                         log=tmp_path / "agent.log"):
        rng = np.random.default_rng(7)
        with Client(d / "agent.sock") as c:
            for _ in range(4):  # above the drift monitor's 200 rows
                c.predict_batch(rng.normal(1.0, 0.1, (256, N_FEATURES)).astype(np.float32))
        yield prom, site.bundle_digest
