"""A real Prometheus (Debian's package) scrapes a running agent with the project's own scrape
jobs and alert rules (k3s/prometheus/), and the test reads everything back through the query
API, as the central Prometheus of a test floor would see it.

- The static job (`prometheus.yml`) finds the agent through a targets file.
- The Kubernetes job (`scrape-kubernetes.yml`) runs with its relabelling exactly as shipped;
  only its discovery block becomes a file discovery that hands Prometheus the same
  `__meta_kubernetes_pod_*` labels pod discovery would (Debian builds Prometheus without
  Kubernetes discovery). Pods that must be dropped are in the list too.
- Two alert rules under test have their `for:` shortened from 5m to 3s; everything else in the
  rules file is as shipped.

Prometheus itself is started by tests/prometheus_support.py.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from agent.client import Client
from tests.deploy_helpers import N_FEATURES, agent_process, free_port, make_site, wait_for
from tests.prometheus_support import (
    PROM_DIR,
    Prometheus,
    fast,
    prometheus_procs_fixture,  # noqa: F401 (fixture)
)

pytestmark = pytest.mark.slow

K8S_NODE, K8S_POD = "box-k8s-01", "edgefleet-agent-x7k2p"
STATIC_DEVICE = "box-static-01"


def write_config(root: Path, agent_port: int, dead_port: int) -> Path:
    """The shipped scrape configuration, pointed at temp files instead of /etc/prometheus."""
    static = (PROM_DIR / "prometheus.yml").read_text()
    paths = [ln for ln in static.splitlines()
             if "/etc/prometheus/edgefleet/" in ln and not ln.lstrip().startswith("#")]
    assert len(paths) == 2, paths  # rule files, targets files
    static = static.replace("/etc/prometheus/edgefleet/", f"{root}/")

    kube = (PROM_DIR / "scrape-kubernetes.yml").read_text()
    jobs = kube.split("\nscrape_configs:\n", 1)[1]
    start = jobs.index("    kubernetes_sd_configs:\n")
    end = jobs.index("    relabel_configs:\n")
    jobs = (jobs[:start] + f"    file_sd_configs:\n      - files:\n          - {root}/pods.json\n"
            + jobs[end:])
    config = root / "prometheus.yml"
    config.write_text(fast(static.rstrip("\n") + "\n\n" + jobs))

    rules = (PROM_DIR / "rules" / "edgefleet.rules.yml").read_text()
    assert rules.count("for: 5m") == 2  # EdgefleetFallbackActive, EdgefleetDeviceOffline
    (root / "rules").mkdir()
    (root / "rules" / "edgefleet.rules.yml").write_text(rules.replace("for: 5m", "for: 3s"))

    (root / "targets").mkdir()
    (root / "targets" / "fab9.yml").write_text(
        f"- targets: ['127.0.0.1:{agent_port}']\n"
        f"  labels: {{site: fab9, device: {STATIC_DEVICE}}}\n"
        # No device label: the job names the device after the host. Nothing listens there.
        f"- targets: ['127.0.0.1:{dead_port}']\n"
        f"  labels: {{site: fab9}}\n"
    )

    def pod(**meta: str) -> dict:
        labels = {
            "__meta_kubernetes_pod_annotation_prometheus_io_scrape": "true",
            "__meta_kubernetes_pod_annotation_prometheus_io_port": str(agent_port),
            "__meta_kubernetes_pod_phase": "Running",
            "__meta_kubernetes_pod_container_port_name": "metrics",
            "__meta_kubernetes_pod_host_ip": "127.0.0.1",
            "__meta_kubernetes_pod_node_name": K8S_NODE,
            "__meta_kubernetes_pod_name": K8S_POD,
        }
        labels.update({f"__meta_kubernetes_pod_{k}": v for k, v in meta.items()})
        # Pod discovery's address is the pod IP and container port; relabelling replaces it.
        return {"targets": ["10.42.0.17:9464"], "labels": labels}

    (root / "pods.json").write_text(json.dumps([
        pod(),
        pod(phase="Pending", name="edgefleet-agent-pending"),
        pod(annotation_prometheus_io_scrape="false", name="edgefleet-agent-optout"),
        pod(container_port_name="other", name="edgefleet-agent-otherport"),
    ]))
    return config


@pytest.fixture
def prometheus_for(tmp_path: Path, prometheus_procs):
    """Start Prometheus on a free port with the shipped configuration aimed at an agent."""

    def start(agent_port: int, dead_port: int) -> Prometheus:
        root = tmp_path / "prometheus"
        root.mkdir()
        return prometheus_procs(root, write_config(root, agent_port, dead_port))

    return start


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    from tests.agent_support import short_tmp

    with short_tmp() as d:
        yield d


def _by_job(results: list[dict]) -> dict[str, dict]:
    return {r["metric"]["job"]: r for r in results}


def test_prometheus_scrapes_the_agent_and_fires_the_fallback_alert(tmp_path: Path, sock_dir,
                                                                  prometheus_for):
    site = make_site(tmp_path / "box")
    agent_port, dead_port = free_port(), free_port()
    sock = sock_dir / "agent.sock"
    log = tmp_path / "agent.log"
    prom = prometheus_for(agent_port, dead_port)
    jobs = {"edgefleet-agent-fab1", "edgefleet-agent-static"}

    # Phase 1: the box serves its installed model.
    with agent_process(sock, agent_port, store=site.store, keyring=site.keyring,
                       rules=site.rules, log=log):
        rng = np.random.default_rng(3)
        with Client(sock) as c:
            for i in range(20):
                assert c.predict(rng.normal(1.0, 0.1, N_FEATURES), die_id=i).source == "model"

        answered = 'sum by (job, site, device, instance) (edgefleet_predictions_total)'
        got = wait_for("both jobs to read the 20 answers back", lambda: (
            r := _by_job(prom.query(answered)))
            and set(r) == jobs and all(float(x["value"][1]) == 20 for x in r.values()) and r, 30)
        assert got["edgefleet-agent-fab1"]["metric"] == {
            "job": "edgefleet-agent-fab1", "site": "fab1", "device": K8S_NODE,
            "instance": f"127.0.0.1:{agent_port}"}
        assert got["edgefleet-agent-static"]["metric"] == {
            "job": "edgefleet-agent-static", "site": "fab9", "device": STATIC_DEVICE,
            "instance": f"127.0.0.1:{agent_port}"}

        # Pod discovery: only the running, opted-in pod with a metrics port is scraped, on the
        # node's address, and carries its pod name.
        pods = prom.query('up{job="edgefleet-agent-fab1"}')
        assert [p["metric"]["pod"] for p in pods] == [K8S_POD]

        info = _by_job(prom.query("edgefleet_model_info"))
        assert set(info) == jobs
        assert {i["metric"]["digest"] for i in info.values()} == {site.bundle_digest}
        assert {i["metric"]["model_sha256"] for i in info.values()} == \
            {site.manifest.model_digest}
        assert {i["metric"]["sequence"] for i in info.values()} == {str(site.manifest.sequence)}
        fallback = prom.query("edgefleet_fallback_active")
        assert {f["metric"]["job"]: f["value"][1] for f in fallback} == dict.fromkeys(jobs, "0")

        # The box behind the dead target is reported offline (named after its host).
        offline = wait_for("the offline alert for the dead target",
                           lambda: prom.alerts("EdgefleetDeviceOffline", "firing"), 30)
        assert [(a["labels"]["device"], a["labels"]["site"]) for a in offline] == \
            [("127.0.0.1", "fab9")]
        assert prom.alerts("EdgefleetFallbackActive") == []
        # Every shipped rule evaluates cleanly against the agent's real series.
        rules = prom.rules()
        shipped = (PROM_DIR / "rules" / "edgefleet.rules.yml").read_text().count("- alert:")
        assert len(rules) == shipped >= 8
        assert [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"] == []

    # Phase 2: the model is gone (an empty store); the box screens with the floor's rules.
    empty = tmp_path / "empty-store"
    empty.mkdir()
    with agent_process(sock, agent_port, store=empty, keyring=site.keyring, rules=site.rules,
                       log=log):
        with Client(sock) as c:
            assert c.predict(np.ones(N_FEATURES), die_id=99).source == "fallback"
        firing = wait_for("the fallback alert to fire for both jobs", lambda: (
            a := prom.alerts("EdgefleetFallbackActive", "firing")) and len(a) == 2 and a, 45)
        assert sorted((a["labels"]["site"], a["labels"]["device"]) for a in firing) == \
            [("fab1", K8S_NODE), ("fab9", STATIC_DEVICE)]
        assert all(a["labels"]["severity"] == "warning" for a in firing)
        assert re.search(r"serves from the fallback rules", firing[0]["annotations"]["summary"])
        assert {f["value"][1] for f in prom.query("edgefleet_fallback_active")} == {"1"}
