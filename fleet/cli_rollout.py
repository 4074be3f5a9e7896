"""`edgefleet fleet rollout ...`: start a rollout and drive it in the foreground, watch it,
list them, pause, abort, resume or roll one back. The staging, gates and persistence are
`fleet/rollout.py` and `fleet/state.py`; the text shown for a rollout is `fleet/rollout_view.py`.

    edgefleet fleet rollout start model.efb --canary 10 --bake 10m --waves 10%,50%,100% \\
        --keyring keyring --fleet-key keys/fleet.key --artifact-url http://ctl:8080 [--dry-run]
    edgefleet fleet rollout status [ID] [--watch] [-o json]
    edgefleet fleet rollout pause|resume|abort|rollback ID
    edgefleet fleet rollout list

See docs/rollouts.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from agent.errors import EdgefleetError, UsageError
from fleet.cli_options import (
    check_output,
    db_opt,
    existing_db,
    fleet_key_opt,
    load_fleet_key,
    mqtt_config,
    mqtt_opts,
    open_db,
    output_opt,
    parse_duration,
    store_opt,
)
from fleet.rollout_view import (
    dry_run_text,
    progress_key,
    progress_line,
    render_status,
    rollouts_table,
)

rollout_app = typer.Typer(
    help="Roll a bundle out in stages: shadow, canary, waves; gates; pause, resume, rollback.",
    no_args_is_help=True,
)


def _plan_from_flags(plan_file: Path | None, **flags: Any) -> Any:
    from fleet.rollout import Plan, replace_plan

    plan = Plan.load(plan_file) if plan_file else Plan()
    return replace_plan(plan, **flags).validate()


@rollout_app.command("start")
def rollout_start(
    bundle: str = typer.Argument(..., help="A bundle file, or sha256:<digest> of a published "
                                 "one."),
    selector: str = typer.Option(None, "--selector", "-l", help="Which devices (labels)."),
    canary: str = typer.Option(None, "--canary", help="Canary size: a count (10) or a share "
                               "(2%). Default 1."),
    spread: str = typer.Option(None, "--spread", help="Labels the canary and waves are spread "
                               "over (site,tester)."),
    shadow: bool = typer.Option(None, "--shadow/--no-shadow", help="Shadow stage first "
                                "(default on)."),
    shadow_min_dies: int = typer.Option(None, "--shadow-min-dies", help="Dies the candidate "
                                        "must score before any shadow verdict (1000)."),
    shadow_timeout: str = typer.Option(None, "--shadow-timeout", help="Give up waiting for "
                                       "shadow evidence after this (10m): pause."),
    shadow_gate: list[str] = typer.Option(None, "--shadow-gate", help="e.g. agreement>=0.99 "
                                          "(repeatable; replaces that metric's default)."),
    bake: str = typer.Option(None, "--bake", help="Bake time after the canary (5m)."),
    wave_bake: str = typer.Option(None, "--wave-bake", help="Bake time after each wave but "
                                  "the last (default: --bake)."),
    waves: str = typer.Option(None, "--waves", help="Cumulative shares, ending at 100% "
                              "(10%,50%,100%)."),
    max_parallel: int = typer.Option(None, "--max-parallel", help="Devices installing at once "
                                     "(50)."),
    max_failures: str = typer.Option(None, "--max-failures", help="Failure budget per stage: "
                                     "count or share (5%)."),
    on_failure: str = typer.Option(None, "--on-failure", help="pause or rollback (pause)."),
    offline: str = typer.Option(None, "--offline", help="Offline devices: wait (up to "
                                "--offline-wait, then failed) or skip (reported)."),
    offline_wait: str = typer.Option(None, "--offline-wait", help="(10m)"),
    step_timeout: str = typer.Option(None, "--step-timeout", help="A device step with no final "
                                     "answer after this has failed (5m)."),
    health_grace: str = typer.Option(None, "--health-grace", help="After live, time for "
                                     "health to read ok (30s)."),
    gate: list[str] = typer.Option(None, "--gate", help="Bake gate, e.g. error_rate<=0.01 "
                                   "(repeatable; replaces that metric's default)."),
    min_requests: int = typer.Option(None, "--min-requests", help="Requests on the new model "
                                     "before a bake verdict (100)."),
    prometheus: str = typer.Option(None, "--prometheus", help="Prometheus URL for --prom-gate."),
    prom_gate: list[str] = typer.Option(None, "--prom-gate", help="'QUERY <= NUMBER' "
                                        "(repeatable)."),
    measure_interval: str = typer.Option(None, "--measure-interval", help="Gate evaluation "
                                         "interval (2s)."),
    plan_file: Path = typer.Option(None, "--plan", help="Plan as JSON (flags override it)."),
    rollout_id: str = typer.Option(None, "--id", help="Rollout id (default: generated)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan; touch nothing."),
    keyring: Path = typer.Option(..., "--keyring", envvar="EDGEFLEET_KEYRING",
                                 help="The keyring devices trust (to verify the bundle)."),
    fleet_key: Path = fleet_key_opt(),
    artifact_url: str = typer.Option(None, "--artifact-url", envvar="EDGEFLEET_ARTIFACT_URL",
                                     help="Base URL devices download from "
                                     "(serve-artifacts), e.g. http://ctl:8080."),
    store: Path = store_opt(), db: Path = db_opt(), output: str = output_opt(),
    mqtt_host: str = mqtt_opts()["mqtt_host"], mqtt_port: int = mqtt_opts()["mqtt_port"],
    mqtt_ca: Path = mqtt_opts()["mqtt_ca"], mqtt_cert: Path = mqtt_opts()["mqtt_cert"],
    mqtt_key: Path = mqtt_opts()["mqtt_key"], prefix: str = mqtt_opts()["prefix"],
) -> None:
    """Start a rollout and drive it in the foreground (progress on stderr). Exit 0 when every
    stage passed, 1 when it paused, failed or was rolled back (resume with `rollout resume`)."""

    from agent.bundle import verify_bundle
    from agent.keys import Keyring
    from fleet import rollout as R
    from fleet.artifacts import find_published, publish
    from fleet.inventory import Inventory, open_controller
    from fleet.state import actor

    check_output(output)
    plan = _plan_from_flags(
        plan_file, selector=selector, canary=canary,
        spread=tuple(s for s in spread.split(",") if s) if spread is not None else None,
        shadow=shadow, shadow_min_dies=shadow_min_dies,
        shadow_timeout_s=parse_duration(shadow_timeout, "--shadow-timeout"),
        shadow_gates=tuple(shadow_gate or ()) or None, bake_s=parse_duration(bake, "--bake"),
        wave_bake_s=parse_duration(wave_bake, "--wave-bake"), waves=waves,
        max_parallel=max_parallel, max_failures=max_failures, on_failure=on_failure,
        offline=offline, offline_wait_s=parse_duration(offline_wait, "--offline-wait"),
        step_timeout_s=parse_duration(step_timeout, "--step-timeout"),
        health_grace_s=parse_duration(health_grace, "--health-grace"),
        gates=tuple(gate or ()) or None,
        min_requests=min_requests, prometheus=prometheus, prom_gates=tuple(prom_gate or ()) or None,
        measure_interval_s=parse_duration(measure_interval, "--measure-interval"))
    ring = Keyring.load(keyring)
    key = None if dry_run else load_fleet_key(fleet_key)
    if not dry_run and not artifact_url:
        raise UsageError("rollout start needs --artifact-url: the base URL devices download "
                         "bundles from", hint="e.g. --artifact-url http://controller:8080, "
                         "served by: edgefleet fleet serve-artifacts --store STORE")
    # 1. the bundle: verified as a device would, published (content-addressed)
    path = Path(bundle)
    if path.is_file():
        if dry_run:
            m = verify_bundle(path, ring)
            digest, size = _sha256(path), path.stat().st_size
            name, version, seq = m.name, m.version, m.sequence
        else:
            pub = publish(store, path, ring, who=actor())
            digest, size, name, version, seq = (pub.digest, pub.size, pub.name, pub.version,
                                                pub.sequence)
    else:
        pub = find_published(store, bundle)
        verify_bundle(pub.path, ring)  # it may have expired, or its key been revoked, since
        digest, size, name, version, seq = (pub.digest, pub.size, pub.name, pub.version,
                                            pub.sequence)
    url = f"{artifact_url.rstrip('/')}/sha256/{digest}" if artifact_url else ""
    # 2. the gates' Prometheus answers, the artifact server serves the bundle
    if plan.prometheus and not dry_run:
        _check_prometheus(plan)
    if not dry_run:
        _check_artifact(url, size)
    mqtt = mqtt_config(mqtt_host, mqtt_port, mqtt_ca, mqtt_cert, mqtt_key)
    rid = rollout_id or R.new_rollout_id()
    if dry_run:
        with open_controller(mqtt, prefix=prefix) as ctl:
            inv = Inventory.from_states(ctl.devices())
        stages, _ = R.plan_targets(plan, inv)
        _print_dry_run(output, plan, stages, inv, digest, name, version, seq)
        return
    database = open_db(store, db)
    with open_controller(mqtt, fleet_key=key, prefix=prefix,
                         client_id=f"edgefleet-rollout-{rid}") as ctl:
        inv = Inventory.from_states(ctl.devices())
        R.create(database, plan, R.NewRollout(
            R.Bundle(digest, size, url, seq, name, version), inv, actor(), rid))
        snap = R.snapshot(database, rid)
        typer.echo(f"rollout {rid}: {name} {version} (sequence {seq}, sha256:{digest[:12]}) to "
                   f"{snap['devices']} devices in {len(snap['stages'])} stages: "
                   + ", ".join(f"{s['name']} {s['devices']}" for s in snap["stages"]), err=True)
        row = _drive(database, rid, ctl, output)
    _finish_line(database, row, output)


def _sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _check_prometheus(plan: Any) -> None:
    from fleet.prometheus import PrometheusClient, PrometheusError

    client = PrometheusClient(plan.prometheus)
    client.check()
    for g in plan.prom_gate_list:
        q = g.query
        for k in ("rollout", "digest", "version", "model"):
            q = q.replace("{{" + k + "}}", "x")
        try:
            client.query(q)
        except PrometheusError as e:
            raise PrometheusError(f"PromQL gate {g}: {e}") from None


def _check_artifact(url: str, size: int) -> None:
    """HEAD the bundle's URL: devices must be able to download exactly `size` bytes."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"),
                                    timeout=5) as resp:
            length = resp.headers.get("Content-Length")
    except urllib.error.HTTPError as e:
        raise EdgefleetError(f"artifact server does not serve {url}: HTTP {e.code}",
                             hint="is serve-artifacts running on the same --store?") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise EdgefleetError(f"artifact server at {url} does not answer: {reason}",
                             hint="start it: edgefleet fleet serve-artifacts --store STORE")\
            from None
    if length is not None and int(length) != size:
        raise EdgefleetError(f"artifact server serves {url} with {length} bytes, the bundle "
                             f"has {size}")


