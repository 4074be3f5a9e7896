"""`edgefleet agent install|rollback|models`: operate the model store of a running agent.

The commands talk to the agent's admin socket (`--admin-socket`, env EDGEFLEET_ADMIN_SOCKET,
default /run/edgefleet/admin.sock), never to the socket the test equipment uses. With
`--store DIR` they work on a store directly instead; that needs the agent to be stopped (the
store's lock says so otherwise) and is meant for recovering a box by hand.

Wire into the agent group with `register(app)`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from agent.admin import AdminClient, default_socket
from agent.cli_output import READ_FORMATS, WRITE_FORMATS, emit, read_output, write_output
from agent.cli_output import check as check_format  # `check` is also --check
from agent.errors import UsageError

if TYPE_CHECKING:
    from agent.install import Installer

_SOCKET_HELP = "Admin socket of the running agent (env EDGEFLEET_ADMIN_SOCKET)."
_STORE_HELP = "Work on this model store directly (agent stopped) instead of the admin socket."


def register(app: typer.Typer) -> None:
    """Add `install`, `rollback` and `models` to the `edgefleet agent` group."""
    app.command("install")(install_cmd)
    app.command("rollback")(rollback_cmd)
    app.command("models")(models_cmd)


def install_cmd(
    bundle: Path = typer.Argument(..., help="Bundle file (*.efb), readable by the agent."),
    force: bool = typer.Option(False, "--force", help="Allow a different input width."),
    admin_socket: Path = typer.Option(None, "--admin-socket", help=_SOCKET_HELP),
    store: Path = typer.Option(None, "--store", help=_STORE_HELP),
    keyring: Path = typer.Option(None, "--keyring", help="Keyring directory (with --store)."),
    output: str = write_output(),
) -> None:
    """Install a model bundle: verify, unpack, load, self-test, then switch to it. On any
    failure the agent keeps serving what it served before, and this says why (exit 1).

    Examples:

      edgefleet agent install model.efb --admin-socket /run/edgefleet/admin.sock

      edgefleet agent install model.efb --store /var/lib/edgefleet/store --keyring keyring
    """
    check_format(output, WRITE_FORMATS)
    if not bundle.is_file():
        raise UsageError(f"{bundle}: no such file")
    if store is not None:
        if keyring is None:
            raise UsageError("--store needs --keyring to verify the bundle")
        with _offline(store, keyring) as inst:
            result = inst.install(bundle, force=force).to_json()
    else:
        result = AdminClient(admin_socket or default_socket()).install(bundle, force=force)
    _show(output, result, _result_line)


def rollback_cmd(
    to: str = typer.Option(None, "--to", help="Version id to return to (default: previous)."),
    admin_socket: Path = typer.Option(None, "--admin-socket", help=_SOCKET_HELP),
    store: Path = typer.Option(None, "--store", help=_STORE_HELP),
    output: str = write_output(),
) -> None:
    """Go back to the previous model (or a retained one, --to), locally, without a download.
    Allowed although its sequence is lower; it is checked and self-tested first.

    Examples:

      edgefleet agent rollback --admin-socket /run/edgefleet/admin.sock

      edgefleet agent rollback --to 3-1.2.0-0a1b2c3d4e5f -o json
    """
    check_format(output, WRITE_FORMATS)
    if store is not None:
        _existing(store)
        with _offline(store, None) as inst:
            result = inst.rollback(to).to_json()
    else:
        result = AdminClient(admin_socket or default_socket()).rollback(to)
    _show(output, result, _result_line)


def models_cmd(
    check: bool = typer.Option(False, "--check", help="Also verify each version's digests."),
    admin_socket: Path = typer.Option(None, "--admin-socket", help=_SOCKET_HELP),
    store: Path = typer.Option(None, "--store", help=_STORE_HELP),
    output: str = read_output(),
) -> None:
    """List installed model versions: which is active, which is the rollback target.

    Examples:

      edgefleet agent models --admin-socket /run/edgefleet/admin.sock

      edgefleet agent models --check -o wide
    """
    check_format(output, READ_FORMATS)
    if store is not None:
        from agent.store import Store

        s = Store(_existing(store))
        result: dict[str, Any] = {
            "active": s.active(), "previous": s.previous(),
            "highest_sequence": s.highest_sequence(),
            "versions": [v.to_json() for v in s.list_versions(check=check)],
        }
    else:
        result = AdminClient(admin_socket or default_socket()).models(check=check)
    emit(output, result, text=lambda: _models_table(result, False),
         wide=lambda: _models_table(result, True),
         names=lambda: [f"model/{v['id']}" for v in result["versions"]])


# --


def _existing(store: Path) -> Path:
    if not (store / "versions").is_dir():
        raise UsageError(f"{store} is not a model store (no versions/ directory)")
    return store


def _show(output: str, result: dict[str, Any], text) -> None:
    emit(output, result, text=lambda: text(result))


def _result_line(r: dict[str, Any]) -> str:
    if r["outcome"] == "unchanged":
        return f"{r['id']} is already active; nothing changed"
    ms = sum(r["timings"].values()) * 1000
    verb = "installed" if r["op"] == "install" else "rolled back to"
    return f"{verb} {r['id']} (was {r['from_id'] or 'none'}) in {ms:.0f} ms"


def _models_table(r: dict[str, Any], wide: bool = False) -> str:
    rows = [("", "ID", "NAME", "VERSION", "SEQ", "LAST ACTIVE", "CHECK")]
    if wide:
        rows[0] = ("", "ID", "NAME", "VERSION", "SEQ", "CREATED", "LAST ACTIVE", "CHECK")
    for v in r["versions"]:
        mark = "*" if v["active"] else ("p" if v["previous"] else "")
        last = (time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(v["last_active"]))
                if v["last_active"] else "-")
        checked = "-" if v["problems"] is None else ("ok" if not v["problems"] else
                                                    "DAMAGED: " + v["problems"][0])
        extra = (str(v.get("created") or "-"),) if wide else ()
        rows.append((mark, v["id"], v["name"], v["version"], str(v["sequence"]), *extra, last,
                     checked))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)) + "  " + row[-1]
             for row in rows]
    lines.append(f"(* active, p previous; highest sequence installed: {r['highest_sequence']})")
    if r.get("integrity") and not r["integrity"]["ok"]:
        lines.append(f"integrity: {r['integrity']['action']}: {r['integrity']['problems'][0]}")
    return "\n".join(lines)


@contextlib.contextmanager
def _offline(store: Path, keyring: Path | None) -> Iterator[Installer]:
    """An installer on a store whose agent is stopped (takes the store lock, recovers first)."""
    from agent.install import InstallConfig, Installer

    inst = Installer.open(store, keyring or Path("/nonexistent"), InstallConfig.from_env())
    try:
        inst.recover()
        yield inst
    finally:
        inst.close()
