"""The agent's container image, run as a box runs it: non-root, read-only root file system, all
capabilities dropped, the socket directory and the model store mounted from the host.

Collected only when EDGEFLEET_IMAGE names a built image (`make image-test`, which runs
`scripts/image.sh test` after `make image`, and CI runs that); `make test` does not collect it
(see tests/conftest.py), so it is never a silently skipped suite. The image is started with
podman under the project's settings (docker/podman/); an arm64 image on an x86 machine runs
under qemu-user-static, with an ARM /proc/cpuinfo mounted in (ONNX Runtime's CPU probe crashes
on the host's x86 one under emulation; real ARM hardware does not need it).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from agent.client import Client
from tests.conftest import REPO
from tests.deploy_helpers import N_FEATURES, free_port, http_get, make_site, wait_for

IMAGE = os.environ.get("EDGEFLEET_IMAGE")
ARCH = os.environ.get("EDGEFLEET_IMAGE_ARCH", "arm64")
AGENT_UID = 10001

pytestmark = [pytest.mark.slow]

PODMAN_ENV = {
    **os.environ,
    "CONTAINERS_CONF": str(REPO / "docker/podman/containers.conf"),
    "CONTAINERS_STORAGE_CONF": str(REPO / "docker/podman/storage.conf"),
    "CONTAINERS_REGISTRIES_CONF": str(REPO / "docker/podman/registries.conf"),
}
EMULATED = {"arm64": "aarch64", "amd64": "x86_64"}[ARCH] != platform.machine()


def podman(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    r = subprocess.run(["podman", *args], capture_output=True, text=True, env=PODMAN_ENV,
                       timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)}: exit {r.returncode}: {r.stderr[-2000:]}")
    return r


@pytest.fixture(scope="module")
def box(tmp_path_factory) -> Iterator[dict]:
    """A box's host side (store with an installed model, keyring, socket directory) and the
    agent container started on it; yields what the tests need, removes the container after."""
    root = tmp_path_factory.mktemp("box")
    site = make_site(root / "site")
    host = root / "host"
    store_parent = host / "var-lib-edgefleet"
    sock_dir = Path(f"/tmp/ef-img-{uuid.uuid4().hex[:8]}")  # short: Unix socket path limit
    store_parent.mkdir(parents=True)
    shutil.move(site.store, store_parent / "store")
    sock_dir.mkdir(mode=0o2770)
    # What k3s/host/edgefleet.conf (systemd-tmpfiles) makes on a box.
    for path in (sock_dir, store_parent):
        subprocess.run(["chown", "-R", f"{AGENT_UID}:{AGENT_UID}", str(path)], check=True)
    sock_dir.chmod(0o2770)
    port = free_port()
    name = f"edgefleet-image-test-{uuid.uuid4().hex[:8]}"
    run = ["run", "--detach", "--name", name, f"--platform=linux/{ARCH}",
           # As the DaemonSet runs it: read-only root with only /tmp (16 MiB) writable besides
           # the two host directories; no capabilities; no privilege escalation.
           "--read-only", "--read-only-tmpfs=false", "--tmpfs=/tmp:rw,size=16m,mode=1777",
           "--cap-drop=ALL", "--security-opt=no-new-privileges",
           "--health-interval=disable",
           "--volume", f"{sock_dir}:/run/edgefleet",
           "--volume", f"{store_parent}:/var/lib/edgefleet",
           "--volume", f"{site.keyring}:/etc/edgefleet/keyring:ro",
           "--env", "EDGEFLEET_AGENT_KEYRING=/etc/edgefleet/keyring",
           "--env", f"EDGEFLEET_AGENT_METRICS_ADDR=127.0.0.1:{port}",
           "--env", f"EDGEFLEET_HEALTH_URL=http://127.0.0.1:{port}/healthz"]
    if EMULATED:
        run += ["--volume", f"{REPO / 'docker/podman/cpuinfo-arm64'}:/proc/cpuinfo:ro"]
    podman(*run, IMAGE)
    url = f"http://127.0.0.1:{port}"

    def alive() -> str | None:
        state = podman("inspect", "--format", "{{.State.Status}}", name, check=False).stdout
        if state.strip() in ("running", "created", ""):
            return None
        return f"container {state.strip()}: {podman('logs', name, check=False).stderr[-3000:]}"

    try:
        # Emulated, ONNX Runtime's import and the model's self-test take a while.
        wait_for("the agent in the container to answer /healthz",
                 lambda: http_get(url + "/healthz")[0] == 200, 240, alive)
        yield {"name": name, "url": url, "socket": sock_dir / "agent.sock", "site": site}
    finally:
        print(podman("logs", name, check=False).stderr[-3000:])
        podman("rm", "--force", "--time", "5", name, check=False)
        shutil.rmtree(sock_dir, ignore_errors=True)


def test_image_is_for_the_target_architecture_with_no_torch_and_no_compiler():
    arch = podman("image", "inspect", "--format", "{{.Architecture}}", IMAGE).stdout.strip()
    assert arch == ARCH
    probe = podman(
        "run", "--rm", f"--platform=linux/{ARCH}", "--read-only", "--network=none",
        "--entrypoint", "/bin/sh", IMAGE, "-c",
        "for c in gcc cc g++ c++ clang make; do command -v $c; done; "
        "/opt/edgefleet/bin/python -c 'import importlib.util as u, json, platform; "
        "print(json.dumps([platform.machine(), u.find_spec(\"torch\") is None, "
        "u.find_spec(\"pip\") is None]))'")
    lines = probe.stdout.strip().splitlines()
    assert len(lines) == 1, f"a compiler is on the image: {lines[:-1]}"
    machine, no_torch, no_pip = json.loads(lines[0])
    assert machine == {"arm64": "aarch64", "amd64": "x86_64"}[ARCH]
    assert no_torch and no_pip


def test_image_declares_a_non_root_user_exec_entrypoint_and_health_check():
    image = json.loads(podman("image", "inspect", IMAGE).stdout)[0]
    cfg = image["Config"]
    assert cfg["User"] == f"{AGENT_UID}:{AGENT_UID}"
    assert cfg["Entrypoint"] == ["/opt/edgefleet/bin/edgefleet"]
    assert cfg["Cmd"] == ["agent", "serve"]
    assert image["Healthcheck"]["Test"][0] == "CMD"  # exec form, no shell


def test_agent_runs_as_non_root_on_a_read_only_root(box):
    status = podman("exec", box["name"], "cat", "/proc/1/status").stdout
    uids = next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1:]
    assert set(uids) == {str(AGENT_UID)}
    caps = next(line for line in status.splitlines() if line.startswith("CapEff:")).split()[1]
    assert int(caps, 16) == 0
    inspect = json.loads(podman("inspect", box["name"]).stdout)[0]
    assert inspect["HostConfig"]["ReadonlyRootfs"] is True
    denied = podman("exec", box["name"], "touch", "/opt/edgefleet/x", check=False)
    assert denied.returncode != 0 and "Read-only file system" in denied.stderr


def test_agent_answers_a_prediction_on_the_host_mounted_socket(box):
    sock: Path = box["socket"]
    st = sock.stat()
    assert st.st_uid == AGENT_UID and st.st_gid == AGENT_UID  # the socket group is the tester's
    rng = np.random.default_rng(5)
    with Client(sock, timeout=60) as c:
        result = c.predict(rng.normal(1.0, 0.1, N_FEATURES), die_id=7)
        info = c.info()
    assert result.decision in ("pass", "fail") and result.source == "model"
    assert result.die_id == 7
    assert result.model_version == box["site"].manifest.version
    assert json.dumps(info)  # the agent describes what it serves


def test_agent_reads_json_with_orjson_built_for_its_architecture(box):
    # orjson's wheel for this architecture, from the wheelhouse (docker/constraints.txt)
    rng = np.random.default_rng(6)
    with Client(box["socket"], timeout=60) as c:
        info = c.info()
        answer = c.predict_json(rng.normal(1.0, 0.1, N_FEATURES), die_id=8)
    assert info["json_parser"] == "orjson"
    assert answer["decision"] in ("pass", "fail") and answer["source"] == "model"
    assert answer["die_id"] == 8


def test_agent_answers_its_health_probes(box):
    assert http_get(box["url"] + "/healthz")[0] == 200
    status, body = http_get(box["url"] + "/readyz")
    assert status == 200 and b"model" in body
    # The image's own HEALTHCHECK, run by podman inside the container.
    check = podman("healthcheck", "run", box["name"], check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    metrics = http_get(box["url"] + "/metrics")[1].decode()
    # one digest everywhere: the bundle's, as the fleet names it; the ONNX file's is separate
    assert f'digest="{box["site"].bundle_digest}"' in metrics
    assert f'model_sha256="{box["site"].manifest.model_digest}"' in metrics


def test_agent_stops_cleanly_on_sigterm(box):
    # Last in this module: it stops the container, as a rolling update does.
    podman("stop", "--time", "30", box["name"])
    code = podman("inspect", "--format", "{{.State.ExitCode}}", box["name"]).stdout.strip()
    assert code == "0"
    wait_for("the socket to be removed", lambda: not box["socket"].exists(), 10)