def _print_dry_run(output: str, plan: Any, stages: Any, inv: Any, digest: str, name: str,
                   version: str, seq: int) -> None:
    import json

    if output == "json":
        typer.echo(json.dumps({
            "dry_run": True, "bundle": {"digest": digest, "name": name, "version": version,
                                        "sequence": seq},
            "plan": plan.to_json(),
            "stages": [{"name": s.name, "kind": s.kind, "devices": list(s.devices)}
                       for s in stages]}, indent=2))
        return
    typer.echo(dry_run_text(plan, stages, inv, digest, name, version, seq))


def _drive(database: Any, rid: str, ctl: Any, output: str) -> Any:
    """Run the engine with a progress display on stderr."""
    import sys

    from fleet.rollout import Engine, EngineOptions
    from fleet.state import actor

    tty = sys.stderr.isatty() and output == "text"
    shown: dict[str, Any] = {"lines": 0, "last": None}

    def progress(snap: dict[str, Any]) -> None:
        if tty:
            text = render_status(snap, bars=True)
            if shown["lines"]:
                sys.stderr.write(f"\x1b[{shown['lines']}F\x1b[J")
            sys.stderr.write(text + "\n")
            sys.stderr.flush()
            shown["lines"] = text.count("\n") + 1
        else:
            key = progress_key(snap)
            if key != shown["last"]:
                shown["last"] = key
                print(progress_line(snap), file=sys.stderr, flush=True)

    engine = Engine(database, rid, ctl, EngineOptions(actor=actor(), progress=progress))
    return engine.run()


