#!/usr/bin/env bash
# Cross-compile the agent's C extension (agent/_jsonfloats.c) for aarch64 on this x86_64
# machine, and the private apt configuration for Debian bookworm arm64 packages that
# scripts/test-arm64.sh and scripts/image.sh share.
#
# Why cross-compile: the boxes are ARM64 and the build machine is not. The extension is plain C
# against CPython's API and nothing else, so a cross gcc and the arm64 Python headers are all it
# takes; a native build under qemu would need an arm64 toolchain in a sysroot and run several
# times slower, for the same object code.
#
#   compiler  aarch64-linux-gnu-gcc from Debian's gcc-aarch64-linux-gnu, with the arm64 C
#             library headers (libc6-dev-arm64-cross); installed with apt-get when missing
#   headers   Debian bookworm's arm64 libpython3.11-dev (Python.h and the arch-specific
#             aarch64-linux-gnu/python3.11/pyconfig.h), fetched with the private apt
#             configuration below and unpacked into build/arm64/pydev
#   output    _jsonfloats.cpython-311-aarch64-linux-gnu.so: the name an aarch64 CPython 3.11
#             looks for (the extension is not built with the limited API), so it sits beside
#             the x86_64 build in agent/ and each interpreter loads its own
#
# Usage: scripts/arm64-native.sh [OUTDIR]     (default agent/; prints the path of the .so)
# Sourced, it only defines arm64_apt_init, arm64_apt and arm64_build_native.
# Environment: ARM64_DIR (default build/arm64), DEBIAN_MIRROR, DEBIAN_SECURITY.

_ARM64_REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ARM64_DIR="${ARM64_DIR:-$_ARM64_REPO/build/arm64}"

_arm64_log() { printf '[arm64-native %s] %s\n' "$(date +%T)" "$*" >&2; }

# The options that make apt-get work on its own state under APTDIR, for arm64 only: the host's
# package database and sources are never read or changed.
_arm64_apt_opts() {
    local aptdir="$1"
    printf '%s\n' -o "Dir=$aptdir" -o "Dir::Etc=$aptdir/etc/apt" \
        -o "Dir::State::status=$aptdir/var/lib/dpkg/status" \
        -o APT::Architecture=arm64 -o APT::Architectures=arm64 \
        -o Debug::NoLocking=1 -o APT::Sandbox::User=root -q
}

# arm64_apt_init APTDIR: a private apt state for bookworm arm64 (main, updates, security),
# with an empty package database, and fresh package lists.
arm64_apt_init() {
    local aptdir="$1" keyring=/usr/share/keyrings/debian-archive-keyring.gpg
    local mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
    local security="${DEBIAN_SECURITY:-http://deb.debian.org/debian-security}"
    mkdir -p "$aptdir"/etc/apt/{apt.conf.d,preferences.d,sources.list.d} \
        "$aptdir"/var/lib/apt/lists/partial "$aptdir"/var/cache/apt/archives/partial \
        "$aptdir"/var/lib/dpkg
    : > "$aptdir/var/lib/dpkg/status"
    cat > "$aptdir/etc/apt/sources.list" <<EOF
deb [arch=arm64 signed-by=$keyring] $mirror bookworm main
deb [arch=arm64 signed-by=$keyring] $mirror bookworm-updates main
deb [arch=arm64 signed-by=$keyring] $security bookworm-security main
EOF
    arm64_apt "$aptdir" update >/dev/null
}

# arm64_apt APTDIR ARGS...: apt-get on that private state.
arm64_apt() {
    local aptdir="$1" opts
    shift
    mapfile -t opts < <(_arm64_apt_opts "$aptdir")
    apt-get "${opts[@]}" "$@"
}

