"""The assembled agent process: store + installer + admin socket + metrics, end to end."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from agent.app import Agent, build
from agent.client import Client
from agent.config import AgentConfig
from agent.health import HealthWindow
from tests.agent_support import build_model, install_into_store, make_keys, short_tmp, wait_for
from tests.broker_fixtures import free_port

REPO = Path(__file__).resolve().parents[1]
N = 16




def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgefleet", *args], capture_output=True,
                          text=True, cwd=REPO, timeout=120)


def _metrics(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()


@contextlib.contextmanager
def _agent_on(store: Path, keyring: Path) -> Iterator[Agent]:
    """The assembled agent (`agent.app.build`) in this process, on a temp socket."""
    with short_tmp() as tmp:
        cfg = replace(AgentConfig(), socket=tmp / "a.sock", metrics_addr="", store=store,
                      keyring=keyring)
        agent = build(cfg).start()
        try:
            yield agent
        finally:
            agent.stop()


@pytest.fixture
def keys(tmp_path):
    return make_keys(tmp_path)


def test_empty_store_then_install_and_rollback_through_the_admin_socket(tmp_path, keys):
    keyring, key = keys
    v1 = build_model(tmp_path, keyring, key, n_features=N, version="1.0.0", sequence=1)
    v2 = build_model(tmp_path, keyring, key, n_features=N, version="2.0.0", sequence=2)
    port = free_port()
    with short_tmp() as tmp:
        sock, admin = tmp / "agent.sock", tmp / "admin.sock"
        proc = subprocess.Popen(
            [sys.executable, "-m", "edgefleet", "agent", "serve", "--socket", str(sock),
             "--store", str(tmp_path / "store"), "--keyring", str(keyring),
             "--metrics-addr", f"127.0.0.1:{port}"], cwd=REPO)
        try:
            wait_for(admin.exists, timeout=30)
            assert oct(admin.stat().st_mode & 0o777) == "0o600"
            with Client(sock) as c:
                assert c.health()["model_version"] is None
            for bundle in (v1.bundle, v2.bundle):
                r = _cli("agent", "install", str(bundle), "--admin-socket", str(admin))
                assert r.returncode == 0, r.stderr
            with Client(sock) as c:
                assert c.predict(v2.train[0], die_id=1).model_version == "2.0.0"
            down = _cli("agent", "install", str(v1.bundle), "--admin-socket", str(admin))
            assert down.returncode == 1 and "sequence" in down.stderr
            back = _cli("agent", "rollback", "--admin-socket", str(admin))
            assert back.returncode == 0, back.stderr
            with Client(sock) as c:
                assert c.predict(v1.train[0], die_id=2).model_version == "1.0.0"
            models = json.loads(_cli("agent", "models", "--admin-socket", str(admin),
                                     "-o", "json").stdout)
            assert models["active"].startswith("1-1.0.0")
            text = _metrics(port)
            assert 'edgefleet_installs_total{op="install",outcome="committed"} 2.0' in text
            assert 'edgefleet_installs_total{op="install",outcome="rolled_back"} 1.0' in text
            assert 'edgefleet_installs_total{op="rollback",outcome="committed"} 1.0' in text
            assert "edgefleet_model_integrity_ok 1.0" in text
        finally:
            proc.terminate()
            assert proc.wait(timeout=10) == 0


def test_health_window_counts_requests_fails_and_fallback(tmp_path, keys):
    keyring, key = keys
    model = build_model(tmp_path, keyring, key, n_features=N)
    store = install_into_store(model, tmp_path / "store", keyring)
    with _agent_on(store, keyring) as agent:
        window = HealthWindow(agent.server.metrics, agent.runtime, agent.installer)
        with Client(agent.config.socket) as c:
            for i in range(100):
                c.predict(model.train[i], die_id=i)
            c.predict(model.train[0] * 100, die_id=999)  # a clear fail
            c.predict_json([1.0] * (N - 1), die_id="short")  # refused: wrong width
        s = window.health_summary()
        assert s["status"] == "ok" and s["requests"] == 102 and s["errors"] == 1
        assert s["fallback"] == 0 and 0 < s["fail_rate"] < 0.1
        assert s["p99_ms"] is not None and s["p99_ms"] < 1000
        agent.runtime.enter_fallback("test")
        with Client(agent.config.socket) as c:
            c.predict(model.train[1], die_id=1000)
        s = window.health_summary()
        assert s["status"] == "fallback" and "test" in s["reason"] and s["fallback"] == 1


def test_health_window_restarts_when_the_model_changes(tmp_path, keys):
    keyring, key = keys
    v1 = build_model(tmp_path, keyring, key, n_features=N, version="1.0.0", sequence=1)
    v2 = build_model(tmp_path, keyring, key, n_features=N, version="2.0.0", sequence=2)
    store = install_into_store(v1, tmp_path / "store", keyring)
    with _agent_on(store, keyring) as agent:
        window = HealthWindow(agent.server.metrics, agent.runtime, agent.installer)
        with Client(agent.config.socket) as c:
            for i in range(20):
                c.predict(v1.train[i], die_id=i)
        assert window.health_summary()["requests"] == 20
        agent.installer.install(v2.bundle)
        with Client(agent.config.socket) as c:
            for i in range(5):
                c.predict(v2.train[i], die_id=i)
        assert window.health_summary()["requests"] == 5  # the new model's answers only



def test_every_answer_given_before_stop_is_in_the_prediction_log(tmp_path, keys):
    """stop() while a tester is still sending: the server stops answering first, then the
    services (a spy among them sees no answer), then the log writes what it was handed, so
    every answer the tester received is in the log (stopping the log first lost the answers
    given in between)."""
    import threading

    from agent.predlog import read_predictions

    keyring, key = keys
    model = build_model(tmp_path, keyring, key, n_features=N)
    store = install_into_store(model, tmp_path / "store", keyring)
    received: list[int] = []
    serving_at_stop: list[bool] = []

    class Spy:
        """A service that, when stopped, asks whether the agent still answers."""

        def start(self) -> None:
            pass

        def stop(self) -> None:
            try:
                with Client(agent.config.socket) as c:
                    c.health()
                serving_at_stop.append(True)
            except Exception:  # refused, or the socket file is gone
                serving_at_stop.append(False)

    with _agent_on(store, keyring) as agent:
        agent.services.append(Spy())

        def tester() -> None:
            with contextlib.suppress(Exception), Client(agent.config.socket) as c:
                for i in range(1_000_000):
                    c.predict(model.train[i % len(model.train)], die_id=i)
                    received.append(i)

        t = threading.Thread(target=tester, daemon=True)
        t.start()
        wait_for(lambda: len(received) >= 200, what="200 answers")
        agent.stop()  # the context's own stop() afterwards finds everything stopped
        t.join(timeout=10)
        assert not t.is_alive()
    _, preds = read_predictions(tmp_path / "predlog" / "predictions", 0, 2_000_000)
    logged = {int(p["die_id"]) for _, p in preds}
    assert len(received) >= 200 and set(received) <= logged
    assert serving_at_stop[0] is False  # the services stopped after the server
