"""`edgefleet fleet rollout ...`: start rollouts and act on them; the controller service
(`edgefleet fleet controller`, fleet/controller.py) drives them. Every action is a request
in the state store that the process driving the rollout applies (fleet/actions.py); without a
running controller the commands say so, and `--once` drives the rollout from this terminal
(scripts, the demo). The staging, gates and persistence are fleet/plan.py, fleet/decide.py,
fleet/driver.py and fleet/state.py; the text shown for a rollout is fleet/rollout_view.py.

    edgefleet fleet rollout start model.efb --canary 10 --bake 10m --waves 10%,50%,100% \\
        --keyring keyring --artifact-url http://ctl:8080 [--replace] [--follow | --once]
    edgefleet fleet rollout status [ID] [--watch] [-o json]
    edgefleet fleet rollout pause|resume|abort|rollback|promote|retry ID [--follow | --once]
    edgefleet fleet rollout list

See docs/rollouts.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from agent.cli_output import check, emit, read_output
from agent.errors import EdgefleetError, UsageError
from fleet.cli_options import (
    check_fleet_key,
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
    help="Roll a bundle out in stages (shadow, canary, waves, gates); pause, resume, abort, "
         "rollback, promote, retry. The controller (`edgefleet fleet controller`) drives them.",
    no_args_is_help=True,
)


def _plan_from_flags(plan_file: Path | None, **flags: Any) -> Any:
    from fleet.rollout import Plan, replace_plan

    plan = Plan.load(plan_file) if plan_file else Plan()
    return replace_plan(plan, **flags).validate()


# `rollout start --help` in sections, not one block of 40 options
SELECTION, STAGES, GATES, TIMING = "Selection", "Stages", "Gates", "Timing"
BUNDLE, CONNECTION, RUN = "Bundle and keys", "Connection", "Run and output"


@rollout_app.command("start")
def rollout_start(
    bundle: str = typer.Argument(..., help="A bundle file, or sha256:<digest> of a published "
                                 "one."),
    selector: str = typer.Option(None, "--selector", "-l", help="Which devices (labels); "
                                 "none: the whole fleet.", rich_help_panel=SELECTION),
    exclude: str = typer.Option(None, "--exclude", help="Device ids the selector matches but "
                                "this rollout leaves alone (comma-separated).",
                                rich_help_panel=SELECTION),
    spread: str = typer.Option(None, "--spread", help="Labels the canary and waves are spread "
                               "over (site,tester).", rich_help_panel=SELECTION),
    replace: bool = typer.Option(False, "--replace", help="Supersede a non-final rollout "
                                 "that targets any of the same devices (else refused).",
                                 rich_help_panel=SELECTION),
    shadow: bool = typer.Option(None, "--shadow/--no-shadow", help="Shadow stage first "
                                "(default on).", rich_help_panel=STAGES),
    shadow_min_dies: int = typer.Option(None, "--shadow-min-dies", help="Dies the candidate "
                                        "must score before any shadow verdict (1000).",
                                        rich_help_panel=STAGES),
    canary: str = typer.Option(None, "--canary", help="Canary size: a count (10) or a share "
                               "(2%). Default 1.", rich_help_panel=STAGES),
    waves: str = typer.Option(None, "--waves", help="Cumulative shares, ending at 100% "
                              "(10%,50%,100%).", rich_help_panel=STAGES),
    max_parallel: int = typer.Option(None, "--max-parallel", help="Devices installing at once "
                                     "(50).", rich_help_panel=STAGES),
    max_failures: str = typer.Option(None, "--max-failures", help="Failure budget per stage: "
                                     "count or share (5%).", rich_help_panel=STAGES),
    on_failure: str = typer.Option(None, "--on-failure", help="pause or rollback (pause).",
                                   rich_help_panel=STAGES),
    offline: str = typer.Option(None, "--offline", help="Offline devices: wait (up to "
                                "--offline-wait, then failed) or skip (reported).",
                                rich_help_panel=STAGES),
    allow_partial: bool = typer.Option(None, "--allow-partial/--no-allow-partial",
                                       help="Succeed with devices left behind (listed); "
                                       "default: pause naming them.", rich_help_panel=STAGES),
    plan_file: Path = typer.Option(None, "--plan", help="Plan as JSON (flags override it).",
                                   rich_help_panel=STAGES),
    gate: list[str] = typer.Option(None, "--gate", help="Bake gate, e.g. error_rate<=0.01 "
                                   "(repeatable; replaces that metric's default).",
                                   rich_help_panel=GATES),
    shadow_gate: list[str] = typer.Option(None, "--shadow-gate", help="e.g. agreement>=0.99 "
                                          "(repeatable; replaces that metric's default).",
                                          rich_help_panel=GATES),
    min_requests: int = typer.Option(None, "--min-requests", help="Requests on the new model "
                                     "before a bake verdict (100).", rich_help_panel=GATES),
    prometheus: str = typer.Option(None, "--prometheus", help="Prometheus URL for --prom-gate.",
                                   rich_help_panel=GATES),
    prom_gate: list[str] = typer.Option(None, "--prom-gate", help="'QUERY <= NUMBER' "
                                        "(repeatable).", rich_help_panel=GATES),
    label_gate: list[str] = typer.Option(None, "--label-gate", help="Realized label figure "
                                         "of the new bundle, e.g. false_fail_rate<=0.02 or "
                                         "recall>=0.5 (repeatable; needs --prometheus).",
                                         rich_help_panel=GATES),
    label_window: str = typer.Option(None, "--label-window", help="Labels joined over this "
                                     "window count (1d).", rich_help_panel=GATES),
    label_min_good: int = typer.Option(None, "--label-min-good", help="Labelled good dies "
                                       "before a false_fail_rate verdict (200).",
                                       rich_help_panel=GATES),
    label_min_bad: int = typer.Option(None, "--label-min-bad", help="Labelled bad dies before "
                                      "a recall verdict (20).", rich_help_panel=GATES),
    strict_gates: bool = typer.Option(False, "--strict-gates", help="Refuse a --prom-gate "
                                      "whose query returns no series now (default: warn).",
                                      rich_help_panel=GATES),
    bake: str = typer.Option(None, "--bake", help="Bake time after the canary (5m).",
                             rich_help_panel=TIMING),
    wave_bake: str = typer.Option(None, "--wave-bake", help="Bake time after each wave but "
                                  "the last (default: --bake).", rich_help_panel=TIMING),
    shadow_timeout: str = typer.Option(None, "--shadow-timeout", help="Give up waiting for "
                                       "shadow evidence after this (10m): pause.",
                                       rich_help_panel=TIMING),
    offline_wait: str = typer.Option(None, "--offline-wait", help="How long --offline wait "
                                     "waits (10m).", rich_help_panel=TIMING),
    step_timeout: str = typer.Option(None, "--step-timeout", help="A device step with no final "
                                     "answer after this has failed (5m).",
                                     rich_help_panel=TIMING),
    health_grace: str = typer.Option(None, "--health-grace", help="After live, time for "
                                     "health to read ok (30s).", rich_help_panel=TIMING),
    measure_interval: str = typer.Option(None, "--measure-interval", help="Gate evaluation "
                                         "interval (2s).", rich_help_panel=TIMING),
    keyring: Path = typer.Option(..., "--keyring", envvar="EDGEFLEET_KEYRING",
                                 help="The keyring devices trust (to verify the bundle and "
                                 "the fleet key's role).", rich_help_panel=BUNDLE),
    fleet_key: Path = fleet_key_opt(BUNDLE),
    artifact_url: str = typer.Option(None, "--artifact-url", envvar="EDGEFLEET_ARTIFACT_URL",
                                     help="Base URL devices download from "
                                     "(serve-artifacts), e.g. http://ctl:8080.",
                                     rich_help_panel=BUNDLE),
    store: Path = store_opt(BUNDLE), db: str = db_opt(BUNDLE),
    mqtt_host: str = mqtt_opts(CONNECTION)["mqtt_host"],
    mqtt_port: int = mqtt_opts(CONNECTION)["mqtt_port"],
    mqtt_ca: Path = mqtt_opts(CONNECTION)["mqtt_ca"],
    mqtt_cert: Path = mqtt_opts(CONNECTION)["mqtt_cert"],
    mqtt_key: Path = mqtt_opts(CONNECTION)["mqtt_key"],
    prefix: str = mqtt_opts(CONNECTION)["prefix"],
    rollout_id: str = typer.Option(None, "--id", help="Rollout id (default: generated).",
                                   rich_help_panel=RUN),
    dry_run: bool = typer.Option(False, "--dry-run", help="Check the bundle, its URL and the "
                                 "fleet key; print the plan; touch nothing.",
                                 rich_help_panel=RUN),
    follow: bool = typer.Option(False, "--follow", "-f", help="Watch it until it pauses or "
                                "ends (exit 0 only when it succeeded).", rich_help_panel=RUN),
    once: bool = typer.Option(False, "--once", help="No controller service: drive this "
                              "rollout from this process until it pauses or ends (Ctrl-C "
                              "pauses it).", rich_help_panel=RUN),
    output: str = output_opt(RUN),
) -> None:
    """Start a rollout: the controller drives it (`--follow` watches it), or this process
    does (`--once`, progress on stderr). With --follow or --once: exit 0 when it succeeded,
    1 when it paused, failed or was rolled back (the message says what to run next).

    Examples:

      edgefleet fleet rollout start model.efb --keyring keyring --artifact-url http://ctl:8080

      edgefleet fleet rollout start model.efb -l site=fab2 --canary 2% --waves 10%,50%,100% -f

      edgefleet fleet rollout start sha256:3f2a... --bake 10m --gate error_rate<=0.01 --once

      edgefleet fleet rollout start model.efb --dry-run -o json
    """

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
        label_gates=tuple(label_gate or ()) or None,
        label_window_s=parse_duration(label_window, "--label-window"),
        label_min_good=label_min_good, label_min_bad=label_min_bad,
        measure_interval_s=parse_duration(measure_interval, "--measure-interval"),
        allow_partial=allow_partial,
        exclude=tuple(x for x in exclude.split(",") if x) if exclude is not None else None)
    ring = Keyring.load(keyring)
    checks: list[str] = []  # what the dry run checked
    warnings: list[str] = []
    # 0. the fleet key: trusted for role fleet where devices look, before anything is
    # published or sent (else the canary would be the first to refuse its commands)
    key = None
    if fleet_key is None and dry_run:
        warnings.append("no --fleet-key: not checked (rollout start needs one)")
    else:
        key = load_fleet_key(fleet_key)
        kid = check_fleet_key(key, fleet_key, ring)
        checks.append(f"fleet key {kid}: trusted for role fleet in {keyring}")
    if not artifact_url:
        if not dry_run:
            raise UsageError("rollout start needs --artifact-url: the base URL devices "
                             "download bundles from", hint="e.g. --artifact-url "
                             "http://controller:8080, served by: edgefleet fleet "
                             "serve-artifacts --store STORE")
        warnings.append("no --artifact-url: the download URL is not checked (rollout start "
                        "needs one)")
    # 1. the bundle: verified as a device would, published (content-addressed)
    path = Path(bundle)
    published = True
    if path.is_file():
        if dry_run:
            m = verify_bundle(path, ring)
            digest, size = _sha256(path), path.stat().st_size
            name, version, seq = m.name, m.version, m.sequence
            published = _is_published(store, digest)
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
    if plan.prometheus:
        _check_prometheus(plan, strict=strict_gates)
    if url:
        checks.append(_check_artifact(url, size, published=published, store=store))
    mqtt = mqtt_config(mqtt_host, mqtt_port, mqtt_ca, mqtt_cert, mqtt_key)
    rid = rollout_id or R.new_rollout_id()
    if dry_run:
        with open_controller(mqtt, prefix=prefix) as ctl:
            inv = Inventory.from_states(ctl.devices())
        stages, _ = R.plan_targets(plan, inv)
        warnings += _whole_fleet(plan, inv)
        for w in warnings:
            typer.echo(f"warning: {w}", err=True)
        _print_dry_run(output, plan, stages, inv, R.Bundle(digest, size, url, seq, name, version),
                       checks, warnings)
        return
    database = open_db(store, db)
    # --once: this process is the controller (a persistent session, resumed by `resume
    # --once`); else it only reads the fleet (a throw-away session)
    with open_controller(mqtt, fleet_key=key, prefix=prefix,
                         client_id=f"edgefleet-rollout-{rid}" if once else None) as ctl:
        inv = Inventory.from_states(ctl.devices())
        R.plan_targets(plan, inv)  # a selector that matches nothing is refused first
        if not once:
            _need_controller(database, "rollout", "--once")
        elif (lease := database.lease())["live"]:
            raise UsageError(f"a controller ({lease['owner']}) is running: it drives "
                             "rollouts", hint="drop --once (add --follow to watch)")
        R.create(database, plan, R.NewRollout(
            R.Bundle(digest, size, url, seq, name, version), inv, actor(), rid),
            replace=replace)
        snap = R.snapshot(database, rid)
        typer.echo(f"rollout {rid}: {name} {version} (sequence {seq}, sha256:{digest[:12]}) to "
                   f"{snap['devices']} devices in {len(snap['stages'])} stages: "
                   + ", ".join(f"{s['name']} {s['devices']}" for s in snap["stages"]), err=True)
        for w in _whole_fleet(plan, inv):  # after the refusals, which are one line each
            typer.echo(f"warning: {w}", err=True)
        if once:
            row = _drive(database, rid, ctl, output)
            _finish_line(database, row, output)
            return
    if follow:
        _finish_line(database, _follow(database, rid, output), output)
        return
    _written(output, database, rid, f"rollout {rid}: pending; the controller "
             f"{database.lease()['owner']} drives it (watch: edgefleet fleet rollout status "
             f"{rid} --watch)")


def _written(output: str, database: Any, rid: str, message: str) -> None:
    """What a write command did: `message` (text), or the rollout as `status -o json` shows
    it, with the message (json)."""
    from fleet.rollout import snapshot

    emit(output, {**snapshot(database, rid), "message": message}, text=lambda: message)


def _sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _check_prometheus(plan: Any, *, strict: bool = False) -> None:
    """Prometheus answers, every gate query parses, and each returns series (placeholders
    relaxed, fleet/gate_check.py): a gate that cannot match is warned about, or refused."""
    from fleet.gate_check import check_gates_return_series
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
    for warning in check_gates_return_series(client, plan.prom_gate_list, strict=strict):
        typer.echo(f"warning: {warning}", err=True)


def _is_published(store: Path, digest: str) -> bool:
    from fleet.artifacts import find_published

    try:
        find_published(store, digest)
    except EdgefleetError:
        return False
    return True


def _whole_fleet(plan: Any, inv: Any) -> list[str]:
    """The warning a rollout without a selector gets: it is easy to forget `-l`."""
    if plan.selector:
        return []
    return [f"no --selector: this rollout targets the whole fleet ({len(inv)} devices)"]


def _check_artifact(url: str, size: int, *, published: bool = True,
                    store: Path | None = None) -> str:
    """HEAD the bundle's URL: devices must be able to download exactly `size` bytes. A
    bundle file not published yet (a dry run) cannot be served: then the server must answer,
    and its 404 is expected. Returns what was checked."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"),
                                    timeout=5) as resp:
            length = resp.headers.get("Content-Length")
    except urllib.error.HTTPError as e:
        if e.code == 404 and not published:
            return (f"artifact server at {url.rsplit('/sha256/', 1)[0]} answers; the bundle "
                    f"is not published yet (rollout start publishes it to {store})")
        raise EdgefleetError(f"artifact server does not serve {url}: HTTP {e.code}",
                             hint="is serve-artifacts running on the same --store?") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise EdgefleetError(f"artifact server at {url} does not answer: {reason}",
                             hint="start it: edgefleet fleet serve-artifacts --store STORE")\
            from None
    if length is None or int(length) != size:
        raise EdgefleetError(f"artifact server serves {url} with {length or 'no'} "
                             f"Content-Length, the bundle has {size} bytes",
                             hint="is serve-artifacts running on the same --store?")
    return f"artifact {url}: served, {size} bytes"


