#!/usr/bin/env bash
# `make demo`: edgefleet's main job end to end, on this machine, in demo-out/.
#
#   1. generate 20,000 dies of a 512-parameter test program (with gross and subtle defects)
#   2. make a release key and a device keyring that trusts it
#   3. build the model: train, prune, INT8, calibrate, evaluate, sign      (about a minute)
#   4. verify the bundle as a device would
#   5. start an agent with an empty model store, install the bundle through its admin socket,
#      and screen the last 5,000 dies over its Unix socket, showing decisions and latency
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
EF="$VENV/bin/edgefleet"
OUT=${DEMO_OUT:-demo-out}
PIDS=()

cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
wait_for() {  # wait_for PATH SECONDS
    for _ in $(seq 1 $(( $2 * 10 ))); do [ -e "$1" ] && return 0; sleep 0.1; done
    echo "demo: $1 did not appear within $2 s" >&2; return 1
}

rm -rf "$OUT"
mkdir -p "$OUT"

step "1. Generate 20,000 dies (512 parameters, gross and subtle defects)"
"$EF" optimize make-data --n 20000 --seed 0 --out "$OUT/dies.csv"

step "2. A release key, and a device keyring that trusts it for bundles"
"$EF" keys generate --out "$OUT/keys" --name release
"$EF" keys trust "$OUT/keys/release.pub" --keyring "$OUT/keyring" --role release

step "3. Build the model: train, prune, quantize to INT8, calibrate, evaluate, sign"
"$EF" optimize build --data "$OUT/dies.csv" --key "$OUT/keys/release.key" --out "$OUT/build"

step "4. Verify the bundle exactly as a device does"
"$EF" bundle verify "$OUT/build/model.efb" --keyring "$OUT/keyring"
"$EF" bundle inspect "$OUT/build/model.efb" --keyring "$OUT/keyring"

step "5. Start an agent (empty store: no model yet), install the bundle, screen dies"
# Unix socket paths are short (107 bytes): keep the sockets in a short directory.
RUN=$(mktemp -d /tmp/edgefleet-demo.XXXXXX)
"$EF" agent serve --socket "$RUN/agent.sock" --store "$OUT/store" --keyring "$OUT/keyring" \
    --metrics-addr 127.0.0.1:0 --log-level warning 2> "$OUT/agent.log" &
PIDS+=($!)
wait_for "$RUN/admin.sock" 30
"$EF" agent install "$OUT/build/model.efb" --admin-socket "$RUN/admin.sock"
"$EF" agent info --socket "$RUN/agent.sock"
# The last 5,000 dies: the period the model never saw in training (the build's test split).
{ head -n 1 "$OUT/dies.csv"; tail -n 5000 "$OUT/dies.csv"; } > "$OUT/screen.csv"
"$EF" agent predict --socket "$RUN/agent.sock" --file "$OUT/screen.csv" > "$OUT/decisions.txt"
echo "first decisions (all 5,000 are in $OUT/decisions.txt):"
head -n 5 "$OUT/decisions.txt"
grep -m 3 " fail " "$OUT/decisions.txt" || true

step "Done"
echo "report: $OUT/build/report.md   bundle: $OUT/build/model.efb   agent log: $OUT/agent.log"
