#!/usr/bin/env bash
# Run the agent's tests that need no broker (protocol, bundle verification, keys, install and
# swap, fallback, ...) on an aarch64 CPython under qemu-user-static emulation: the code path
# the ARM64 boxes run, with the wheels they install.
#
#   sysroot   Debian bookworm's arm64 python3.11 (+ libstdc++ for ONNX Runtime), fetched with a
#             private apt configuration for the arm64 architecture and unpacked with dpkg-deb
#             into build/arm64/sysroot; it gets an ARM /proc/cpuinfo (below)
#   wheels    aarch64 wheels from PyPI (pip download --platform manylinux..._aarch64) at the
#             versions in docker/constraints.txt, plus the test tools, installed with --target
#             into the sysroot's dist-packages
#   run       pytest on the aarch64 interpreter (QEMU_LD_PREFIX=sysroot; child processes run
#             through the binfmt handler with the same prefix)
#
# Usage: scripts/test-arm64.sh [PYTEST ARGS...]     (make test-arm64)
# ARM64_TESTS overrides the list of test files (names under tests/, without .py).
#
# ONNX Runtime's CPU probe reads /proc/cpuinfo; under qemu-user that is the host's x86 file and
# the aarch64 library crashes on it. qemu resolves absolute paths under QEMU_LD_PREFIX first,
# so the sysroot's proc/cpuinfo (docker/podman/cpuinfo-arm64, a Neoverse-N1) is what the
# guest reads.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO="$PWD"

DIR="${ARM64_DIR:-$REPO/build/arm64}"
SYSROOT="$DIR/sysroot"
# Wheels go where the interpreter looks by itself (Debian's dist-packages under its prefix),
# so child processes that set their own PYTHONPATH still find them.
SITE="$SYSROOT/usr/lib/python3/dist-packages"
WHEELS="$DIR/wheels"
PY="$SYSROOT/usr/bin/python3.11"  # the aarch64 interpreter
APTDIR="$DIR/apt"
HOST_PYTHON="${HOST_PYTHON:-python3}"
DEB_PACKAGES=(python3.11 libstdc++6 libgcc-s1)
# Test-only wheels (the agent's own come from docker/constraints.txt). onnx: the tests build
# real models with optimize.baseline.to_onnx.
TEST_WHEELS=(pytest==9.2.0 pytest-timeout==2.4.0 hypothesis==6.170.17 onnx==1.23.2)
# The agent's tests that need no broker: wire protocol, the JSON reader (orjson's aarch64
# wheel), bundles and keys, signed commands, the store, install/rollback/crash recovery, swap under load, the
# admin socket, fallback, the server, drift and metrics, and the prediction log's tap (its C
# build for aarch64 beside the Python one).
DEFAULT_TESTS="test_protocol test_jsonfast test_bundle test_keys fleet/test_commands test_store
test_install test_install_crash test_install_load test_admin test_agent_fallback
test_agent_server test_agent_drift test_agent_metrics test_predlog_tap"

# Tests that assume native speed, each with why; every correctness check in them passes under
# emulation before the speed assumption fails. Remove an entry once its test no longer assumes.
DESELECT=(
    # Kills the driver 0-0.3 s after it starts; emulated, no install finishes in that window,
    # so its closing "some install committed" cannot hold. The kill-at-every-persisted-state
    # test covers each crash point here.
    tests/test_install_crash.py::test_random_kills_during_many_installs_and_rollbacks
    # Asserts the load client kept up 5000 requests/s; emulated it makes ~1200.
    tests/test_install_load.py::test_swap_under_load_drops_no_request_and_leaks_no_session
    # Builds "the same bundle" three times and expects one version id, but the manifest's
    # creation time is in it: emulated, the builds straddle a second and the ids differ.
    tests/test_store.py::test_promote_replaces_a_damaged_copy_and_keeps_an_intact_one
)

log() { printf '[test-arm64 %s] %s\n' "$(date +%T)" "$*" >&2; }

# shellcheck source=scripts/foreign-apt.sh
source "$REPO/scripts/foreign-apt.sh"

