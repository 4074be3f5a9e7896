# Sourced by the demo scripts (scripts/demo.sh, scripts/demo-retrain.sh) after `cd` to the
# repository and setting VENV: background processes stopped on exit, step headers with the
# elapsed time, waiting for a file or a service, a free local port; on a failure, the tails of
# the services' logs (a demo that fails in CI says why).
PIDS=()
LOGS=()  # the background services' logs, shown when the demo fails

cleanup() {
    local rc=$?
    if [ "$rc" -ne 0 ]; then
        for f in "${LOGS[@]}"; do
            [ -s "$f" ] && { echo "demo: failed ($rc); last lines of $f:" >&2; tail -n 15 "$f" >&2; }
        done
    fi
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
wait_healthy() {  # wait_healthy URL SECONDS PID: until URL answers 200; fail if PID exits first
    for _ in $(seq 1 $(( $2 * 10 ))); do
        kill -0 "$3" 2>/dev/null || { echo "demo: process $3 exited before $1 answered" >&2; return 1; }
        "$VENV/bin/python" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' \
            "$1" 2>/dev/null && return 0
        sleep 0.1
    done
    echo "demo: $1 did not answer 200 within $2 s" >&2; return 1
}
free_port() {
    "$VENV/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
