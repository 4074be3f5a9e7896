"""The realized false-fail query of docs/operations.md, run as written by a real Prometheus
(Debian's package) scraping a real agent whose tester sends dies and then final-test labels;
and the rollout's label gates (fleet/label_gates.py) reading their counts from it."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import signal
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from agent.client import Client
from agent.predlog import wait_flushed
from fleet.gates import parse_gate
from fleet.label_gates import LABEL_METRICS, evaluate_label_gates
from fleet.prometheus import PrometheusClient
from fleet.quality import fleet_quality, quality_table
from tests.agent_support import build_model, make_keys, wait_for
from tests.broker_fixtures import free_port
from tests.conftest import REPO
from tests.predlog_support import logged_agent

pytestmark = pytest.mark.slow
N = 8


def _doc_query() -> str:
    text = (REPO / "docs" / "operations.md").read_text()
    block = text.split("Realized false-fail rate of a model", 1)[1]
    return re.search(r"```\n(.*?)```", block, re.S).group(1).strip()


@contextlib.contextmanager
def prometheus(root: Path, target_port: int):
    binary = shutil.which("prometheus")
    assert binary, "prometheus is not installed (scripts/system-deps.sh installs it)"
    root.mkdir()
    (root / "prometheus.yml").write_text(json.dumps({
        "global": {"scrape_interval": "1s"},
        "scrape_configs": [{"job_name": "edgefleet-agent", "static_configs": [
            {"targets": [f"127.0.0.1:{target_port}"],
             "labels": {"site": "fab1", "device": "box-a"}}]}]}))
    port = free_port()
    proc = subprocess.Popen([binary, f"--config.file={root / 'prometheus.yml'}",
                             f"--storage.tsdb.path={root / 'data'}",
                             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        try:
            return urllib.request.urlopen(url + "/-/ready", timeout=2).status == 200
        except OSError:
            return False

    try:
        wait_for(ready, timeout=60)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def _query(url: str, expr: str) -> list[dict]:
    q = urllib.parse.urlencode({"query": expr})
    doc = json.loads(urllib.request.urlopen(f"{url}/api/v1/query?{q}", timeout=10).read())
    assert doc["status"] == "success", doc
    return doc["data"]["result"]


def _label(server, plog, items: list[tuple[int, str]]) -> None:
    with Client(server.path) as c:
        c.request({"op": "label", "labels": [{"die_id": i, "label": v} for i, v in items]})
    assert wait_flushed(plog, server)


def test_the_documented_false_fail_query_gives_the_realized_rate(tmp_path):
    model = build_model(tmp_path, *make_keys(tmp_path), n_features=N)
    x = model.train[:30].copy()
    x[20:] += 50.0  # dies 20..29 fail on the device
    with logged_agent(model, tmp_path / "log") as (server, plog):
        with Client(server.path) as c:
            decisions = [c.predict(row, die_id=i).decision for i, row in enumerate(x)]
        assert wait_flushed(plog, server)
        good = [i for i in range(20) if decisions[i] == "pass"]
        assert len(good) >= 15 and all(d == "fail" for d in decisions[20:])
        digest = plog.models.models[0].digest
        query = _doc_query().replace("<bundle sha256>", digest)
        with prometheus(tmp_path / "prom", server.http.port) as url:
            # first labels: the series exist (increase() needs a sample before the growth)
            _label(server, plog, [(good[0], "pass"), (20, "pass")])
            wait_for(lambda: _query(url, 'edgefleet_label_joins_total{predicted="fail"}'),
                     timeout=60)
            # then, within the window: good dies passed, and four failed dies that were good
            _label(server, plog, [(i, "pass") for i in good[1:]] + [(i, "pass")
                                                                     for i in (21, 22, 23, 24)])
            expected = 4 / (len(good) - 1 + 4)

            def realized() -> float | None:
                result = _query(url, query)
                return float(result[0]["value"][1]) if result else None

            wait_for(lambda: realized() is not None and abs(realized() - expected) < 1e-9,
                     timeout=60)
            [series] = _query(url, query)
            assert series["metric"] == {"site": "fab1"}
            # the label gates of a rollout of this bundle, on the same counts
            gate = [parse_gate("false_fail_rate<=0.05", LABEL_METRICS)]
            client = PrometheusClient(url)
            failing = evaluate_label_gates(gate, client, digest, window_s=3600, min_good=5)
            short = evaluate_label_gates(gate, client, digest, window_s=3600, min_good=1000)
            # `fleet quality`: every label so far, then only those after a first report
            first = {"models": [q.to_json(1, 1) for q in fleet_quality(client)]}
            _label(server, plog, [(25, "pass"), (26, "fail")])
            wait_for(lambda: fleet_quality(client, since=first)[0].labels.bad == 1, timeout=60)
            [q] = fleet_quality(client, since=first)
            [everything] = fleet_quality(client)
            table = quality_table([q], min_good=1, min_bad=1)
    assert np.isclose(float(series["value"][1]), expected)
    assert failing.verdict == "fail" and failing.results[0].value > 0.05, failing.explain()
    assert failing.evidence["labels"]["false_fail"] >= 4
    assert short.verdict == "inconclusive" and "1000 needed" in short.explain()
    assert (q.digest, q.devices) == (digest, 1) and q.name and q.version
    assert q.labels.to_json() == {"true_pass": 0, "false_fail": 1, "true_fail": 1,
                                  "missed_fail": 0}
    assert everything.labels.false_fail == 6 and everything.labels.good == len(good) + 6
    assert "100.00%" in table.splitlines()[1]
