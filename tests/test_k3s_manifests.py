"""What k3s/ ships, checked against the code and the real programs it configures (the schema,
policy and lint checks of the rendered manifests are scripts/check-manifests.sh):

- the broker configuration in the central base is exactly broker/'s templates rendered for the
  pod's paths, and a real mosquitto runs it: TLS with a client certificate, per-device ACLs;
- the agent's settings (agent.env and the site overlay's) are read by the agent's own loaders;
- the host directories a box needs are what systemd-tmpfiles makes from k3s/host/edgefleet.conf.

Regenerate the rendered broker files after changing broker/ with
`EDGEFLEET_RENDER_K3S=1 pytest tests/test_k3s_manifests.py -k rendered`.
"""

from __future__ import annotations

import dataclasses
import getpass
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import threading
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from agent.config import AgentConfig, load_config
from agent.link import LinkConfig
from fleet.bridge import BROKER_POD_PATHS
from fleet.certs import init_ca, issue_client, issue_server
from fleet.transport import render_acl
from tests.broker_fixtures import free_port
from tests.conftest import REPO

K3S = REPO / "k3s"
MOSQUITTO_DIR = K3S / "base" / "central" / "mosquitto"
# Where the central Deployment mounts things (k3s/base/central/mosquitto/deployment.yaml).
POD_PATHS = BROKER_POD_PATHS
HEADER = ("# Rendered from broker/mosquitto-tls.conf for the Deployment's paths; do not edit:\n"
          "# tests/test_k3s_manifests.py regenerates it (EDGEFLEET_RENDER_K3S=1).\n")


def _render_conf() -> str:
    out = (REPO / "broker" / "mosquitto-tls.conf").read_text()
    for key, value in POD_PATHS.items():
        out = out.replace("{{" + key + "}}", value)
    left = re.search(r"\{\{[A-Z_]+\}\}", out)
    assert left is None, f"broker template field {left.group()} has no value for K3s"
    return HEADER + out


def test_rendered_broker_config_matches_the_templates():
    expected = {"mosquitto.conf": _render_conf(), "acl": render_acl()}
    if os.environ.get("EDGEFLEET_RENDER_K3S") == "1":
        for name, text in expected.items():
            (MOSQUITTO_DIR / name).write_text(text)
    for name, text in expected.items():
        assert (MOSQUITTO_DIR / name).read_text() == text, (
            f"k3s/base/central/mosquitto/{name} differs from broker/'s template: regenerate it "
            "with EDGEFLEET_RENDER_K3S=1 pytest tests/test_k3s_manifests.py -k rendered")
    kustomization = (K3S / "base" / "central" / "kustomization.yaml").read_text()
    assert "- mosquitto/mosquitto.conf" in kustomization and "- mosquitto/acl" in kustomization




def _connect(port: int, ca: Path, cert: Path | None, key: Path | None, client_id: str
             ) -> tuple[mqtt.Client | None, str]:
    ctx = ssl.create_default_context(cafile=str(ca))
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key))
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                         protocol=mqtt.MQTTv5)
    client.tls_set_context(ctx)
    done = threading.Event()
    result: dict[str, str] = {}

    def on_connect(c, userdata, flags, reason, props):
        result["reason"] = str(reason)
        done.set()

    def on_disconnect(c, userdata, flags, reason, props):
        result.setdefault("reason", f"disconnected: {reason}")
        done.set()

    client.on_connect = on_connect
    client.on_disconnect = on_disconnect
    try:
        client.connect("127.0.0.1", port, keepalive=10)
    except (OSError, ssl.SSLError) as e:
        return None, f"refused: {e}"
    client.loop_start()
    if not done.wait(10):
        client.loop_stop()
        return None, "no CONNACK"
    if result["reason"] != "Success":
        client.loop_stop()
        return None, result["reason"]
    return client, "Success"


