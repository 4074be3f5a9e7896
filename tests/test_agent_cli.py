"""`edgefleet agent serve | predict | health | info` as an operator runs them: real processes,
a real store verified with a keyring, CSV files, exit codes and one-line errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from agent.client import Client
from tests.agent_support import build_model, install_into_store, make_keys, short_tmp, wait_for
from tests.broker_fixtures import free_port

N = 16
REPO = Path(__file__).resolve().parents[1]


def _cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgefleet", *args], capture_output=True,
                          text=True, cwd=REPO, timeout=timeout)




def _ready(url: str) -> bool:
    try:
        return urllib.request.urlopen(url + "/readyz", timeout=1).status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    keyring, key = make_keys(d)
    model = build_model(d, keyring, key, n_features=N)
    store = install_into_store(model, d / "store", keyring)
    return d, keyring, model, store


@pytest.fixture(scope="module")
def served(setup):
    _, keyring, model, store = setup
    with short_tmp() as tmp:
        sock = tmp / "agent.sock"
        port = free_port()
        proc = subprocess.Popen(
            [sys.executable, "-m", "edgefleet", "agent", "serve", "--socket", str(sock),
             "--store", str(store), "--keyring", str(keyring), "--metrics-addr",
             f"127.0.0.1:{port}"], cwd=REPO, stderr=subprocess.PIPE, text=True)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_for(lambda: _ready(url) or proc.poll() is not None, timeout=30)
            assert proc.poll() is None, proc.stderr.read()
            yield proc, sock, url, model
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=10)


def test_serve_loads_the_verified_model_in_a_lean_process(served):
    proc, sock, url, model = served
    body = urllib.request.urlopen(url + "/metrics", timeout=5).read().decode()
    assert f'version="{model.manifest.version}"' in body
    maps = Path(f"/proc/{proc.pid}/maps").read_text()
    for heavy in ("pydantic_core", "torch", "onnx_cpp2py", "sklearn"):
        assert heavy not in maps, heavy
    assert (os.stat(sock).st_mode & 0o777) == 0o660


def test_predict_one_die_from_arguments(served):
    _, sock, _, model = served
    values = [f"{v:.6g}" for v in model.train[0]]
    values[2] = ""  # missing
    r = _cli("agent", "predict", "--socket", str(sock), "--die-id", "W3-12-07", ",".join(values))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("die W3-12-07: PASS score") and "1 imputed" in r.stdout
    r = _cli("agent", "predict", "--socket", str(sock), "-o", "json", *values[:3])
    assert r.returncode == 1 and json.loads(r.stdout)["error"]["code"] == "bad_width"


def test_predict_a_csv_file_prints_each_die_and_a_summary(served, tmp_path):
    _, sock, _, model = served
    x = model.train[:300].copy()
    x[7, 3] = 40.0  # a fail
    path = tmp_path / "dies.csv"
    with open(path, "w") as f:
        f.write("die_id,lot," + ",".join(f"p{i:03d}" for i in reversed(range(N))) + "\n")
        for i, row in enumerate(x):
            f.write(f"D{i},L1," + ",".join(f"{v:.7g}" for v in row[::-1]) + "\n")
    r = _cli("agent", "predict", "--socket", str(sock), "--file", str(path), "--batch", "64")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    fails = int((model.engine().predict(x).score > model.manifest.threshold).sum())
    assert len(lines) == 300 and lines[7].startswith("D7\tfail\t") and "p003=" in lines[7]
    assert sum("\tfail\t" in line for line in lines) == fails
    assert f"300 dies: {300 - fails} pass, {fails} fail (0 by fallback rules), 0 refused" \
        in r.stderr
    assert "300 dies (100% of the file read)" in r.stderr


def test_predict_file_sends_whole_number_die_ids_so_labels_join_on_them(served, tmp_path):
    """The agent logs the die ids a file's whole-number ids name (the prediction log is on
    beside the store); final-test labels for those ids then join to the decisions. A block
    with any other id (`D5`, `007`) goes by position and is echoed by its own text."""
    _, sock, url, model = served
    x = model.train[:70].copy()
    x[3] += 40.0  # die 9000003 fails
    path = tmp_path / "dies.csv"
    ids = [str(9_000_000 + i) for i in range(64)] + ["D5", "007", "8", "9", "10", "11"]
    with open(path, "w") as f:
        f.write("die_id," + ",".join(f"p{i:03d}" for i in range(N)) + "\n")
        for die, row in zip(ids, x, strict=True):
            f.write(f"{die}," + ",".join(f"{v:.7g}" for v in row) + "\n")
    r = _cli("agent", "predict", "--socket", str(sock), "--file", str(path), "--batch", "64")
    assert r.returncode == 0, r.stderr
    assert [ln.split("\t")[0] for ln in r.stdout.splitlines()] == ids
    assert r.stdout.splitlines()[3].startswith("9000003\tfail\t")
    with Client(sock) as c:
        assert c.label([9_000_003, 9_000_004], ["pass", "pass"]) == (2, 0)

    def joined() -> bool:
        body = urllib.request.urlopen(url + "/metrics", timeout=5).read().decode()
        return 'predicted="fail"} 1.0' in body and 'predicted="pass"} 1.0' in body \
            and 'edgefleet_labels_total{result="joined",source="socket"} 2.0' in body

    wait_for(joined, timeout=30)


def test_predict_refuses_a_csv_it_cannot_map(served, tmp_path):
    _, sock, _, _ = served
    path = tmp_path / "bad.csv"
    path.write_text("die_id,a,b\nD1,1,2\n")
    r = _cli("agent", "predict", "--socket", str(sock), "--file", str(path))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "the agent expects 16" in r.stderr


def test_predict_file_reads_a_spreadsheet_export_and_names_a_bad_row_by_line(served, tmp_path):
    """A CSV from a spreadsheet export (BOM, CRLF, quoted ids): read as written; a short row
    further down stops the run with its line number, in one line on stderr."""
    _, sock, _, model = served
    path = tmp_path / "dies.csv"
    rows = [f'"W3,{i}",' + ",".join(f"{v:.7g}" for v in model.train[i]) for i in range(5)]
    rows.insert(3, '"W3,x",1,2')
    path.write_bytes(("\ufeffdie_id," + ",".join(f"p{i:03d}" for i in range(N)) + "\r\n"
                      + "\r\n".join(rows) + "\r\n").encode())
    r = _cli("agent", "predict", "--socket", str(sock), "--file", str(path))
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and f"{path}:5: 3 cells, the header has {N + 1}" in r.stderr
    path.write_bytes(path.read_bytes().replace(b'"W3,x",1,2\r\n', b""))
    r = _cli("agent", "predict", "--socket", str(sock), "--file", str(path))
    assert r.returncode == 0, r.stderr
    assert [ln.split("\t")[0] for ln in r.stdout.splitlines()] == [f"W3,{i}" for i in range(5)]


def test_health_and_info_commands(served):
    _, sock, _, model = served
    h = _cli("agent", "health", "--socket", str(sock))
    assert h.returncode == 0 and h.stdout == f"ok: model {model.manifest.version}\n"
    h = _cli("agent", "health", "--socket", str(sock), "-o", "json")
    assert h.returncode == 0 and json.loads(h.stdout)["status"] == "ok"
    i = json.loads(_cli("agent", "info", "--socket", str(sock), "-o", "json").stdout)
    assert i["model"]["version"] == model.manifest.version and i["n_features"] == N
    text = _cli("agent", "info", "--socket", str(sock)).stdout
    assert text.splitlines()[0].split() == ["model", "robust-z", model.manifest.version,
                                            "(sequence", f"{model.manifest.sequence})"]
    assert f"input      {N} parameters" in text and "model sha256" not in text
    wide = _cli("agent", "info", "--socket", str(sock), "-o", "wide").stdout
    assert f"model sha256   {model.manifest.model_digest}" in wide
    assert f"bundle digest  {i['model']['digest']}" in wide  # the digest the fleet names
    assert _cli("agent", "info", "--socket", str(sock), "-o", "name").stdout == \
        f"agent/{sock}\n"


def test_sigterm_stops_the_agent_and_removes_its_socket(setup, tmp_path):
    _, keyring, model, _ = setup
    store = install_into_store(model, tmp_path / "store", keyring)  # one agent per store
    with short_tmp() as tmp:
        sock = tmp / "a.sock"
        proc = subprocess.Popen(
            [sys.executable, "-m", "edgefleet", "agent", "serve", "--socket", str(sock),
             "--store", str(store), "--keyring", str(keyring), "--metrics-addr", ""], cwd=REPO)
        wait_for(sock.exists, timeout=30)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0 and not sock.exists()


def test_serve_with_a_tampered_model_screens_by_its_rules_and_says_why(setup, tmp_path):
    """A model that changed on disk is never used: with no previous version to return to, the
    agent answers with that model's (intact) fallback rules and health names the damage."""
    _, keyring, model, _ = setup
    store = install_into_store(model, tmp_path / "store", keyring)
    onnx = store / "active" / "model.onnx"
    data = bytearray(onnx.read_bytes())
    data[-1] ^= 1
    onnx.write_bytes(bytes(data))
    with short_tmp() as tmp:
        sock = tmp / "a.sock"
        proc = subprocess.Popen(
            [sys.executable, "-m", "edgefleet", "agent", "serve", "--socket", str(sock),
             "--store", str(store), "--keyring", str(keyring), "--metrics-addr", ""], cwd=REPO)
        try:
            wait_for(sock.exists, timeout=30)
            with Client(sock) as c:
                health = c.health()
                answer = c.predict(model.train[0], die_id=1)
        finally:
            proc.terminate()
            proc.wait(timeout=10)
    assert "sha256" in health["fallback_reason"] and "model.onnx" in health["fallback_reason"]
    assert answer.source == "fallback" and answer.decision == "pass"