def _print_dry_run(output: str, plan: Any, stages: Any, inv: Any, b: Any, checks: list[str],
                   warnings: list[str]) -> None:
    """The plan, what was checked, and which targeted devices already run the bundle."""
    already = {d for s in stages for d in s.devices
               if inv.devices[d].model_digest == b.digest}
    emit(output, {
        "dry_run": True, "bundle": {"digest": b.digest, "size": b.size, "url": b.url,
                                    "name": b.name, "version": b.version,
                                    "sequence": b.sequence},
        "plan": plan.to_json(), "checks": checks, "warnings": warnings,
        "stages": [{"name": s.name, "kind": s.kind, "devices": list(s.devices),
                    "already_on_bundle": [d for d in s.devices if d in already]}
                   for s in stages]},
        text=lambda: dry_run_text(plan, stages, inv, b, checks, already))


def _need_controller(database: Any, what: str, once_flag: str | None) -> None:
    """Refuse (exit 1) when no controller service is running to act on `what`."""
    if database.lease()["live"]:
        return
    alt = f", or pass {once_flag} to drive it from this terminal" if once_flag else ""
    raise EdgefleetError(f"no controller is running on {database.where}: nobody would drive "
                         f"this {what}",
                         hint=f"start one: edgefleet fleet controller --db {database.where} "
                              f"(docs/operations.md: systemd unit, K3s Deployment){alt}")


