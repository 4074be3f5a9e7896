"""`edgefleet fleet ...`: publish bundles and run rollouts across the fleet.

    edgefleet fleet devices [-l site=fab2] [-o json]
    edgefleet fleet publish model.efb --keyring keyring --store artifacts
    edgefleet fleet serve-artifacts --store artifacts --port 8080
    edgefleet fleet rollout start model.efb --canary 10 --bake 10m --waves 10%,50%,100% \\
        --keyring keyring --fleet-key keys/fleet.key --artifact-url http://ctl:8080 [--dry-run]
    edgefleet fleet rollout status [ID] [--watch] [-o json]
    edgefleet fleet rollout pause|resume|abort|rollback ID
    edgefleet fleet rollout list
    edgefleet fleet certs init|issue ...

See docs/rollouts.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from agent.errors import EdgefleetError, UsageError

app = typer.Typer(
    help="Publish bundles and roll them out to devices over MQTT: canary, waves, rollback.",
    no_args_is_help=True,
)

# -- certificates (fleet/certs.py) ------------------------------------------------------------

certs_app = typer.Typer(
    help="A small PKI for the MQTT link: a CA, the broker's and one certificate per device.",
    no_args_is_help=True,
)
app.add_typer(certs_app, name="certs")


@certs_app.command("init")
def certs_init(
    out: Path = typer.Option(..., "--out", help="Directory for the CA, broker and controller "
                             "certificates, and a rendered broker configuration."),
    broker_host: list[str] = typer.Option(
        ["localhost", "127.0.0.1"], "--broker-host",
        help="Host name or IP address devices use to reach the broker (repeatable)."),
    port: int = typer.Option(8883, "--port", help="TLS port for the broker configuration."),
    prefix: str = typer.Option("edgefleet", "--prefix", help="MQTT topic prefix."),
    days: int = typer.Option(3650, "--days", help="CA validity in days."),
    force: bool = typer.Option(False, "--force", help="Replace existing files."),
) -> None:
    """Create a CA, the broker's certificate, the fleet controller's client certificate, and
    OUT/broker/mosquitto.conf + acl (TLS, client certificates required, per-device ACL)."""
    from fleet.certs import CONTROLLER_NAME, init_ca, issue_client, issue_server
    from fleet.transport import render_broker_config

    ca = init_ca(out, days=days, force=force)
    server = issue_server(out, out, hosts=tuple(broker_host), force=force)
    ctl = issue_client(out, out, CONTROLLER_NAME, controller=True, force=force)
    conf = render_broker_config(out / "broker", port=port, tls=True, bind="0.0.0.0",
                                ca_file=ca.cert, cert_file=server.cert, key_file=server.key,
                                prefix=prefix, controller=CONTROLLER_NAME)
    typer.echo(f"CA:         {ca.cert} (keep {ca.key} off the broker and the devices)")
    typer.echo(f"broker:     {server.cert} for {', '.join(broker_host)} (mosquitto drops to "
               f"user 'mosquitto': chown mosquitto {server.key})")
    typer.echo(f"controller: {ctl.cert}")
    typer.echo(f"broker configuration: {conf} (mosquitto -c {conf})")
    typer.echo(f"next: edgefleet fleet certs issue DEVICE_ID... --ca {out} --out DIR")


@certs_app.command("issue")
def certs_issue(
    device_ids: list[str] = typer.Argument(..., help="Device ids (the certificate CN)."),
    ca: Path = typer.Option(..., "--ca", help="Directory holding ca.crt and ca.key."),
    out: Path = typer.Option(..., "--out", help="Directory for <id>.crt and <id>.key."),
    days: int = typer.Option(825, "--days", help="Validity in days."),
    force: bool = typer.Option(False, "--force", help="Replace existing files."),
) -> None:
    """Issue a client certificate per device (ECDSA P-256, clientAuth, CN = device id)."""
    from fleet.certs import issue_client

    for device_id in device_ids:
        paths = issue_client(ca, out, device_id, days=days, force=force)
        typer.echo(f"{device_id}: {paths.cert} {paths.key}")


# -- shared options ---------------------------------------------------------------------------
#
# Settings come from flags, then EDGEFLEET_* environment variables, then defaults (the MQTT
# ones are the device link's: EDGEFLEET_MQTT_HOST, _PORT, _CA, _CERT, _KEY).

_STORE_HELP = "Artifact store directory (content-addressed; the rollout database lives here)."


def _store_opt() -> Any:
    return typer.Option(Path("artifacts"), "--store", envvar="EDGEFLEET_ARTIFACT_STORE",
                        help=_STORE_HELP)


def _db_opt() -> Any:
    return typer.Option(None, "--db", envvar="EDGEFLEET_ROLLOUT_DB",
                        help="Rollout database (default: STORE/rollouts.db).")


def _output_opt() -> Any:
    return typer.Option("text", "--output", "-o", help="text or json.")


def _mqtt_opts() -> dict[str, Any]:
    return {
        "mqtt_host": typer.Option(None, "--mqtt-host", envvar="EDGEFLEET_MQTT_HOST",
                                  help="Broker host (localhost)."),
        "mqtt_port": typer.Option(None, "--mqtt-port", envvar="EDGEFLEET_MQTT_PORT",
                                  help="Broker port (1883)."),
        "mqtt_ca": typer.Option(None, "--mqtt-ca", envvar="EDGEFLEET_MQTT_CA",
                                help="CA certificate (turns TLS on)."),
        "mqtt_cert": typer.Option(None, "--mqtt-cert", envvar="EDGEFLEET_MQTT_CERT",
                                  help="The controller's client certificate."),
        "mqtt_key": typer.Option(None, "--mqtt-key", envvar="EDGEFLEET_MQTT_KEY",
                                 help="Its private key."),
        "prefix": typer.Option("edgefleet", "--prefix", envvar="EDGEFLEET_TOPIC_PREFIX",
                               help="MQTT topic prefix."),
    }


def _mqtt(mqtt_host: str | None, mqtt_port: int | None, mqtt_ca: Path | None,
          mqtt_cert: Path | None, mqtt_key: Path | None) -> Any:
    from agent.link import MqttConfig

    return MqttConfig(host=mqtt_host or "localhost", port=mqtt_port or 1883,
                      ca_file=mqtt_ca, cert_file=mqtt_cert, key_file=mqtt_key,
                      reconnect_min_s=1.0, reconnect_max_s=5.0)


def _check_output(output: str) -> None:
    if output not in ("text", "json"):
        raise UsageError(f"--output must be text or json, not {output!r}")


def _db(store: Path, db: Path | None) -> Any:
    from fleet.state import DB_NAME, StateDB

    return StateDB(db or Path(store) / DB_NAME)


def _existing_db(store: Path, db: Path | None) -> Any:
    from fleet.state import DB_NAME

    path = db or Path(store) / DB_NAME
    if not Path(path).exists():
        raise UsageError(f"no rollout database at {path}",
                         hint="pass --store (or --db) where rollouts were started")
    return _db(store, db)


def _duration(text: str | None, what: str) -> float | None:
    """`90`, `90s`, `5m`, `1h`, `1.5s` -> seconds."""
    if text is None:
        return None
    import re

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(ms|s|m|h)?\s*", text)
    if not m:
        raise UsageError(f"{what} {text!r}: expected a duration like 30s, 5m or 1h")
    scale = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 1}[m.group(2)]
    return float(m.group(1)) * scale


def _load_fleet_key(fleet_key: Path | None) -> Any:
    from agent.keys import load_private_key

    if fleet_key is None:
        raise UsageError("this command sends signed commands and needs the fleet key",
                         hint="pass --fleet-key FILE or set EDGEFLEET_FLEET_KEY")
    return load_private_key(fleet_key)


# -- devices ----------------------------------------------------------------------------------


@app.command("devices")
def devices_cmd(
    selector: str = typer.Option("", "--selector", "-l",
                                 help="Label selector, e.g. site=fab2,tester in (t5k,t7)."),
    output: str = _output_opt(),
    mqtt_host: str = _mqtt_opts()["mqtt_host"], mqtt_port: int = _mqtt_opts()["mqtt_port"],
    mqtt_ca: Path = _mqtt_opts()["mqtt_ca"], mqtt_cert: Path = _mqtt_opts()["mqtt_cert"],
    mqtt_key: Path = _mqtt_opts()["mqtt_key"], prefix: str = _mqtt_opts()["prefix"],
) -> None:
    """Every known device from its retained state: online, model, health, labels, last seen."""
    import json

    from fleet.inventory import Inventory, Selector, devices_table, open_controller

    _check_output(output)
    sel = Selector.parse(selector)
    with open_controller(_mqtt(mqtt_host, mqtt_port, mqtt_ca, mqtt_cert, mqtt_key),
                         prefix=prefix) as ctl:
        inv = Inventory.from_states(ctl.devices())
    devs = inv.select(sel)
    if output == "json":
        typer.echo(json.dumps([d.to_json() for d in devs], indent=2))
        return
    if not devs:
        typer.echo(f"no devices{' match ' + repr(str(sel)) if sel else ''} "
                   f"({len(inv)} known)", err=True)
        return
    typer.echo(devices_table(devs))
    online = sum(d.online for d in devs)
    typer.echo(f"{len(devs)} devices, {online} online")


# -- publish, serve-artifacts -----------------------------------------------------------------


@app.command("publish")
def publish_cmd(
    bundle: Path = typer.Argument(..., help="The signed bundle (*.efb)."),
    keyring: Path = typer.Option(..., "--keyring", envvar="EDGEFLEET_KEYRING",
                                 help="The keyring devices trust (release keys)."),
    store: Path = _store_opt(),
    output: str = _output_opt(),
) -> None:
    """Verify a bundle exactly as a device would, then put it in the content-addressed artifact
    store that `serve-artifacts` serves (STORE/sha256/<digest>)."""
    import json

    from agent.keys import Keyring
    from fleet.artifacts import publish
    from fleet.state import actor

    _check_output(output)
    if not bundle.is_file():
        raise UsageError(f"bundle {bundle} does not exist")
    pub = publish(store, bundle, Keyring.load(keyring), who=actor())
    if output == "json":
        typer.echo(json.dumps(pub.to_json(), indent=2))
        return
    typer.echo(f"published {pub.name} {pub.version} (sequence {pub.sequence}, {pub.size} bytes)"
               f" as sha256:{pub.digest}")
    typer.echo(f"  {pub.path}  (served at <artifact-url>/sha256/{pub.digest})")


@app.command("serve-artifacts")
def serve_artifacts_cmd(
    store: Path = _store_opt(),
    host: str = typer.Option("0.0.0.0", "--host", help="Address to listen on."),
    port: int = typer.Option(8080, "--port", help="TCP port."),
    tls_cert: Path = typer.Option(None, "--tls-cert", help="Serve HTTPS with this certificate."),
    tls_key: Path = typer.Option(None, "--tls-key", help="... and this key."),
) -> None:
    """Serve STORE/sha256/<digest> over HTTP(S) (Range, HEAD) until SIGTERM or Ctrl-C. Devices
    trust none of it: the signed command pins size and digest, the bundle carries its own
    signature."""
    import signal
    import ssl
    import threading

    from fleet.artifacts import ArtifactServer

    ctx = None
    if tls_cert or tls_key:
        if not (tls_cert and tls_key):
            raise UsageError("HTTPS needs both --tls-cert and --tls-key")
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(str(tls_cert), str(tls_key))
    if not Path(store).is_dir():
        raise UsageError(f"artifact store {store} does not exist",
                         hint="publish a bundle first: edgefleet fleet publish FILE --store DIR")
    srv = ArtifactServer(store, host=host, port=port, ssl_context=ctx)
    try:
        srv.start()
    except OSError as e:
        raise EdgefleetError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: stop.set())
    signal.signal(signal.SIGINT, lambda *a: stop.set())
    typer.echo(f"serving {Path(store).resolve()} at {srv.base_url}/sha256/<digest>", err=True)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        srv.stop()


# -- rollouts ---------------------------------------------------------------------------------

rollout_app = typer.Typer(
    help="Roll a bundle out in stages: shadow, canary, waves; gates; pause, resume, rollback.",
    no_args_is_help=True,
)
app.add_typer(rollout_app, name="rollout")


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
    fleet_key: Path = typer.Option(None, "--fleet-key", envvar="EDGEFLEET_FLEET_KEY",
                                   help="Private key that signs commands."),
    artifact_url: str = typer.Option(None, "--artifact-url", envvar="EDGEFLEET_ARTIFACT_URL",
                                     help="Base URL devices download from "
                                     "(serve-artifacts), e.g. http://ctl:8080."),
    store: Path = _store_opt(), db: Path = _db_opt(), output: str = _output_opt(),
    mqtt_host: str = _mqtt_opts()["mqtt_host"], mqtt_port: int = _mqtt_opts()["mqtt_port"],
    mqtt_ca: Path = _mqtt_opts()["mqtt_ca"], mqtt_cert: Path = _mqtt_opts()["mqtt_cert"],
    mqtt_key: Path = _mqtt_opts()["mqtt_key"], prefix: str = _mqtt_opts()["prefix"],
) -> None:
    """Start a rollout and drive it in the foreground (progress on stderr). Exit 0 when every
    stage passed, 1 when it paused, failed or was rolled back (resume with `rollout resume`)."""

    from agent.bundle import verify_bundle
    from agent.keys import Keyring
    from fleet import rollout as R
    from fleet.artifacts import find_published, publish
    from fleet.inventory import Inventory, open_controller
    from fleet.state import actor

    _check_output(output)
    plan = _plan_from_flags(
        plan_file, selector=selector, canary=canary,
        spread=tuple(s for s in spread.split(",") if s) if spread is not None else None,
        shadow=shadow, shadow_min_dies=shadow_min_dies,
        shadow_timeout_s=_duration(shadow_timeout, "--shadow-timeout"),
        shadow_gates=tuple(shadow_gate or ()) or None, bake_s=_duration(bake, "--bake"),
        wave_bake_s=_duration(wave_bake, "--wave-bake"), waves=waves,
        max_parallel=max_parallel, max_failures=max_failures, on_failure=on_failure,
        offline=offline, offline_wait_s=_duration(offline_wait, "--offline-wait"),
        step_timeout_s=_duration(step_timeout, "--step-timeout"),
        health_grace_s=_duration(health_grace, "--health-grace"), gates=tuple(gate or ()) or None,
        min_requests=min_requests, prometheus=prometheus, prom_gates=tuple(prom_gate or ()) or None,
        measure_interval_s=_duration(measure_interval, "--measure-interval"))
    ring = Keyring.load(keyring)
    key = None if dry_run else _load_fleet_key(fleet_key)
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
    mqtt = _mqtt(mqtt_host, mqtt_port, mqtt_ca, mqtt_cert, mqtt_key)
    rid = rollout_id or R.new_rollout_id()
    if dry_run:
        with open_controller(mqtt, prefix=prefix) as ctl:
            inv = Inventory.from_states(ctl.devices())
        stages, _ = R.plan_targets(plan, inv)
        _print_dry_run(output, plan, stages, inv, digest, name, version, seq)
        return
    database = _db(store, db)
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
    typer.echo(f"dry run: {name} {version} (sequence {seq}, sha256:{digest[:12]}); nothing is "
               "sent")
    gates = ", ".join(str(g) for g in plan.bake_gates)
    typer.echo(f"  bake {plan.bake_s:g} s after the canary, {plan.wave_bake:g} s after each "
               f"wave but the last; gates: {gates}")
    if plan.shadow:
        typer.echo(f"  shadow gates: {', '.join(str(g) for g in plan.shadow_gate_list)}; "
                   f"at least {plan.shadow_min_dies} dies")
    typer.echo(f"  at most {plan.max_parallel} installing at once; failure budget "
               f"{plan.max_failures} per stage; on failure: {plan.on_failure}; offline: "
               f"{plan.offline}")
    for s in stages:
        sites = sorted({inv.devices[d].labels.get(plan.spread[0], "-") if plan.spread else "-"
                        for d in s.devices})
        typer.echo(f"{s.name:<8} {s.kind:<8} {len(s.devices):>5} devices  "
                   f"({(plan.spread or ('-',))[0]}: {', '.join(sites)})")
        typer.echo(_wrap(", ".join(s.devices), "    "))


def _wrap(text: str, indent: str, width: int = 100) -> str:
    import textwrap

    return textwrap.fill(text, width, initial_indent=indent, subsequent_indent=indent)


def _drive(database: Any, rid: str, ctl: Any, output: str) -> Any:
    """Run the engine with a progress display on stderr."""
    import sys

    from fleet.rollout import Engine, EngineOptions
    from fleet.state import actor

    tty = sys.stderr.isatty() and output == "text"
    shown: dict[str, Any] = {"lines": 0, "last": None}

    def progress(snap: dict[str, Any]) -> None:
        if tty:
            text = _render(snap, bars=True)
            if shown["lines"]:
                sys.stderr.write(f"\x1b[{shown['lines']}F\x1b[J")
            sys.stderr.write(text + "\n")
            sys.stderr.flush()
            shown["lines"] = text.count("\n") + 1
        else:
            key = _progress_key(snap)
            if key != shown["last"]:
                shown["last"] = key
                print(_progress_line(snap), file=sys.stderr, flush=True)

    engine = Engine(database, rid, ctl, EngineOptions(actor=actor(), progress=progress))
    return engine.run()


def _progress_key(snap: dict[str, Any]) -> tuple:
    st = next((s for s in snap["stages"] if s["name"] == snap["stage"]), None) or {}
    return (snap["state"], snap["stage"], snap["phase"], st.get("done"), st.get("failed"),
            st.get("state"))


def _progress_line(snap: dict[str, Any]) -> str:
    st = next((s for s in snap["stages"] if s["name"] == snap["stage"]), None) or {}
    line = (f"{snap['id']} {snap['state']} {snap['stage']} {st.get('state', '')}: "
            f"{st.get('done', 0)}/{st.get('devices', 0)} done, {st.get('failed', 0)} failed")
    if snap["state"] != "running" and snap.get("reason"):
        line += f" ({snap['reason']})"
    return line


def _bar(done: int, failed: int, total: int, width: int = 24) -> str:
    if total <= 0:
        return "[" + " " * width + "]"
    d = round(width * done / total)
    f = min(width - d, round(width * failed / total))
    return "[" + "#" * d + "x" * f + "." * (width - d - f) + "]"


def _render(snap: dict[str, Any], *, bars: bool = True) -> str:
    """`rollout status` for people."""
    import datetime as dt

    def when(ts: float | None) -> str:
        return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ") if ts \
            else "-"

    b = snap["bundle"]
    elapsed = (snap["finished"] or snap["updated"]) - snap["created"]
    lines = [
        f"rollout {snap['id']}  {snap['state'].upper()}  stage {snap['stage']} "
        f"({snap['phase']})  {elapsed:.1f} s",
        f"  bundle  {b['name']} {b['version']}  sequence {b['sequence']}  "
        f"sha256:{b['digest'][:16]}  {b['size']} bytes",
        f"  started {when(snap['created'])} by {snap['created_by']}; {snap['devices']} devices"
        f"; selector {snap['plan'].get('selector') or '(all)'}",
        f"  {'STAGE':<8} {'KIND':<8} {'DEVICES':>7}  {'PROGRESS':<26} {'DONE':>9} "
        f"{'FAILED':>6} {'SKIP':>4}  STATE",
    ]
    for s in snap["stages"]:
        verdict = s.get("verdict") or {}
        note = ""
        if verdict and s["state"] in ("baking", "failed", "paused", "passed"):
            ev = verdict.get("evidence") or {}
            if s["kind"] == "shadow":
                note = f"  {verdict.get('verdict')} ({ev.get('dies', 0)} dies)"
            else:
                note = f"  {verdict.get('verdict')} ({ev.get('requests', 0)} requests)"
        if s["in_flight"] and s["state"] == "deploying":
            note += f"  {s['in_flight']} in flight"
        lines.append(
            f"  {s['name']:<8} {s['kind']:<8} {s['devices']:>7}  "
            f"{_bar(s['done'], s['failed'], s['devices']) if bars else '':<26} "
            f"{str(s['done']) + '/' + str(s['devices']):>9} {s['failed']:>6} {s['skipped']:>4}  "
            f"{s['state']}{note}")
    if snap.get("rollback"):
        rb = snap["rollback"]
        lines.append(f"  rollback: {rb['done']}/{rb['devices']} done, {rb['failed']} failed")
    if snap.get("reason"):
        lines.append(f"  reason: {snap['reason']}")
    for s in snap["stages"]:
        if s["state"] in ("baking", "failed", "paused") and s.get("verdict"):
            bad = [r for r in s["verdict"]["results"] if r["verdict"] != "pass"]
            for r in bad[:6]:
                val = "" if r["value"] is None else f" = {r['value']:.4g}"
                lines.append(f"  gate {s['name']}: {r['gate']}: {r['verdict']}{val}"
                             + (f" ({r['reason']})" if r.get("reason") else ""))
    probs = snap.get("problems") or []
    if probs:
        lines.append(f"  problems ({len(probs)}):")
        for p in probs[:10]:
            lines.append(f"    {p['device']} {p['step']} {p['status']}: {p['reason']}"
                         + (f" - {p['detail'][:80]}" if p.get("detail") else ""))
        if len(probs) > 10:
            lines.append(f"    ... {len(probs) - 10} more (--output json lists all)")
    return "\n".join(lines)


def _finish_line(database: Any, row: Any, output: str, ok: str = "succeeded") -> None:
    """Print where the rollout ended; exit 1 (one line on stderr) unless it reached `ok`."""
    import json

    from fleet.rollout import snapshot

    snap = snapshot(database, row.id)
    if output == "json":
        typer.echo(json.dumps(snap, indent=2))
    else:
        typer.echo(_render(snap))
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
    store: Path = _store_opt(), db: Path = _db_opt(), output: str = _output_opt(),
) -> None:
    """Progress per stage, gate verdicts, failed devices, and (json) the audit log."""
    import json
    import sys
    import time

    from fleet.rollout import snapshot
    from fleet.state import PAUSED, TERMINAL

    _check_output(output)
    database = _existing_db(store, db)
    rid = _resolve_id(database, rollout_id)
    lines = 0
    while True:
        snap = snapshot(database, rid)
        if output == "json":
            snap["audit"] = database.audit_log(rid)
            typer.echo(json.dumps(snap, indent=2))
            return
        text = _render(snap)
        if watch and lines and sys.stdout.isatty():
            sys.stdout.write(f"\x1b[{lines}F\x1b[J")
        typer.echo(text)
        lines = text.count("\n") + 1
        if not watch or snap["state"] in (*TERMINAL, PAUSED):
            return
        time.sleep(1.0)


@rollout_app.command("list")
def rollout_list(
    store: Path = _store_opt(), db: Path = _db_opt(), output: str = _output_opt(),
    limit: int = typer.Option(50, "--limit", help="Newest first, at most this many."),
) -> None:
    """Rollouts, newest first: who started which bundle when, and where each stands."""
    import datetime as dt
    import json

    _check_output(output)
    database = _existing_db(store, db)
    rows = database.rollouts(limit)
    if output == "json":
        typer.echo(json.dumps([{
            "id": r.id, "state": r.state, "stage": r.stage, "phase": r.phase,
            "created": r.created, "created_by": r.created_by, "bundle_digest": r.bundle_digest,
            "model": f"{r.model_name} {r.model_version}", "sequence": r.sequence,
            "reason": r.reason, "finished": r.finished} for r in rows], indent=2))
        return
    table = [("ROLLOUT", "STATE", "STAGE", "MODEL", "SHA256", "STARTED", "BY")]
    for r in rows:
        stages = database.stages(r.id)
        stage = stages[r.stage].name if r.stage < len(stages) else "-"
        table.append((r.id, r.state, stage, f"{r.model_name} {r.model_version}",
                      r.bundle_digest[:12],
                      dt.datetime.fromtimestamp(r.created, dt.UTC).strftime("%Y-%m-%d %H:%M"),
                      r.created_by))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        typer.echo("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def _request(store: Path, db: Path | None, rid: str, what: str) -> tuple[Any, Any]:
    """Hand `what` to the live driver, if there is one; returns (database, driver or None)."""
    from fleet.state import actor

    database = _existing_db(store, db)
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
                  store: Path = _store_opt(), db: Path = _db_opt()) -> None:
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
                  store: Path = _store_opt(), db: Path = _db_opt()) -> None:
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
    database = _existing_db(store, db)
    database.rollout(rollout_id)
    key = _load_fleet_key(fleet_key)
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
    fleet_key: Path = typer.Option(None, "--fleet-key", envvar="EDGEFLEET_FLEET_KEY",
                                   help="Private key that signs commands."),
    store: Path = _store_opt(), db: Path = _db_opt(), output: str = _output_opt(),
    mqtt_host: str = _mqtt_opts()["mqtt_host"], mqtt_port: int = _mqtt_opts()["mqtt_port"],
    mqtt_ca: Path = _mqtt_opts()["mqtt_ca"], mqtt_cert: Path = _mqtt_opts()["mqtt_cert"],
    mqtt_key: Path = _mqtt_opts()["mqtt_key"], prefix: str = _mqtt_opts()["prefix"],
) -> None:
    """Continue a paused rollout (failures so far are accepted; a bake starts again), or one
    whose controller died, and drive it to the end in the foreground."""
    from fleet.rollout import resume
    from fleet.state import TERMINAL, actor

    _check_output(output)
    database = _existing_db(store, db)
    row = database.rollout(rollout_id)
    if row.state in TERMINAL:
        raise EdgefleetError(f"rollout {rollout_id} is already {row.state}; nothing to resume")
    _drive_existing(rollout_id, store, db, fleet_key, output,
                    _mqtt(mqtt_host, mqtt_port, mqtt_ca, mqtt_cert, mqtt_key), prefix,
                    lambda d: resume(d, rollout_id, actor()))


@rollout_app.command("rollback")
def rollout_rollback(
    rollout_id: str = typer.Argument(..., help="Rollout id."),
    fleet_key: Path = typer.Option(None, "--fleet-key", envvar="EDGEFLEET_FLEET_KEY",
                                   help="Private key that signs commands."),
    store: Path = _store_opt(), db: Path = _db_opt(), output: str = _output_opt(),
    mqtt_host: str = _mqtt_opts()["mqtt_host"], mqtt_port: int = _mqtt_opts()["mqtt_port"],
    mqtt_ca: Path = _mqtt_opts()["mqtt_ca"], mqtt_cert: Path = _mqtt_opts()["mqtt_cert"],
    mqtt_key: Path = _mqtt_opts()["mqtt_key"], prefix: str = _mqtt_opts()["prefix"],
) -> None:
    """Roll back every device this rollout moved to the new model and stop its shadows (also
    after it succeeded). With a live driver, it does it; otherwise this command does."""
    from fleet.rollout import request_rollback
    from fleet.state import ROLLED_BACK, ROLLING_BACK, actor

    _check_output(output)
    database = _existing_db(store, db)
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
                    _mqtt(mqtt_host, mqtt_port, mqtt_ca, mqtt_cert, mqtt_key), prefix,
                    lambda d: request_rollback(d, rollout_id, actor()), ok=ROLLED_BACK)
