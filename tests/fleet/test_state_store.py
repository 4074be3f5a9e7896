"""The rollout state store on both backends (a real SQLite file, a real PostgreSQL: see
tests/postgres_support.py): migrations recorded in a version table, leases with epochs that
fence a driver that lost its rollout, ages by the database's clock, controller leases alone or
shared. Two `StateDB` handles on one store stand for two controller processes."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from agent.errors import EdgefleetError
from fleet.controller import Controller, ControllerOptions
from fleet.controller_metrics import MetricsServer
from fleet.driver import RolloutDriver
from fleet.inventory import Device, Inventory
from fleet.rollout import Bundle, NewRollout, Plan, create
from fleet.state import MIGRATIONS, SCHEMA_VERSION, LeaseLost, StateDB
from tests.fleet.rollout_helpers import cli
from tests.postgres_support import Postgres

REPO = Path(__file__).resolve().parents[2]
B = Bundle("ab" * 32, 10, "http://x/sha256/ab", 2, "m", "2")


def _rollout(db: StateDB, rid: str = "r-1", n: int = 4) -> str:
    inv = Inventory(Device.from_state({"device_id": f"{rid}-box-{i}", "online": True,
                                       "health": {"status": "ok"}}) for i in range(n))
    return create(db, Plan(canary="1", waves=(100,), shadow=False),
                  NewRollout(B, inv, "tester", rid))


class _Ctl:
    """The driver's view of the broker, never connected here: only the drivers' and the
    controllers' writes are under test."""
    connected = threading.Event()

    def add_listener(self, fn):
        pass

    def remove_listener(self, fn):
        pass

    def publish(self, cmd, track=False):
        raise AssertionError("nothing is published while disconnected")

    def orphan_events(self):
        return []

    def state(self, device):
        return None

    state_of = state


def test_a_new_store_records_every_migration_once(state_target: str):
    db = StateDB(state_target)
    assert [(m["version"], m["name"]) for m in db.migrations()] == \
        [(v, name) for v, name, _ in MIGRATIONS]
    assert db.migrations()[-1]["version"] == SCHEMA_VERSION
    db.close()
    again = StateDB(state_target)  # opening it again applies nothing
    assert len(again.migrations()) == SCHEMA_VERSION
    # a store migrated by a newer edgefleet is refused, not misread
    with again.tx() as c:
        c.execute("INSERT INTO schema_migrations VALUES (?,?,?)", (99, "future", 0.0))
    again.close()
    with pytest.raises(EdgefleetError, match=f"schema version 99, this controller knows "
                                             f"{SCHEMA_VERSION}"):
        StateDB(state_target)


def test_a_version_2_file_from_before_the_version_table_is_migrated_keeping_its_rollouts(
        tmp_path: Path):
    path = tmp_path / "rollouts.db"
    old = sqlite3.connect(path)
    for _, _, statements in MIGRATIONS[:2]:  # what schema 2 created, and its meta row
        for sql in statements:
            old.execute(sql)
    old.execute("INSERT INTO meta VALUES ('schema', '2')")
    old.execute("INSERT INTO rollouts (id, created, created_by, bundle_digest, bundle_size, "
                "bundle_url, plan, state, updated) VALUES ('r-old', 1, 'me', 'd', 1, 'u', "
                "'{}', 'succeeded', 1)")
    old.commit()
    old.close()
    db = StateDB(path)
    assert [m["version"] for m in db.migrations()] == [1, 2, 3]
    row = db.rollout("r-old")
    assert (row.state, row.epoch) == ("succeeded", 0)
    # a controller from before this change refuses the migrated file (its check reads meta)
    assert db._q("SELECT value FROM meta WHERE key='schema'")[0][0] == str(SCHEMA_VERSION)


def test_columns_a_later_migration_adds_do_not_break_a_running_controller(
        state_db: StateDB):
    rid = _rollout(state_db)
    with state_db.tx() as c:
        for table in ("rollouts", "stages", "steps"):
            c.execute(f"ALTER TABLE {table} ADD COLUMN future TEXT")
    assert state_db.rollout(rid).state == "pending"
    assert len(state_db.steps(rid)) == 4 and state_db.stages(rid)[0].name == "canary"


