"""`edgefleet fleet rollout ...` as an operator runs it: bad input is refused in one line with
nothing sent, a dry run shows the plan, pause / resume / abort / rollback / status / list in
one-shot mode (`--once`), and what the CLI says without a controller. The one-shot drivers
are real processes (paused from another command, interrupted with Ctrl-C); the other commands
call the CLI's entry point in this process (rollout_helpers.cli_here), one real `edgefleet`
process excepted. The controller service is tests/fleet/test_rollout_controller.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleet.artifacts import list_published
from fleet.state import StateDB
from tests.broker_fixtures import (
    Broker,
    FleetKeys,
    free_port,
    make_fleet_keys,
    make_real_bundle,
)
from tests.fleet.rollout_helpers import (
    FAST_FLAGS,
    REPO,
    CommandSniffer,
    Floor,
    cli,
    cli_env,
    cli_here,
    floor,
    wait_until,
)

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]


def _one_line_error(r: subprocess.CompletedProcess, code: int, *needles: str) -> None:
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgefleet: error: "), r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def _popen(fl: Floor, *args: str) -> subprocess.Popen:
    env = dict(os.environ, **cli_env(fl))
    return subprocess.Popen([sys.executable, "-m", "edgefleet", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)




def _stage(db: StateDB, rid: str, name: str):
    rows = [s for s in db.stages(rid) if s.name == name] if _exists(db, rid) else []
    return rows[0] if rows else None


def _exists(db: StateDB, rid: str) -> bool:
    return any(r.id == rid for r in db.rollouts())


def test_pause_resume_status_list_rollback_and_abort(tmp_path: Path, broker: Broker,
                                                     fleet_keys: FleetKeys):
    """The one-shot drivers are real processes (an operator's terminal: paused from another
    command, interrupted with Ctrl-C); the commands run against them call the CLI's entry
    point in this process. Bakes are long: each action lands while its rollout bakes, and
    `promote` ends the bake."""
    n = 4
    with floor(tmp_path, broker, fleet_keys, n) as fl:
        env = cli_env(fl)
        v1, v2, v3 = (fl.pubs[k].digest for k in ("v1", "v2", "v3"))
        wait_until(lambda: all((d.link.health.health_summary()["requests"] or 0) > 0
                          for d in fl.sim.devices.values()), 20, "traffic")
        # no controller service: the CLI says so and how to start one; nothing is created
        _one_line_error(cli_here("fleet", "rollout", "start", f"sha256:{v2}", *FAST_FLAGS,
                                 env=env), 1,
                        "no controller is running", "edgefleet fleet controller", "--once")
        assert fl.db.rollouts() == []
        proc = _popen(fl, "fleet", "rollout", "start", f"sha256:{v2}", "--id", "r-one",
                      "--canary", "2", "--waves", "100%", "--bake", "10m", "--once",
                      *FAST_FLAGS)
        wait_until(lambda: (s := _stage(fl.db, "r-one", "canary")) and s.state == "baking", 30,
              "the canary bake")
        r = cli_here("fleet", "rollout", "pause", "r-one", env=env)
        assert r.returncode == 0 and "paused" in r.stdout, r.stderr
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 1 and "paused by an operator (tester)" in err.splitlines()[-1]
        r = cli_here("fleet", "rollout", "status", "r-one", "-o", "json", env=env)
        snap = json.loads(r.stdout)
        assert snap["state"] == "paused" and snap["stage"] == "canary"
        r = cli_here("fleet", "rollout", "status", "r-one", env=env)
        assert "driver  none (nothing to drive while paused)" in r.stdout, r.stdout
        # one rollout per device: the paused one still holds its devices
        _one_line_error(cli_here("fleet", "rollout", "start", f"sha256:{v3}", "--once",
                                 *FAST_FLAGS, env=env), 2,
                        "rollout r-one (paused) already targets 4", "--replace")
        r = cli_here("fleet", "rollout", "resume", "r-one", env=env)  # recorded; no driver
        _one_line_error(r, 1, "no controller is running", "--once")
        r = cli_here("fleet", "rollout", "status", "r-one", env=env)
        assert "driver  NONE: nobody is driving it" in r.stdout, r.stdout
        # recorded as running; drive it from here, and end its bake now (promote)
        r = cli_here("fleet", "rollout", "promote", "r-one", "--once", env=env)
        assert r.returncode == 0, r.stderr
        assert "SUCCEEDED" in r.stdout and "wave-1" in r.stdout
        assert {a for a in fl.actives().values()} == {v2}
        r = cli_here("fleet", "rollout", "list", env=env)
        assert r.returncode == 0 and "r-one" in r.stdout and "succeeded" in r.stdout
        actions = [(a["action"], a["actor"]) for a in fl.db.audit_log("r-one")]
        assert ("start", "tester") in actions and ("request-pause", "tester") in actions
        assert ("resumed", "tester") in actions and ("promote", "tester") in actions
        assert actions[-1][0] == "succeeded"
        # roll a finished rollout back: every device it moved returns to v1
        r = cli_here("fleet", "rollout", "rollback", "r-one", "--once", env=env)
        assert r.returncode == 0 and "ROLLED-BACK" in r.stdout, r.stderr
        assert set(fl.actives().values()) == {v1}
        # Ctrl-C on a one-shot driver pauses the rollout, saying so (issue 14: it stayed
        # `running` with nobody driving it); abort then leaves devices as they are
        proc = _popen(fl, "fleet", "rollout", "start", f"sha256:{v3}", "--id", "r-two",
                      "--canary", "2", "--bake", "10m", "--once", *FAST_FLAGS)
        wait_until(lambda: (s := _stage(fl.db, "r-two", "canary")) and s.state == "baking", 30,
              "the second canary bake")
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=90)
        assert proc.returncode == 130, err
        row = fl.db.rollout("r-two")
        assert row.state == "paused" and "its driver stopped (interrupted)" in row.reason
        assert "interrupted: rollout r-two is paused" in err.splitlines()[-1]
        r = cli_here("fleet", "rollout", "abort", "r-two", env=env)
        assert r.returncode == 0 and "aborted" in r.stdout, r.stderr
        assert sorted(fl.actives().values()).count(v3) == 2
        r = cli_here("fleet", "rollout", "status", env=env)  # the latest
        assert r.returncode == 0 and "r-two" in r.stdout and "ABORTED" in r.stdout


def test_rollout_commands_print_every_output_format(tmp_path: Path, broker: Broker,
                                                    fleet_keys: FleetKeys):
    """`-o` on the rollout commands: write commands print the rollout as one JSON document
    (what `status -o json` shows, plus what was done); read commands json, yaml, wide and
    name; a format a command does not print is a one-line usage error."""
    import yaml

    from fleet.inventory import open_controller
    from tests.fleet.rollout_helpers import plan, start_rollout

    with floor(tmp_path, broker, fleet_keys, 3) as fl:
        env = cli_env(fl)
        v2 = fl.pubs["v2"]
        for fmt, want in (("json", "[]"), ("yaml", "[]"), ("name", ""), ("text", "no rollouts")):
            r = cli_here("fleet", "rollout", "list", "-o", fmt, env=env)
            assert (r.returncode, r.stdout.strip()) == (0, want), (fmt, r.stderr)
        # driven from this terminal: stdout is the rollout where it ended, as JSON
        r = cli("fleet", "rollout", "start", f"sha256:{v2.digest}", "--id", "r-json",
                "--canary", "1", "--waves", "100%", "--once", "-o", "json", *FAST_FLAGS,
                "--bake", "0s", env=env)
        assert r.returncode == 0, r.stderr
        doc = json.loads(r.stdout)
        assert (doc["id"], doc["state"], doc["bundle"]["digest"]) == ("r-json", "succeeded",
                                                                      v2.digest)
        assert [s["done"] for s in doc["stages"]] == [1, 2]
        r = cli_here("fleet", "rollout", "rollback", "r-json", "--once", "-o", "json",
                     env=env)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["state"] == "rolled-back"
        # actions applied here (no driver): the rollout after it, and the message
        with open_controller(fl.mqtt, prefix="edgefleet") as ctl:
            assert ctl.wait_for(lambda c: len(c.devices()) == 3, 30)
            start_rollout(fl, ctl, plan(), "v3", "r-two")
        r = cli_here("fleet", "rollout", "pause", "r-two", "-o", "json", env=env)
        assert r.returncode == 0, r.stderr
        doc = json.loads(r.stdout)
        assert (doc["id"], doc["state"], doc["message"]) == ("r-two", "paused",
                                                            "rollout r-two: paused")
        r = cli_here("fleet", "rollout", "resume", "r-two", "-o", "json", env=env)
        _one_line_error(r, 1, "no controller is running")
        assert json.loads(r.stdout)["state"] == "running"  # recorded; nobody drives it
        # --once with a fleet key devices do not trust: refused before the action applies
        _one_line_error(cli_here("fleet", "rollout", "promote", "r-two", "--once",
                                 "--fleet-key", str(fleet_keys.release_key), env=env), 2,
                        "devices would refuse the commands it signs")
        assert "promote" not in [a["action"] for a in fl.db.audit_log("r-two")]
        r = cli_here("fleet", "rollout", "abort", "r-two", "-o", "json", env=env)
        assert r.returncode == 0 and json.loads(r.stdout)["state"] == "aborted", r.stderr
        _one_line_error(cli_here("fleet", "rollout", "abort", "r-two", "-o", "wide", env=env),
                        2, "--output must be text or json, not 'wide'")
        # read commands
        r = cli_here("fleet", "rollout", "list", "-o", "name", env=env)
        assert r.stdout.split() == ["rollout/r-two", "rollout/r-json"]
        r = cli_here("fleet", "rollout", "list", "-o", "yaml", env=env)
        assert [d["id"] for d in yaml.safe_load(r.stdout)] == ["r-two", "r-json"]
        r = cli_here("fleet", "rollout", "list", "-o", "wide", env=env)
        assert "REASON" in r.stdout.splitlines()[0] and v2.digest in r.stdout
        assert v2.digest not in cli_here("fleet", "rollout", "list", env=env).stdout
        r = cli_here("fleet", "rollout", "status", "r-json", "-o", "name", env=env)
        assert r.stdout == "rollout/r-json\n"
        doc = yaml.safe_load(cli_here("fleet", "rollout", "status", "r-json", "-o", "yaml",
                                      env=env).stdout)
        assert doc["state"] == "rolled-back" and doc["audit"][0]["action"] == "start"
        r = cli_here("fleet", "rollout", "status", "r-json", "-o", "wide", env=env)
        assert f"sha256:{v2.digest}" in r.stdout and f"/sha256/{v2.digest}" in r.stdout
        _one_line_error(cli_here("fleet", "rollout", "status", "-o", "xml", env=env), 2,
                        "--output must be text, wide, json, yaml or name")


def test_controller_refuses_a_fleet_key_not_trusted_for_role_fleet(tmp_path: Path,
                                                                    fleet_keys: FleetKeys):
    """With --keyring, the controller checks its --fleet-key like `rollout start` does: a
    release key is a one-line usage error before it connects or records anything."""
    r = cli("fleet", "controller", "--keyring", str(fleet_keys.keyring), "--fleet-key",
            str(fleet_keys.release_key), "--store", str(tmp_path / "store"), "--metrics-port",
            "0", env={"EDGEFLEET_MQTT_HOST": "127.0.0.1", "EDGEFLEET_MQTT_PORT": str(free_port())})
    _one_line_error(r, 2, "trusted for role 'release', not for 'fleet'",
                    "devices would refuse the commands it signs")
    assert not (tmp_path / "store").exists()


@pytest.fixture(scope="module")
def quiet_floor(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Floor, FleetKeys]]:
    """One floor (6 devices on v1) for the tests that must leave it as they found it: they
    are refused, or dry runs, and each checks that nothing was sent or recorded."""
    root = tmp_path_factory.mktemp("quiet-floor")
    (root / "broker").mkdir()
    broker = Broker(root / "broker").start()
    keys = make_fleet_keys(root)
    try:
        with floor(root, broker, keys, 6) as fl:
            yield fl, keys
    finally:
        broker.stop()


def test_bad_input_is_one_line_with_nothing_sent_and_dry_run_shows_the_plan(
        tmp_path: Path, quiet_floor: tuple[Floor, FleetKeys]):
    """The first case runs the real `edgefleet` process; the rest call its entry point
    (`edgefleet.cli.main`) in this process: the same parsing, checks and one-line errors,
    without an interpreter start per case."""
    fl, _ = quiet_floor
    env = cli_env(fl)
    sniffer = CommandSniffer(fl.mqtt)
    v2 = fl.store.parent / "v2.efb"  # the floor's bundle file (rollout_helpers.bundles)
    published = len(list_published(fl.store))
    start = ["fleet", "rollout", "start"]
    # an unknown bundle, and one that does not verify as a device would
    _one_line_error(cli(*start, str(tmp_path / "nope.efb"), env=env), 2, "nope.efb",
                    "no such file")
    _one_line_error(cli_here(*start, "sha256:" + "0" * 64, env=env), 2,
                    "no published bundle with that SHA-256")
    tampered = tmp_path / "tampered.efb"
    data = bytearray(v2.read_bytes())
    data[700] ^= 0x01
    tampered.write_bytes(bytes(data))
    _one_line_error(cli_here(*start, str(tampered), env=env), 1, "tampered.efb")
    from agent.keys import generate_keypair
    stranger = generate_keypair(tmp_path / "stranger", "release")
    unsigned = make_real_bundle(tmp_path / "stranger.efb", stranger.private_path,
                                sequence=9)
    _one_line_error(cli_here(*start, str(unsigned), env=env), 1, "stranger.efb", "key")
    # a selector that matches nothing; a wave plan that does not end at 100%
    _one_line_error(cli_here(*start, str(v2), "-l", "site=mars", env=env), 2,
                    "selector 'site=mars' matches no device (6 known)")
    _one_line_error(cli_here(*start, str(v2), "--waves", "10%,50%", env=env), 2,
                    "wave plan 10%,50% does not end at 100%")
    _one_line_error(cli_here(*start, str(v2), "--gate", "error_rate<=0.01", "--gate",
                        "error_rate>=0.05", env=env), 2, "contradictory gates",
                    "error_rate<=0.01 and error_rate>=0.05")
    _one_line_error(cli_here(*start, str(v2), "--shadow-gate", "agreement>1.5", env=env), 2,
                    "contradictory shadow gates")
    dead = f"http://127.0.0.1:{free_port()}"
    _one_line_error(cli_here(*start, str(v2), "--prometheus", dead, "--prom-gate",
                        "sum(up) >= 1", env=env), 1, f"Prometheus at {dead}",
                    "does not answer")
    _one_line_error(cli_here(*start, str(v2), env={**env, "EDGEFLEET_ARTIFACT_URL": ""}), 2,
                    "--artifact-url")
    # a rollout id that does not exist
    for cmd in ("status", "pause", "resume", "abort", "rollback"):
        _one_line_error(cli_here("fleet", "rollout", cmd, "r-nope", env=env), 2,
                        "no rollout 'r-nope'")
    assert fl.db.rollouts() == []
    # the dry run: which devices in which stage; nothing sent, nothing stored
    r = cli_here(*start, str(v2), "--dry-run", "--canary", "2", "--waves", "50%,100%", "-o",
            "json", env=env)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert [(s["name"], len(s["devices"])) for s in doc["stages"]] == [
        ("shadow", 2), ("canary", 2), ("wave-1", 1), ("wave-2", 3)]
    assert len({fl.sim.devices[d].link.config.labels["site"]
                for d in doc["stages"][1]["devices"]}) == 2  # spread over sites
    r = cli_here(*start, str(v2), "--dry-run", "--no-shadow", env=env)
    assert r.returncode == 0 and "dry run" in r.stdout and "wave-1" in r.stdout
    sniffer.close()  # waits for its own marker: anything sent before it is in
    assert sniffer.commands == []
    assert fl.db.rollouts() == []
    assert len(list_published(fl.store)) == published


def test_dry_run_checks_url_and_fleet_key_and_marks_devices_already_on_the_bundle(
        tmp_path: Path, quiet_floor: tuple[Floor, FleetKeys]):
    """`rollout start --dry-run` checks what the rollout would trip on (the artifact URL
    serves the bundle's exact size; the fleet key is trusted for role fleet), marks the
    devices already on the bundle and warns that no selector means the whole fleet. A wrong
    --fleet-key is refused in one line before anything is published or sent."""
    from fleet.artifacts import ArtifactServer

    fl, fleet_keys = quiet_floor
    env = cli_env(fl)
    sniffer = CommandSniffer(fl.mqtt)
    start = ["fleet", "rollout", "start"]
    v1, v2 = fl.pubs["v1"], fl.pubs["v2"]  # every device runs v1
    wait_until(lambda: len(fl.sim.actives()) == 6, 30, "the devices' state")
    r = cli_here(*start, f"sha256:{v1.digest}", "--dry-run", "--no-shadow", env=env)
    assert r.returncode == 0, r.stderr
    assert r.stderr == ("warning: no --selector: this rollout targets the whole fleet "
                        "(6 devices)\n")
    assert (f"checked: artifact {fl.artifacts.base_url}/sha256/{v1.digest}: served, "
            f"{v1.size} bytes") in r.stdout
    assert "checked: fleet key " in r.stdout and "trusted for role fleet" in r.stdout
    assert "* already on this bundle (6): " in r.stdout
    site = next(iter(fl.sim.devices.values())).link.config.labels["site"]
    r = cli_here(*start, f"sha256:{v1.digest}", "--dry-run", "-l", f"site={site}", "-o",
                 "json", env=env)
    doc = json.loads(r.stdout)
    assert (r.stderr, doc["warnings"]) == ("", [])
    for s in doc["stages"]:
        assert s["already_on_bundle"] == s["devices"] and s["devices"]
    r = cli_here(*start, str(fl.store.parent / "v2.efb"), "--dry-run", "-o", "json", env=env)
    assert all(s["already_on_bundle"] == [] for s in json.loads(r.stdout)["stages"])
    # a bundle file not published yet: the server must answer; its 404 is expected
    v9 = make_real_bundle(tmp_path / "v9.efb", fleet_keys.release_key, sequence=9)
    r = cli_here(*start, str(v9), "--dry-run", env=env)
    assert r.returncode == 0 and "the bundle is not published yet" in r.stdout, r.stderr
    # an artifact server on another store: not served, or served with another size
    other = ArtifactServer(tmp_path / "other").start()
    try:
        wrong = {**env, "EDGEFLEET_ARTIFACT_URL": other.base_url}
        _one_line_error(cli_here(*start, f"sha256:{v2.digest}", "--dry-run", env=wrong), 1,
                        f"does not serve {other.base_url}/sha256/{v2.digest}: HTTP 404")
        (tmp_path / "other" / "sha256" / v2.digest).write_bytes(b"x" * 10)
        _one_line_error(cli_here(*start, f"sha256:{v2.digest}", "--dry-run", env=wrong), 1,
                        "with 10 Content-Length", f"has {v2.size} bytes")
    finally:
        other.stop()
    # the fleet key: a release key, or one the keyring does not know, is a usage error
    from agent.keys import generate_keypair

    stranger = generate_keypair(tmp_path / "stranger", "x").private_path
    for key, says in ((fleet_keys.release_key, "trusted for role 'release', not for "
                       "'fleet'"), (stranger, "is not in keyring")):
        _one_line_error(cli_here(*start, str(v2.path), "--dry-run", "--fleet-key",
                                 str(key), env=env), 2, f"--fleet-key {key}", says)
    published = len(list_published(fl.store))
    _one_line_error(cli_here(*start, str(v9), "--once", "--fleet-key",
                             str(fleet_keys.release_key), *FAST_FLAGS, env=env), 2,
                    "devices would refuse the commands it signs")
    assert len(list_published(fl.store)) == published  # v9 was not published
    # the gates' Prometheus must answer, as for a real start
    dead = f"http://127.0.0.1:{free_port()}"
    _one_line_error(cli_here(*start, f"sha256:{v2.digest}", "--dry-run", "--prometheus",
                             dead, "--prom-gate", "sum(up) >= 1", env=env), 1,
                    f"Prometheus at {dead}", "does not answer")
    # without a fleet key or a URL, the dry run says what it could not check
    r = cli_here(*start, f"sha256:{v2.digest}", "--dry-run", "-l", f"site={site}",
                 env={**env, "EDGEFLEET_FLEET_KEY": "", "EDGEFLEET_ARTIFACT_URL": ""})
    assert r.returncode == 0 and r.stderr.splitlines() == [
        "warning: no --fleet-key: not checked (rollout start needs one)",
        "warning: no --artifact-url: the download URL is not checked (rollout start "
        "needs one)"], r.stderr
    sniffer.close()
    assert sniffer.commands == [] and fl.db.rollouts() == []
