#!/usr/bin/env bash
# Build agent/_tapfast.c, the prediction log's tap in C (agent/predlog_tap.py; why C:
# docs/operations.md "What it costs"). Without it the agent runs the pure-Python tap, which
# writes the same log and costs a single binary answer ~9% of its p99 instead of ~2%.
#
#   scripts/build-tap.sh                  for PYTHON (default .venv/bin/python), in place:
#                                         agent/_tapfast<its EXT_SUFFIX>; exit 1 if it fails
#   scripts/build-tap.sh ARCH OUT_DIR     for Debian bookworm's python3.11 on ARCH (aarch64 or
#                                         x86_64): OUT_DIR/_tapfast.cpython-311-ARCH-linux-gnu.so
#                                         (the image's wheels, scripts/image.sh; the aarch64
#                                         tests, scripts/test-arm64.sh)
#
# The second form compiles against that release's own headers (libpython3.11-dev for ARCH,
# fetched with a private apt state, scripts/foreign-apt.sh, as scripts/test-arm64.sh fetches
# its sysroot), with the host's gcc for x86_64 and Debian's cross compiler
# (gcc-aarch64-linux-gnu) for aarch64.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO="$PWD"
SRC="$REPO/agent/_tapfast.c"
CFLAGS=(-shared -fPIC -O2 -Wall -Wextra -Werror -fvisibility=hidden)

log() { printf '[build-tap %s] %s\n' "$(date +%T)" "$*" >&2; }
# shellcheck source=scripts/foreign-apt.sh
source "$REPO/scripts/foreign-apt.sh"

if [ $# -eq 0 ]; then
    PYTHON="${PYTHON:-$REPO/.venv/bin/python}"
    mapfile -t cfg < <("$PYTHON" -c 'import sysconfig as s
print(s.get_paths()["include"]); print(s.get_config_var("EXT_SUFFIX"))')
    out="$REPO/agent/_tapfast${cfg[1]}"
    if [ ! -f "${cfg[0]}/Python.h" ]; then
        # Debian's interpreter keeps its headers in pythonX.Y-dev
        pkg="$(basename "${cfg[0]}")-dev"
        if [ "$(id -u)" -eq 0 ] && [[ "${cfg[0]}" == /usr/include/* ]]; then
            log "installing $pkg (Python.h)"
            apt-get update -q >/dev/null
            DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
                "$pkg" >/dev/null
        else
            echo "build-tap.sh: no ${cfg[0]}/Python.h: install $pkg" >&2
            exit 1
        fi
    fi
    gcc "${CFLAGS[@]}" -I"${cfg[0]}" "$SRC" -o "$out.tmp"
    mv "$out.tmp" "$out"
    log "built $out"
    exit 0
fi

[ $# -eq 2 ] || { echo "usage: scripts/build-tap.sh [ARCH OUT_DIR]" >&2; exit 2; }
ARCH="$1"
OUT="$2"
case "$ARCH" in
    aarch64) DEB_ARCH=arm64; CC=aarch64-linux-gnu-gcc
        CC_PKGS=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross) ;;
    x86_64) DEB_ARCH=amd64; CC=gcc; CC_PKGS=(gcc libc6-dev) ;;
    *) echo "build-tap.sh: ARCH must be aarch64 or x86_64, found $ARCH" >&2; exit 2 ;;
esac
DIR="$REPO/build/tap-$ARCH"
HEADERS="$DIR/headers"
APTDIR="$DIR/apt"

if ! command -v "$CC" >/dev/null 2>&1 || ! dpkg -s "${CC_PKGS[@]}" >/dev/null 2>&1; then
    log "installing ${CC_PKGS[*]}"
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        "${CC_PKGS[@]}" >/dev/null
fi

if [ ! -f "$HEADERS/usr/include/python3.11/Python.h" ]; then
    log "headers: libpython3.11-dev for $DEB_ARCH"
    rm -rf "$HEADERS"
    mkdir -p "$HEADERS"
    foreign_apt_init "$APTDIR" "$DEB_ARCH"
    # only the headers' own package: its dependencies are libraries, not needed to compile
    (cd "$APTDIR/var/cache/apt/archives" \
        && foreign_apt "$APTDIR" "$DEB_ARCH" download libpython3.11-dev >/dev/null)
    dpkg-deb -x "$APTDIR"/var/cache/apt/archives/libpython3.11-dev_*.deb "$HEADERS"
    rm -f "$APTDIR"/var/cache/apt/archives/*.deb
fi

mkdir -p "$OUT"
out="$OUT/_tapfast.cpython-311-$ARCH-linux-gnu.so"
# Debian's python3.11/pyconfig.h includes <ARCH-linux-gnu/python3.11/pyconfig.h>
"$CC" "${CFLAGS[@]}" -I"$HEADERS/usr/include/python3.11" -I"$HEADERS/usr/include" "$SRC" \
    -o "$out.tmp"
mv "$out.tmp" "$out"
log "built $out"