def test_serve_needs_a_keyring_for_a_stored_model(setup, tmp_path):
    _, keyring, model, _ = setup
    store = install_into_store(model, tmp_path / "store", keyring)
    with short_tmp() as tmp:
        r = _cli("agent", "serve", "--socket", str(tmp / "a.sock"), "--store", str(store),
                 "--metrics-addr", "")
    assert r.returncode == 1 and "pass --keyring DIR" in r.stderr


def test_serve_with_only_a_rules_file_screens_by_rules(tmp_path):
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps({"n_features": 3, "rules": [
        {"feature": 0, "low": 0.0, "high": 1.0}]}))
    with short_tmp() as tmp:
        sock = tmp / "a.sock"
        proc = subprocess.Popen(
            [sys.executable, "-m", "edgefleet", "agent", "serve", "--socket", str(sock),
             "--rules", str(rules), "--metrics-addr", ""], cwd=REPO)
        try:
            wait_for(sock.exists, timeout=30)
            r = _cli("agent", "predict", "--socket", str(sock), "-o", "json", "2", "0", "0")
            a = json.loads(r.stdout)
            assert a["decision"] == "fail" and a["source"] == "fallback"
            assert a["top"][0]["index"] == 0 and np.isclose(a["top"][0]["contribution"], 1.0)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=10)


def test_bad_flags_exit_2():
    r = _cli("agent", "serve", "--socket", "/tmp/x.sock", "--max-missing-share", "2")
    assert r.returncode == 2 and "max_missing_share must be in 0..1" in r.stderr
    r = _cli("agent", "predict", "--socket", "/tmp/none.sock")
    assert r.returncode == 2 and "give either VALUES" in r.stderr
