"""Where the rollout state lives: the seam between fleet/state.py (one set of SQL statements,
one schema) and the database that runs them.

    backend = open_backend("artifacts/rollouts.db")                   # SQLite, the default
    backend = open_backend("postgresql://ctl@db.fab/edgefleet")       # PostgreSQL (psycopg 3)

Both backends take the same statements, written with `?` placeholders and portable SQL
(`INSERT ... ON CONFLICT`, `RETURNING`), and give rows readable by name and by position. What
differs, each backend states once:

- `ddl(statement)`: the schema's column types (SQLite's REAL and INTEGER keys are PostgreSQL's
  DOUBLE PRECISION and BIGINT/BIGSERIAL, so a float timestamp keeps its microseconds);
- `now_sql`: the database's own clock as seconds since the epoch, which every lease uses: with
  two controller hosts, a host whose clock jumped can neither expire nor renew a lease early;
- `lock_row`: what makes `SELECT ... WHERE id=?` hold the row until the transaction ends
  (`FOR UPDATE` on PostgreSQL; SQLite's `BEGIN IMMEDIATE` already holds the whole file);
- `serialize(c)`: one transaction at a time for the few that read several rows and then write
  (taking the controller lease, migrating): an advisory lock on PostgreSQL;
- `tx(durable=False)`: a transaction whose commit does not wait for the disk (SQLite
  `synchronous=NORMAL` in WAL mode, PostgreSQL `synchronous_commit = off`): after a power cut
  it may be lost, never half applied, and a later durable commit makes it durable too. Only
  for what a crash may forget: the heartbeats (a heartbeat lost makes a lease look older,
  which after a crash it is).

The agent never imports this module; psycopg is imported only when a PostgreSQL URL is given
(it is in the `controller` extra, not the device's install).
"""

from __future__ import annotations

import contextlib
import functools
import re
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

from agent.errors import EdgefleetError, UsageError

__all__ = ["Backend", "PostgresBackend", "SqliteBackend", "StoreUnavailable", "is_url",
           "open_backend"]

POSTGRES_SCHEMES = ("postgresql://", "postgres://")


class Backend(Protocol):
    """What fleet/state.py needs from a database."""

    kind: str        # "sqlite" or "postgresql"
    where: str       # for messages: the file, or the URL without its password
    path: Path | None  # the SQLite file (None for a server)
    now_sql: str
    lock_row: str

    def tx(self, durable: bool = True) -> contextlib.AbstractContextManager[Any]: ...
    def query(self, sql: str, args: Sequence[Any] = ()) -> list[Any]: ...
    def ddl(self, statement: str) -> str: ...
    def serialize(self, c: Any) -> None: ...
    def close(self) -> None: ...


class StoreUnavailable(EdgefleetError):
    """The database server cannot be reached (the connection dropped, the server restarts):
    what was being written was not; the next call connects again."""


def is_url(target: str | Path) -> bool:
    return str(target).startswith(POSTGRES_SCHEMES)


def open_backend(target: str | Path) -> Backend:
    """A PostgreSQL URL (`postgresql://...`) or a SQLite file path."""
    if is_url(target):
        return PostgresBackend(str(target))
    return SqliteBackend(Path(target))


class SqliteBackend:
    """One file, one connection shared by the process's threads (a lock around it); other
    processes on the same host open the same file (SQLite's locking, WAL). Durable:
    `synchronous=FULL`; writers wait up to 10 s for the lock."""

    kind = "sqlite"
    # the clock of the host the file is on, which is the only host that can open it
    now_sql = "((julianday('now') - 2440587.5) * 86400.0)"
    lock_row = ""  # BEGIN IMMEDIATE holds the write lock of the whole file

    def __init__(self, path: Path) -> None:
        self.path: Path | None = Path(path)
        self.where = str(path)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        try:
            self._conn = sqlite3.connect(path, timeout=10.0, isolation_level=None,
                                         check_same_thread=False)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.execute("PRAGMA busy_timeout=10000")
        except sqlite3.DatabaseError as e:
            raise EdgefleetError(f"rollout database {path}: {e}") from None
        self._conn.row_factory = sqlite3.Row
        self._lock = threading.RLock()

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    @contextlib.contextmanager
    def tx(self, durable: bool = True) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE ... COMMIT); not `durable`: committed
        without the fsync (see the module docstring)."""
        with self._lock:
            if not durable:
                self._conn.execute("PRAGMA synchronous=NORMAL")
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    yield self._conn
                except BaseException:
                    self._conn.execute("ROLLBACK")
                    raise
                self._conn.execute("COMMIT")
            finally:
                if not durable:
                    self._conn.execute("PRAGMA synchronous=FULL")

    def query(self, sql: str, args: Sequence[Any] = ()) -> list[Any]:
        with self._lock:
            return self._conn.execute(sql, args).fetchall()

    def ddl(self, statement: str) -> str:
        return statement

    def serialize(self, c: Any) -> None:
        pass  # BEGIN IMMEDIATE: one writer at a time already


class Row(dict):
    """A PostgreSQL row read like sqlite3.Row: by column name and by position."""

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, int):
            return list(self.values())[key]
        return super().__getitem__(key)


def _row_factory(cursor: Any) -> Any:
    names = [c.name for c in cursor.description or ()]

    def make(values: Sequence[Any]) -> Row:
        return Row(zip(names, values, strict=True))
    return make


@functools.lru_cache(maxsize=512)
def _pg_sql(sql: str) -> str:
    """`?` placeholders as psycopg's `%s` (a literal `%`, as in LIKE 'x/%', doubled)."""
    return sql.replace("%", "%%").replace("?", "%s")