def test_a_real_mosquitto_runs_the_k3s_broker_config(tmp_path: Path):
    mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not Path(mosquitto).exists():
        pytest.fail("mosquitto is not installed (.ci/run installs it)", pytrace=False)
    pki = tmp_path / "pki"
    init_ca(pki)
    issue_server(pki, pki)
    box = issue_client(pki, pki, "box-01")
    ctl = issue_client(pki, pki, "edgefleet-controller", controller=True)
    (tmp_path / "data").mkdir()
    port = free_port()
    # The committed file, with the pod's paths mapped to this machine's.
    conf = (MOSQUITTO_DIR / "mosquitto.conf").read_text()
    for old, new in {
        "/mosquitto/config/acl": str(MOSQUITTO_DIR / "acl"),
        "/mosquitto/certs/": f"{pki}/",
        "/mosquitto/data": str(tmp_path / "data"),
        "listener 8883 0.0.0.0": f"listener {port} 127.0.0.1",
        "user mosquitto": f"user {getpass.getuser()}",
    }.items():
        assert old in conf, old
        conf = conf.replace(old, new)
    (tmp_path / "mosquitto.conf").write_text(conf)
    log = tmp_path / "mosquitto.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([mosquitto, "-c", str(tmp_path / "mosquitto.conf")],
                                stdout=out, stderr=subprocess.STDOUT)
    clients: list[mqtt.Client] = []
    try:
        from tests.deploy_helpers import wait_for

        def listening() -> bool:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True

        wait_for("mosquitto to listen", listening, 15,
                 lambda: None if proc.poll() is None else log.read_text()[-2000:])

        # No client certificate: the TLS handshake is refused.
        none, why = _connect(port, pki / "ca.crt", None, None, "anonymous")
        assert none is None, why

        device, why = _connect(port, pki / "ca.crt", box.cert, box.key, "box-01")
        assert device is not None, why
        controller, why = _connect(port, pki / "ca.crt", ctl.cert, ctl.key, "ctl")
        assert controller is not None, why
        clients += [device, controller]
        got: list[str] = []
        seen = threading.Event()

        def on_message(c, userdata, msg):
            got.append(msg.topic)
            if msg.topic.endswith("/box-01/state"):
                seen.set()

        controller.on_message = on_message
        sub_done = threading.Event()
        controller.on_subscribe = lambda *a: sub_done.set()
        controller.subscribe("edgefleet/#", qos=1)
        assert sub_done.wait(10)
        # The ACL: a device writes only its own topics; the other publish is dropped.
        device.publish("edgefleet/device/box-02/state", b"forged", qos=1).wait_for_publish(10)
        device.publish("edgefleet/device/box-01/state", b"mine", qos=1).wait_for_publish(10)
        assert seen.wait(10), got
        assert got == ["edgefleet/device/box-01/state"]
    finally:
        for c in clients:
            c.disconnect()
            c.loop_stop()
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)


def _env_file(path: Path) -> dict[str, str]:
    pairs = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            pairs[key] = value
    return pairs


def test_agent_settings_are_read_by_the_agents_own_loaders():
    env = _env_file(K3S / "base" / "agent" / "agent.env")
    env.update(_env_file(K3S / "overlays" / "site-example" / "site.env"))
    fields = {f.name for f in dataclasses.fields(AgentConfig)}
    unknown = [k for k in env if k.startswith("EDGEFLEET_AGENT_")
               and k.removeprefix("EDGEFLEET_AGENT_").lower() not in fields]
    assert unknown == []
    cfg = load_config(env=env)
    assert str(cfg.socket) == "/run/edgefleet/agent.sock"
    assert str(cfg.store).startswith("/var/lib/edgefleet/")  # the host path volume
    assert cfg.metrics_host_port() == ("0.0.0.0", 9464)
    # What the DaemonSet adds per node (device id and certificate from the node name).
    daemonset = (K3S / "base" / "agent" / "daemonset.yaml").read_text()
    for name in ("EDGEFLEET_DEVICE_ID", "EDGEFLEET_MQTT_CERT", "EDGEFLEET_MQTT_KEY"):
        assert f"name: {name}" in daemonset
    link = LinkConfig.from_env({**env, "EDGEFLEET_DEVICE_ID": "box-01",
                                "EDGEFLEET_MQTT_CERT": "/etc/edgefleet/device/device.crt",
                                "EDGEFLEET_MQTT_KEY": "/etc/edgefleet/device/device.key"})
    assert link.mqtt.port == 8883 and link.mqtt.tls
    assert link.labels == {"site": "fab1"}
    assert str(link.data_dir).startswith("/var/lib/edgefleet/")
    # One metrics port everywhere: the agent, the pod, the scrape annotation, the policy.
    for text in (daemonset, (K3S / "base" / "agent" / "networkpolicy.yaml").read_text()):
        assert "9464" in text and "9100" not in text
    # The data feed and the MES drop directory: the agent's settings, the pod's port and
    # volume, the policy; the feed takes the link's certificate, as agent/datafeed.py reads it.
    assert cfg.data_addr == "0.0.0.0:9465" and "port: 9465" in \
        (K3S / "base" / "agent" / "networkpolicy.yaml").read_text()
    assert "containerPort: 9465" in daemonset
    assert str(cfg.labels_dir) == "/var/spool/edgefleet-labels"
    assert "mountPath: /var/spool/edgefleet-labels" in daemonset
    assert link.mqtt.ca_file and link.mqtt.cert_file and link.mqtt.key_file
    assert "name: EDGEFLEET_DATA_FEED\n              value: $(HOST_IP):9465" in daemonset
    assert LinkConfig.from_env({**env, "EDGEFLEET_DEVICE_ID": "box-01",
                                "EDGEFLEET_DATA_FEED": "10.1.2.3:9465"}).data_feed == \
        "10.1.2.3:9465"
    assert link.data_feed is None  # 0.0.0.0 is no address to reach it at


