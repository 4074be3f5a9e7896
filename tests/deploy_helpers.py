"""Helpers for the deployment tests (Prometheus scrape, container image): a model store with a
real signed model installed the way a device installs it, a standalone rules file, free ports,
and `edgefleet agent serve` run as a separate process, as on a box."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.install import Installer
from agent.manifest import Manifest
from tests.agent_support import build_model
from tests.broker_fixtures import free_port
from tests.install_helpers import make_keys

N_FEATURES = 16


@dataclass(frozen=True)
class Site:
    """What a box has before the agent starts: a store with one installed model, the keyring
    that vouches for it, and a standalone rules file for when no model can serve."""

    store: Path
    keyring: Path
    rules: Path
    manifest: Manifest
    bundle_digest: str  # sha256 of the bundle: what devices report and metrics label


def make_site(root: Path, *, install: bool = True, drift_alert_psi: float | None = None) -> Site:
    """`drift_alert_psi`: the drift alert threshold the bundle ships (none by default)."""
    key, ring = make_keys(root / "release")
    extra = {}
    if drift_alert_psi is not None:
        from agent.drift import drift_reference
        from tests.agent_support import training_rows

        extra["drift_reference"] = {**drift_reference(training_rows(N_FEATURES)),
                                    "alert_psi": drift_alert_psi}
    model = build_model(root / "build", ring, key, n_features=N_FEATURES, **extra)
    store = root / "store"
    store.mkdir(parents=True)
    if install:
        inst = Installer.open(store, ring)
        try:
            inst.start()
            inst.install(model.bundle)
        finally:
            inst.close()
    rules = root / "rules.json"
    rules.write_text(json.dumps({
        "n_features": N_FEATURES, "version": "floor-rules-1",
        "rules": [{"feature": i, "low": -6.0, "high": 6.0} for i in range(N_FEATURES)],
    }))
    return Site(store, ring, rules, model.manifest,
                hashlib.sha256(model.bundle.read_bytes()).hexdigest())




def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def wait_for(what: str, check: Callable[[], Any], timeout: float,
             alive: Callable[[], str | None] = lambda: None) -> Any:
    """Poll `check` until it returns something truthy; fail with `what` after `timeout` s, or
    at once when `alive` reports that the process being waited on has died."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        died = alive()
        if died:
            raise AssertionError(f"waiting for {what}: {died}")
        try:
            last = check()
        except (OSError, ValueError) as e:
            last = e
        else:
            if last:
                return last
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")


@contextlib.contextmanager
def agent_process(socket_path: Path, port: int, *, store: Path | None, keyring: Path | None,
                  rules: Path | None, log: Path, timeout: float = 60.0) -> Iterator[str]:
    """`edgefleet agent serve` in its own process; yields its metrics URL once /healthz
    answers, and stops it with SIGTERM (as Kubernetes does) on exit."""
    cmd = [sys.executable, "-m", "edgefleet", "agent", "serve", "--socket", str(socket_path),
           "--metrics-addr", f"127.0.0.1:{port}"]
    for flag, value in (("--store", store), ("--keyring", keyring), ("--rules", rules)):
        if value is not None:
            cmd += [flag, str(value)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_")}
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"

    def alive() -> str | None:
        if proc.poll() is None:
            return None
        return f"agent exited with {proc.returncode}: {log.read_text()[-2000:]}"

    try:
        wait_for("the agent's /healthz", lambda: http_get(url + "/healthz")[0] == 200, timeout,
                 alive)
        yield url
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextlib.contextmanager
def nginx_serving(tmp: Path, server_conf: Path, replace: dict[str, str]) -> Iterator[str]:
    """Debian's nginx running one of the project's server configurations (`server_conf`, with
    its `listen 8080;` moved to a free local port and `replace` applied), inside what the
    nginx-unprivileged image's main configuration provides (temp paths); yields its URL once
    it answers /healthz. Its access log is tmp/access.log."""
    import getpass
    import shutil

    import pytest

    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(nginx).exists():
        pytest.fail("nginx is not installed (apt-get install nginx; .ci/run does this)",
                    pytrace=False)
    port = free_port()
    server = server_conf.read_text()
    for old, new in {"listen 8080;": f"listen 127.0.0.1:{port};", **replace}.items():
        assert old in server, old
        server = server.replace(old, new)
    conf_d, temp = tmp / "conf.d", tmp / "temp"
    conf_d.mkdir()
    temp.mkdir()
    (conf_d / "default.conf").write_text(server)
    main = tmp / "nginx.conf"
    main.write_text(
        f"user {getpass.getuser()};\nworker_processes 2;\npid {tmp}/nginx.pid;\n"
        f"error_log {tmp}/error.log warn;\nevents {{}}\nhttp {{\n"
        f"  access_log {tmp}/access.log;\n  client_body_temp_path {temp}/body;\n"
        f"  proxy_temp_path {temp}/proxy;\n  fastcgi_temp_path {temp}/fastcgi;\n"
        f"  uwsgi_temp_path {temp}/uwsgi;\n  scgi_temp_path {temp}/scgi;\n"
        f"  include {conf_d}/*.conf;\n}}\n")
    check = subprocess.run([nginx, "-t", "-c", str(main), "-g", "daemon off;"],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    proc = subprocess.Popen([nginx, "-c", str(main), "-g", "daemon off;"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for("nginx to answer", lambda: http_get(url + "/healthz")[0] == 200, 15,
                 lambda: None if proc.poll() is None else proc.stderr.read().decode())
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
