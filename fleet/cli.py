"""`edgefleet fleet ...`: publish bundles and run rollouts across the fleet.

    edgefleet fleet devices [NAME] [-l site=fab2] [-o text|wide|json|yaml|name]
    edgefleet fleet artifacts [--store artifacts] [-o ...]
    edgefleet fleet publish model.efb --keyring keyring --store artifacts
    edgefleet fleet serve-artifacts --store artifacts --port 8080
    edgefleet fleet rollout start model.efb --canary 10 --bake 10m --waves 10%,50%,100% \\
        --keyring keyring --fleet-key keys/fleet.key --artifact-url http://ctl:8080 [--dry-run]
    edgefleet fleet rollout status [ID] [--watch] [-o json]
    edgefleet fleet rollout pause|resume|abort|rollback ID
    edgefleet fleet rollout list
    edgefleet fleet certs init|issue|site ...
    edgefleet fleet collect -d box-a=10.0.0.5:9465 --out dataset/ --ca ... --cert ... --key ...
    edgefleet fleet quality --prometheus http://prometheus:9090 [--window 7d | --since FILE]

This module is the `fleet` group and its small commands; the `rollout` group is
fleet/cli_rollout.py, the options both share are fleet/cli_options.py. See docs/rollouts.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from agent.cli_output import check, emit, read_output
from agent.errors import EdgefleetError, UsageError
from fleet.cli_collect import collect_cmd
from fleet.cli_controller import apply_command, controller_command
from fleet.cli_options import (
    check_output,
    db_opt,
    existing_db,
    mqtt_config,
    mqtt_opts,
    output_opt,
    store_opt,
)
from fleet.cli_quality import quality_cmd
from fleet.cli_rollout import rollout_app

app = typer.Typer(
    help="Publish bundles and roll them out to devices over MQTT: canary, waves, rollback.",
    no_args_is_help=True,
)
app.command("controller")(controller_command)  # fleet/cli_controller.py
app.command("apply")(apply_command)

# -- certificates (fleet/certs.py) ------------------------------------------------------------

certs_app = typer.Typer(
    help="A small PKI for the MQTT link: a CA, the broker's and one certificate per device.",
    no_args_is_help=True,
)
app.add_typer(certs_app, name="certs")


def _cert_doc(name: str, paths: Any) -> dict[str, str]:
    """What `-o json` says of one certificate written: its files and its SHA-256 fingerprint
    (what `openssl x509 -fingerprint -sha256` prints, to check the copy on the device)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    cert = x509.load_pem_x509_certificate(Path(paths.cert).read_bytes())
    return {"name": name, "cert": str(paths.cert), "key": str(paths.key),
            "sha256": cert.fingerprint(hashes.SHA256()).hex()}


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
    output: str = output_opt(),
) -> None:
    """Create a CA, the broker's certificate, the fleet controller's client certificate, and
    OUT/broker/mosquitto.conf + acl (TLS, client certificates required, per-device ACL).

    Examples:

      edgefleet fleet certs init --out pki --broker-host broker.fab.example

      edgefleet fleet certs init --out pki --broker-host 10.20.0.5 --port 8883

      edgefleet fleet certs init --out pki --broker-host broker.fab.example -o json
    """
    from fleet.certs import BROKER_NAME, CONTROLLER_NAME, init_ca, issue_client, issue_server
    from fleet.transport import render_broker_config

    check_output(output)
    ca = init_ca(out, days=days, force=force)
    server = issue_server(out, out, hosts=tuple(broker_host), force=force)
    ctl = issue_client(out, out, CONTROLLER_NAME, controller=True, force=force)
    conf = render_broker_config(out / "broker", port=port, tls=True, bind="0.0.0.0",
                                ca_file=ca.cert, cert_file=server.cert, key_file=server.key,
                                prefix=prefix, controller=CONTROLLER_NAME)
    doc = {"ca": _cert_doc("ca", ca),
           "broker": {**_cert_doc(BROKER_NAME, server), "hosts": list(broker_host)},
           "controller": _cert_doc(CONTROLLER_NAME, ctl),
           "broker_config": str(conf), "broker_acl": str(conf.parent / "acl")}
    emit(output, doc, text=lambda: "\n".join([
        f"CA:         {ca.cert} (keep {ca.key} off the broker and the devices)",
        f"broker:     {server.cert} for {', '.join(broker_host)} (mosquitto drops to "
        f"user 'mosquitto': chown mosquitto {server.key})",
        f"controller: {ctl.cert}",
        f"broker configuration: {conf} (mosquitto -c {conf})",
        f"next: edgefleet fleet certs issue DEVICE_ID... --ca {out} --out DIR"]))