def test_host_directories_come_from_systemd_tmpfiles(tmp_path: Path):
    tmpfiles = shutil.which("systemd-tmpfiles")
    if tmpfiles is None:
        pytest.skip("systemd-tmpfiles is not on this machine")
    root = tmp_path / "root"
    subprocess.run([tmpfiles, f"--root={root}", "--create",
                    str(K3S / "host" / "edgefleet.conf")], check=True, capture_output=True)
    sock, store = (root / "run" / "edgefleet").stat(), (root / "var/lib/edgefleet").stat()
    device = (root / "etc/edgefleet/device").stat()
    assert (sock.st_uid, sock.st_gid, oct(sock.st_mode & 0o7777)) == (10001, 10001, "0o2770")
    assert (store.st_uid, store.st_gid, oct(store.st_mode & 0o7777)) == (10001, 10001, "0o750")
    assert (device.st_uid, device.st_gid, oct(device.st_mode & 0o7777)) == \
        (10001, 10001, "0o700")
    daemonset = (K3S / "base" / "agent" / "daemonset.yaml").read_text()
    for path in ("/run/edgefleet", "/var/lib/edgefleet", "/etc/edgefleet/device",
                 "/var/spool/edgefleet-labels"):
        assert f"path: {path}\n            type: Directory" in daemonset, path
    labels = root / "var/spool/edgefleet-labels"
    for d in (labels, labels / "incoming"):  # the MES exporter (group 10001) writes here
        st = d.stat()
        assert (st.st_uid, st.st_gid, oct(st.st_mode & 0o7777)) == (10001, 10001, "0o2770")


def test_a_real_nginx_serves_artifacts_with_the_k3s_config(tmp_path: Path):
    """The artifact server's nginx configuration (k3s/base/central/artifacts/default.conf) on
    Debian's nginx: the device's own downloader fetches a bundle from it, with a resumed Range
    request; nothing but `sha256/<digest>` is served, and only to GET/HEAD."""
    import hashlib
    import urllib.error
    import urllib.request

    from agent.download import DownloadConfig, download
    from fleet.artifacts import add_artifact
    from tests.deploy_helpers import http_get, nginx_serving

    root = tmp_path / "artifacts"
    payload = os.urandom(300_000)
    digest = add_artifact(root, payload)
    conf = K3S / "base" / "central" / "artifacts" / "default.conf"
    with nginx_serving(tmp_path, conf, {"root /srv/artifacts;": f"root {root};"}) as url:
        # The device's downloader, resuming a transfer cut off halfway.
        dest = tmp_path / "device" / "bundle.efb"
        dest.parent.mkdir()
        dest.with_name("bundle.efb.part").write_bytes(payload[:100_000])
        download(f"{url}/sha256/{digest}", dest, sha256=digest, size=len(payload),
                 config=DownloadConfig(attempts=1))
        assert hashlib.sha256(dest.read_bytes()).hexdigest() == digest
        assert f'"GET /sha256/{digest} HTTP/1.1" 206 ' in (tmp_path / "access.log").read_text()

        head = urllib.request.Request(f"{url}/sha256/{digest}", method="HEAD")
        with urllib.request.urlopen(head, timeout=5) as r:
            assert r.status == 200 and int(r.headers["Content-Length"]) == len(payload)
            assert r.headers["Content-Type"] == "application/octet-stream"
        for path in (f"/sha256/{'0' * 64}", "/sha256/", f"/sha256/{digest[:10]}", "/",
                     "/nginx.conf"):
            assert http_get(url + path)[0] == 404, path
        post = urllib.request.Request(f"{url}/sha256/{digest}", data=b"x", method="POST")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(post, timeout=5)
        assert refused.value.code == 403