def _finish_line(database: Any, row: Any, output: str, ok: str = "succeeded") -> None:
    """Print where the rollout ended; exit 1 (one line on stderr) unless it reached `ok`."""
    import json

    from fleet.rollout import snapshot

    snap = snapshot(database, row.id)
    if output == "json":
        typer.echo(json.dumps(snap, indent=2))
    else:
        typer.echo(render_status(snap))
    if row.state == ok:
        return
    if row.state == "paused":
        raise EdgefleetError(f"rollout {row.id} paused: {row.reason}",
                             hint=f"edgefleet fleet rollout resume {row.id}, or rollback "
                             f"{row.id}")
    raise EdgefleetError(f"rollout {row.id} {row.state}: {row.reason}")


def _resolve_id(database: Any, rid: str | None) -> str:
    if rid:
        database.rollout(rid)  # raises RolloutNotFound (exit 2)
        return rid
    latest = database.latest()
    if latest is None:
        raise UsageError("no rollouts yet", hint="start one: edgefleet fleet rollout start")
    return latest.id


@rollout_app.command("status")
def rollout_status(
    rollout_id: str = typer.Argument(None, help="Rollout id (default: the latest)."),
    watch: bool = typer.Option(False, "--watch", "-w", help="Refresh until it stops."),
    store: Path = store_opt(), db: Path = db_opt(), output: str = output_opt(),
) -> None:
    """Progress per stage, gate verdicts, failed devices, and (json) the audit log."""
    import json
    import sys
    import time

    from fleet.rollout import snapshot
    from fleet.state import PAUSED, TERMINAL

    check_output(output)
    database = existing_db(store, db)
    rid = _resolve_id(database, rollout_id)
    lines = 0
    while True:
        snap = snapshot(database, rid)
        if output == "json":
            snap["audit"] = database.audit_log(rid)
            typer.echo(json.dumps(snap, indent=2))
            return
        text = render_status(snap)
        if watch and lines and sys.stdout.isatty():
            sys.stdout.write(f"\x1b[{lines}F\x1b[J")
        typer.echo(text)
        lines = text.count("\n") + 1
        if not watch or snap["state"] in (*TERMINAL, PAUSED):
            return
        time.sleep(1.0)