@certs_app.command("issue")
def certs_issue(
    device_ids: list[str] = typer.Argument(..., help="Device ids (the certificate CN)."),
    ca: Path = typer.Option(..., "--ca", help="Directory holding ca.crt and ca.key."),
    out: Path = typer.Option(..., "--out", help="Directory for <id>.crt and <id>.key."),
    days: int = typer.Option(825, "--days", help="Validity in days."),
    force: bool = typer.Option(False, "--force", help="Replace existing files."),
    output: str = output_opt(),
) -> None:
    """Issue a client certificate per device (ECDSA P-256, clientAuth, CN = device id).

    Examples:

      edgefleet fleet certs issue box-a box-b --ca pki --out pki/devices

      edgefleet fleet certs issue box-c --ca pki --out pki/devices -o json
    """
    from fleet.certs import issue_client

    check_output(output)
    issued = [_cert_doc(d, issue_client(ca, out, d, days=days, force=force))
              for d in device_ids]
    emit(output, {"ca": str(Path(ca) / "ca.crt"), "issued": issued},
         text=lambda: "\n".join(f"{c['name']}: {c['cert']} {c['key']}" for c in issued))


@certs_app.command("site")
def certs_site(
    site: str = typer.Argument(..., help="The site's name (the bridge's CN is bridge-SITE)."),
    ca: Path = typer.Option(..., "--ca", help="The directory `certs init` wrote: ca.crt, "
                            "ca.key, and the central broker's broker/acl (updated here)."),
    out: Path = typer.Option(..., "--out", help="Directory for the site broker's files."),
    central_host: str = typer.Option(..., "--central-host", help="The central broker's name "
                                     "as its certificate has it."),
    central_port: int = typer.Option(8883, "--central-port"),
    broker_host: list[str] = typer.Option(
        ["localhost", "127.0.0.1"], "--broker-host",
        help="Host name or IP address the site's devices use to reach the site broker "
        "(repeatable)."),
    port: int = typer.Option(8883, "--port", help="TLS port of the site broker."),
    device: list[str] = typer.Option([], "--device", help="The site's device ids "
                                     "(repeatable): the bridge carries only theirs. None: "
                                     "every device's topics."),
    prefix: str = typer.Option("edgefleet", "--prefix", help="MQTT topic prefix."),
    k3s: bool = typer.Option(False, "--k3s", help="Write the broker configuration for the "
                             "site overlay's pod (its mount paths) instead of for OUT."),
    force: bool = typer.Option(False, "--force", help="Replace existing certificates."),
    output: str = output_opt(),
) -> None:
    """A site broker bridged to the central broker: its server certificate, the bridge's
    client certificate, OUT/broker/mosquitto.conf + acl, and the bridge's block in the
    central broker's ACL (CA/broker/acl). See docs/deploy-k3s.md, Sites.

    Examples:

      edgefleet fleet certs site fab2 --ca pki --out site-fab2 --central-host mqtt.example.com

      edgefleet fleet certs site fab2 --ca pki --out fab2 --central-host mqtt --device box-a --k3s

      edgefleet fleet certs site fab3 --ca pki --out site-fab3 --central-host mqtt -o json
    """
    from agent.fsio import atomic_write
    from fleet.bridge import (
        Bridge,
        add_bridge_to_acl,
        render_site_broker_config,
        render_site_broker_k3s,
    )
    from fleet.certs import BROKER_NAME, issue_bridge, issue_server

    check_output(output)
    server = issue_server(ca, out, hosts=tuple(broker_host), force=force)
    link = issue_bridge(ca, out, site, force=force)
    bridge = Bridge(site, central_host, central_port, ca_file=link.ca, cert_file=link.cert,
                    key_file=link.key, devices=tuple(device), local_prefix=prefix,
                    remote_prefix=prefix)
    if k3s:
        (out / "broker").mkdir(parents=True, exist_ok=True)
        for name, text in render_site_broker_k3s(bridge).items():
            atomic_write(out / "broker" / name, text.encode())
        conf = out / "broker" / "mosquitto.conf"
    else:
        conf = render_site_broker_config(out / "broker", bridge, port=port, tls=True,
                                         bind="0.0.0.0", ca_file=server.ca,
                                         cert_file=server.cert, key_file=server.key)
    central_acl = Path(ca) / "broker" / "acl"
    acl_updated = central_acl.exists()
    if acl_updated:
        add_bridge_to_acl(central_acl, bridge)
    doc = {"site": site, "broker": {**_cert_doc(BROKER_NAME, server), "hosts": list(broker_host)},
           "bridge": {**_cert_doc(bridge.client_id, link),
                      "central": f"{central_host}:{central_port}", "devices": list(device)},
           "broker_config": str(conf), "central_acl": str(central_acl),
           "central_acl_updated": acl_updated}

    def text() -> str:
        from fleet.bridge import render_bridge_acl

        lines = [f"site broker: {server.cert} for {', '.join(broker_host)}",
                 f"bridge:      {link.cert} (CN {bridge.client_id}) to "
                 f"{central_host}:{central_port}, "
                 f"{len(device) or 'every'} device{'s' if len(device) != 1 else ''}",
                 f"site broker configuration: {conf} (mosquitto -c {conf})"]
        if acl_updated:
            return "\n".join([*lines, f"central ACL: {central_acl} lets {bridge.client_id} in "
                               "(reload the central broker: kill -HUP)"])
        return "\n".join([*lines, f"no {central_acl}: add this to the central broker's ACL:",
                           render_bridge_acl(bridge)])

    emit(output, doc, text=text)


