"""`edgefleet agent ...`: run and operate the on-device agent.

    edgefleet agent serve --socket /run/edgefleet/agent.sock --store /var/lib/edgefleet/store \\
        --keyring /etc/edgefleet/keyring [--metrics-addr 0.0.0.0:9464] [--config agent.toml]
    edgefleet agent predict --socket S --die-id W3-12-07 0.51 0.49 '' 1.2 ...   # one die
    edgefleet agent predict --socket S --file dies.csv                          # a CSV file
    edgefleet agent health --socket S
    edgefleet agent info --socket S
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
import time
from pathlib import Path

import typer

from agent import admin_cli
from agent.errors import UsageError

app = typer.Typer(
    help="Run the on-device agent: serve predictions on a Unix socket, install models.",
    no_args_is_help=True,
)

_SOCKET_HELP = "The agent's Unix socket."


@app.command("serve")
def serve(
    socket: Path = typer.Option(None, "--socket", help="Unix socket to listen on."),
    store: Path = typer.Option(
        None, "--store", help="Model store directory (docs/operations.md); needs --keyring."
    ),
    keyring: Path = typer.Option(None, "--keyring", help="Keyring to verify models with."),
    admin_socket: Path = typer.Option(
        None, "--admin-socket",
        help="Admin socket for install/rollback/models (default: admin.sock beside --socket).",
    ),
    rules: Path = typer.Option(
        None, "--rules", help="Standalone fallback rules (JSON), used while no model is loaded."
    ),
    metrics_addr: str = typer.Option(
        None, "--metrics-addr", help="HOST:PORT for /metrics, /healthz, /readyz ('' = off)."
    ),
    config: Path = typer.Option(None, "--config", help="TOML file; flags and env override it."),
    socket_mode: str = typer.Option(None, "--socket-mode", help="Octal file mode (0660)."),
    socket_group: str = typer.Option(None, "--socket-group", help="Group owning the socket."),
    threads: int = typer.Option(None, "--threads", help="ONNX Runtime intra-op threads (1)."),
    max_missing_share: float = typer.Option(
        None, "--max-missing-share", help="Refuse a die with more missing values than this."
    ),
    log_level: str = typer.Option(None, "--log-level", help="debug, info, warning, error."),
    predlog_dir: Path = typer.Option(
        None, "--predlog-dir", help="Prediction log and capture (default: beside --store)."
    ),
    capture_rate: float = typer.Option(
        None, "--capture-rate", help="Share of dies whose input row is captured (0.01)."
    ),
    labels_dir: Path = typer.Option(
        None, "--labels-dir", help="MES label drop directory (incoming/, done/, rejected/)."
    ),
) -> None:
    """Serve predictions on a Unix socket until SIGTERM.

    With --store, the model store is recovered and its active model self-tested before the
    socket opens; installs and rollbacks then go through the admin socket (mode 0600). When
    EDGEFLEET_MQTT_HOST is set, the fleet link starts too (docs/fleet-protocol.md).
    Settings come from flags, then EDGEFLEET_AGENT_* environment variables, then --config,
    then defaults. The protocol is in docs/protocol.md; the prediction log, capture and labels
    (EDGEFLEET_AGENT_PREDLOG_*, CAPTURE_*, LABELS_DIR, DATA_ADDR) in docs/operations.md."""
    from agent.config import load_config

    cfg = load_config(config, socket=socket, store=store, keyring=keyring, rules=rules,
                      admin_socket=admin_socket,
                      metrics_addr=metrics_addr, socket_mode=socket_mode,
                      socket_group=socket_group, threads=threads,
                      max_missing_share=max_missing_share, log_level=log_level,
                      predlog_dir=predlog_dir, capture_rate=capture_rate, labels_dir=labels_dir)
    if cfg.socket is None:
        raise UsageError("no socket path", hint="pass --socket PATH or set it in --config")
    if cfg.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise UsageError(f"--log-level must be debug, info, warning or error, not {cfg.log_level}")
    # Serve from a fresh interpreter (same PID) that never imports typer, pydantic or rich.
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-m", "agent.daemon", cfg.to_json()])


@app.command("health")
def health(socket: Path = typer.Option(..., "--socket", help=_SOCKET_HELP)) -> None:
    """Ask a running agent whether it can answer (exit 1 when it cannot)."""
    from agent.client import Client

    with Client(socket) as c:
        h = c.health()
    typer.echo(json.dumps(h))
    if not h.get("ok"):
        raise typer.Exit(1)


@app.command("info")
def info(socket: Path = typer.Option(..., "--socket", help=_SOCKET_HELP)) -> None:
    """Show what a running agent serves: model, width, threshold, fallback, uptime."""
    from agent.client import Client

    with Client(socket) as c:
        typer.echo(json.dumps(c.info(), indent=2))


@app.command("predict")
def predict(
    values: list[str] = typer.Argument(
        None, help="One die's parameters, spaces or commas between them (empty, nan or null = "
        "missing). Put -- before them when the first is negative."
    ),
    socket: Path = typer.Option(..., "--socket", help=_SOCKET_HELP),
    die_id: str = typer.Option(None, "--die-id", help="Die id to echo (one die)."),
    file: Path = typer.Option(
        None, "--file", "-f", help="CSV with a header: feature-name columns (or exactly "
        "n_features numeric columns) and an optional die-id column."
    ),
    id_column: str = typer.Option("die_id", "--id-column", help="CSV column holding die ids."),
    batch: int = typer.Option(256, "--batch", min=1, max=65536, help="Dies per request."),
    output: str = typer.Option("text", "--output", "-o", help="text or json (one per line)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Files: print the summary only."),
) -> None:
    """Screen one die (from arguments) or a CSV file of dies.

    Prints each decision, and for files progress and a latency summary on stderr. Exit 1 when
    any die was refused with an error."""
    from agent.client import Client

    if output not in ("text", "json"):
        raise UsageError(f"--output must be text or json, not {output!r}")
    if (file is None) == (not values):
        raise UsageError("give either VALUES for one die or --file CSV",
                         hint="see edgefleet agent predict --help")
    with Client(socket, timeout=60.0) as c:
        if file is None:
            ok = _predict_one(c, values, die_id, output)
        else:
            ok = _predict_file(c, file, id_column, batch, output, quiet)
    if not ok:
        raise typer.Exit(1)


def _parse_value(text: str, where: str) -> float:
    t = text.strip()
    if t == "" or t.lower() in ("nan", "null", "na"):
        return math.nan
    try:
        return float(t)
    except ValueError:
        raise UsageError(f"{where}: {text!r} is not a number (empty, nan or null = missing)"
                         ) from None


def _predict_one(c, values: list[str], die_id: str | None, output: str) -> bool:
    cells = [cell for v in values for cell in v.split(",")]
    params = [_parse_value(v, f"value {i}") for i, v in enumerate(cells)]
    answer = c.predict_json(params, die_id=die_id)
    if output == "json":
        typer.echo(json.dumps(answer))
    elif "error" in answer:
        typer.echo(f"die {die_id}: ERROR {answer['error']['code']}: "
                   f"{answer['error']['message']}")
    else:
        typer.echo(_describe(answer))
        for t in answer["top"]:
            typer.echo(f"  {t['name'] or t['index']}: {t['contribution']:.4g}")
    return "error" not in answer


def _describe(a: dict) -> str:
    op = ">" if a["decision"] == "fail" else "<="
    return (f"die {a['die_id']}: {a['decision'].upper()} score {a['score']:.4g} {op} threshold "
            f"{a['threshold']:.4g} (confidence {a['confidence']:.2f}, {a['source']} "
            f"{a['model_version'] or '-'}, {a['imputed']} imputed, {a['latency_us']:.0f} us)")


def _csv_batches(path: Path, id_column: str, names: list[str] | None, n: int, batch: int):
    """Yield (die ids, float32 rows) of up to `batch` dies, streaming the file. Columns are the
    model's feature names when the header has them all, else every column but the id."""
    import numpy as np

    if not path.is_file():
        raise UsageError(f"cannot read {path}: no such file")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise UsageError(f"{path} is empty", hint="the first line must be a header")
        pos = {h: i for i, h in enumerate(header)}
        id_col = pos.get(id_column)
        if names and all(nm in pos for nm in names):
            cols = [pos[nm] for nm in names]
        else:
            cols = [i for i in range(len(header)) if i != id_col]
            if len(cols) != n:
                raise UsageError(
                    f"{path}: the header names {len(cols)} parameter columns and not the model's "
                    f"feature names; the agent expects {n}",
                    hint="name columns as in the model (edgefleet agent info) or give exactly "
                    f"{n} columns")
        ids: list[str] = []
        rows: list[list[float]] = []
        for line_no, rec in enumerate(reader, start=2):
            if not rec:
                continue
            try:
                rows.append([_parse_value(rec[j], f"column {header[j]!r}") for j in cols])
            except IndexError:
                raise UsageError(f"{path}:{line_no}: {len(rec)} cells, the header has "
                                 f"{len(header)}") from None
            except UsageError as e:
                raise UsageError(f"{path}:{line_no}: {e}") from None
            ids.append(rec[id_col] if id_col is not None and id_col < len(rec) else
                       str(line_no - 1))
            if len(rows) == batch:
                yield ids, np.array(rows, dtype=np.float32)
                ids, rows = [], []
        if rows:
            yield ids, np.array(rows, dtype=np.float32)