# -- keys in the cluster: per-node identity, a keyring that updates in place ----------------


def _rendered_agent(overlay: Path) -> tuple[dict, dict[str, str]]:
    """The agent DaemonSet and its ConfigMap's data, as `kubectl kustomize` renders them."""
    import yaml

    out = subprocess.run(["kubectl", "kustomize", str(overlay)], check=True,
                         capture_output=True, text=True).stdout
    docs = [d for d in yaml.safe_load_all(out) if d]
    ds = next(d for d in docs if d["kind"] == "DaemonSet"
              and d["metadata"]["name"] == "edgefleet-agent")
    config = next(d for d in docs if d["kind"] == "ConfigMap"
                  and d["metadata"]["name"].startswith("edgefleet-agent-config"))
    return ds, config["data"]


AGENT_OVERLAYS = sorted(d for d in (K3S / "overlays").iterdir()
                        if (d / "kustomization.yaml").is_file()
                        and "base/agent" in (d / "kustomization.yaml").read_text())


@pytest.mark.parametrize("overlay", AGENT_OVERLAYS, ids=lambda d: d.name)
def test_keyring_updates_reach_running_pods_and_no_pod_holds_another_nodes_key(overlay: Path):
    if shutil.which("kubectl") is None:
        pytest.fail("kubectl (for kustomize) is not installed", pytrace=False)
    ds, config = _rendered_agent(overlay)
    pod = ds["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    (agent,) = [c for c in pod["containers"] if c["name"] == "agent"]
    mounts = agent["volumeMounts"]
    env = {e["name"]: e.get("value") for e in agent.get("env", [])}

    def volume_at(path: str) -> tuple[dict, dict]:
        mount = max((m for m in mounts if path == m["mountPath"]
                     or path.startswith(m["mountPath"].rstrip("/") + "/")),
                    key=lambda m: len(m["mountPath"]))
        return mount, volumes[mount["name"]]

    # An updated Secret never reaches a subPath mount: none at all, and the keyring is one
    # Secret mounted whole (no items) at the path the agent reads it from.
    assert [m["mountPath"] for m in mounts if "subPath" in m or "subPathExpr" in m] == []
    mount, keyring = volume_at(config["EDGEFLEET_AGENT_KEYRING"])
    assert mount["mountPath"] == config["EDGEFLEET_AGENT_KEYRING"] and mount["readOnly"]
    assert "secret" in keyring and "items" not in keyring["secret"]
    # The device's private key: on its own node (a host directory), never in a Secret or any
    # volume every pod of the DaemonSet shares.
    for var in ("EDGEFLEET_MQTT_KEY", "EDGEFLEET_MQTT_CERT"):
        path = env.get(var) or config.get(var)
        mount, volume = volume_at(path)
        assert set(volume) == {"name", "hostPath"}, (var, volume)
        assert volume["hostPath"]["type"] == "Directory" and mount["readOnly"]
        assert "$(" not in path  # one identity per node, not one file per node in a shared set
    assert volume_at(config["EDGEFLEET_MQTT_CA"])[1] == volume_at(env["EDGEFLEET_MQTT_KEY"])[1]
    secrets = [v for v in volumes.values() if "secret" in v or "projected" in v]
    assert [v["name"] for v in secrets] == ["keyring"]  # public keys and revocations only


def _doc_block(name: str) -> str:
    """The shell function `name` as docs/deploy-k3s.md defines it."""
    text = (REPO / "docs" / "deploy-k3s.md").read_text()
    start = text.index(f"{name}() {{")
    return text[start:text.index("\n}\n", start) + 3]


FAKE_KUBECTL = """#!{python}
# A stand-in for kubectl + kubelet (no cluster here): `create secret generic NAME
# --from-file=KEY=PATH ...` writes the Secret the way kubelet projects a Secret volume (a new
# timestamped directory, then an atomic swap of the `..data` symlink, one visible symlink per
# key); `apply -f -` reads the manifest and does nothing else.
import os, sys, time
args = sys.argv[1:]
if "apply" in args:
    sys.stdin.read()
    sys.exit(0)
mount = os.environ["FAKE_SECRET_DIR"]
files = dict(a.split("=", 1)[1].split("=", 1) for a in args if a.startswith("--from-file="))
stamp = "..%d" % time.monotonic_ns()
os.makedirs(os.path.join(mount, stamp))
for key, path in files.items():
    with open(path, "rb") as src, open(os.path.join(mount, stamp, key), "wb") as dst:
        dst.write(src.read())
tmp = os.path.join(mount, "..data_tmp")
os.symlink(stamp, tmp)
os.replace(tmp, os.path.join(mount, "..data"))
for name in os.listdir(mount):
    if not name.startswith("..") and name not in files:
        os.unlink(os.path.join(mount, name))
for key in files:
    if not os.path.islink(os.path.join(mount, key)):
        os.symlink(os.path.join("..data", key), os.path.join(mount, key))
"""


def test_a_revocation_applied_as_the_guide_says_reaches_a_running_agents_keyring(
        tmp_path: Path):
    """docs/deploy-k3s.md's `keyring_secret`, run as written against a fake kubectl/kubelet
    (there is no cluster here): the flat Secret it makes is a keyring the agent reads, and
    after `edgefleet keys revoke` and `keyring_secret` again, the agent's keyring (read once,
    as a running agent holds it) refuses the key, with no restart."""
    import sys

    from agent.keys import Keyring, LiveKeyring, RevokedKey, generate_keypair, trust_key

    work, bindir, mount = tmp_path / "ops", tmp_path / "bin", tmp_path / "pod-keyring"
    for d in (work, bindir, mount):
        d.mkdir()
    kubectl = bindir / "kubectl"
    kubectl.write_text(FAKE_KUBECTL.format(python=sys.executable))
    kubectl.chmod(0o755)
    rel = generate_keypair(tmp_path / "keys", "release")
    fleet = generate_keypair(tmp_path / "keys", "fleet")
    trust_key(work / "keyring", rel.public_path, "release")
    trust_key(work / "keyring", fleet.public_path, "fleet")
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}",
           "FAKE_SECRET_DIR": str(mount)}
    script = _doc_block("keyring_secret") + "keyring_secret\n"
    subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=work, env=env, check=True)

    running = LiveKeyring(Keyring.load(mount))  # what the agent loaded at start
    assert running.current().public_key(rel.key_id, "release")
    assert running.current().public_key(fleet.key_id, "fleet")
    edgefleet = Path(sys.executable).with_name("edgefleet")
    subprocess.run([str(edgefleet), "keys", "revoke", rel.key_id, "--keyring", "keyring"],
                   cwd=work, env=env, check=True, capture_output=True)
    subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=work, env=env, check=True)
    with pytest.raises(RevokedKey):
        running.current().public_key(rel.key_id, "release")
    assert running.current().public_key(fleet.key_id, "fleet")