def _drive(database: Any, rid: str, ctl: Any, output: str) -> Any:
    """Drive the rollout from this process (`--once`), progress on stderr. Ctrl-C (or
    SIGTERM) pauses it, saying its driver stopped, then exits 130."""
    import signal
    import sys

    from fleet.rollout import drive, snapshot
    from fleet.state import actor

    tty = sys.stderr.isatty() and output == "text"
    shown: dict[str, Any] = {"lines": 0, "last": None}

    def progress(p: dict[str, Any]) -> None:
        key = progress_key(p)
        if key == shown["last"]:
            return
        shown["last"] = key
        if tty:  # the full table, redrawn when something shown changes
            text = render_status(snapshot(database, rid), bars=True)
            if shown["lines"]:
                sys.stderr.write(f"\x1b[{shown['lines']}F\x1b[J")
            sys.stderr.write(text + "\n")
            sys.stderr.flush()
            shown["lines"] = text.count("\n") + 1
        else:
            print(progress_line(p), file=sys.stderr, flush=True)

    def stop(*_: Any) -> None:
        raise KeyboardInterrupt

    # Ctrl-C and a supervisor's SIGTERM pause the rollout, even when this process was
    # started with SIGINT ignored (a background job of a non-interactive shell)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, stop)
    try:
        return drive(database, rid, ctl, actor=actor(), progress=progress)
    except KeyboardInterrupt:
        row = database.rollout(rid)
        print(f"edgefleet: interrupted: rollout {rid} is {row.state}: {row.reason}",
              file=sys.stderr, flush=True)
        raise typer.Exit(130) from None


