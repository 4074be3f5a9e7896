"""`edgefleet fleet ...`: publish bundles and run rollouts across the fleet."""

from __future__ import annotations

from pathlib import Path

import typer

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