def test_a_driver_that_lost_its_lease_writes_nothing_more(state_target: str):
    """Two controllers: A drives r-1, stalls (SIGSTOP, a long pause) past its lease; B takes
    it over; A resumes and tries to record a step and an audit record: refused, unchanged."""
    a, b = StateDB(state_target), StateDB(state_target)
    rid = _rollout(a)
    assert a.acquire(rid, "hostA:1:a") is None
    drv = RolloutDriver(a, rid, _Ctl(), "hostA:1:a")
    assert a.acquire(rid, "hostA:1:a") is None and a.rollout(rid).epoch == drv.epoch == 1
    drv._audit("stage", {"stage": "canary"})  # while it holds the lease, it writes
    assert b.acquire(rid, "hostB:2:b") == "hostA:1:a"  # A is live: refused
    assert b.acquire(rid, "hostB:2:b", stale_s=0.0) is None  # A's heartbeat is stale: taken
    assert b.rollout(rid).epoch == 2
    step = next(iter(drv.steps.values()))
    step.status, step.attempts = "sending", 1
    drv._dirty.add((step.device_id, step.step))
    with pytest.raises(LeaseLost, match=r"lease lost: hostA:1:a held it at epoch 1, now "
                                        r"hostB:2:b \(epoch 2\)"):
        drv.flush()
    with pytest.raises(LeaseLost):
        drv._audit("stage-passed", {})
    assert {s.status for s in b.steps(rid)} == {"pending"}
    assert [e["action"] for e in b.audit_log(rid)] == ["start", "stage"]
    assert b.holder(rid) == "hostB:2:b"
    b.release(rid, "hostB:2:b")
    a.release(rid, "hostA:1:a")  # not A's: changes nothing
    assert b.holder(rid) is None and b.rollout(rid).owner is None


def test_lease_ages_come_from_the_database_clock_not_the_host(
        state_target: str, monkeypatch: pytest.MonkeyPatch):
    """A controller host whose clock jumps an hour ahead neither sees a live lease as
    expired nor renews one into the future."""
    db = StateDB(state_target)
    rid = _rollout(db)
    assert db.acquire(rid, "hostA:1:a") is None
    before = db.rollout(rid).heartbeat
    monkeypatch.setattr(time, "time", lambda: before + 3600.0)
    other = StateDB(state_target)
    assert other.acquire(rid, "hostB:2:b") == "hostA:1:a"
    assert other.holder(rid) == "hostA:1:a"
    db.beat("hostA:1:a")
    assert abs(db.rollout(rid).heartbeat - before) < 60  # the database's time, not the host's
    assert abs(other.now() - before) < 60


def test_controllers_alone_or_shared(state_db: StateDB):
    db = state_db
    assert db.take_lease("h:1:a", {"pid": 1}, shared=True) is None
    assert db.take_lease("h:2:b", {"pid": 2}, shared=True) is None  # shared: both run
    assert db.take_lease("h:3:c", {}) in ("h:1:a", "h:2:b")  # alone: refused while they run
    lease = db.lease()
    assert lease["live"] and lease["controllers"] == ["h:1:a", "h:2:b"]
    db.drop_lease("h:1:a")
    db.drop_lease("h:2:b")
    assert db.lease()["owner"] is None
    assert db.take_lease("h:3:c", {}) is None
    assert db.take_lease("h:1:a", {}, shared=True) == "h:3:c"  # nor shared next to one alone
    assert db.lease()["controllers"] == ["h:3:c"]


def test_the_device_install_and_the_fleet_modules_load_without_psycopg(tmp_path: Path):
    """psycopg is the controller extra's: imported only for a PostgreSQL URL."""
    code = ("import sys, pkgutil, importlib, agent, fleet\n"
            "for pkg in (agent, fleet):\n"
            "    for m in pkgutil.iter_modules(pkg.__path__, pkg.__name__ + '.'):\n"
            "        importlib.import_module(m.name)\n"
            "from fleet.state import StateDB\n"
            "StateDB(sys.argv[1])\n"
            "assert 'psycopg' not in sys.modules, 'psycopg imported'\n")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "r.db")], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def test_shared_controllers_each_take_a_share_of_the_rollouts(state_target: str):
    """Two shared controllers (in-process, each with its own connection) and two pending
    rollouts: the first takes one and leaves the other to its idle peer. Only the first
    follows declared rollouts (Git), so a declaration is not applied twice."""
    applied: list[str] = []
    a, b = (Controller(StateDB(state_target), _Ctl(), ControllerOptions(
        shared=True, on_apply=lambda c: applied.append(c.owner))) for _ in range(2))
    a.take_lease()
    b.take_lease()
    for rid in ("r-1", "r-2"):
        _rollout(a.db, rid)
    a.step()
    assert list(a.drivers) == ["r-1"]
    b.step()
    assert list(b.drivers) == ["r-2"]
    first = min((a, b), key=lambda c: (c.started, c.owner))  # the longest-running
    assert applied == [first.owner]  # declared rollouts: followed by one controller only
    assert (a.db.holder("r-1"), a.db.holder("r-2")) == (a.owner, b.owner)
    assert a.db.rollout("r-1").state == "running"
    a.release_all()
    b.release_all()
    assert a.db.lease()["owner"] is None and a.db.holder("r-1") is None


