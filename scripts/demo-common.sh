# Sourced by the demo scripts (scripts/demo.sh, scripts/demo-retrain.sh) after `cd` to the
# repository and setting VENV: background processes stopped on exit, step headers with the
# elapsed time, waiting for a file, a free local port.
PIDS=()

cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT

START=$SECONDS
elapsed() { printf '%d:%02d' $(( (SECONDS - START) / 60 )) $(( (SECONDS - START) % 60 )); }
step() { printf '\n\033[1m== %s\033[0m  (at %s)\n' "$*" "$(elapsed)"; }
wait_for() {  # wait_for PATH SECONDS
    for _ in $(seq 1 $(( $2 * 10 ))); do [ -e "$1" ] && return 0; sleep 0.1; done
    echo "demo: $1 did not appear within $2 s" >&2; return 1
}
free_port() {
    "$VENV/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