# -- devices ----------------------------------------------------------------------------------


@app.command("devices")
def devices_cmd(
    name: str = typer.Argument(None, metavar="NAME",
                               help="One device: its state, labels and history."),
    selector: str = typer.Option("", "--selector", "-l",
                                 help="Label selector, e.g. site=fab2,tester in (t5k,t7)."),
    output: str = read_output(),
    store: Path = store_opt(), db: str = db_opt(),
    mqtt_host: str = mqtt_opts()["mqtt_host"], mqtt_port: int = mqtt_opts()["mqtt_port"],
    mqtt_ca: Path = mqtt_opts()["mqtt_ca"], mqtt_cert: Path = mqtt_opts()["mqtt_cert"],
    mqtt_key: Path = mqtt_opts()["mqtt_key"], prefix: str = mqtt_opts()["prefix"],
) -> None:
    """Every known device from its retained state: online, model, health, labels, last seen.
    An offline device's HEALTH is `unknown` (its last report is in `-o json`). With NAME,
    one device: its state, both models, its last command, and the rollouts that targeted it
    (from the rollout database in --store, when there is one).

    Examples:

      edgefleet fleet devices -l site=fab2

      edgefleet fleet devices -o wide

      edgefleet fleet devices box-a --store /srv/edgefleet/artifacts

      edgefleet fleet devices -l site=fab2 -o name
    """
    from fleet.inventory import (
        Inventory,
        Selector,
        device_history,
        device_view,
        devices_table,
        open_controller,
    )

    check(output)
    sel = Selector.parse(selector)
    with open_controller(mqtt_config(mqtt_host, mqtt_port, mqtt_ca, mqtt_cert, mqtt_key),
                         prefix=prefix) as ctl:
        inv = Inventory.from_states(ctl.devices())
    if name is not None:
        name = name.removeprefix("device/")
        if name not in inv.devices:
            raise UsageError(f"no device {name!r} ({len(inv)} known)",
                             hint="edgefleet fleet devices lists them")
        dev = inv.devices[name]
        history = None
        if db is not None or (Path(store) / "rollouts.db").exists():
            history = device_history(existing_db(store, db), name)
        emit(output, {**dev.to_json(), "state": dev.state, "history": history},
             text=lambda: device_view(dev, history), names=lambda: [f"device/{dev.id}"])
        return
    devs = inv.select(sel)
    if not devs and output in ("text", "wide"):
        typer.echo(f"no devices{' match ' + repr(str(sel)) if sel else ''} "
                   f"({len(inv)} known)", err=True)
        return

    def text(wide: bool) -> str:
        online = sum(d.online for d in devs)
        return f"{devices_table(devs, wide=wide)}\n{len(devs)} devices, {online} online"

    emit(output, [d.to_json() for d in devs], text=lambda: text(False),
         wide=lambda: text(True), names=lambda: [f"device/{d.id}" for d in devs])