def _follow(database: Any, rid: str, output: str, timeout: float | None = None) -> Any:
    """Watch a rollout another process drives until it no longer needs driving; progress
    lines on stderr. Returns its row."""
    import sys
    import time

    from fleet.machine import DRIVEN
    from fleet.rollout import snapshot

    last = None
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        snap = snapshot(database, rid)
        key = progress_key(snap)
        if key != last and output == "text":
            last = key
            print(progress_line(snap), file=sys.stderr, flush=True)
        if snap["state"] not in DRIVEN and not database.open_requests(rid):
            return database.rollout(rid)
        if deadline is not None and time.monotonic() > deadline:
            return database.rollout(rid)
        time.sleep(0.5)


def _finish_line(database: Any, row: Any, output: str, ok: str = "succeeded") -> None:
    """Print where the rollout ended; exit 1 (one line on stderr) unless it reached `ok`."""
    from fleet.rollout import snapshot

    snap = snapshot(database, row.id)
    emit(output, snap, text=lambda: render_status(snap))
    if row.state == ok:
        return
    if row.state == "paused":
        raise EdgefleetError(f"rollout {row.id} paused: {row.reason}")
    raise EdgefleetError(f"rollout {row.id} {row.state}: {row.reason}")


def _no_rollouts(store: Path, db: str | None, output: str) -> Any:
    """The database, or None after printing that there are no rollouts (exit 0)."""
    from fleet.state import DB_NAME
    from fleet.state_backend import is_url

    path = db or Path(store) / DB_NAME
    if is_url(path) or Path(path).exists():
        database = open_db(store, db)
        if database.latest() is not None:
            return database
    emit(output, [], text=lambda: "no rollouts", names=lambda: [])
    return None


