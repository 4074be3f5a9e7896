"""A real PostgreSQL (Debian's `postgresql` package) for the tests: one throwaway cluster per
test session (initdb + pg_ctl in a temporary directory, listening on a unix socket only), and a
fresh schema of it per test, so a test starts from an empty store in milliseconds.

    def test_x(postgres):           # the session's server
        url = postgres.new_store()  # postgresql://...&options=-csearch_path=t3: empty

PostgreSQL refuses to run as root, and CI runs as root: then the server runs as the
`postgres` user the package creates (`runuser`), in a directory that user owns.

Without the binaries the tests are skipped, saying so, except under CI (CI=true), where
`make test` installs the package (scripts/system-deps.sh) and a missing server is a failure.
Durability is off for speed (fsync=off): these tests are about behaviour, not power cuts.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

PORT = 5432  # only names the socket file (.s.PGSQL.5432 in our own directory): no TCP


def pg_bindir() -> Path | None:
    """Where initdb and pg_ctl are: on PATH, else Debian's /usr/lib/postgresql/<v>/bin."""
    found = shutil.which("pg_ctl")
    if found and shutil.which("initdb"):
        return Path(found).resolve().parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"),
                      key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    return Path(versions[-1]).parent if versions else None


@dataclass
class Postgres:
    root: Path
    bindir: Path
    run_as: list[str]
    _n: itertools.count = field(default_factory=lambda: itertools.count(1))

    @property
    def socket_dir(self) -> Path:
        return self.root

    def url(self, schema: str | None = None) -> str:
        query = {"host": str(self.socket_dir), "port": str(PORT)}
        if schema:
            query["options"] = f"-csearch_path={schema}"
        return "postgresql://edgefleet@/edgefleet?" + urllib.parse.urlencode(query)

    def new_store(self) -> str:
        """An empty schema of the session's database: the URL of a fresh state store."""
        import psycopg

        schema = f"t{next(self._n)}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE SCHEMA {schema}")
        return self.url(schema)

    def pg(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run([*self.run_as, *args], capture_output=True, text=True,
                              check=check, timeout=120)


class NoPostgres(RuntimeError):
    """The binaries, or a user to run them as, are missing."""


def _run_as() -> tuple[list[str], int | None, int | None]:
    """`runuser -u postgres --` when root (PostgreSQL will not run as root), else nothing."""
    if os.geteuid() != 0:
        return [], None, None
    try:
        user = pwd.getpwnam("postgres")
    except KeyError:
        raise NoPostgres("running as root and there is no `postgres` user to run PostgreSQL "
                         "as (the postgresql package creates it)") from None
    return ["runuser", "-u", "postgres", "--"], user.pw_uid, user.pw_gid


@contextlib.contextmanager
def throwaway_cluster() -> Iterator[Postgres]:
    """initdb, start, `createdb edgefleet`; stopped and deleted on exit. Raises `NoPostgres`
    without the binaries, RuntimeError when the server does not start. Also used by
    bench/state_bench.py."""
    bindir = pg_bindir()
    if bindir is None:
        raise NoPostgres("PostgreSQL binaries (initdb, pg_ctl) not found: apt-get install "
                         "postgresql")
    run_as, uid, gid = _run_as()
    root = Path(tempfile.mkdtemp(prefix="edgefleet-pg-"))  # short: a socket path is <108 bytes
    if uid is not None:
        os.chown(root, uid, gid)  # type: ignore[arg-type]
    pg = Postgres(root, bindir, run_as)
    data, log = root / "data", root / "server.log"
    try:
        pg.pg(str(bindir / "initdb"), "-D", str(data), "-U", "edgefleet", "-A", "trust",
              "-E", "UTF8", "--no-sync", "--no-instructions")
        opts = (f"-k {root} -p {PORT} -c listen_addresses='' -c fsync=off "
                "-c synchronous_commit=off -c full_page_writes=off")
        started = pg.pg(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", opts,
                        "-w", "-t", "60", "start", check=False)
        if started.returncode != 0:
            text = log.read_text() if log.exists() else ""
            raise RuntimeError(f"PostgreSQL did not start: {started.stderr}\n{text[-2000:]}")
        pg.pg(str(bindir / "createdb"), "-h", str(root), "-p", str(PORT), "-U", "edgefleet",
              "edgefleet")
        yield pg
    finally:
        if (data / "postmaster.pid").exists():
            pg.pg(str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop",
                  check=False)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    try:
        with throwaway_cluster() as pg:
            yield pg
    except NoPostgres as e:
        if os.environ.get("CI"):
            pytest.fail(f"{e} (scripts/system-deps.sh installs the postgresql package; make "
                        "test runs it)", pytrace=False)
        pytest.skip(str(e))
    except RuntimeError as e:
        pytest.fail(str(e), pytrace=False)