@app.command("artifacts")
def artifacts_cmd(
    store: Path = store_opt(),
    output: str = read_output(),
) -> None:
    """Bundles published in the artifact store, oldest first: digest, model, sequence, size,
    when and by whom. The digest is what `rollout start sha256:DIGEST` and devices name.

    Examples:

      edgefleet fleet artifacts --store /srv/edgefleet/artifacts

      edgefleet fleet artifacts -o wide

      edgefleet fleet artifacts -o name
    """
    from fleet.artifacts import list_published
    from fleet.inventory import table

    check(output)
    if not Path(store).is_dir():
        raise UsageError(f"artifact store {store} does not exist",
                         hint="publish a bundle first: edgefleet fleet publish FILE --store DIR")
    pubs = list_published(store)

    def text(wide: bool) -> str:
        if not pubs:
            return f"no bundles published in {store}"
        head = ("DIGEST", "MODEL", "SEQ", "SIZE", "PUBLISHED", "BY")
        return table([head + (("PATH",) if wide else ())] + [
            (p.digest if wide else p.digest[:12], f"{p.name} {p.version}", str(p.sequence),
             str(p.size), p.published, p.published_by) + ((str(p.path),) if wide else ())
            for p in pubs])

    emit(output, [p.to_json() for p in pubs], text=lambda: text(False),
         wide=lambda: text(True), names=lambda: [f"sha256:{p.digest}" for p in pubs])


# -- publish, serve-artifacts -----------------------------------------------------------------


@app.command("publish")
def publish_cmd(
    bundle: Path = typer.Argument(..., help="The signed bundle (*.efb)."),
    keyring: Path = typer.Option(..., "--keyring", envvar="EDGEFLEET_KEYRING",
                                 help="The keyring devices trust (release keys)."),
    store: Path = store_opt(),
    output: str = output_opt(),
) -> None:
    """Verify a bundle exactly as a device would, then put it in the content-addressed artifact
    store that `serve-artifacts` serves (STORE/sha256/<digest>).

    Examples:

      edgefleet fleet publish model.efb --keyring keyring --store /srv/edgefleet/artifacts

      edgefleet fleet publish model.efb --keyring keyring -o json
    """
    import json

    from agent.keys import Keyring
    from fleet.artifacts import publish
    from fleet.state import actor

    check_output(output)
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
    store: Path = store_opt(),
    host: str = typer.Option("0.0.0.0", "--host", help="Address to listen on."),
    port: int = typer.Option(8080, "--port", help="TCP port."),
    tls_cert: Path = typer.Option(None, "--tls-cert", help="Serve HTTPS with this certificate."),
    tls_key: Path = typer.Option(None, "--tls-key", help="... and this key."),
) -> None:
    """Serve STORE/sha256/<digest> over HTTP(S) (Range, HEAD) until SIGTERM or Ctrl-C. Devices
    trust none of it: the signed command pins size and digest, the bundle carries its own
    signature.

    Examples:

      edgefleet fleet serve-artifacts --store /srv/edgefleet/artifacts --port 8080

      edgefleet fleet serve-artifacts --tls-cert art.crt --tls-key art.key --port 8443
    """
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


# -- collect (fleet/cli_collect.py) -----------------------------------------------------------

app.command("collect")(collect_cmd)

# -- quality (fleet/cli_quality.py) -----------------------------------------------------------

app.command("quality")(quality_cmd)

# -- rollouts (fleet/cli_rollout.py) ----------------------------------------------------------

app.add_typer(rollout_app, name="rollout")
