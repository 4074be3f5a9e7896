"""`edgefleet fleet collect` (fleet/collect.py) against real agents' data feeds
(agent/datafeed.py) over real mutual TLS with the fleet's own certificates, and
`edgefleet optimize build --data DIR` on what it collected (optimize/dataset_dir.py)."""

from __future__ import annotations

import contextlib
import json
import ssl
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from agent.client import Client
from agent.datafeed import DataFeed
from agent.errors import UsageError
from agent.predlog import wait_flushed
from edgefleet.cli import main
from fleet.certs import CONTROLLER_NAME, init_ca, issue_client
from fleet.collect import CollectTLS, Device, collect, devices_from_inventory, parse_since
from optimize.dataset_dir import load_collected
from tests.agent_support import build_model, make_keys
from tests.optimize_support import fast_config_file, small_dies
from tests.predlog_support import logged_agent


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    init_ca(d / "ca")
    return {"ca": d / "ca" / "ca.crt", "ca_dir": d / "ca",
            "box-a": issue_client(d / "ca", d / "dev", "box-a"),
            "box-b": issue_client(d / "ca", d / "dev", "box-b"),
            "ctl": issue_client(d / "ca", d / "ctl", CONTROLLER_NAME, controller=True)}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("model")
    return build_model(d, *make_keys(d), n_features=small_dies().n_features)


@contextlib.contextmanager
def device(model, pki, name: str, logdir: Path, **config):
    """An agent with a prediction log, a label desk and its data feed on a free port."""
    with logged_agent(model, logdir, **config) as (server, plog):
        cert = pki[name]
        feed = DataFeed(plog, "127.0.0.1", 0, device_id=name,
                        provenance={"site": "fab1", "tester": "t5"}, cert=cert.cert,
                        key=cert.key, ca=pki["ca"])
        feed.start()
        try:
            yield server, plog, feed
        finally:
            feed.stop()


def _tls(pki) -> CollectTLS:
    return CollectTLS(pki["ca"], pki["ctl"].cert, pki["ctl"].key)


def _screen(server, plog, dies, ids, labels=None, label_ids=None) -> None:
    with Client(server.path) as c:
        for i, row in zip(ids, dies, strict=True):
            c.predict(row, die_id=int(i))
        if labels is not None:
            c.request({"op": "label", "labels": [
                {"die_id": int(i), "label": int(v)}
                for i, v in zip(ids if label_ids is None else label_ids, labels, strict=True)]})
    assert wait_flushed(plog, server)
    plog.flush()  # the labels queued after the last pass


def _lines(directory: Path) -> list[dict]:
    return [json.loads(x) for f in sorted(directory.glob("*.jsonl"))
            for x in f.read_text().splitlines()]


def test_collect_pulls_rows_fails_and_labels_with_provenance_and_resumes(model, pki, tmp_path):
    data = small_dies()
    out = tmp_path / "dataset"
    with device(model, pki, "box-a", tmp_path / "log", capture_rate=0.0) as (server, plog, feed):
        _screen(server, plog, data.X[:60], np.arange(60), data.labels[:60])
        dev = Device("box-a", "127.0.0.1", feed.port)
        [r] = collect([dev], out, _tls(pki), max_records=1000, page=7)
        assert r.ok, r.error
        fails = plog.captured["fail"]
        assert r.pulled == {"capture": fails, "labels": 60} and fails > 0
        caps = _lines(out / "capture" / "box-a")
        assert len(caps) == fails and {c["reason"] for c in caps} == {"fail"}
        c0 = caps[0]
        assert (c0["device"], c0["site"], c0["tester"]) == ("box-a", "fab1", "t5")
        assert c0["digest"] == plog.models.models[0].digest and c0["model_version"] == "1.0.0"
        labels = _lines(out / "labels" / "box-a")
        assert [x["die_id"] for x in labels] == [str(i) for i in range(60)]
        assert labels[0]["predicted"] in ("pass", "fail") and labels[0]["device"] == "box-a"
        info = json.loads((out / "devices" / "box-a.json").read_text())
        assert info["site"] == "fab1" and info["models"][0]["digest"] == c0["digest"]
        # nothing new: nothing pulled; new dies: only those
        [r] = collect([dev], out, _tls(pki))
        assert r.pulled == {"capture": 0, "labels": 0}
        _screen(server, plog, data.X[60:90] + 50.0, np.arange(60, 90))
        [r] = collect([dev], out, _tls(pki), max_records=10)  # bounded per device
        assert r.pulled["capture"] == 10 and r.more["capture"]
        [r] = collect([dev], out, _tls(pki))
        assert r.pulled["capture"] == 20 and not r.more["capture"]
    caps = _lines(out / "capture" / "box-a")
    assert [c["die_id"] for c in caps[-30:]] == [str(i) for i in range(60, 90)]
    assert len({c["seq"] for c in caps}) == len(caps)