@rollout_app.command("status")
def rollout_status(
    rollout_id: str = typer.Argument(None, help="Rollout id (default: the latest)."),
    watch: bool = typer.Option(False, "--watch", "-w", help="Refresh until it stops."),
    store: Path = store_opt(), db: str = db_opt(), output: str = read_output(),
) -> None:
    """Progress per stage, gate verdicts, failed devices, who drives it and when it was last
    heard from; -o wide adds the bundle's URL and full digest and lists every problem; json
    and yaml add the audit log.

    Examples:

      edgefleet fleet rollout status

      edgefleet fleet rollout status r-261204-1a2b3c --watch

      edgefleet fleet rollout status r-261204-1a2b3c -o json
    """
    import sys
    import time

    from fleet.machine import DRIVEN
    from fleet.rollout import snapshot

    check(output)
    if rollout_id:
        database = existing_db(store, db)
        database.rollout(rollout_id)  # raises RolloutNotFound (exit 2)
    else:
        database = _no_rollouts(store, db, output)
        if database is None:
            return
        rollout_id = database.latest().id
    if output not in ("text", "wide"):  # a document: once, with the audit log
        snap = snapshot(database, rollout_id)
        emit(output, {**snap, "audit": database.audit_log(rollout_id)},
             text=lambda: render_status(snap), names=lambda: [f"rollout/{rollout_id}"])
        return
    lines = 0
    while True:
        snap = snapshot(database, rollout_id)
        text = render_status(snap, wide=output == "wide")
        if watch and lines and sys.stdout.isatty():
            sys.stdout.write(f"\x1b[{lines}F\x1b[J")
        typer.echo(text)
        lines = text.count("\n") + 1
        if not watch or snap["state"] not in DRIVEN or (not snap["driver"]["live"] and \
                not snap["driver"]["controller"]):
            return  # nothing will change it (see the driver line)
        time.sleep(1.0)