# The cross compiler and the arm64 C library headers. The headers are only a Recommends of the
# compiler, and without them Debian's cross gcc falls through to the host's /usr/include (its
# last search directory) and fails on the first arch-specific header.
_arm64_cross_gcc() {
    local pkgs=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross file) need=() p
    for p in "${pkgs[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || need+=("$p")
    done
    [ "${#need[@]}" -eq 0 ] && return 0
    if [ "$(id -u)" -ne 0 ]; then
        echo "arm64-native: missing Debian packages (run: sudo apt-get install ${need[*]})" >&2
        return 1
    fi
    _arm64_log "installing ${need[*]}"
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}" \
        >/dev/null
}

# The arm64 Python headers, once: only libpython3.11-dev itself (`apt-get download`, no
# dependencies), since the C library headers come with the cross compiler. Any bookworm
# 3.11 patch release gives the same ABI, so a present copy is not refreshed.
_arm64_python_headers() {
    local pydev="$ARM64_DIR/pydev" aptdir="$ARM64_DIR/apt"
    if [ -f "$pydev/usr/include/aarch64-linux-gnu/python3.11/pyconfig.h" ] \
        && [ -f "$pydev/usr/include/python3.11/Python.h" ]; then
        return 0
    fi
    _arm64_log "fetching Debian bookworm's arm64 libpython3.11-dev"
    arm64_apt_init "$aptdir"
    local tmp
    tmp="$(mktemp -d)"
    (cd "$tmp" && arm64_apt "$aptdir" download libpython3.11-dev >/dev/null)
    rm -rf "$pydev"
    mkdir -p "$pydev"
    dpkg-deb -x "$tmp"/libpython3.11-dev_*_arm64.deb "$pydev"
    basename "$tmp"/libpython3.11-dev_*_arm64.deb > "$pydev/.deb"
    rm -rf "$tmp"
}

# arm64_build_native OUTDIR: compile agent/_jsonfloats.c for aarch64 into
# OUTDIR/_jsonfloats.cpython-311-aarch64-linux-gnu.so (replaced atomically, so an interpreter
# never sees half a file), check that it is an aarch64 shared object exporting the module's
# init function, and print its path.
arm64_build_native() {
    local outdir="$1" name=_jsonfloats.cpython-311-aarch64-linux-gnu.so
    local pydev="$ARM64_DIR/pydev" src="$_ARM64_REPO/agent/_jsonfloats.c"
    _arm64_cross_gcc
    _arm64_python_headers
    local tmp="$outdir/.$name.tmp"
    # setup.py's flags, plus what CPython's own build adds to every extension it compiles
    # (-DNDEBUG -fwrapv, sysconfig's CFLAGS). No libpython on the link line: the interpreter
    # provides its symbols, as for every Debian extension. The first -I holds Debian's
    # pyconfig.h, which includes <aarch64-linux-gnu/python3.11/pyconfig.h> from the second.
    aarch64-linux-gnu-gcc -O2 -Wall -Wextra -Werror=implicit-function-declaration \
        -DNDEBUG -fwrapv -fPIC -shared \
        -I "$pydev/usr/include/python3.11" -I "$pydev/usr/include" \
        -o "$tmp" "$src"
    local kind
    kind="$(file -b "$tmp")"
    case "$kind" in
        "ELF 64-bit LSB shared object, ARM aarch64"*) ;;
        *) rm -f "$tmp"
           echo "arm64-native: $src built to '$kind', not an aarch64 shared object" >&2
           return 1 ;;
    esac
    if ! aarch64-linux-gnu-nm -D --defined-only "$tmp" | grep -qw PyInit__jsonfloats; then
        rm -f "$tmp"
        echo "arm64-native: $name does not export PyInit__jsonfloats" >&2
        return 1
    fi
    mv -f "$tmp" "$outdir/$name"
    _arm64_log "built $outdir/$name against $(cat "$pydev/.deb"): ${kind%%, version*}"
    echo "$outdir/$name"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    set -euo pipefail
    arm64_build_native "${1:-$_ARM64_REPO/agent}"
fi