def test_a_device_whose_certificate_names_another_device_is_refused(model, pki, tmp_path):
    with device(model, pki, "box-b", tmp_path / "log") as (server, plog, feed):
        _screen(server, plog, small_dies().X[:5], np.arange(5))
        [r] = collect([Device("box-a", "127.0.0.1", feed.port)], tmp_path / "out", _tls(pki))
    assert not r.ok and "expected device box-a" in r.error
    assert not (tmp_path / "out" / "capture").exists()


def test_only_the_controller_certificate_may_collect(model, pki, tmp_path):
    with device(model, pki, "box-a", tmp_path / "log") as (_server, _plog, feed):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        ctx.load_cert_chain(pki["box-b"].cert, pki["box-b"].key)  # a device, not the controller
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(f"https://127.0.0.1:{feed.port}/v1/info", context=ctx,
                                   timeout=10)
        assert e.value.code == 403
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE  # no certificate at all
        with pytest.raises((ssl.SSLError, ConnectionError, urllib.error.URLError)):
            urllib.request.urlopen(f"https://127.0.0.1:{feed.port}/v1/info", context=ctx,
                                   timeout=10).read()


def test_optimize_build_reads_a_collected_directory(model, pki, tmp_path, capsys):
    """Rows captured on a device, final-test labels from the tester: a signed bundle."""
    data = small_dies()
    out = tmp_path / "dataset"
    with device(model, pki, "box-a", tmp_path / "log", capture_rate=1.0) as (server, plog, feed):
        # the tester labels every die but the first 20 (those keep the device's decision)
        _screen(server, plog, data.X, np.arange(data.n_rows), data.labels[20:],
                label_ids=np.arange(20, data.n_rows))
        [r] = collect([Device("box-a", "127.0.0.1", feed.port)], out, _tls(pki),
                      max_records=10_000)
        assert r.ok, r.error
    ds = load_collected(out)
    assert ds.X.shape == data.X.shape
    np.testing.assert_array_equal(np.isnan(ds.X), np.isnan(data.X))
    np.testing.assert_allclose(ds.X, data.X.astype(np.float32), rtol=1e-6)
    source = ds.extra["label_source"]
    assert list(source[:20]) == ["device"] * 20 and (source[20:] == "final_test").all()
    np.testing.assert_array_equal(ds.labels[20:], data.labels[20:])
    assert ds.feature_names == model.manifest.input.feature_names
    config = fast_config_file(tmp_path / "fast.json")
    key = model.bundle.parent.parent / "keys" / "release.key"
    with pytest.raises(SystemExit) as e:
        main(["optimize", "build", "--data", str(out), "--key", str(key), "--out",
              str(tmp_path / "build"), "--config", str(config), "-q"])
    assert e.value.code in (0, None), capsys.readouterr().err
    assert (tmp_path / "build" / "model.efb").exists()