@rollout_app.command("list")
def rollout_list(
    store: Path = store_opt(), db: Path = db_opt(), output: str = output_opt(),
    limit: int = typer.Option(50, "--limit", help="Newest first, at most this many."),
) -> None:
    """Rollouts, newest first: who started which bundle when, and where each stands."""
    import json

    check_output(output)
    database = existing_db(store, db)
    rows = database.rollouts(limit)
    if output == "json":
        typer.echo(json.dumps([{
            "id": r.id, "state": r.state, "stage": r.stage, "phase": r.phase,
            "created": r.created, "created_by": r.created_by, "bundle_digest": r.bundle_digest,
            "model": f"{r.model_name} {r.model_version}", "sequence": r.sequence,
            "reason": r.reason, "finished": r.finished} for r in rows], indent=2))
        return
    stage_names = {}
    for r in rows:
        stages = database.stages(r.id)
        stage_names[r.id] = stages[r.stage].name if r.stage < len(stages) else "-"
    typer.echo(rollouts_table(rows, stage_names))


def _request(store: Path, db: Path | None, rid: str, what: str) -> tuple[Any, Any]:
    """Hand `what` to the live driver, if there is one; returns (database, driver or None)."""
    from fleet.state import actor

    database = existing_db(store, db)
    database.rollout(rid)
    holder = database.holder(rid)
    if holder is not None:
        database.request(rid, what, actor())
    return database, holder


def _wait_state(database: Any, rid: str, states: tuple[str, ...], timeout: float) -> Any:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = database.rollout(rid)
        if row.state in states:
            return row
        time.sleep(0.2)
    return database.rollout(rid)


@rollout_app.command("pause")
def rollout_pause(rollout_id: str = typer.Argument(..., help="Rollout id."),
                  store: Path = store_opt(), db: Path = db_opt()) -> None:
    """Stop sending new commands; running device steps finish. Resume with `resume`."""
    from fleet.state import PAUSED, PENDING, RUNNING, actor

    database, holder = _request(store, db, rollout_id, "pause")
    row = database.rollout(rollout_id)
    if row.state == PAUSED:
        typer.echo(f"rollout {rollout_id} is already paused ({row.reason})")
        return
    if row.state not in (RUNNING, PENDING):
        raise EdgefleetError(f"rollout {rollout_id} is {row.state}; only a running rollout "
                             "can be paused")
    if holder is None:
        with database.tx() as c:
            database.update(rollout_id, c, state=PAUSED,
                            reason=f"paused by an operator ({actor()})")
            database.audit(rollout_id, actor(), "paused", {"driver": None}, c)
    else:
        row = _wait_state(database, rollout_id, (PAUSED,), 15)
    typer.echo(f"rollout {rollout_id}: {database.rollout(rollout_id).state}")


