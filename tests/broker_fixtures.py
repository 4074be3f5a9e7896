"""Real services for the fleet tests: a Mosquitto broker on a free port, run with the project's
own configuration (broker/mosquitto.conf, or broker/mosquitto-tls.conf with the ACL template
and certificates from fleet.certs), an artifact server, fleet and release keys, real bundles.

Import the fixtures into a test module: `from tests.broker_fixtures import broker, ...`.
If mosquitto is not installed the tests FAIL (they never skip): `.ci/run` installs it.
"""

from __future__ import annotations

import contextlib
import getpass
import shutil
import signal
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from agent.bundle import write_bundle
from agent.keys import generate_keypair, load_private_key, trust_key
from agent.link import MqttConfig
from fleet.artifacts import ArtifactServer
from fleet.certs import CONTROLLER_NAME, CertPaths, init_ca, issue_client, issue_server
from fleet.transport import render_broker_config
from tests.agent_support import wait_for


def mosquitto_binary() -> str:
    found = shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if Path(p).exists()),
        None)
    if found is None:
        pytest.fail("mosquitto is not installed: the fleet tests need a real broker "
                    "(apt-get install mosquitto; .ci/run does this)", pytrace=False)
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class PKI:
    """A CA, the broker's certificate and client certificates issued on demand."""

    dir: Path
    ca: CertPaths
    server: CertPaths
    clients: dict[str, CertPaths] = field(default_factory=dict)

    @classmethod
    def create(cls, directory: Path) -> PKI:
        ca = init_ca(directory)
        return cls(directory, ca, issue_server(directory, directory))

    def client(self, name: str) -> CertPaths:
        if name not in self.clients:
            self.clients[name] = issue_client(self.dir, self.dir, name,
                                              controller=name == CONTROLLER_NAME)
        return self.clients[name]


class Broker:
    """A mosquitto process with the project's configuration. `restart()` keeps the port and the
    persistence directory (sessions, queued commands and retained states survive)."""

    def __init__(self, workdir: Path, *, pki: PKI | None = None, prefix: str = "edgefleet"):
        self.workdir = workdir
        self.pki = pki
        self.port = free_port()
        self.host = "127.0.0.1"
        kw = {}
        if pki is not None:
            kw = {"ca_file": pki.ca.cert, "cert_file": pki.server.cert,
                  "key_file": pki.server.key}
        self.conf = render_broker_config(workdir, port=self.port, tls=pki is not None,
                                         prefix=prefix, user=getpass.getuser(), **kw)
        self.proc: subprocess.Popen | None = None
        self.log = workdir / "mosquitto.log"

    def start(self, timeout: float = 10.0) -> Broker:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([mosquitto_binary(), "-c", str(self.conf)],
                                         stdout=log, stderr=subprocess.STDOUT)
        wait_for(self._listening, timeout, interval=0.02,
                 what=f"mosquitto listening on {self.port}")
        return self

    def _listening(self) -> bool:
        """Whether the broker accepts connections; fails the test, with its log, if it
        exited."""
        assert self.proc is not None
        if self.proc.poll() is not None:
            pytest.fail(f"mosquitto exited with {self.proc.returncode}: "
                        f"{self.log.read_text()[-2000:]}", pytrace=False)
        with contextlib.suppress(OSError), socket.create_connection(
                (self.host, self.port), timeout=0.2):
            return True
        return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # saves persistence
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def mqtt(self, client: str | None = None, **kw) -> MqttConfig:
        """Client settings for this broker; on TLS, with `client`'s certificate (or none)."""
        tls = {}
        if self.pki is not None:
            tls["ca_file"] = self.pki.ca.cert
            if client is not None:
                cert = self.pki.client(client)
                tls.update(cert_file=cert.cert, key_file=cert.key)
        kw.setdefault("reconnect_min_s", 1)
        kw.setdefault("reconnect_max_s", 2)
        return MqttConfig(self.host, self.port, **tls, **kw)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    """Plain mosquitto (broker/mosquitto.conf) on a free port."""
    (tmp_path / "broker").mkdir()
    b = Broker(tmp_path / "broker").start()
    yield b
    b.stop()


@pytest.fixture
def pki(tmp_path: Path) -> PKI:
    return PKI.create(tmp_path / "pki")


@pytest.fixture
def tls_broker(tmp_path: Path, pki: PKI) -> Iterator[Broker]:
    """mosquitto with TLS, client certificates and the per-device ACL."""
    (tmp_path / "tls-broker").mkdir()
    b = Broker(tmp_path / "tls-broker", pki=pki).start()
    yield b
    b.stop()


@dataclass
class FleetKeys:
    keyring: Path
    release_key: Path
    fleet_key: Path


def make_fleet_keys(root: Path) -> FleetKeys:
    """A release key (bundles) and a fleet key (commands), each trusted for its role."""
    release = generate_keypair(root / "keys", "release")
    fleet = generate_keypair(root / "keys", "fleet")
    ring = root / "keyring"
    trust_key(ring, release.public_path, "release")
    trust_key(ring, fleet.public_path, "fleet")
    return FleetKeys(ring, release.private_path, fleet.private_path)


@pytest.fixture
def fleet_keys(tmp_path: Path) -> FleetKeys:
    """A release key (bundles) and a fleet key (commands), each trusted for its role."""
    return make_fleet_keys(tmp_path)


N_FEATURES = 8


def make_real_bundle(out: Path, release_key: Path, *, sequence: int, seed: int = 0,
                     break_golden: bool = False, n: int = N_FEATURES) -> Path:
    """A signed bundle with a real (tiny) robust z-score model, via optimize.baseline."""
    from optimize.baseline import bundle_contents

    rng = np.random.default_rng(seed)
    x = rng.normal(loc=seed % 5, size=(200, n)).astype(np.float32)
    fields, onnx_bytes = bundle_contents(x, [f"p{i}" for i in range(n)], name="fleet-test",
                                         version=f"1.{sequence}.{seed}", sequence=sequence)
    if break_golden:  # the model is fine, the golden scores are not: self-test must fail
        for v in fields["golden"]["vectors"]:
            v["score"] += 100.0
    write_bundle(out, fields, {"model.onnx": onnx_bytes}, load_private_key(release_key))
    return out


@pytest.fixture
def artifacts(tmp_path: Path) -> Iterator[ArtifactServer]:
    srv = ArtifactServer(tmp_path / "artifacts").start()
    yield srv
    srv.stop()


@dataclass
class Box:
    """One device: a real model store and installer, and the real link."""

    device_id: str
    root: Path
    installer: object
    link: object

    def stop(self) -> None:
        self.link.stop()
        self.installer.close()


def make_box(root: Path, broker: Broker, keys: FleetKeys, device_id: str = "box-1", *,
             mqtt: MqttConfig | None = None, start: bool = True, **link_kw) -> Box:
    """Open (or reopen) the device at `root/device_id` and start its link."""
    from agent.install import InstallConfig, Installer
    from agent.link import DeviceLink, LinkConfig

    base = root / device_id
    installer = Installer.open(base / "store", keys.keyring,
                               InstallConfig(latency_rows=10, max_latency_s=None))
    installer.start()
    cfg_kw = {k: link_kw.pop(k) for k in ("labels", "state_interval_s", "download", "prefix")
              if k in link_kw}
    link = DeviceLink(LinkConfig(device_id, base / "link", mqtt or broker.mqtt(device_id),
                                 **cfg_kw),
                      keyring=keys.keyring, installer=installer, **link_kw)
    if start:
        link.start()
    return Box(device_id, base, installer, link)