def test_the_collect_command_prints_what_it_pulled_and_exits_1_for_a_device_it_missed(
        model, pki, tmp_path, capsys):
    with device(model, pki, "box-a", tmp_path / "log") as (server, plog, feed):
        _screen(server, plog, small_dies().X[:10] + 50.0, np.arange(10))
        args = ["fleet", "collect", "-d", f"box-a=127.0.0.1:{feed.port}", "--out",
                str(tmp_path / "ds"), "--ca", str(pki["ca"]), "--cert", str(pki["ctl"].cert),
                "--key", str(pki["ctl"].key)]
        with pytest.raises(SystemExit) as e:
            main([*args, "-o", "json"])
        assert e.value.code in (0, None)
        doc = json.loads(capsys.readouterr().out)
        assert doc["out"] == str(tmp_path / "ds") and doc["failed"] == []
        [report] = doc["devices"]
        assert report["ok"] and report["pulled"]["capture"] == 10
        assert doc["records"] == sum(report["pulled"].values()) >= 10
        assert len(list((tmp_path / "ds" / "capture" / "box-a").glob("*.jsonl"))) >= 1
        with pytest.raises(SystemExit) as e:
            main([*args, "-d", "box-b=127.0.0.1:1"])
        assert e.value.code == 1
        captured = capsys.readouterr()
        assert "box-a" in captured.out and "1 of 2 devices not collected (box-b)" in captured.err


def test_since_collects_only_what_was_logged_after_it_and_moves_past_the_rest(model, pki,
                                                                              tmp_path):
    """A retrain after a process change wants the dies since the change, not the months
    before it: older records are skipped, and a later run does not pull them either."""
    data = small_dies()
    out = tmp_path / "dataset"
    with device(model, pki, "box-a", tmp_path / "log", capture_rate=1.0) as (server, plog, feed):
        _screen(server, plog, data.X[:20], np.arange(20), data.labels[:20])
        since = time.time()
        _screen(server, plog, data.X[20:50], np.arange(20, 50), data.labels[20:50],
                label_ids=np.arange(20, 50))
        dev = Device("box-a", "127.0.0.1", feed.port)
        [r] = collect([dev], out, _tls(pki), since=since)
        assert r.ok, r.error
        assert r.pulled == {"capture": 30, "labels": 30}
        [r] = collect([dev], out, _tls(pki))
        assert r.pulled == {"capture": 0, "labels": 0}
    assert [c["die_id"] for c in _lines(out / "capture" / "box-a")] == \
        [str(i) for i in range(20, 50)]
    assert [x["die_id"] for x in _lines(out / "labels" / "box-a")] == \
        [str(i) for i in range(20, 50)]


def test_since_takes_a_duration_or_an_iso_time():
    assert parse_since("2h", 10_000.0) == 10_000.0 - 7200
    assert parse_since("2026-12-04T21:30:00Z", 0) == parse_since("2026-12-04T21:30:00", 0) \
        == 1796419800.0
    assert parse_since(None, 5.0) is None
    with pytest.raises(UsageError, match="ISO 8601"):
        parse_since("yesterday", 0)


def test_devices_come_from_the_inventory_at_the_feed_address_their_state_reports():
    """`fleet collect -l SELECTOR`: a device's state names its feed (`data_feed`, which the
    link takes from EDGEFLEET_DATA_FEED or a data_addr with a real host); one without is
    reported, not silently left out."""
    from agent.link import LinkConfig
    from fleet.inventory import Inventory, Selector

    def link(**env: str) -> str | None:
        return LinkConfig.from_env({"EDGEFLEET_DEVICE_ID": "box-a",
                                    "EDGEFLEET_LINK_DIR": "/tmp/x", **env}).data_feed

    assert link(EDGEFLEET_AGENT_DATA_ADDR="10.0.0.5:9465") == "10.0.0.5:9465"
    assert link(EDGEFLEET_AGENT_DATA_ADDR="0.0.0.0:9465") is None
    assert link(EDGEFLEET_AGENT_DATA_ADDR="0.0.0.0:9465",
                EDGEFLEET_DATA_FEED="box-a.fab1:9465") == "box-a.fab1:9465"
    assert link() is None
    states = [{"device_id": "box-a", "online": True, "labels": {"site": "fab1"},
               "data_feed": "10.0.0.5:9465"},
              {"device_id": "box-b", "online": True, "labels": {"site": "fab1"}},
              {"device_id": "box-c", "online": True, "labels": {"site": "fab2"},
               "data_feed": "10.0.0.7:9465"}]
    inv = Inventory.from_states({s["device_id"]: s for s in states})
    found, missing = devices_from_inventory(inv, Selector.parse("site=fab1"))
    assert found == [Device("box-a", "10.0.0.5", 9465)]
    assert [(r.device, r.ok) for r in missing] == [("box-b", False)]
    assert "no data feed address" in missing[0].error