def test_pods_sharing_a_read_write_once_claim_are_scheduled_onto_one_node():
    """ReadWriteOnce is one node: the rollout controller mounts the artifact server's claim
    (read-only, for `--git-repo`), so it must be required onto the node of the pod that
    mounts it first, or it stays Pending (or fails to attach) anywhere else."""
    import yaml

    if shutil.which("kubectl") is None:
        pytest.fail("kubectl (for kustomize) is not installed", pytrace=False)
    out = subprocess.run(["kubectl", "kustomize", str(K3S / "overlays" / "central")],
                         check=True, capture_output=True, text=True).stdout
    docs = [d for d in yaml.safe_load_all(out) if d]
    rwo = {d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"
           and d["spec"]["accessModes"] == ["ReadWriteOnce"]}
    users: dict[str, list[dict]] = {}
    for d in docs:
        if d["kind"] in ("Deployment", "StatefulSet", "DaemonSet"):
            for v in d["spec"]["template"]["spec"].get("volumes", []):
                claim = (v.get("persistentVolumeClaim") or {}).get("claimName")
                if claim in rwo:
                    users.setdefault(claim, []).append(d)
    shared = {c: ds for c, ds in users.items() if len(ds) > 1}
    assert set(shared) == {"artifacts"}, {c: [d["metadata"]["name"] for d in ds]
                                          for c, ds in shared.items()}
    first, *others = shared["artifacts"]
    assert first["metadata"]["name"] == "artifacts"
    labels = first["spec"]["template"]["metadata"]["labels"]
    for d in others:
        terms = d["spec"]["template"]["spec"]["affinity"]["podAffinity"][
            "requiredDuringSchedulingIgnoredDuringExecution"]
        assert any(t["topologyKey"] == "kubernetes.io/hostname" and
                   t["labelSelector"]["matchLabels"].items() <= labels.items()
                   for t in terms), (d["metadata"]["name"], terms)