@rollout_app.command("abort")
def rollout_abort(rollout_id: str = typer.Argument(..., help="Rollout id."),
                  store: Path = store_opt(), db: Path = db_opt()) -> None:
    """Stop the rollout for good, leaving every device as it is (see `rollback` to undo)."""
    import time

    from fleet.state import ABORTED, TERMINAL, actor

    database, holder = _request(store, db, rollout_id, "abort")
    row = database.rollout(rollout_id)
    if row.state in TERMINAL:
        raise EdgefleetError(f"rollout {rollout_id} is already {row.state}")
    if holder is None:
        with database.tx() as c:
            database.update(rollout_id, c, state=ABORTED, finished=time.time(),
                            reason=f"aborted by an operator ({actor()})")
            database.audit(rollout_id, actor(), "aborted", {"driver": None}, c)
    else:
        _wait_state(database, rollout_id, (ABORTED,), 15)
    typer.echo(f"rollout {rollout_id}: {database.rollout(rollout_id).state}")


def _drive_existing(rollout_id: str, store: Path, db: Path | None, fleet_key: Path | None,
                    output: str, mqtt: Any, prefix: str, prepare: Any,
                    ok: str = "succeeded") -> None:
    database = existing_db(store, db)
    database.rollout(rollout_id)
    key = load_fleet_key(fleet_key)
    holder = database.holder(rollout_id)
    if holder is not None:
        raise EdgefleetError(f"rollout {rollout_id} is being driven by {holder}",
                             hint="pause, abort or roll it back; the driver acts on it")
    from fleet.inventory import open_controller

    with open_controller(mqtt, fleet_key=key, prefix=prefix,
                         client_id=f"edgefleet-rollout-{rollout_id}") as ctl:
        prepare(database)
        row = _drive(database, rollout_id, ctl, output)
    _finish_line(database, row, output, ok)


@rollout_app.command("resume")
def rollout_resume(
    rollout_id: str = typer.Argument(..., help="Rollout id."),
    fleet_key: Path = fleet_key_opt(),
    store: Path = store_opt(), db: Path = db_opt(), output: str = output_opt(),
    mqtt_host: str = mqtt_opts()["mqtt_host"], mqtt_port: int = mqtt_opts()["mqtt_port"],
    mqtt_ca: Path = mqtt_opts()["mqtt_ca"], mqtt_cert: Path = mqtt_opts()["mqtt_cert"],
    mqtt_key: Path = mqtt_opts()["mqtt_key"], prefix: str = mqtt_opts()["prefix"],
) -> None:
    """Continue a paused rollout (failures so far are accepted; a bake starts again), or one
    whose controller died, and drive it to the end in the foreground."""
    from fleet.rollout import resume
    from fleet.state import TERMINAL, actor

    check_output(output)
    database = existing_db(store, db)
    row = database.rollout(rollout_id)
    if row.state in TERMINAL:
        raise EdgefleetError(f"rollout {rollout_id} is already {row.state}; nothing to resume")
    _drive_existing(rollout_id, store, db, fleet_key, output,
                    mqtt_config(mqtt_host, mqtt_port, mqtt_ca, mqtt_cert, mqtt_key), prefix,
                    lambda d: resume(d, rollout_id, actor()))


@rollout_app.command("rollback")
def rollout_rollback(
    rollout_id: str = typer.Argument(..., help="Rollout id."),
    fleet_key: Path = fleet_key_opt(),
    store: Path = store_opt(), db: Path = db_opt(), output: str = output_opt(),
    mqtt_host: str = mqtt_opts()["mqtt_host"], mqtt_port: int = mqtt_opts()["mqtt_port"],
    mqtt_ca: Path = mqtt_opts()["mqtt_ca"], mqtt_cert: Path = mqtt_opts()["mqtt_cert"],
    mqtt_key: Path = mqtt_opts()["mqtt_key"], prefix: str = mqtt_opts()["prefix"],
) -> None:
    """Roll back every device this rollout moved to the new model and stop its shadows (also
    after it succeeded). With a live driver, it does it; otherwise this command does."""
    from fleet.rollout import request_rollback
    from fleet.state import ROLLED_BACK, ROLLING_BACK, actor

    check_output(output)
    database = existing_db(store, db)
    row = database.rollout(rollout_id)
    if row.state == ROLLED_BACK:
        raise EdgefleetError(f"rollout {rollout_id} is already rolled back")
    holder = database.holder(rollout_id)
    if holder is not None and row.state != ROLLING_BACK:
        database.request(rollout_id, "rollback", actor())
        row = _wait_state(database, rollout_id, ("rolled-back", "failed"), 600)
        _finish_line(database, row, output, ok=ROLLED_BACK)
        return
    _drive_existing(rollout_id, store, db, fleet_key, output,
                    mqtt_config(mqtt_host, mqtt_port, mqtt_ca, mqtt_cert, mqtt_key), prefix,
                    lambda d: request_rollback(d, rollout_id, actor()), ok=ROLLED_BACK)
