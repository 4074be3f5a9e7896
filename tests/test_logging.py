"""Logs an operator can trust and a log shipper can parse: a healthy agent's start-up is INFO
(nothing at WARNING), its first words about the model reflect the store (no "no model" line
when the store has one), `--log-format json` makes every line one JSON object (the agent's and
the fleet CLI's), and an install's log names the previous version the same way the CLI does.
The agent runs as `edgefleet agent serve` in its own process on a real store."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from agent.install import Installer
from tests.agent_support import short_tmp
from tests.deploy_helpers import free_port, http_get, make_site, wait_for

pytestmark = pytest.mark.slow


def _serve_log(tmp_path: Path, *, store: Path, keyring: Path, rules: Path | None) -> list[dict]:
    """Start `agent serve --log-format json --log-level info`, wait until it serves, stop it;
    its stderr as parsed lines (each line must parse)."""
    port = free_port()
    log = tmp_path / f"agent-{port}.log"
    with short_tmp() as d:
        cmd = [sys.executable, "-m", "edgefleet", "agent", "serve", "--socket",
               str(d / "a.sock"), "--store", str(store), "--keyring", str(keyring),
               "--metrics-addr", f"127.0.0.1:{port}", "--log-format", "json",
               "--log-level", "info"]
        if rules is not None:
            cmd += ["--rules", str(rules)]
        with open(log, "wb") as out:
            proc = subprocess.Popen(cmd, stderr=out, stdout=subprocess.DEVNULL)
        try:
            wait_for("the agent to serve", lambda: http_get(
                f"http://127.0.0.1:{port}/readyz")[0] in (200, 503), 60,
                lambda: None if proc.poll() is None else log.read_text())
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    return [json.loads(line) for line in log.read_text().splitlines()]


def test_a_healthy_start_is_info_and_reflects_the_store(tmp_path: Path):
    site = make_site(tmp_path / "box")
    records = _serve_log(tmp_path, store=site.store, keyring=site.keyring, rules=site.rules)
    assert {r["logger"] for r in records} <= {"edgefleet.agent", "edgefleet.link"}
    assert all(set(r) == {"ts", "level", "logger", "msg"} for r in records)
    msgs = [r["msg"] for r in records]
    assert any(m.startswith("serving model robust-z 1.0.0 (sequence 1") for m in msgs), msgs
    assert any(m.startswith("agent listening on") for m in msgs)
    assert any(m.startswith("signal 15: shutting down") for m in msgs)
    assert not [m for m in msgs if "no model" in m or "fallback" in m], msgs
    assert [r for r in records if r["level"] != "info"] == []


def test_an_empty_store_says_what_answers(tmp_path: Path):
    site = make_site(tmp_path / "box", install=False)
    records = _serve_log(tmp_path, store=site.store, keyring=site.keyring, rules=site.rules)
    warnings = [r["msg"] for r in records if r["level"] == "warning"]
    assert warnings == ["no model installed: screening with 16 fallback rules (floor-rules-1) "
                        "until one is"]


def test_an_install_logs_the_previous_version_as_none(tmp_path: Path, caplog):
    from tests.agent_support import build_model, make_keys

    ring, key = make_keys(tmp_path / "keys")
    model = build_model(tmp_path / "m", ring, key)
    caplog.set_level(logging.INFO, "edgefleet.agent")
    inst = Installer.open(tmp_path / "store", ring)
    try:
        inst.start()
        result = inst.install(model.bundle)
    finally:
        inst.close()
    (rec,) = [r for r in caplog.records if "is active" in r.getMessage()]
    assert rec.levelno == logging.INFO
    assert rec.getMessage() == f"install: {result.id} is active (was none)"


def test_the_fleet_cli_logs_json_lines(tmp_path: Path):
    dead = free_port()  # nothing listens: the controller's link logs its failed connects
    r = subprocess.run([sys.executable, "-m", "edgefleet", "--log-format", "json",
                        "--log-level", "debug", "fleet", "devices", "--mqtt-port", str(dead)],
                       capture_output=True, text=True, timeout=120)
    *lines, last = r.stderr.splitlines()
    assert r.returncode == 1 and last.startswith("edgefleet: error: cannot reach the MQTT")
    records = [json.loads(line) for line in lines]
    assert records and {r["logger"] for r in records} == {"edgefleet.fleet"}
    assert all(r["level"] == "debug" and "connect failed" in r["msg"] for r in records)
    r = subprocess.run([sys.executable, "-m", "edgefleet", "--log-format", "xml", "--version"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0  # --version is eager: it answers before options are checked
    r = subprocess.run([sys.executable, "-m", "edgefleet", "--log-format", "xml", "keys",
                        "list", "--keyring", str(tmp_path)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--log-format" in r.stderr