@rollout_app.command("list")
def rollout_list(
    store: Path = store_opt(), db: str = db_opt(), output: str = read_output(),
    limit: int = typer.Option(50, "--limit", help="Newest first, at most this many."),
) -> None:
    """Rollouts, newest first: who started which bundle when, and where each stands.

    Examples:

      edgefleet fleet rollout list --store /srv/edgefleet/artifacts

      edgefleet fleet rollout list -o wide --limit 10

      edgefleet fleet rollout list -o name
    """
    check(output)
    database = _no_rollouts(store, db, output)
    if database is None:
        return
    rows = database.rollouts(limit)
    stage_names = {}
    for r in rows:
        stages = database.stages(r.id)
        stage_names[r.id] = stages[r.stage].name if r.stage < len(stages) else "-"
    emit(output, [{
        "id": r.id, "state": r.state, "stage": r.stage, "phase": r.phase,
        "created": r.created, "created_by": r.created_by, "bundle_digest": r.bundle_digest,
        "model": f"{r.model_name} {r.model_version}", "sequence": r.sequence,
        "reason": r.reason, "finished": r.finished} for r in rows],
         text=lambda: rollouts_table(rows, stage_names),
         wide=lambda: rollouts_table(rows, stage_names, wide=True),
         names=lambda: [f"rollout/{r.id}" for r in rows])


# -- operator actions: requests to whoever drives the rollout ---------------------------------

_NEEDS_DRIVER = ("resume", "rollback", "promote", "retry")
_OK_STATE = {"rollback": "rolled-back"}


def operate(action: str, rollout_id: str, *, store: Path, db: Path | None, output: str,
            follow: bool, once: bool, args: dict[str, Any] | None = None,
            mqtt: Any = None, prefix: str = "edgefleet", fleet_key: Path | None = None,
            keyring: Path | None = None, wait_s: float = 30.0) -> None:
    """One operator action. With a live driver (the controller, or a `--once` process) it
    is queued for it and this waits for its answer; with none, it is applied here, and an
    action that needs driving says so (or, with --once, is driven from here)."""
    import time

    from fleet.actions import apply
    from fleet.machine import DRIVEN
    from fleet.state import actor

    check_output(output)
    database = existing_db(store, db)
    database.rollout(rollout_id)  # RolloutNotFound: exit 2
    who = actor()
    holder, lease = database.holder(rollout_id), database.lease()
    if once and (holder or lease["live"]):
        raise UsageError(f"rollout {rollout_id} has a driver ({holder or lease['owner']})",
                         hint="drop --once: the request goes to it")
    key = None
    if once and fleet_key is not None:  # its role, before the action is applied or sent
        from agent.keys import Keyring

        key = load_fleet_key(fleet_key, Keyring.load(keyring) if keyring else None)
    row = database.rollout(rollout_id)
    if action == "resume" and row.state in DRIVEN:  # nothing to change: it needs driving
        ok, msg = True, f"rollout {rollout_id}: {row.state}, driven by " + (
            holder or lease["owner"] or "nobody")
    elif holder or lease["live"]:
        seq = database.add_request(rollout_id, action, who, args)
        deadline = time.monotonic() + wait_s
        while (result := database.request_result(seq)) is None:
            if time.monotonic() > deadline:
                raise EdgefleetError(f"the controller did not answer the {action} request "
                                     f"within {wait_s:.0f} s",
                                     hint="see: edgefleet fleet rollout status "
                                          f"{rollout_id}")
            time.sleep(0.1)
        ok, msg = result.startswith("ok: "), result.split(": ", 1)[1]
    else:
        ok, msg = apply(database, rollout_id, action, who, args)
    if not ok:
        raise EdgefleetError(msg)
    row = database.rollout(rollout_id)
    if row.state in DRIVEN and once:
        from fleet.inventory import open_controller

        key = key or load_fleet_key(fleet_key)
        with open_controller(mqtt, fleet_key=key, prefix=prefix,
                             client_id=f"edgefleet-rollout-{rollout_id}") as ctl:
            row = _drive(database, rollout_id, ctl, output)
        _finish_line(database, row, output, _OK_STATE.get(action, "succeeded"))
        return
    if row.state in DRIVEN and follow:
        _finish_line(database, _follow(database, rollout_id, output), output,
                     _OK_STATE.get(action, "succeeded"))
        return
    _written(output, database, rollout_id, msg)
    if row.state in DRIVEN and not (holder or lease["live"]):
        _need_controller(database, f"{action} of rollout {rollout_id} (it is recorded)",
                         "--once")


