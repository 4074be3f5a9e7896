"""Rollout persistence: every rollout, its stages, each device's steps, and an append-only audit
log, in one SQLite file (by default `<artifact store>/rollouts.db`) or, for fleets that outgrow
one controller host, a PostgreSQL database several controllers share (`--db
postgresql://...`; fleet/state_backend.py is the seam: same statements, same schema).

The engine (fleet/rollout.py) writes the *intent* before it acts: a step is marked `sending`
and committed before its command is published, and its command id is derived from the rollout,
the device and the step (`<rollout>:<device>:<step>`), so a controller killed at any moment and
resumed neither forgets a command nor issues a second, different one for the same step.

Schema (version 3), built by numbered migrations recorded in `schema_migrations` (version,
name, applied), each applied once, in order, in one transaction, when a store is opened; a
store newer than this code is refused (so is an older controller on a newer store, by the
`meta` row `schema`). A file from before the version table (schema 1 or 2) is brought up to
date the same way:

    rollouts  id PK, created, created_by, bundle_digest, bundle_size, bundle_url, model_name,
              model_version, sequence, plan (JSON), state, stage, phase, reason, request
              (`promote`: the driver ends the current bake), owner, heartbeat, epoch (the
              lease of the process driving it, see "Leases"), updated, finished
    stages    (rollout_id, idx) PK, name, kind (shadow | install), devices, state, started,
              deployed, bake_started, finished, failures_accepted, verdict (JSON)
    targets   (rollout_id, device_id) PK, stage, from_digest, from_version, labels (JSON),
              baseline (JSON: the device's summary when the rollout started)
    steps     (rollout_id, device_id, step) PK, command_id UNIQUE, status, result, reason,
              detail, created, sent, finished, attempts
    audit     seq PK, ts, rollout_id, actor, action, detail (JSON)
    requests  seq PK, ts, rollout_id, action (start | pause | resume | abort | rollback |
              promote | retry | supersede), actor, args (JSON), done, result: what operators
              asked of the controller, applied in order by whoever drives the rollout
    leases    name PK (`controller`, or `controller/<owner>` for each of several
              `--shared` controllers), owner (`host:pid:token`), heartbeat, info (JSON): the
              running controller services and when each was last heard from
    declared  (name, seq) PK, rollout_id, spec_hash, spec (JSON), applied, source: each
              version of a declarative rollout (`fleet apply`) and the rollout it became

Leases: a rollout is driven by the process named in its `owner`, which renews `heartbeat`
every second; another process may take it (`acquire`) once the heartbeat is `stale_s` old (or,
on the same host, the owner's pid is gone). Every take increments `epoch`, and every write of a
driver checks, inside its transaction and with the row locked, that owner and epoch are still
its own (`fence`): a controller that was paused (SIGSTOP, a VM migration, a long GC) past its
lease and then resumes finds its rollout taken and writes nothing more. Heartbeats and ages
come from the database's clock (`clock_timestamp()` on PostgreSQL), never from a controller
host's.

SQLite journal: WAL, `synchronous=FULL` (a committed transaction survives a power cut, not only
a killed process), except a controller's once-a-second `heartbeat`, which need not (see
there). Writers wait up to 10 s for the lock (`busy_timeout`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import getpass
import json
import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.errors import EdgefleetError, UsageError
from fleet.machine import STEP_FINAL as _STEP_FINAL
from fleet.machine import TERMINAL as _TERMINAL
from fleet.machine import RolloutState, StepStatus
from fleet.state_backend import Backend, open_backend

SCHEMA_VERSION = 3
DB_NAME = "rollouts.db"

# rollout states and step statuses (the enums of fleet/machine.py, under their old names)
PENDING, RUNNING, PAUSED, ROLLING_BACK = (RolloutState.PENDING, RolloutState.RUNNING,
                                          RolloutState.PAUSED, RolloutState.ROLLING_BACK)
SUCCEEDED, FAILED, ROLLED_BACK, ABORTED = (RolloutState.SUCCEEDED, RolloutState.FAILED,
                                           RolloutState.ROLLED_BACK, RolloutState.ABORTED)
SUPERSEDED = RolloutState.SUPERSEDED
TERMINAL = tuple(s for s in RolloutState if s in _TERMINAL)
S_PENDING, S_SENDING, S_SENT, S_DONE = (StepStatus.PENDING, StepStatus.SENDING,
                                        StepStatus.SENT, StepStatus.DONE)
S_FAILED, S_TIMEOUT, S_SKIPPED = StepStatus.FAILED, StepStatus.TIMEOUT, StepStatus.SKIPPED
STEP_FINAL = tuple(s for s in StepStatus if s in _STEP_FINAL)
STEP_BAD = (S_FAILED, S_TIMEOUT)
CONTROLLER_LEASE = "controller"

__all__ = [
    "LeaseLost",
    "RolloutNotFound",
    "RolloutRow",
    "StageRow",
    "StateDB",
    "StepRow",
    "actor",
]

# (version, what it adds, statements): SQLite's dialect, translated by the backend (`ddl`)
MIGRATIONS: tuple[tuple[int, str, tuple[str, ...]], ...] = (
    (1, "rollouts, stages, targets, steps, audit", (
        "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)",
        """CREATE TABLE IF NOT EXISTS rollouts (
  id TEXT PRIMARY KEY, created REAL NOT NULL, created_by TEXT NOT NULL,
  bundle_digest TEXT NOT NULL, bundle_size INTEGER NOT NULL, bundle_url TEXT NOT NULL,
  model_name TEXT, model_version TEXT, sequence INTEGER,
  plan TEXT NOT NULL, state TEXT NOT NULL, stage INTEGER NOT NULL DEFAULT 0,
  phase TEXT NOT NULL DEFAULT 'deploy', reason TEXT, request TEXT,
  owner TEXT, heartbeat REAL, updated REAL NOT NULL, finished REAL)""",
        """CREATE TABLE IF NOT EXISTS stages (
  rollout_id TEXT NOT NULL, idx INTEGER NOT NULL, name TEXT NOT NULL, kind TEXT NOT NULL,
  devices INTEGER NOT NULL, state TEXT NOT NULL DEFAULT 'pending', started REAL,
  deployed REAL, bake_started REAL, finished REAL, failures_accepted INTEGER NOT NULL DEFAULT 0,
  verdict TEXT, PRIMARY KEY (rollout_id, idx))""",
        """CREATE TABLE IF NOT EXISTS targets (
  rollout_id TEXT NOT NULL, device_id TEXT NOT NULL, stage INTEGER NOT NULL,
  from_digest TEXT, from_version TEXT, labels TEXT, baseline TEXT,
  PRIMARY KEY (rollout_id, device_id))""",
        """CREATE TABLE IF NOT EXISTS steps (
  rollout_id TEXT NOT NULL, device_id TEXT NOT NULL, step TEXT NOT NULL,
  command_id TEXT NOT NULL UNIQUE, status TEXT NOT NULL, result TEXT, reason TEXT,
  detail TEXT, created REAL NOT NULL, sent REAL, finished REAL,
  attempts INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (rollout_id, device_id, step))""",
        """CREATE TABLE IF NOT EXISTS audit (
  seq INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL, rollout_id TEXT,
  actor TEXT NOT NULL, action TEXT NOT NULL, detail TEXT)""",
        "CREATE INDEX IF NOT EXISTS steps_by_status ON steps (rollout_id, status)",
        "CREATE INDEX IF NOT EXISTS audit_by_rollout ON audit (rollout_id, seq)")),
    (2, "operator requests, controller leases, declared rollouts", (
        """CREATE TABLE IF NOT EXISTS requests (
  seq INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL, rollout_id TEXT NOT NULL,
  action TEXT NOT NULL, actor TEXT NOT NULL, args TEXT, done REAL, result TEXT)""",
        """CREATE TABLE IF NOT EXISTS leases (
  name TEXT PRIMARY KEY, owner TEXT, heartbeat REAL, info TEXT)""",
        """CREATE TABLE IF NOT EXISTS declared (
  name TEXT NOT NULL, seq INTEGER NOT NULL, rollout_id TEXT NOT NULL,
  spec_hash TEXT NOT NULL, spec TEXT NOT NULL, applied REAL NOT NULL, source TEXT,
  PRIMARY KEY (name, seq))""",
        "CREATE INDEX IF NOT EXISTS requests_open ON requests (done, seq)")),
    (3, "lease epochs (fencing a driver that lost its rollout)", (
        "ALTER TABLE rollouts ADD COLUMN epoch INTEGER NOT NULL DEFAULT 0",)),
)
assert [m[0] for m in MIGRATIONS] == list(range(1, SCHEMA_VERSION + 1))


class RolloutNotFound(UsageError):
    """No rollout with that id."""


class LeaseLost(EdgefleetError):
    """A driver's write refused: another process took its rollout's lease (`fence`)."""


def actor() -> str:
    """Who is acting: EDGEFLEET_ACTOR, else user@host."""
    env = os.environ.get("EDGEFLEET_ACTOR")
    if env:
        return env
    try:
        user = getpass.getuser()
    except Exception:
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"


@dataclass(frozen=True)
class RolloutRow:
    id: str
    created: float
    created_by: str
    bundle_digest: str
    bundle_size: int
    bundle_url: str
    model_name: str | None
    model_version: str | None
    sequence: int | None
    plan: dict[str, Any]
    state: str
    stage: int
    phase: str
    reason: str | None
    request: str | None
    owner: str | None
    heartbeat: float | None
    updated: float
    finished: float | None
    epoch: int = 0


@dataclass(frozen=True)
class StageRow:
    rollout_id: str
    idx: int
    name: str
    kind: str
    devices: int
    state: str
    started: float | None
    deployed: float | None
    bake_started: float | None
    finished: float | None
    failures_accepted: int
    verdict: dict[str, Any] | None


@dataclass
class StepRow:
    rollout_id: str
    device_id: str
    step: str
    command_id: str
    status: str
    result: str | None
    reason: str | None
    detail: str | None
    created: float
    sent: float | None
    finished: float | None
    attempts: int
    resend_after: float | None = None  # in memory only (fleet/driver.py), never stored


class StateDB:
    """The rollout database, on either backend (fleet/state_backend.py). Thread-safe (one
    connection, one lock); several processes, and with PostgreSQL several hosts, may open the
    same store."""

    def __init__(self, target: str | Path) -> None:
        self.backend: Backend = open_backend(target)
        self.kind = self.backend.kind
        self.path = self.backend.path  # the SQLite file; None for PostgreSQL
        self.where = self.backend.where
        try:
            self._migrate()
        except EdgefleetError:
            self.backend.close()
            raise
        except Exception as e:  # sqlite3.DatabaseError, psycopg.Error: not a usable store
            self.backend.close()
            raise EdgefleetError(f"rollout database {self.where}: {e}") from None
        self._now = self.backend.now_sql

    def _migrate(self) -> None:
        """Apply the migrations this store lacks, in order, in one transaction (another
        process opening the store at the same time waits, then finds them applied)."""
        b = self.backend
        with b.tx() as c:
            b.serialize(c)
            c.execute(b.ddl("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER "
                            "PRIMARY KEY, name TEXT NOT NULL, applied REAL NOT NULL)"))
            done = {int(r[0]) for r in c.execute("SELECT version FROM schema_migrations")}
            if done and max(done) > SCHEMA_VERSION:
                raise EdgefleetError(f"rollout database {self.where}: schema version "
                                     f"{max(done)}, this controller knows {SCHEMA_VERSION}",
                                     hint="upgrade edgefleet on this host")
            for version, name, statements in MIGRATIONS:
                if version in done:
                    continue
                for sql in statements:
                    c.execute(b.ddl(sql))
                c.execute("INSERT INTO schema_migrations VALUES (?,?,?)",
                          (version, name, time.time()))
            # what controllers from before the version table read (they refuse a newer one)
            c.execute("INSERT INTO meta VALUES ('schema', ?) ON CONFLICT (key) DO UPDATE SET "
                      "value=excluded.value", (str(SCHEMA_VERSION),))

    def migrations(self) -> list[dict[str, Any]]:
        """The applied migrations, oldest first: {version, name, applied}."""
        return [dict(r) for r in self._q("SELECT * FROM schema_migrations ORDER BY version")]

    def close(self) -> None:
        self.backend.close()

    def tx(self, durable: bool = True) -> contextlib.AbstractContextManager[Any]:
        """One write transaction: statements with `?` placeholders, rows by name or index
        (`durable=False`: see fleet/state_backend.py)."""
        return self.backend.tx(durable)

    def _q(self, sql: str, args: Sequence[Any] = ()) -> list[Any]:
        return self.backend.query(sql, args)

    def now(self) -> float:
        """The database's clock (seconds since the epoch): what leases are measured by."""
        return float(self._q(f"SELECT {self._now} AS now")[0][0])

    # -- rollouts -----------------------------------------------------------------------------

    def create(self, *, id: str, created_by: str, bundle_digest: str, bundle_size: int,
               bundle_url: str, model_name: str, model_version: str, sequence: int,
               plan: dict[str, Any], stages: Sequence[tuple[str, str, int]],
               targets: Sequence[dict[str, Any]], steps: Sequence[tuple[str, str, str]]
               ) -> None:
        """Insert a rollout with its stages (name, kind, devices), targets and pending steps
        (device, step, command id), and the audit record of its start, in one transaction."""
        now = time.time()
        with self.tx() as c:
            if c.execute("SELECT 1 FROM rollouts WHERE id=?", (id,)).fetchone():
                raise UsageError(f"rollout {id} already exists", hint="choose another --id")
            c.execute("INSERT INTO rollouts (id, created, created_by, bundle_digest, bundle_size,"
                      " bundle_url, model_name, model_version, sequence, plan, state, updated)"
                      " VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                      (id, now, created_by, bundle_digest, bundle_size, bundle_url, model_name,
                       model_version, sequence, json.dumps(plan), PENDING, now))
            c.executemany("INSERT INTO stages (rollout_id, idx, name, kind, devices) "
                          "VALUES (?,?,?,?,?)",
                          [(id, i, n, k, d) for i, (n, k, d) in enumerate(stages)])
            c.executemany("INSERT INTO targets VALUES (?,?,?,?,?,?,?)",
                          [(id, t["device_id"], t["stage"], t.get("from_digest"),
                            t.get("from_version"), json.dumps(t.get("labels") or {}),
                            json.dumps(t.get("baseline") or {})) for t in targets])
            c.executemany("INSERT INTO steps (rollout_id, device_id, step, command_id, status,"
                          " created) VALUES (?,?,?,?,?,?)",
                          [(id, d, s, cid, S_PENDING, now) for d, s, cid in steps])
            self._audit(c, id, created_by, "start", {
                "bundle_digest": bundle_digest, "model": f"{model_name} {model_version}",
                "sequence": sequence, "devices": len(targets), "plan": plan})

    def rollout(self, rid: str) -> RolloutRow:
        rows = self._q("SELECT * FROM rollouts WHERE id=?", (rid,))
        if not rows:
            raise RolloutNotFound(f"no rollout {rid!r} in {self.where}",
                                  hint="see: edgefleet fleet rollout list")
        return _rollout(rows[0])

    def rollouts(self, limit: int = 50) -> list[RolloutRow]:
        return [_rollout(r) for r in
                self._q("SELECT * FROM rollouts ORDER BY created DESC LIMIT ?", (limit,))]

    def active(self) -> list[RolloutRow]:
        """Every rollout not in a final state, oldest first."""
        marks = ",".join("?" * len(TERMINAL))
        return [_rollout(r) for r in self._q(
            f"SELECT * FROM rollouts WHERE state NOT IN ({marks}) ORDER BY created",
            tuple(str(t) for t in TERMINAL))]

    def state_counts(self) -> dict[str, int]:
        """Rollouts per state."""
        return {r["state"]: r["n"] for r in
                self._q("SELECT state, COUNT(*) AS n FROM rollouts GROUP BY state")}

    def target_ids(self, rid: str) -> list[str]:
        return [r["device_id"] for r in
                self._q("SELECT device_id FROM targets WHERE rollout_id=?", (rid,))]

    def latest(self) -> RolloutRow | None:
        rows = self.rollouts(1)
        return rows[0] if rows else None

    def update(self, rid: str, c: Any = None, **fields: Any) -> None:
        fields["updated"] = time.time()
        sql = "UPDATE rollouts SET " + ", ".join(f"{k}=?" for k in fields) + " WHERE id=?"
        if c is not None:
            c.execute(sql, (*fields.values(), rid))
        else:
            with self.tx() as conn:
                conn.execute(sql, (*fields.values(), rid))

    # -- a rollout's lease (see "Leases" above) ---------------------------------------------

    def acquire(self, rid: str, owner: str, *, stale_s: float = 10.0) -> str | None:
        """Take the lease on a rollout unless a live process holds it (a new epoch unless
        `owner` held it already); returns the holder that refused us, or None when we hold it
        now."""
        with self.tx() as c:
            row = c.execute(f"SELECT owner, {self._now} - heartbeat AS age FROM rollouts "
                            f"WHERE id=?{self.backend.lock_row}", (rid,)).fetchone()
            if row is None:
                raise RolloutNotFound(f"no rollout {rid!r} in {self.where}")
            holder = row["owner"]
            if holder and holder != owner and _live(holder, row["age"], stale_s):
                return str(holder)
            c.execute(f"UPDATE rollouts SET owner=?, heartbeat={self._now}, epoch=epoch+? "
                      "WHERE id=?", (owner, int(holder != owner), rid))
        return None

    def fence(self, c: Any, rid: str, owner: str, epoch: int) -> None:
        """Inside a driver's write transaction: raise `LeaseLost` unless `owner` still holds
        `rid` at `epoch` (the row stays locked until the transaction ends, so no other
        process can take the lease between this check and the writes)."""
        row = c.execute(f"SELECT owner, epoch FROM rollouts WHERE id=?{self.backend.lock_row}",
                        (rid,)).fetchone()
        if row is None or row["owner"] != owner or int(row["epoch"]) != epoch:
            now = f"{row['owner']} (epoch {row['epoch']})" if row and row["owner"] else "nobody"
            raise LeaseLost(f"rollout {rid}: lease lost: {owner} held it at epoch {epoch}, "
                            f"now {now}")

    def beat(self, owner: str) -> None:
        """Renew the lease of every rollout `owner` drives."""
        with self.tx() as c:
            c.execute(f"UPDATE rollouts SET heartbeat={self._now} WHERE owner=?", (owner,))

    def release(self, rid: str, owner: str) -> None:
        with self.tx() as c:
            c.execute("UPDATE rollouts SET owner=NULL, heartbeat=NULL WHERE id=? AND owner=?",
                      (rid, owner))

    def holder(self, rid: str, stale_s: float = 10.0) -> str | None:
        """The live process driving `rid`, if any."""
        rows = self._q(f"SELECT owner, {self._now} - heartbeat AS age FROM rollouts WHERE id=?",
                       (rid,))
        if not rows:
            raise RolloutNotFound(f"no rollout {rid!r} in {self.where}",
                                  hint="see: edgefleet fleet rollout list")
        owner = rows[0]["owner"]
        return str(owner) if owner and _live(owner, rows[0]["age"], stale_s) else None

    # -- operator requests (for whoever drives the rollout) -----------------------------

    def add_request(self, rid: str, action: str, who: str, args: dict | None = None,
                    c: Any = None) -> int:
        """Queue an operator request; returns its sequence number (see `request_result`)."""
        def put(conn: Any) -> int:
            seq = conn.execute("INSERT INTO requests (ts, rollout_id, action, actor, args) "
                               "VALUES (?,?,?,?,?) RETURNING seq",
                               (time.time(), rid, action, who, json.dumps(args or {}))
                               ).fetchone()[0]
            self._audit(conn, rid, who, f"request-{action}", args or {})
            return int(seq)

        if c is not None:
            return put(c)
        with self.tx() as conn:
            return put(conn)

    def open_requests(self, rid: str | None = None) -> list[dict[str, Any]]:
        rows = self._q("SELECT * FROM requests WHERE done IS NULL AND (? IS NULL OR "
                       "rollout_id=?) ORDER BY seq", (rid, rid))
        return [{**dict(r), "args": json.loads(r["args"] or "{}")} for r in rows]

    def close_request(self, seq: int, result: str, c: Any) -> None:
        c.execute("UPDATE requests SET done=?, result=? WHERE seq=?", (time.time(), result, seq))

    def request_result(self, seq: int) -> str | None:
        rows = self._q("SELECT result FROM requests WHERE seq=? AND done IS NOT NULL", (seq,))
        return rows[0]["result"] if rows else None

    # -- the controllers' leases ------------------------------------------------------------

    def take_lease(self, owner: str, info: dict[str, Any], *, stale_s: float = 10.0,
                   shared: bool = False) -> str | None:
        """Take (or renew) a controller lease; returns the live holder that refuses us, or
        None when `owner` holds it now. Alone (the default) it is the one `controller` lease,
        refused while any other controller is live; `shared`, it is `controller/<owner>`,
        refused only while a controller runs alone."""
        with self.tx() as c:
            return self._take_lease(c, owner, info, stale_s, shared)

    def _take_lease(self, c: Any, owner: str, info: dict[str, Any], stale_s: float,
                    shared: bool) -> str | None:
        name = f"{CONTROLLER_LEASE}/{owner}" if shared else CONTROLLER_LEASE
        self.backend.serialize(c)
        for r in c.execute(f"SELECT name, owner, {self._now} - heartbeat AS age FROM leases "
                           "WHERE name=? OR name LIKE ?",
                           (CONTROLLER_LEASE, CONTROLLER_LEASE + "/%")).fetchall():
            if r["owner"] and r["owner"] != owner and _live(r["owner"], r["age"], stale_s) \
                    and (not shared or r["name"] == CONTROLLER_LEASE):
                return str(r["owner"])
        c.execute(f"INSERT INTO leases (name, owner, heartbeat, info) VALUES (?,?,"
                  f"{self._now},?) ON CONFLICT (name) DO UPDATE SET owner=excluded.owner, "
                  "heartbeat=excluded.heartbeat, info=excluded.info",
                  (name, owner, json.dumps(info)))
        return None

    def heartbeat(self, owner: str, info: dict[str, Any] | None, *, stale_s: float = 10.0,
                  shared: bool = False) -> tuple[str | None, dict[str, int]]:
        """A controller's heartbeat, one transaction: renew its controller lease (`info`;
        None: a one-shot run, which holds none) and the lease of every rollout it drives.
        Returns (the live controller that refused the lease, else None; rollout id -> epoch
        of every rollout `owner` holds now, for the caller to find the ones taken from it).
        Not durable (`tx(durable=False)`): a heartbeat a power cut forgets makes the leases
        look older, which after a power cut they are; taking a lease (`take_lease`,
        `acquire`) and every fenced write stay durable."""
        with self.tx(durable=False) as c:
            if info is not None:
                holder = self._take_lease(c, owner, info, stale_s, shared)
                if holder is not None:
                    return holder, {}
            c.execute(f"UPDATE rollouts SET heartbeat={self._now} WHERE owner=?", (owner,))
            held = c.execute("SELECT id, epoch FROM rollouts WHERE owner=?",
                             (owner,)).fetchall()
        return None, {r["id"]: int(r["epoch"]) for r in held}

    def drop_lease(self, owner: str) -> None:
        with self.tx() as c:
            c.execute("UPDATE leases SET owner=NULL WHERE name=? AND owner=?",
                      (CONTROLLER_LEASE, owner))
            c.execute("DELETE FROM leases WHERE name=?", (f"{CONTROLLER_LEASE}/{owner}",))

    def controllers(self, stale_s: float = 10.0) -> dict[str, dict[str, Any]]:
        """owner -> info (pid, host, started, rollouts) of every live controller."""
        return {r["owner"]: json.loads(r["info"] or "{}") for r in self._q(
            f"SELECT owner, info, {self._now} - heartbeat AS age FROM leases "
            "WHERE name=? OR name LIKE ?", (CONTROLLER_LEASE, CONTROLLER_LEASE + "/%"))
            if r["owner"] and _live(r["owner"], r["age"], stale_s)}

    def lease(self, stale_s: float = 10.0) -> dict[str, Any]:
        """{owner, heartbeat, age_s, info, live, controllers}: the controller last heard from
        (a live one first), whether it is alive, and every live controller's owner."""
        rows = [{**dict(r), "live": bool(r["owner"] and _live(r["owner"], r["age"], stale_s))}
                for r in self._q(f"SELECT owner, heartbeat, info, {self._now} - heartbeat AS age "
                                 "FROM leases WHERE name=? OR name LIKE ?",
                                 (CONTROLLER_LEASE, CONTROLLER_LEASE + "/%"))]
        rows.sort(key=lambda r: (not r["live"], not r["owner"], r["age"] is None,
                                 r["age"] or 0.0))
        if not rows:
            return {"owner": None, "heartbeat": None, "age_s": None, "info": {},
                    "live": False, "controllers": []}
        r = rows[0]
        return {"owner": r["owner"], "heartbeat": r["heartbeat"], "age_s": r["age"],
                "info": json.loads(r["info"] or "{}"), "live": r["live"],
                "controllers": sorted(x["owner"] for x in rows if x["live"])}

    # -- declarative rollouts ----------------------------------------------------------------

    def declared(self, name: str) -> list[dict[str, Any]]:
        """Every applied version of declarative rollout `name`, oldest first."""
        rows = self._q("SELECT * FROM declared WHERE name=? ORDER BY seq", (name,))
        return [{**dict(r), "spec": json.loads(r["spec"])} for r in rows]

    def declared_names(self) -> list[str]:
        return [r["name"] for r in self._q("SELECT DISTINCT name FROM declared ORDER BY name")]

    def declare(self, name: str, rid: str, spec_hash: str, spec: dict[str, Any],
                source: str | None, c: Any) -> None:
        seq = c.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM declared WHERE name=?",
                        (name,)).fetchone()[0]
        c.execute("INSERT INTO declared VALUES (?,?,?,?,?,?,?)",
                  (name, seq, rid, spec_hash, json.dumps(spec), time.time(), source))

    # -- stages, targets, steps ------------------------------------------------------------

    def stages(self, rid: str) -> list[StageRow]:
        return [_stage(r) for r in
                self._q("SELECT * FROM stages WHERE rollout_id=? ORDER BY idx", (rid,))]

    def update_stage(self, rid: str, idx: int, c: Any, **fields: Any) -> None:
        if "verdict" in fields and fields["verdict"] is not None:
            fields["verdict"] = json.dumps(fields["verdict"])
        c.execute("UPDATE stages SET " + ", ".join(f"{k}=?" for k in fields)
                  + " WHERE rollout_id=? AND idx=?", (*fields.values(), rid, idx))

    def targets(self, rid: str) -> list[dict[str, Any]]:
        out = []
        for r in self._q("SELECT * FROM targets WHERE rollout_id=? ORDER BY stage, device_id",
                         (rid,)):
            d = dict(r)
            d["labels"] = json.loads(d["labels"] or "{}")
            d["baseline"] = json.loads(d["baseline"] or "{}")
            out.append(d)
        return out

    def steps(self, rid: str) -> list[StepRow]:
        return [StepRow(**_known(StepRow, dict(r))) for r in
                self._q("SELECT * FROM steps WHERE rollout_id=? ORDER BY device_id, step",
                        (rid,))]

    def add_steps(self, rid: str, steps: Sequence[tuple[str, str, str]],
                  c: Any) -> list[StepRow]:
        """Add pending steps (device, step, command id) that are not there yet; returns them
        as rows, as stored (the caller adds only steps it knows are not there)."""
        now = time.time()
        c.executemany("INSERT INTO steps (rollout_id, device_id, step, command_id, status, "
                      "created) VALUES (?,?,?,?,?,?) ON CONFLICT DO NOTHING",
                      [(rid, d, s, cid, S_PENDING, now) for d, s, cid in steps])
        return [StepRow(rid, d, s, cid, S_PENDING, None, None, None, now, None, None, 0)
                for d, s, cid in steps]

    def save_steps(self, rows: Sequence[StepRow], c: Any) -> None:
        c.executemany("UPDATE steps SET status=?, result=?, reason=?, detail=?, sent=?, "
                      "finished=?, attempts=? WHERE rollout_id=? AND device_id=? AND step=?",
                      [(s.status, s.result, s.reason, s.detail, s.sent, s.finished, s.attempts,
                        s.rollout_id, s.device_id, s.step) for s in rows])

    # -- audit ---------------------------------------------------------------------------------

    def _audit(self, c: Any, rid: str | None, who: str, action: str,
               detail: dict[str, Any]) -> None:
        c.execute("INSERT INTO audit (ts, rollout_id, actor, action, detail) VALUES (?,?,?,?,?)",
                  (time.time(), rid, who, action, json.dumps(detail, default=str)))

    def audit(self, rid: str | None, who: str, action: str, detail: dict[str, Any] | None = None,
              c: Any = None) -> None:
        if c is not None:
            self._audit(c, rid, who, action, detail or {})
        else:
            with self.tx() as conn:
                self._audit(conn, rid, who, action, detail or {})

    def audit_log(self, rid: str | None = None, limit: int = 1000) -> list[dict[str, Any]]:
        rows = self._q("SELECT * FROM audit WHERE (? IS NULL OR rollout_id=?) ORDER BY seq "
                       "DESC LIMIT ?", (rid, rid, limit))
        out = []
        for r in reversed(rows):
            d = dict(r)
            d["detail"] = json.loads(d["detail"] or "{}")
            out.append(d)
        return out


def _live(owner: str, age: float | None, stale_s: float) -> bool:
    """A lease holder heard from less than `stale_s` ago (by the database's clock) whose
    process, if on this host, still runs."""
    return age is not None and age < stale_s and _alive(owner)


def _alive(owner: str) -> bool:
    """Is the process named by an owner string `host:pid:token` alive? (Other hosts: assume
    yes; the heartbeat decides.)"""
    try:
        host, pid, _ = owner.split(":", 2)
    except ValueError:
        return True
    if host != socket.gethostname():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError):
        return True
    return _not_zombie(int(pid))


def _not_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _known(cls: type, row: dict[str, Any]) -> dict[str, Any]:
    """The columns `cls` has: a column a later migration adds does not break this version
    while it still runs on the migrated store."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in row.items() if k in names}


def _rollout(r: Any) -> RolloutRow:
    d = dict(r)
    d["plan"] = json.loads(d["plan"])
    return RolloutRow(**_known(RolloutRow, d))


def _stage(r: Any) -> StageRow:
    d = dict(r)
    d["verdict"] = json.loads(d["verdict"]) if d["verdict"] else None
    return StageRow(**_known(StageRow, d))