def _count_rows(path: Path) -> int:
    with open(path, "rb") as f:
        lines = sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
    return max(lines - 1, 0)


def _predict_file(c, path: Path, id_column: str, batch: int, output: str, quiet: bool) -> bool:
    import numpy as np

    from agent.client import AgentError

    meta = c.info(feature_names=True)
    if not meta.get("ready"):
        raise AgentError("unavailable", "the agent has no model and no fallback rules")
    total = _count_rows(path) if path.is_file() else 0
    counts = {"pass": 0, "fail": 0, "error": 0, "fallback": 0}
    server_us: list[float] = []
    t_start, done, last = time.perf_counter(), 0, 0.0
    tty = sys.stderr.isatty()
    for ids, x in _csv_batches(path, id_column, meta.get("feature_names"), meta["n_features"],
                               batch):
        res = c.predict_batch(x, np.arange(len(x), dtype=np.uint64))
        server_us.append(res.latency_us / len(x))
        for r in res.results():
            counts[r.decision] += 1
            counts["fallback"] += r.source == "fallback"
            if quiet:
                continue
            die = ids[int(r.die_id)]
            if output == "json":
                typer.echo(json.dumps({"die_id": die, "decision": r.decision, "score": r.score,
                                       "source": r.source, "error": r.error,
                                       "top": [list(t) for t in r.top]}))
            elif r.error:
                typer.echo(f"{die}\terror\t{r.error}: {r.message}")
            else:
                top = " ".join(f"{_name(meta, i)}={v:.3g}" for i, v in r.top)
                typer.echo(f"{die}\t{r.decision}\t{r.score:.4g}\t{r.source}\t{top}")
        done += len(x)
        now = time.perf_counter()
        if now - last > (0.2 if tty else 5.0):  # progress: live on a terminal, sparse in logs
            last = now
            print(f"\r{done}/{total} dies ({100 * done / max(total, 1):.0f}%), "
                  f"{done / max(now - t_start, 1e-9):,.0f} dies/s", end="" if tty else "\n",
                  file=sys.stderr, flush=True)
    elapsed = time.perf_counter() - t_start
    print(f"\r{done}/{total} dies (100%)", file=sys.stderr)
    per_die = sorted(server_us)
    p50 = per_die[len(per_die) // 2] if per_die else 0.0
    print(f"{done} dies: {counts['pass']} pass, {counts['fail']} fail "
          f"({counts['fallback']} by fallback rules), {counts['error']} refused; "
          f"model {meta['model']['version'] if meta.get('model') else '-'}; agent time per die "
          f"p50 {p50:.1f} us (batches of {batch}); {done / max(elapsed, 1e-9):,.0f} dies/s "
          "end to end", file=sys.stderr)
    return counts["error"] == 0


def _name(meta: dict, i: int) -> str:
    names = meta.get("feature_names")
    return names[i] if names else str(i)


admin_cli.register(app)  # install, rollback, models: through the admin socket
