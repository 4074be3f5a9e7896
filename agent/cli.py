"""`edgefleet agent ...`: run and operate the on-device agent.

    edgefleet agent serve --socket /run/edgefleet/agent.sock --store /var/lib/edgefleet/store \\
        --keyring /etc/edgefleet/keyring [--metrics-addr 0.0.0.0:9464] [--config agent.toml]
    edgefleet agent predict --socket S --die-id W3-12-07 0.51 0.49 '' 1.2 ...   # one die
    edgefleet agent predict --socket S --file dies.csv                          # a CSV file
    edgefleet agent health --socket S [-o text|wide|json|yaml|name]
    edgefleet agent info --socket S [-o text|wide|json|yaml|name]
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import typer

from agent import admin_cli
from agent.cli_output import check, emit, read_output
from agent.config import AgentConfig
from agent.errors import UsageError

app = typer.Typer(
    help="Run the on-device agent: serve predictions on a Unix socket, install models.",
    no_args_is_help=True,
)

_SOCKET_HELP = "The agent's Unix socket."
_D = AgentConfig()  # the defaults, shown in --help


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
        None, "--max-missing-share", help="Refuse a die with more missing values than this "
        f"share of its parameters ({_D.max_missing_share:g})."
    ),
    log_level: str = typer.Option(None, "--log-level", help="debug, info, warning, error."),
    max_line_bytes: int = typer.Option(
        None, "--max-line-bytes", help=f"Longest JSON line; longer: too_large, closed "
        f"({_D.max_line_bytes})."),
    max_frame_bytes: int = typer.Option(
        None, "--max-frame-bytes", help=f"Largest binary frame, header included; larger: "
        f"too_large, closed ({_D.max_frame_bytes})."),
    max_connections: int = typer.Option(
        None, "--max-connections", help=f"Open connections; when all are taken the one idle "
        f"longest (1 s or more) is closed for a new one, else busy ({_D.max_connections})."),
    max_connections_per_peer: int = typer.Option(
        None, "--max-connections-per-peer", help="Open connections from one process (its pid); "
        f"beyond: busy ({_D.max_connections_per_peer})."),
    idle_timeout_s: float = typer.Option(
        None, "--idle-timeout", help="Seconds a connection may wait between messages; 0: "
        f"forever ({_D.idle_timeout_s:g})."),
    message_timeout_s: float = typer.Option(
        None, "--message-timeout", help="Seconds a message may take to arrive whole, from its "
        f"first bytes ({_D.message_timeout_s:g})."),
    io_timeout_s: float = typer.Option(
        None, "--io-timeout", help="Seconds an answer may wait for the client to read it "
        f"({_D.io_timeout_s:g})."),
    log_format: str = typer.Option(None, "--log-format", help="text or json (one object a line)."),
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
    Settings come from flags, then EDGEFLEET_AGENT_<SETTING> environment variables (the
    setting's name in capitals, e.g. EDGEFLEET_AGENT_IDLE_TIMEOUT_S=60), then --config, then
    the defaults in brackets. One event loop serves every connection, and single-row frames
    that arrive together from several connections are scored in one model run (no setting;
    docs/protocol.md, "Serving many test heads"). The protocol and its limits are in
    docs/protocol.md; the prediction log, capture and labels (EDGEFLEET_AGENT_PREDLOG_*,
    CAPTURE_*, LABELS_DIR, DATA_ADDR) in docs/operations.md.

    Examples:

      edgefleet agent serve --socket /run/edgefleet/agent.sock --store models --keyring keyring

      edgefleet agent serve --socket /tmp/a.sock --rules rules.json --metrics-addr 127.0.0.1:9464

      edgefleet agent serve --config /etc/edgefleet/agent.toml --log-format json
    """
    from agent.config import load_config

    cfg = load_config(config, socket=socket, store=store, keyring=keyring, rules=rules,
                      admin_socket=admin_socket,
                      metrics_addr=metrics_addr, socket_mode=socket_mode,
                      socket_group=socket_group, threads=threads,
                      max_missing_share=max_missing_share, log_level=log_level,
                      max_line_bytes=max_line_bytes, max_frame_bytes=max_frame_bytes,
                      max_connections=max_connections,
                      max_connections_per_peer=max_connections_per_peer,
                      idle_timeout_s=idle_timeout_s, message_timeout_s=message_timeout_s,
                      io_timeout_s=io_timeout_s,
                      log_format=log_format,
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
def health(socket: Path = typer.Option(..., "--socket", help=_SOCKET_HELP),
           output: str = read_output()) -> None:
    """Ask a running agent whether it can answer (exit 1 when it cannot).

    Examples:

      edgefleet agent health --socket /run/edgefleet/agent.sock

      edgefleet agent health --socket /run/edgefleet/agent.sock -o json
    """
    from agent.client import Client

    check(output)
    with Client(socket) as c:
        h = c.health()
    h.pop("id", None)

    def text(wide: bool = False) -> str:
        line = f"{h.get('status')}: " + (
            f"model {h['model_version']}" if h.get("model_version") else "no model")
        if h.get("fallback_reason"):
            line += f", answering from the fallback rules ({h['fallback_reason']})"
        return line + (f", up {h.get('uptime_s', 0):.0f} s" if wide else "")

    emit(output, h, text=text, wide=lambda: text(True),
         names=lambda: [f"agent/{socket}"])
    if not h.get("ok"):
        raise typer.Exit(1)


@app.command("info")
def info(socket: Path = typer.Option(..., "--socket", help=_SOCKET_HELP),
         output: str = read_output()) -> None:
    """Show what a running agent serves: model, width, threshold, fallback, uptime.

    Examples:

      edgefleet agent info --socket /run/edgefleet/agent.sock

      edgefleet agent info --socket /run/edgefleet/agent.sock -o yaml
    """
    from agent.client import Client

    check(output)
    with Client(socket) as c:
        i = c.info()
    i.pop("id", None)
    emit(output, i, text=lambda: _info_text(i, False), wide=lambda: _info_text(i, True),
         names=lambda: [f"agent/{socket}"])


def _info_text(i: dict, wide: bool) -> str:
    m, fb = i.get("model"), i.get("fallback") or {}
    rows = [("model", f"{m['name']} {m['version']} (sequence {m['sequence']})" if m else
             "none"),
            ("input", f"{i.get('n_features')} parameters"),
            ("threshold", f"{i['threshold']:.6g} (top_k {i.get('top_k')})"
             if i.get("threshold") is not None else "-"),
            ("fallback", (f"active: {fb.get('reason')}" if fb.get("active") else "inactive")
             + f", {fb.get('rules', 0)} rules"),
            ("ready", "yes" if i.get("ready") else "no"),
            ("uptime", f"{i.get('uptime_s', 0):.0f} s")]
    if wide:
        rows += [("bundle digest", (m.get("digest") or "-") if m else "-"),
                 ("model sha256", (m.get("model_sha256") or "-") if m else "-"),
                 ("protocol", str(i.get("protocol"))),
                 ("json parser", str(i.get("json_parser"))),
                 ("max missing", str(i.get("max_missing"))),
                 ("rules version", str(fb.get("rules_version") or "-"))]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


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
        "n_features numeric columns) and an optional die-id column (whole-number ids are "
        "sent with the dies, so labels join on them). Missing: empty, nan, null or na. "
        "Read in chunks by polars when installed (pip install 'edgefleet[screen]': ~1.5x "
        "less CPU per value) for files of 8 MB and more, else by orjson; a bad row stops the "
        "run with its line. "
        "docs/protocol.md, \"Screening a CSV file\"."
    ),
    id_column: str = typer.Option("die_id", "--id-column", help="CSV column holding die ids."),
    batch: int = typer.Option(256, "--batch", min=1, max=65536, help="Dies per request."),
    output: str = typer.Option("text", "--output", "-o", help="text or json (one per line)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Files: print the summary only."),
) -> None:
    """Screen one die (from arguments) or a CSV file of dies.

    Prints each decision, and for files progress and a latency summary on stderr. Exit 1 when
    any die was refused with an error.

    Examples:

      edgefleet agent predict --socket /run/edgefleet/agent.sock --file dies.csv --batch 256 -q

      edgefleet agent predict --socket /run/edgefleet/agent.sock --die-id W3-17 0.2 1.5 3.1

      edgefleet agent predict --socket /run/edgefleet/agent.sock -f dies.csv -o json
    """
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