def _action_command(action: str, doc: str, example: str) -> None:
    """Register `rollout <action> ID` with the shared options; `example` is the flags of its
    second Example."""

    def command(
        rollout_id: str = typer.Argument(..., help="Rollout id."),
        follow: bool = typer.Option(False, "--follow", "-f", help="Watch it until it pauses "
                                    "or ends."),
        once: bool = typer.Option(False, "--once", help="No controller running: drive it "
                                  "from this process until it pauses or ends."),
        full: bool = typer.Option(False, "--full", help="promote: skip the remaining waves' "
                                  "bakes; every device left goes in one last stage."),
        allow_partial: bool = typer.Option(False, "--allow-partial", help="resume: accept "
                                           "the devices left behind (listed in the end "
                                           "state)."),
        fleet_key: Path = fleet_key_opt(),
        keyring: Path = typer.Option(None, "--keyring", envvar="EDGEFLEET_KEYRING",
                                     help="--once: the keyring devices trust; --fleet-key "
                                     "must be trusted there for role fleet."),
        store: Path = store_opt(), db: str = db_opt(), output: str = output_opt(),
        mqtt_host: str = mqtt_opts()["mqtt_host"], mqtt_port: int = mqtt_opts()["mqtt_port"],
        mqtt_ca: Path = mqtt_opts()["mqtt_ca"], mqtt_cert: Path = mqtt_opts()["mqtt_cert"],
        mqtt_key: Path = mqtt_opts()["mqtt_key"], prefix: str = mqtt_opts()["prefix"],
    ) -> None:
        args: dict[str, Any] = {}
        if full:
            args["full"] = True
        if allow_partial:
            args["allow_partial"] = True
        operate(action, rollout_id, store=store, db=db, output=output, follow=follow,
                once=once, args=args, prefix=prefix, fleet_key=fleet_key, keyring=keyring,
                mqtt=mqtt_config(mqtt_host, mqtt_port, mqtt_ca, mqtt_cert, mqtt_key))

    command.__doc__ = f"""{doc}

    Examples:

      edgefleet fleet rollout {action} r-261204-1a2b3c

      edgefleet fleet rollout {action} r-261204-1a2b3c {example}
    """
    rollout_app.command(action)(command)


_action_command("pause", "Stop sending new commands; running device steps finish. Resume "
                "with `resume`.", "-o json")
_action_command("resume", "Continue a paused rollout: its stage accepts the failures so far, "
                "a paused bake bakes again; at the final check, --allow-partial accepts the "
                "devices left behind.", "--allow-partial --once")
_action_command("abort", "Stop the rollout for good, leaving every device as it is (see "
                "`rollback` to undo).", "-o json")
_action_command("rollback", "Roll back every device this rollout moved and stop its shadows "
                "(also after it succeeded).", "--follow")
_action_command("promote", "End the current bake now as passed (a stage still deploying: "
                "its bake, as soon as it starts); with --full, also merge the remaining waves "
                "into one last stage (no more bakes).", "--full --once")
_action_command("retry", "Command the failed, timed-out and skipped devices again (new "
                "command ids), from the first stage that had one.", "--once -o json")
