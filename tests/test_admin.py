"""The admin socket and `edgefleet agent install|rollback|models`: a separate 0600 socket."""

from __future__ import annotations

import json
import socket
import stat
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from agent.admin import AdminClient, AdminError, AdminServer, AdminUnreachable
from agent.admin_cli import register
from agent.install import Installer
from agent.server import ServerError
from tests.install_helpers import make_keys, real_bundle


@pytest.fixture
def agent(tmp_path: Path):
    """An installer behind an admin socket, plus two good bundles."""
    key, ring = make_keys(tmp_path)
    bundles = []
    for seq in (1, 2):
        bundles.append(tmp_path / f"b{seq}.efb")
        real_bundle(bundles[-1], key, sequence=seq, seed=seq)
    inst = Installer.open(tmp_path / "store", ring)
    server = AdminServer(tmp_path / "run" / "admin.sock", inst).start()
    yield server, inst, bundles, ring
    server.stop()
    inst.close()


def test_admin_socket_is_owner_only_by_default(agent):
    server, *_ = agent
    st = server.path.lstat()
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert not list(server.path.parent.glob(".*.tmp"))


def test_install_models_rollback_over_the_admin_socket(agent):
    server, inst, (one, two), _ = agent
    client = AdminClient(server.path)
    assert client.install(one)["outcome"] == "committed"
    r = client.install(two)
    assert (r["op"], r["from_id"]) == ("install", inst.store.pointer_target("previous"))
    models = client.models(check=True)
    assert [(v["sequence"], v["active"], v["previous"], v["problems"])
            for v in models["versions"]] == [(2, True, False, []), (1, False, True, [])]
    with pytest.raises(AdminError, match="below the minimum allowed 2") as e:
        client.install(one)
    assert (e.value.kind, e.value.cause, e.value.state) == ("InstallFailed", "Downgrade", "verify")
    back = client.rollback()
    assert back["op"] == "rollback" and inst.store.active() == back["id"]
    assert client.status()["state"] == "idle"
    assert client.check()["ok"] is True


def test_admin_refuses_malformed_requests_and_keeps_serving(agent):
    server, *_ = agent
    with socket.socket(socket.AF_UNIX) as s, s.makefile("rb") as r:
        s.connect(str(server.path))
        for line in (b"nonsense\n", b'{"op": "format-disk"}\n',
                     b'{"op": "install", "bundle": "relative.efb"}\n'):
            s.sendall(line)
            answer = json.loads(r.readline())
            assert answer["ok"] is False
        s.sendall(b'{"op": "status"}\n')
        assert json.loads(r.readline())["ok"] is True


def test_no_agent_is_a_clear_error(tmp_path):
    with pytest.raises(AdminUnreachable, match="is the agent running"):
        AdminClient(tmp_path / "none.sock").status()


def test_stale_admin_socket_is_replaced_and_a_live_one_refused(agent, tmp_path):
    server, inst, *_ = agent
    with pytest.raises(ServerError, match="another process is listening"):
        AdminServer(server.path, inst).start()
    stale = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(stale))
    s.close()  # file left behind, nothing listens
    AdminServer(stale, inst).start().stop()
    plain = tmp_path / "plain"
    plain.write_text("x")
    with pytest.raises(ServerError, match="not a socket"):
        AdminServer(plain, inst).start()


def _cli() -> typer.Typer:
    app = typer.Typer()
    register(app)
    return app


def test_cli_commands_talk_to_the_admin_socket(agent):
    server, _, (one, two), _ = agent
    runner, app, sock = CliRunner(), _cli(), ["--admin-socket", str(server.path)]
    r = runner.invoke(app, ["install", str(one), *sock])
    assert r.exit_code == 0 and r.output.startswith("installed 1-"), r.output
    r = runner.invoke(app, ["install", str(two), *sock, "-o", "json"])
    assert json.loads(r.output)["outcome"] == "committed"
    r = runner.invoke(app, ["models", *sock, "--check"])
    assert r.exit_code == 0
    lines = r.output.splitlines()
    assert lines[1].startswith("*") and " ok" in lines[1] and lines[2].startswith("p")
    ids = [ln.split()[1] for ln in lines[1:3]]
    r = runner.invoke(app, ["models", *sock, "-o", "name"])
    assert sorted(r.output.split()) == sorted(f"model/{i}" for i in ids)
    r = runner.invoke(app, ["models", *sock, "-o", "wide"])
    assert r.output.splitlines()[0].split()[4] == "CREATED"
    r = runner.invoke(app, ["rollback", *sock])
    assert r.exit_code == 0 and "rolled back to 1-" in r.output
    r = runner.invoke(app, ["install", str(one), *sock])
    assert isinstance(r.exception, AdminError) and r.exception.cause == "Downgrade"


def test_cli_on_a_stopped_agents_store(tmp_path):
    key, ring = make_keys(tmp_path)
    b = tmp_path / "b.efb"
    real_bundle(b, key, sequence=1)
    runner, app, store = CliRunner(), _cli(), ["--store", str(tmp_path / "store")]
    r = runner.invoke(app, ["install", str(b), *store, "--keyring", str(ring)])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["models", *store, "-o", "json"])
    assert json.loads(r.output)["active"].startswith("1-")