step_deps() {
    if [ ! -x /usr/bin/qemu-aarch64-static ]; then
        log "installing qemu-user-static"
        apt-get update -q >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
            qemu-user-static >/dev/null
    fi
    # The binfmt handler runs the aarch64 interpreter for child processes (tests that start the
    # agent or a driver with sys.executable).
    if ! mountpoint -q /proc/sys/fs/binfmt_misc; then
        mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
    fi
    if [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
        grep -v '^#' /usr/lib/binfmt.d/qemu-aarch64.conf > /proc/sys/fs/binfmt_misc/register
    fi
}

step_sysroot() {
    local want stamp="$SYSROOT/.packages"
    want="${DEB_PACKAGES[*]}"
    if [ -x "$SYSROOT/usr/bin/python3.11" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
        log "sysroot: $SYSROOT is ready"
        return 0
    fi
    rm -rf "$SYSROOT" "$APTDIR/var/cache/apt/archives"/*.deb
    mkdir -p "$SYSROOT"
    log "sysroot: resolving ${DEB_PACKAGES[*]} for arm64"
    foreign_apt_init "$APTDIR" arm64
    foreign_apt "$APTDIR" arm64 install -y --download-only --no-install-recommends \
        "${DEB_PACKAGES[@]}" >/dev/null
    local deb n=0
    for deb in "$APTDIR"/var/cache/apt/archives/*.deb; do
        dpkg-deb -x "$deb" "$SYSROOT"
        n=$((n + 1))
    done
    mkdir -p "$SYSROOT/proc"
    cp docker/podman/cpuinfo-arm64 "$SYSROOT/proc/cpuinfo"
    rm -rf "$APTDIR/var/cache/apt/archives"/*.deb
    echo "$want" > "$stamp"
    log "sysroot: $n packages unpacked, $(du -sh "$SYSROOT" | cut -f1)"
}

step_wheels() {
    local want stamp="$SITE/.wheels"
    want="$(cat docker/constraints.txt; echo "${TEST_WHEELS[*]}")"
    if [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
        log "wheels: $SITE is ready"
        return 0
    fi
    rm -rf "$SITE"
    mkdir -p "$WHEELS" "$SITE"
    local plat=() v
    plat+=(--platform manylinux2014_aarch64)
    for v in $(seq 17 36); do plat+=(--platform "manylinux_2_${v}_aarch64"); done
    local target=(--only-binary=:all: "${plat[@]}" --python-version 3.11 --implementation cp
        --abi cp311 --abi abi3 --abi none)
    # The agent's runtime dependencies: the names pinned in docker/constraints.txt.
    mapfile -t runtime < <(grep -v '^#' docker/constraints.txt | grep -v '^$')
    log "wheels: downloading aarch64 wheels"
    "$HOST_PYTHON" -m pip download --quiet --disable-pip-version-check --dest "$WHEELS" \
        "${target[@]}" "${runtime[@]}" "${TEST_WHEELS[@]}" \
        2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
    log "wheels: installing into $SITE"
    "$HOST_PYTHON" -m pip install --quiet --disable-pip-version-check --no-index \
        --find-links "$WHEELS" --target "$SITE" "${target[@]}" \
        "${runtime[@]}" "${TEST_WHEELS[@]}" \
        2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
    echo "$want" > "$stamp"
    log "wheels: $(du -sh "$SITE" | cut -f1)"
}

step_run() {
    local tests=() t
    for t in ${ARM64_TESTS:-$DEFAULT_TESTS}; do
        [ -f "tests/$t.py" ] && tests+=("tests/$t.py")
    done
    [ "${#tests[@]}" -gt 0 ] || { echo "test-arm64: none of the test files exist" >&2; exit 1; }
    log "run: $(qemu-aarch64-static "$PY" -c 'import platform, sys; print(platform.machine(), sys.version.split()[0])') on qemu-user-static"
    log "run: ${tests[*]}"
    local deselect=() d
    for d in "${DESELECT[@]}"; do deselect+=(--deselect "$d"); done
    qemu-aarch64-static "$PY" -m pytest -p no:cacheprovider -p tests.qemu_profile \
        "${deselect[@]}" \
        "${tests[@]}" "$@"
}

t0=$SECONDS
step_deps
step_sysroot
step_wheels
# the prediction log's tap in C, cross-compiled for the aarch64 interpreter, in place beside
# the host's build (each loads its own: the file names carry the architecture)
bash scripts/build-tap.sh aarch64 "$REPO/agent"
# From here on the aarch64 interpreter runs; the child processes it starts run through the
# binfmt handler and find the same sysroot and checkout through these.
export QEMU_LD_PREFIX="$SYSROOT"
export PYTHONPATH="$REPO"
export PYTHONDONTWRITEBYTECODE=1
log "prepared in $((SECONDS - t0)) s"
t1=$SECONDS
status=0
step_run "$@" || status=$?
log "tests: $((SECONDS - t1)) s; total $((SECONDS - t0)) s"
exit "$status"
