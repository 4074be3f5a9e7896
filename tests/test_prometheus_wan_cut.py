"""Metrics survive a WAN cut: the site Prometheus (agent mode, the configuration shipped in
k3s/overlays/site-example/prometheus-agent.yaml) scrapes a real agent and remote-writes to a
real central Prometheus (the shipped k3s/prometheus/prometheus.yml's storage settings, with the
remote-write receiver on). The test stops the central server (the link is cut), keeps the
agent screening dies and the site scraping it for at least 10 s, starts the central server
again on its own data, and finds the cut filled: samples at every scrape through the cut
(no gap of 5 s at a 1 s scrape interval), with the dies screened during the cut counted.

What differs from the shipped files: intervals of 1 s instead of 15 s; the pod discovery block
becomes file discovery with the labels pod discovery gives (Debian builds Prometheus without
Kubernetes discovery), the relabelling runs as shipped; the remote-write URL points at the
test's central server, and its retry backoff tops out at 2 s instead of 30 s (so the catch-up
is seconds, not half a minute, after the link is back).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from agent.client import Client
from tests.conftest import REPO
from tests.deploy_helpers import N_FEATURES, agent_process, free_port, http_get, make_site, wait_for
from tests.prometheus_support import PROM_DIR, Prometheus, start_prometheus

pytestmark = pytest.mark.slow

SITE_MANIFEST = REPO / "k3s" / "overlays" / "site-example" / "prometheus-agent.yaml"
NODE = "box-fab1-07"
CUT_S = 10.0


def site_config(root: Path, agent_port: int, central_url: str) -> Path:
    """The shipped site configuration, aimed at the test's agent and central server."""
    docs = list(yaml.safe_load_all(SITE_MANIFEST.read_text()))
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap"]
    cfg = yaml.safe_load(cm["data"]["prometheus.yml"])
    cfg["global"]["scrape_interval"] = "1s"
    (job,) = cfg["scrape_configs"]
    job.update(scrape_interval="1s", scrape_timeout="1s")
    del job["kubernetes_sd_configs"]
    job["file_sd_configs"] = [{"files": [str(root / "pods.json")]}]
    (root / "pods.json").write_text(json.dumps([{"targets": ["10.42.0.9:9464"], "labels": {
        "__meta_kubernetes_pod_annotation_prometheus_io_scrape": "true",
        "__meta_kubernetes_pod_annotation_prometheus_io_port": str(agent_port),
        "__meta_kubernetes_pod_phase": "Running",
        "__meta_kubernetes_pod_container_port_name": "metrics",
        "__meta_kubernetes_pod_host_ip": "127.0.0.1",
        "__meta_kubernetes_pod_node_name": NODE,
        "__meta_kubernetes_pod_name": "edgefleet-agent-q2w9z"}}]))
    (rw,) = cfg["remote_write"]
    rw["url"] = f"{central_url}/api/v1/write"
    rw["queue_config"]["max_backoff"] = "2s"
    path = root / "site.yml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def central_config(root: Path) -> Path:
    shipped = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    assert shipped["storage"]["tsdb"]["out_of_order_time_window"]
    path = root / "central.yml"
    path.write_text(yaml.safe_dump({"global": {"scrape_interval": "1s"},
                                    "storage": shipped["storage"]}))
    return path


def _site_metric(url: str, name: str) -> float:
    _, body = http_get(url + "/metrics", timeout=5)
    values = [float(ln.split()[-1]) for ln in body.decode().splitlines()
              if ln.startswith(name + "{") or ln.startswith(name + " ")]
    return max(values, default=0.0)


def test_a_wan_cut_leaves_no_gap_in_the_central_prometheus(tmp_path: Path):
    site = make_site(tmp_path / "box")
    agent_port, central_port = free_port(), free_port()
    (tmp_path / "central").mkdir()
    (tmp_path / "site").mkdir()
    central_args = (tmp_path / "central", central_config(tmp_path / "central"),
                    "--web.enable-remote-write-receiver")
    central = start_prometheus(*central_args, port=central_port)
    procs: list[Prometheus] = [central]
    sock_dir = tmp_path / "s"
    sock_dir.mkdir()
    try:
        with agent_process(sock_dir / "a.sock", agent_port, store=site.store,
                           keyring=site.keyring, rules=site.rules, log=tmp_path / "agent.log"), \
                Client(sock_dir / "a.sock") as client:
            cfg = site_config(tmp_path / "site", agent_port, central.url)
            site_prom = start_prometheus(tmp_path / "site", cfg, "--enable-feature=agent",
                                         f"--storage.agent.path={tmp_path / 'site' / 'wal'}")
            procs.append(site_prom)
            rng = np.random.default_rng(1)

            def screen(n: int) -> None:
                client.predict_batch(rng.normal(1.0, 0.1, (n, N_FEATURES)).astype(np.float32))

            screen(100)
            sel = 'job="edgefleet-agent-site"'
            answered = f"sum by (site, device) (edgefleet_predictions_total{{{sel}}})"
            got = wait_for("the central server to receive the site's samples", lambda: (
                r := central.query(answered)) and float(r[0]["value"][1]) == 100 and r,
                60, central.alive)
            labels = got[0]["metric"]
            assert (labels["site"], labels["device"]) == ("fab1", NODE)  # external label, node

            # Cut the link: the central server goes away; the site keeps scraping.
            central.stop()
            t_cut = time.time()
            screen(1000)  # dies screened while the centre cannot see them
            wait_for(f"{CUT_S:.0f} s of scrapes in the site's WAL during the cut", lambda:
                     _site_metric(site_prom.url,
                                  "prometheus_remote_storage_highest_timestamp_in_seconds")
                     >= t_cut + CUT_S, 120, site_prom.alive)
            assert _site_metric(site_prom.url, "prometheus_remote_storage_samples_pending") > 0

            # The link is back: the same central server, on its own data.
            t_back = time.time()
            central = start_prometheus(*central_args, port=central_port)
            procs.append(central)
            wait_for("the site to catch up", lambda: (
                r := central.query(f"timestamp(up{{{sel}}})")) and
                float(r[0]["value"][1]) >= t_back, 120, central.alive)

            span = int(time.time() - t_cut) + 10
            (series,) = central.query(f"up{{{sel}}}[{span}s]")
            stamps = [float(t) for t, _ in series["values"]]
            assert stamps[0] < t_cut and stamps[-1] >= t_back
            gaps = np.diff(stamps)
            assert gaps.max() < 5.0, f"a {gaps.max():.1f} s gap in {len(stamps)} samples"
            assert sum(t_cut < t < t_back for t in stamps) >= CUT_S / 2

            (counted,) = central.query(f"{answered}[{span}s:1s]")
            during = [float(v) for t, v in counted["values"] if t_cut < float(t) < t_back]
            assert during and max(during) == 1100  # the dies screened in the cut are there
    finally:
        for p in procs:
            p.stop()
