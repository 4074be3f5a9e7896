"""`edgefleet fleet controller`: the long-lived process that drives every rollout
(fleet/controller.py), with `/metrics` and `/healthz` (fleet/controller_metrics.py), and,
optionally, rollouts declared in a Git repository (fleet/apply.py); and `edgefleet fleet
apply -f rollout.yaml`, which records declared rollouts for it.

    edgefleet fleet controller --store artifacts --fleet-key keys/fleet.key \\
        [--metrics-port 9470] [--git-repo URL --git-branch main --git-path rollouts]

It runs until SIGTERM or SIGINT, then releases its rollouts (a restarted controller resumes
them). Shipped as a systemd unit (k3s/host/edgefleet-controller.service) and a Deployment
(k3s/overlays/central/controller.yaml); see docs/operations.md.
"""

from __future__ import annotations

from pathlib import Path

import typer

from fleet.cli_options import (
    db_opt,
    fleet_key_opt,
    load_fleet_key,
    mqtt_config,
    mqtt_opts,
    open_db,
    parse_duration,
    store_opt,
)

CONTROLLER_CLIENT_ID = "edgefleet-controller"


def controller_command(
    fleet_key: Path = fleet_key_opt(),
    store: Path = store_opt(), db: str = db_opt(),
    metrics_host: str = typer.Option("127.0.0.1", "--metrics-host",
                                     envvar="EDGEFLEET_CONTROLLER_METRICS_HOST",
                                     help="Address for /metrics and /healthz."),
    metrics_port: int = typer.Option(9470, "--metrics-port",
                                     envvar="EDGEFLEET_CONTROLLER_METRICS_PORT",
                                     help="Port for /metrics and /healthz (0: any free one, "
                                     "printed)."),
    client_id: str = typer.Option(None, "--client-id",
                                  help="MQTT client id (a persistent session: events sent "
                                  "while it was down arrive when it is back); default "
                                  f"{CONTROLLER_CLIENT_ID}, with --shared "
                                  f"{CONTROLLER_CLIENT_ID}-HOSTNAME (each controller needs "
                                  "its own)."),
    git_repo: str = typer.Option(None, "--git-repo", envvar="EDGEFLEET_GIT_REPO",
                                 help="Follow rollouts declared in this Git repository."),
    git_branch: str = typer.Option("main", "--git-branch", envvar="EDGEFLEET_GIT_BRANCH"),
    git_path: str = typer.Option("rollouts", "--git-path", envvar="EDGEFLEET_GIT_PATH",
                                 help="Directory of rollout YAML documents in the repo."),
    git_interval: str = typer.Option("30s", "--git-interval", help="How often to fetch."),
    shared: bool = typer.Option(False, "--shared", envvar="EDGEFLEET_CONTROLLER_SHARED",
                                help="Run next to other --shared controllers on one "
                                "PostgreSQL state store (--db postgresql://...): each rollout "
                                "is driven by exactly one of them (its lease), and a dead "
                                "one's rollouts are taken over once their leases expire."),
    lease_ttl: str = typer.Option("10s", "--lease-ttl", envvar="EDGEFLEET_LEASE_TTL",
                                  help="How long a silent controller keeps its leases "
                                  "(renewed every second, by the database's clock)."),
    keyring: Path = typer.Option(None, "--keyring", envvar="EDGEFLEET_KEYRING",
                                 help="The keyring devices trust: --fleet-key must be trusted "
                                 "there for role fleet; verifies declared bundles "
                                 "(--git-repo)."),
    artifact_url: str = typer.Option(None, "--artifact-url", envvar="EDGEFLEET_ARTIFACT_URL",
                                     help="Base URL devices download from (--git-repo)."),
    mqtt_host: str = mqtt_opts()["mqtt_host"], mqtt_port: int = mqtt_opts()["mqtt_port"],
    mqtt_ca: Path = mqtt_opts()["mqtt_ca"], mqtt_cert: Path = mqtt_opts()["mqtt_cert"],
    mqtt_key: Path = mqtt_opts()["mqtt_key"], prefix: str = mqtt_opts()["prefix"],
) -> None:
    """Drive every rollout until stopped (SIGTERM): hold the controller lease, apply operator
    requests, resume what was running, serve /metrics and /healthz.

    Examples:

      edgefleet fleet controller --store artifacts --fleet-key keys/fleet.key

      edgefleet fleet controller --fleet-key fleet.key --metrics-host 0.0.0.0 --metrics-port 9470

      edgefleet fleet controller --git-repo https://git/ops.git --git-path rollouts --keyring ring

      edgefleet fleet controller --shared --db postgresql://edgefleet@db.fab/edgefleet
    """
    import signal
    import socket
    import sys
    import threading

    from agent.errors import UsageError
    from agent.keys import Keyring
    from fleet.controller import Controller, ControllerOptions
    from fleet.controller_metrics import MetricsServer
    from fleet.inventory import open_controller
    from fleet.state import actor

    # a fleet key devices do not trust is refused before anything is sent
    key = load_fleet_key(fleet_key, Keyring.load(keyring) if keyring else None)
    ttl = parse_duration(lease_ttl, "--lease-ttl") or 10.0
    if ttl < 3:
        raise UsageError(f"--lease-ttl {lease_ttl}: at least 3s (leases are renewed every "
                         "second)")
    database = open_db(store, db)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    on_apply = None
    if git_repo:
        from fleet.apply import GitFollower

        if not (keyring and artifact_url):
            raise UsageError("--git-repo needs --keyring and --artifact-url (to verify and "
                             "serve the bundles it declares)")
        follower = GitFollower(git_repo, git_branch, git_path, database, store=store,
                               keyring=keyring, artifact_url=artifact_url,
                               interval_s=parse_duration(git_interval, "--git-interval") or 30,
                               workdir=(database.path.parent if database.path
                                        else Path(store)) / "git-follow")
        on_apply = follower.poll
    if client_id is None:
        client_id = f"{CONTROLLER_CLIENT_ID}-{socket.gethostname()}" if shared \
            else CONTROLLER_CLIENT_ID
    mqtt = mqtt_config(mqtt_host, mqtt_port, mqtt_ca, mqtt_cert, mqtt_key)
    with open_controller(mqtt, fleet_key=key, prefix=prefix, client_id=client_id) as ctl:
        loop = Controller(database, ctl, ControllerOptions(actor=f"controller ({actor()})",
                                                           on_apply=on_apply, shared=shared,
                                                           stale_s=ttl))
        loop.take_lease()
        metrics = MetricsServer(loop, metrics_host, metrics_port).start()
        print(f"edgefleet controller {loop.owner}: state store {database.where}"
              f"{' (shared)' if shared else ''}; /metrics and /healthz on "
              f"http://{metrics_host}:{metrics.port}", file=sys.stderr, flush=True)
        try:
            loop.run(stop)
        finally:
            metrics.stop()
    if loop.lost_lease:
        raise SystemExit(1)


