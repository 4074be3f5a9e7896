"""The fleet tests' fixtures: a real Mosquitto with the project's configuration, an artifact
server, keys and real bundles (defined in tests/broker_fixtures.py)."""

from tests.broker_fixtures import (  # noqa: F401  (fixtures are registered by name)
    artifacts,
    broker,
    fleet_keys,
    pki,
    tls_broker,
)
