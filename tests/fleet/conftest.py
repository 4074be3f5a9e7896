"""The fleet tests' fixtures: a real Mosquitto with the project's configuration, an artifact
server, keys and real bundles (defined in tests/broker_fixtures.py); a real PostgreSQL
(tests/postgres_support.py) and `state_db`, a rollout state store on each backend."""

from collections.abc import Iterator
from typing import Any

import pytest

from tests.broker_fixtures import (  # noqa: F401  (fixtures are registered by name)
    artifacts,
    broker,
    fleet_keys,
    pki,
    tls_broker,
)
from tests.postgres_support import postgres  # noqa: F401  (fixture)


@pytest.fixture(params=["sqlite", "postgresql"])
def state_target(request: pytest.FixtureRequest, tmp_path) -> str:
    """An empty state store: a SQLite file, or a fresh schema of the session's PostgreSQL
    (started only when a test asks for it)."""
    if request.param == "sqlite":
        return str(tmp_path / "rollouts.db")
    return request.getfixturevalue("postgres").new_store()


@pytest.fixture
def state_db(state_target: str) -> Iterator[Any]:
    from fleet.state import StateDB  # here: the aarch64 run (fleet/test_commands) needs none

    db = StateDB(state_target)
    yield db
    db.close()
