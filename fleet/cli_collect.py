"""`edgefleet fleet collect`: the command around fleet/collect.py (registered in fleet/cli.py).

    edgefleet fleet collect --device box-a=10.0.0.5:9465 --device box-b=10.0.0.6:9465 \\
        --out dataset/ --ca pki/ca.crt --cert pki/edgefleet-controller.crt \\
        --key pki/edgefleet-controller.key [--stream capture --stream labels] [--max-records N]
        [--since 2h]
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from agent.errors import UsageError
from fleet.cli_options import check_output, mqtt_config, mqtt_opts, output_opt


def collect_cmd(
    device: list[str] = typer.Option(None, "--device", "-d",
                                     help="ID=HOST:PORT of a device's data feed (repeat)."),
    selector: str = typer.Option(None, "--selector", "-l", help="Or: the devices these labels "
                                 "select in the fleet inventory, at the data feed address "
                                 "each reports (read from the broker)."),
    out: Path = typer.Option(..., "--out", help="Dataset directory (created; runs resume it)."),
    ca: Path = typer.Option(..., "--ca", envvar="EDGEFLEET_MQTT_CA", help="Fleet CA (PEM)."),
    cert: Path = typer.Option(..., "--cert", envvar="EDGEFLEET_MQTT_CERT",
                              help="The controller's certificate (PEM)."),
    key: Path = typer.Option(..., "--key", envvar="EDGEFLEET_MQTT_KEY",
                             help="The controller's private key (PEM)."),
    stream: list[str] = typer.Option(["capture", "labels"], "--stream",
                                     help="capture, labels or predictions (repeat)."),
    max_records: int = typer.Option(50_000, "--max-records", min=1,
                                    help="At most this many records per device and stream."),
    since: str = typer.Option(None, "--since", help="Only what the devices logged since: a "
                              "duration back (90m, 2h, 7d) or an ISO 8601 time; older records "
                              "are skipped, and not pulled again."),
    mqtt_host: str = mqtt_opts()["mqtt_host"],
    mqtt_port: int = mqtt_opts()["mqtt_port"],
    prefix: str = mqtt_opts()["prefix"],
    output: str = output_opt(),
) -> None:
    """Pull captured rows (the sample and every fail), labels and optionally predictions from
    devices into a dataset directory with provenance; resumable (per-device cursors).

    Examples:

      edgefleet fleet collect -d box-a=10.0.0.5:9465 --out ds/ --ca ca.crt --cert c.crt --key c.key

      edgefleet fleet collect -d box-b=10.0.0.6:9465 --out data/ --stream predictions -o json

      edgefleet fleet collect -d box-a=10.0.0.5:9465 --out drift/ --since 2h   # recent dies only

      edgefleet fleet collect -l site=fab2 --out ds/   # addresses from the devices' states

    With -o json: one document, the dataset directory (out), the records pulled in all,
    the devices not collected (failed) and each device's report (pulled, gaps, cursors).
    """
    import time

    from agent.cli_output import emit
    from fleet.collect import CollectTLS, collect, parse_device, parse_since

    check_output(output)
    if bool(device) == (selector is not None):
        raise UsageError("give the devices either as --device ID=HOST:PORT or with "
                         "--selector LABELS (from the fleet inventory)")
    devices, skipped = [parse_device(d) for d in device or ()], []
    if selector is not None:
        devices, skipped = _from_inventory(selector, mqtt_config(
            mqtt_host, mqtt_port, ca, cert, key), prefix)
    reports = skipped + collect(devices, out, CollectTLS(ca, cert, key), streams=stream,
                                max_records=max_records, since=parse_since(since, time.time()))
    failed = [r for r in reports if not r.ok]
    doc = {"out": str(out), "records": sum(sum(r.pulled.values()) for r in reports),
           "failed": [r.device for r in failed], "devices": [r.to_json() for r in reports]}
    emit(output, doc, text=lambda: _table(reports))
    if failed:
        typer.echo(f"error: {len(failed)} of {len(reports)} devices not collected "
                   f"({', '.join(r.device for r in failed)}); run again to resume", err=True)
        raise typer.Exit(1)


def _from_inventory(selector: str, mqtt: Any, prefix: str) -> tuple[list, list]:
    from fleet.collect import devices_from_inventory
    from fleet.inventory import Inventory, Selector, open_controller

    sel = Selector.parse(selector)
    with open_controller(mqtt, prefix=prefix) as ctl:
        inv = Inventory.from_states(ctl.devices())
    found, skipped = devices_from_inventory(inv, sel)
    if not found and not skipped:
        raise UsageError(f"selector {selector!r} matches no device ({len(inv)} known)",
                         hint="see: edgefleet fleet devices")
    return found, skipped


def _table(reports: list) -> str:
    """One line per device and stream: what was pulled, the gaps, where the cursor stands."""
    lines = [f"{'DEVICE':16} {'STREAM':12} {'PULLED':>8} {'GAP':>6} {'CURSOR':>10}  NOTE"]
    for r in reports:
        if not r.ok:
            lines.append(f"{r.device:16} {'-':12} {'-':>8} {'-':>6} {'-':>10}  {r.error}")
            continue
        for s, n in r.pulled.items():
            note = "more to pull (bound reached)" if r.more.get(s) else ""
            lines.append(f"{r.device:16} {s:12} {n:>8} {r.gaps.get(s, 0):>6} "
                         f"{r.cursors.get(s, 0):>10}  {note}")
    return "\n".join(lines)