def apply_command(
    file: Path = typer.Option(..., "--file", "-f", help="YAML with one or more Rollout "
                              "documents (apiVersion: edgefleet/v1)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print what would change on which "
                                 "devices; touch nothing."),
    keyring: Path = typer.Option(..., "--keyring", envvar="EDGEFLEET_KEYRING",
                                 help="The keyring devices trust (to verify the bundle)."),
    artifact_url: str = typer.Option(..., "--artifact-url", envvar="EDGEFLEET_ARTIFACT_URL",
                                     help="Base URL devices download from."),
    store: Path = store_opt(), db: str = db_opt(),
    output: str = typer.Option("text", "--output", "-o", help="text or json."),
    mqtt_host: str = mqtt_opts()["mqtt_host"], mqtt_port: int = mqtt_opts()["mqtt_port"],
    mqtt_ca: Path = mqtt_opts()["mqtt_ca"], mqtt_cert: Path = mqtt_opts()["mqtt_cert"],
    mqtt_key: Path = mqtt_opts()["mqtt_key"], prefix: str = mqtt_opts()["prefix"],
) -> None:
    """Make the fleet match declared rollouts, idempotently: a new spec starts a rollout
    (superseding the one it replaces), the same spec changes nothing, the previous spec (a
    revert) rolls the latest one back. The controller drives what this records.

    Examples:

      edgefleet fleet apply -f rollout.yaml --keyring keyring --artifact-url http://ctl:8080

      edgefleet fleet apply -f rollouts/fab2.yaml --dry-run

      edgefleet fleet apply -f rollout.yaml -o json
    """
    import dataclasses
    import json

    from agent.errors import UsageError
    from fleet.apply import apply_doc, load_docs, plan_doc, resolve
    from fleet.cli_options import check_output
    from fleet.cli_rollout import _need_controller
    from fleet.inventory import Inventory, open_controller
    from fleet.state import actor

    check_output(output)
    try:
        text = file.read_text()
    except OSError as e:
        raise UsageError(f"{file}: {e.strerror}") from None
    docs = load_docs(text, str(file))
    resolved = [resolve(d, store=store, keyring=keyring, artifact_url=artifact_url,
                        where=str(file)) for d in docs]
    database = open_db(store, db)
    mqtt = mqtt_config(mqtt_host, mqtt_port, mqtt_ca, mqtt_cert, mqtt_key)
    with open_controller(mqtt, prefix=prefix) as ctl:
        inv = Inventory.from_states(ctl.devices())
    if dry_run:
        changes = [plan_doc(database, r, inv) for r in resolved]
    else:
        if any(plan_doc(database, r, inv).action != "unchanged" for r in resolved):
            _need_controller(database, "apply", None)
        changes = [apply_doc(database, r, inv, actor(), f"file:{file}") for r in resolved]
    if output == "json":
        typer.echo(json.dumps([dataclasses.asdict(c) | {"dry_run": dry_run} for c in changes],
                              indent=2))
        return
    for c in changes:
        typer.echo(("(dry run) " if dry_run else "") + c.text())