class _PgConn:
    """A psycopg connection that takes the statements written for SQLite (see `_pg_sql`)."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn

    def execute(self, sql: str, args: Sequence[Any] = ()) -> Any:
        return self._conn.execute(_pg_sql(sql), tuple(args))

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        rows = list(rows)
        if rows:
            with self._conn.cursor() as cur:
                cur.executemany(_pg_sql(sql), rows)


_PG_TYPES = ((re.compile(r"\bINTEGER PRIMARY KEY AUTOINCREMENT\b"), "BIGSERIAL PRIMARY KEY"),
             (re.compile(r"\bREAL\b"), "DOUBLE PRECISION"),
             (re.compile(r"\bINTEGER\b"), "BIGINT"))


def redact(url: str) -> str:
    """The URL without its password (for messages and `status`)."""
    return re.sub(r"(://[^:/@]*):[^@/]*@", r"\1:***@", url)


class PostgresBackend:
    """A PostgreSQL server (psycopg 3): one connection per process, in autocommit mode with
    explicit transactions, values bound on the client side (the statements are SQLite's, whose
    `? IS NULL` the server could not type). Shared by several controllers on several hosts."""

    kind = "postgresql"
    now_sql = "(EXTRACT(EPOCH FROM clock_timestamp())::float8)"
    lock_row = " FOR UPDATE"
    path = None

    def __init__(self, url: str) -> None:
        try:
            import psycopg
        except ImportError:
            raise UsageError("a PostgreSQL state store needs psycopg",
                             hint="pip install 'edgefleet[controller]'") from None
        self._psycopg, self._url, self.where = psycopg, url, redact(url)
        self._lock = threading.RLock()
        try:
            self._connect()
        except StoreUnavailable as e:
            raise EdgefleetError(str(e)) from None

    def _connect(self) -> None:
        pg = self._psycopg
        try:
            self._raw = pg.connect(self._url, autocommit=True, row_factory=_row_factory,
                                   cursor_factory=pg.ClientCursor,
                                   application_name="edgefleet", connect_timeout=10)
            # a controller stopped (SIGSTOP, a frozen VM) inside a transaction would hold its
            # row locks, and with them its rollouts, past their leases: the server ends that
            # session
            self._raw.execute("SET idle_in_transaction_session_timeout = '10s'")
        except pg.OperationalError as e:
            raise self._unavailable(e) from None
        self._conn = _PgConn(self._raw)

    def _unavailable(self, e: Exception) -> StoreUnavailable:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        return StoreUnavailable(f"rollout database {self.where}: {first}")

    @contextlib.contextmanager
    def _live(self) -> Iterator[None]:
        """Under the lock, on a connection that is up (made again after it dropped); a
        dropped connection in the middle is `StoreUnavailable`."""
        with self._lock:
            if self._raw.closed:
                self._connect()
            try:
                yield
            except self._psycopg.OperationalError as e:
                raise self._unavailable(e) from None

    def close(self) -> None:
        with self._lock:
            self._raw.close()

    @contextlib.contextmanager
    def tx(self, durable: bool = True) -> Iterator[_PgConn]:
        with self._live(), self._raw.transaction():
            if not durable:
                self._conn.execute("SET LOCAL synchronous_commit TO OFF")
            yield self._conn

    def query(self, sql: str, args: Sequence[Any] = ()) -> list[Any]:
        with self._live():
            return self._conn.execute(sql, args).fetchall()

    def ddl(self, statement: str) -> str:
        for pattern, repl in _PG_TYPES:
            statement = pattern.sub(repl, statement)
        return statement

    def serialize(self, c: Any) -> None:
        c.execute("SELECT pg_advisory_xact_lock(7210018)")  # edgefleet's lock number