def test_the_state_benchmark_runs(tmp_path: Path):
    """bench/state_bench.py, tiny and on SQLite only (its figures come from real runs)."""
    out = tmp_path / "state.json"
    r = subprocess.run([sys.executable, "bench/state_bench.py", "--devices", "20",
                        "--backends", "sqlite", "--out", str(out)], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    (fig,) = json.loads(out.read_text())["results"]
    assert fig["devices"] == 20 and fig["tx_per_s"] > 0 and fig["snapshot_ms"] > 0


def test_the_cli_takes_a_postgresql_url_and_names_an_unreachable_one_without_its_password(
        postgres: Postgres, tmp_path: Path):
    url = postgres.new_store()
    r = cli("fleet", "rollout", "list", "--db", url, "--store", str(tmp_path))
    assert r.returncode == 0 and r.stdout.strip() == "no rollouts", r.stderr
    assert [m["version"] for m in StateDB(url).migrations()] == [1, 2, 3]  # created it
    r = cli("fleet", "rollout", "list", "--db",
            "postgresql://ops:s3cret@/edgefleet?host=/nonexistent", "--store", str(tmp_path))
    assert r.returncode == 1 and "s3cret" not in r.stderr, r.stderr
    assert r.stderr.startswith("edgefleet: error: rollout database "
                               "postgresql://ops:***@/edgefleet?host=/nonexistent: "), r.stderr


def test_a_controller_outlives_a_dropped_database_connection(postgres: Postgres):
    """The server ends the controller's session (as a PostgreSQL restart or a network cut
    would): that round is lost and /healthz says why; the next connects again and the
    controller drives its rollout on, under the same lease."""
    url = postgres.new_store()
    ctl = Controller(StateDB(url), _Ctl(), ControllerOptions(shared=True))
    ctl.take_lease()
    _rollout(ctl.db)
    ctl.step()
    assert list(ctl.drivers) == ["r-1"]
    epoch = ctl.db.rollout("r-1").epoch
    (pid,) = ctl.db._q("SELECT pg_backend_pid()")[0].values()
    admin = StateDB(url)
    admin._q("SELECT pg_terminate_backend(?)", (pid,))
    ctl._last_scan = 0.0  # a round that reads the store
    ctl.step()
    assert ctl.drivers == {} and ctl.healthy()[1].startswith(
        "state store unreachable: rollout database postgresql://")
    ctl.step()
    assert list(ctl.drivers) == ["r-1"] and ctl.store_error is None
    assert admin.rollout("r-1").epoch == epoch and admin.holder("r-1") == ctl.owner


def test_metrics_answer_while_the_store_is_unreachable(postgres: Postgres):
    """/metrics of a controller whose store cannot be reached says so
    (edgefleet_controller_store_up 0) and shows what the controller holds, its driven
    rollouts; the store-wide families come back with the store."""
    url = postgres.new_store()
    ctl = Controller(StateDB(url), _Ctl(), ControllerOptions(shared=True))
    ctl.take_lease()
    _rollout(ctl.db)
    ctl.step()
    server = MetricsServer(ctl, port=0).start()

    def scrape() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics",
                                    timeout=10) as r:
            return r.read().decode()

    try:
        assert "edgefleet_controller_store_up 1.0" in scrape()
        (pid,) = ctl.db._q("SELECT pg_backend_pid()")[0].values()
        StateDB(url)._q("SELECT pg_terminate_backend(?)", (pid,))
        body = scrape()
        assert "edgefleet_controller_store_up 0.0" in body, body
        assert 'edgefleet_rollout_stage_index{rollout="r-1"}' in body
        assert "edgefleet_rollouts{" not in body
        body = scrape()  # the next read connects again
        assert "edgefleet_controller_store_up 1.0" in body and "edgefleet_rollouts{" in body
    finally:
        server.stop()