def _predict_one(c, values: list[str], die_id: str | None, output: str) -> bool:
    from agent.csvread import parse_value

    cells = [cell for v in values for cell in v.split(",")]
    params = [parse_value(v, f"value {i}") for i, v in enumerate(cells)]
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


def _predict_file(c, path: Path, id_column: str, batch: int, output: str, quiet: bool) -> bool:
    """Screen a CSV: a reader thread parses the next blocks (agent/csvread.py) while this one
    sends blocks and the agent scores them (`Client.predict_stream`); answers are read as
    arrays, and only printed dies become text."""
    from collections import deque

    from agent import csvread
    from agent.client import AgentError

    meta = c.info(feature_names=True)
    if not meta.get("ready"):
        raise AgentError("unavailable", "the agent has no model and no fallback rules")
    size = path.stat().st_size if path.is_file() else 0
    read = [0]  # bytes parsed so far: progress without counting the file's lines first
    counts = {"pass": 0, "fail": 0, "error": 0, "fallback": 0}
    server_us: list[float] = []
    t_start, done, last = time.perf_counter(), 0, 0.0
    tty = sys.stderr.isatty()
    sent_ids: deque[list[str]] = deque()

    def on_read(nbytes: int) -> None:
        read[0] += nbytes

    def blocks():
        for ids, x in csvread.prefetched(csvread.read_batches(
                path, id_column, meta.get("feature_names"), meta["n_features"], batch,
                on_read=on_read)):
            numeric = _numeric_ids(ids)
            # whole-number ids go with the dies (the agent logs them: final-test labels join on
            # them); any other id is echoed here only, the frame carries its position
            sent_ids.append(ids if numeric is None else None)
            yield x, numeric

    for res in c.predict_stream(blocks()):
        ids = sent_ids.popleft() or _Echo()
        for key, value in res.counts().items():
            counts[key] += value
        server_us.append(res.latency_us / len(res))
        if not quiet:
            sys.stdout.write(_answer_lines(res, ids, meta, output))
        done += len(res)
        now = time.perf_counter()
        if now - last > (0.2 if tty else 5.0):  # progress: live on a terminal, sparse in logs
            last = now
            print(f"\r{done} dies ({100 * read[0] / max(size, 1):.0f}% of the file read), "
                  f"{done / max(now - t_start, 1e-9):,.0f} dies/s", end="" if tty else "\n",
                  file=sys.stderr, flush=True)
    sys.stdout.flush()
    elapsed = time.perf_counter() - t_start
    print(f"\r{done} dies (100% of the file read)", file=sys.stderr)
    per_die = sorted(server_us)
    p50 = per_die[len(per_die) // 2] if per_die else 0.0
    print(f"{done} dies: {counts['pass']} pass, {counts['fail']} fail "
          f"({counts['fallback']} by fallback rules), {counts['error']} refused; "
          f"model {meta['model']['version'] if meta.get('model') else '-'}; agent time per die "
          f"p50 {p50:.1f} us (batches of {batch}); {done / max(elapsed, 1e-9):,.0f} dies/s "
          f"end to end (CSV read by {csvread.engine_for(size)})", file=sys.stderr)
    return counts["error"] == 0


class _Echo:
    """The ids of a block sent with its dies: the answer's die id is the id itself."""

    def __getitem__(self, die_id: int) -> str:
        return str(die_id)


def _numeric_ids(ids: list[str]):
    """`ids` as u64 die ids when each is a plain whole number (its own decimal text, as
    `die_key` in agent/dieindex.py reads it), else None."""
    import numpy as np

    if not ids or not all(i.isdigit() and (i == "0" or i[0] != "0") and len(i) <= 19
                          for i in ids):
        return None
    return np.array([int(i) for i in ids], dtype=np.uint64)


def _answer_lines(res, ids, meta: dict, output: str) -> str:
    """One batch's answers as text (or JSON) lines, from its record arrays."""
    from agent.protocol import DECISION_LABELS, SOURCE_LABELS, row_error

    out = []
    rec = res.records
    for pos, decision, source, code, imputed, col, score, top_i, top_c in zip(
            rec["die_id"].tolist(), rec["decision"].tolist(), rec["source"].tolist(),
            rec["error_code"].tolist(), rec["imputed"].tolist(), rec["error_column"].tolist(),
            rec["score"].tolist(), rec["top_index"].tolist(), rec["top_contribution"].tolist(),
            strict=True):
        die = ids[pos]
        err = row_error(code, col, imputed, 0, 0) if decision == 2 else None
        top = [(i, v) for i, v in zip(top_i, top_c, strict=True) if i >= 0] if decision == 1 \
            else []
        if output == "json":
            out.append(json.dumps({"die_id": die, "decision": DECISION_LABELS[decision],
                                   "score": score, "source": SOURCE_LABELS[source],
                                   "error": err.code.label if err else None,
                                   "top": [list(t) for t in top]}) + "\n")
        elif err:
            out.append(f"{die}\terror\t{err.code.label}: {err.message}\n")
        else:
            names = " ".join(f"{_name(meta, i)}={v:.3g}" for i, v in top)
            out.append(f"{die}\t{DECISION_LABELS[decision]}\t{score:.4g}\t"
                       f"{SOURCE_LABELS[source]}\t{names}\n")
    return "".join(out)


def _name(meta: dict, i: int) -> str:
    names = meta.get("feature_names")
    return names[i] if names else str(i)


admin_cli.register(app)  # install, rollback, models: through the admin socket
