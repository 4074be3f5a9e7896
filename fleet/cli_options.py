"""Options and small helpers shared by the `edgefleet fleet ...` commands (`fleet/cli.py`,
`fleet/cli_rollout.py`): the artifact store and rollout database, `--output`, the MQTT link,
the fleet key, durations.

Settings come from flags, then EDGEFLEET_* environment variables, then defaults (the MQTT
ones are the device link's: EDGEFLEET_MQTT_HOST, _PORT, _CA, _CERT, _KEY).

Everything heavier than typer is imported inside the helpers, so `--help` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from agent.errors import UsageError

_STORE_HELP = "Artifact store directory (content-addressed; the rollout database lives here)."


def store_opt(panel: str | None = None) -> Any:
    """`panel` is the --help section the option is listed in (typer's rich_help_panel)."""
    return typer.Option(Path("artifacts"), "--store", envvar="EDGEFLEET_ARTIFACT_STORE",
                        help=_STORE_HELP, rich_help_panel=panel)


def db_opt(panel: str | None = None) -> Any:
    """A SQLite file, or a PostgreSQL URL several controllers can share (fleet/state.py)."""
    return typer.Option(None, "--db", envvar="EDGEFLEET_ROLLOUT_DB",
                        help="Rollout state store: a SQLite file (default: STORE/rollouts.db) "
                        "or a PostgreSQL URL (postgresql://user@host/dbname).",
                        rich_help_panel=panel)


def output_opt(panel: str | None = None) -> Any:
    """`-o text|json` of a write command (agent/cli_output.py)."""
    return typer.Option("text", "--output", "-o", help="text or json.", rich_help_panel=panel)


def fleet_key_opt(panel: str | None = None) -> Any:
    return typer.Option(None, "--fleet-key", envvar="EDGEFLEET_FLEET_KEY",
                        help="Private key that signs commands (its public half is in the "
                        "devices' keyring with role fleet).", rich_help_panel=panel)


def mqtt_opts(panel: str | None = None) -> dict[str, Any]:
    return {
        "mqtt_host": typer.Option(None, "--mqtt-host", envvar="EDGEFLEET_MQTT_HOST",
                                  help="Broker host (localhost).", rich_help_panel=panel),
        "mqtt_port": typer.Option(None, "--mqtt-port", envvar="EDGEFLEET_MQTT_PORT",
                                  help="Broker port (1883).", rich_help_panel=panel),
        "mqtt_ca": typer.Option(None, "--mqtt-ca", envvar="EDGEFLEET_MQTT_CA",
                                help="CA certificate (turns TLS on).", rich_help_panel=panel),
        "mqtt_cert": typer.Option(None, "--mqtt-cert", envvar="EDGEFLEET_MQTT_CERT",
                                  help="The controller's client certificate.",
                                  rich_help_panel=panel),
        "mqtt_key": typer.Option(None, "--mqtt-key", envvar="EDGEFLEET_MQTT_KEY",
                                 help="Its private key.", rich_help_panel=panel),
        "prefix": typer.Option("edgefleet", "--prefix", envvar="EDGEFLEET_TOPIC_PREFIX",
                               help="MQTT topic prefix.", rich_help_panel=panel),
    }


def mqtt_config(mqtt_host: str | None, mqtt_port: int | None, mqtt_ca: Path | None,
                mqtt_cert: Path | None, mqtt_key: Path | None) -> Any:
    """The `mqtt_opts` values as the controller's `MqttConfig`."""
    from agent.link import MqttConfig

    return MqttConfig(host=mqtt_host or "localhost", port=mqtt_port or 1883,
                      ca_file=mqtt_ca, cert_file=mqtt_cert, key_file=mqtt_key,
                      reconnect_min_s=1.0, reconnect_max_s=5.0)


def check_output(output: str) -> None:
    """Refuse an `-o` a write command does not print (only text and json)."""
    from agent.cli_output import WRITE_FORMATS, check

    check(output, WRITE_FORMATS)


def open_db(store: Path, db: str | Path | None) -> Any:
    """The rollout database (`--db`: a file or a PostgreSQL URL, else STORE/rollouts.db),
    created (or migrated) if needed."""
    from fleet.state import DB_NAME, StateDB

    return StateDB(db or Path(store) / DB_NAME)


def existing_db(store: Path, db: str | Path | None) -> Any:
    """The rollout database, which must exist already (commands on past rollouts)."""
    from fleet.state import DB_NAME
    from fleet.state_backend import is_url

    path = db or Path(store) / DB_NAME
    if not is_url(path) and not Path(path).exists():
        raise UsageError(f"no rollout database at {path}",
                         hint="pass --store (or --db) where rollouts were started")
    return open_db(store, db)


def parse_duration(text: str | None, what: str) -> float | None:
    """`90`, `90s`, `5m`, `1h`, `1.5s`, `7d` -> seconds."""
    if text is None:
        return None
    import re

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(ms|s|m|h|d)?\s*", text)
    if not m:
        raise UsageError(f"{what} {text!r}: expected a duration like 30s, 5m or 1h")
    scale = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}[m.group(2)]
    return float(m.group(1)) * scale


def load_fleet_key(fleet_key: Path | None, keyring: Any = None) -> Any:
    """The private key that signs commands; with `keyring` (a loaded `Keyring`), also
    checked to be trusted there for role fleet (`check_fleet_key`)."""
    from agent.keys import load_private_key

    if fleet_key is None:
        raise UsageError("this command sends signed commands and needs the fleet key",
                         hint="pass --fleet-key FILE or set EDGEFLEET_FLEET_KEY")
    key = load_private_key(fleet_key)
    if keyring is not None:
        check_fleet_key(key, fleet_key, keyring)
    return key


def check_fleet_key(key: Any, path: Path, keyring: Any) -> str:
    """Refuse (exit 2) a --fleet-key whose public half the keyring does not trust for role
    fleet: devices would refuse every command it signs, and a rollout would only find out
    when its canary fails. Returns the key id."""
    from agent.keys import KeyringError, key_id

    kid = key_id(key.public_key())
    try:
        keyring.public_key(kid, "fleet")
    except KeyringError as e:
        raise UsageError(f"--fleet-key {path}: {e.message}: devices would refuse the commands "
                         "it signs", hint="pass the fleet key (edgefleet keys list --keyring "
                         f"{keyring.path} shows the roles)") from None
    return kid
