#!/usr/bin/env bash
# Build the agent's container image with no registry in reach, for linux/arm64 (the boxes) or
# linux/amd64, with podman under qemu-user-static emulation.
#
#   scripts/image.sh all        deps + wheelhouse + base + build            (make image)
#   scripts/image.sh test       start the image and check it (tests/test_image.py; make image-test)
#   scripts/image.sh deps       Debian packages (podman, buildah, runc, qemu-user-static,
#                               debootstrap) and the qemu binfmt handler for foreign binaries
#   scripts/image.sh wheelhouse docker/wheelhouse/: the project's wheels (one per architecture:
#                               the Python code and the log's tap in C, scripts/build-tap.sh)
#                               and every runtime wheel for arm64 and amd64, at the versions in
#                               docker/constraints.txt
#   scripts/image.sh base       a Debian bookworm base (debootstrap, minbase + python3), imported
#                               into podman as localhost/edgefleet-base:bookworm-ARCH; skipped when
#                               that image exists (FORCE_BASE=1 rebuilds it)
#   scripts/image.sh build      podman build of docker/Dockerfile on that base
#   scripts/image.sh size       the image's size
#   scripts/image.sh lock       rewrite docker/constraints.txt from a fresh resolution
#
# Environment: ARCH (arm64|amd64, default arm64), IMAGE (default
# localhost/edgefleet-agent:VERSION-ARCH), BASE_IMAGE (default the debootstrap'ed base; set it to
# python:3.11-slim-bookworm where a registry or mirror is reachable), DEBIAN_MIRROR.
# Podman reads the project's settings in docker/podman/ (runc, ulimits, its own storage).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO="$PWD"

ARCH="${ARCH:-arm64}"
VERSION="$(sed -n 's/^version = "\(.*\)"$/\1/p' pyproject.toml | head -n1)"
IMAGE="${IMAGE:-localhost/edgefleet-agent:${VERSION}-${ARCH}}"
BASE_IMAGE="${BASE_IMAGE:-localhost/edgefleet-base:bookworm-${ARCH}}"
DEBIAN_MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
BUILD_DIR="${IMAGE_BUILD_DIR:-$REPO/build/image}"
WHEELHOUSE="$REPO/docker/wheelhouse"
HOST_PYTHON="${HOST_PYTHON:-python3}"
# The pip that the build stage runs from the wheelhouse (it is not left in the image).
PIP_VERSION="25.3"

export CONTAINERS_CONF="$REPO/docker/podman/containers.conf"
export CONTAINERS_STORAGE_CONF="$REPO/docker/podman/storage.conf"
export CONTAINERS_REGISTRIES_CONF="$REPO/docker/podman/registries.conf"

log() { printf '[image.sh %s] %s\n' "$(date +%T)" "$*" >&2; }

case "$ARCH" in
    arm64) QEMU_ARCH=aarch64 ;;
    amd64) QEMU_ARCH=x86_64 ;;
    *) echo "image.sh: ARCH must be arm64 or amd64, not '$ARCH'" >&2; exit 2 ;;
esac

# pip's --platform takes exact tags: name every manylinux level bookworm's glibc (2.36) runs.
platform_args() {
    local arch="$1" v
    printf -- '--platform\nmanylinux2014_%s\n' "$arch"
    for v in $(seq 17 36); do printf -- '--platform\nmanylinux_2_%s_%s\n' "$v" "$arch"; done
}

pip_quiet() {
    # The machine's pip configuration names local indexes that may not exist; keep their
    # warnings out of the log, keep real errors.
    "$HOST_PYTHON" -m pip "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}

register_binfmt() {
    # Run foreign binaries through qemu (F: the interpreter is opened now, so it also works
    # inside containers and chroots).
    local arch="$1"
    [ "$arch" = "$(uname -m)" ] && return 0
    if ! mountpoint -q /proc/sys/fs/binfmt_misc; then
        mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
    fi
    if [ ! -e "/proc/sys/fs/binfmt_misc/qemu-$arch" ]; then
        grep -v '^#' "/usr/lib/binfmt.d/qemu-$arch.conf" > /proc/sys/fs/binfmt_misc/register
    fi
    [ "$(head -n1 "/proc/sys/fs/binfmt_misc/qemu-$arch")" = enabled ] || \
        echo 1 > "/proc/sys/fs/binfmt_misc/qemu-$arch"
}

cmd_deps() {
    local need=() p
    for p in podman buildah runc qemu-user-static debootstrap; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || need+=("$p")
    done
    if [ "${#need[@]}" -gt 0 ]; then
        log "installing Debian packages: ${need[*]}"
        apt-get update -q >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}" \
            >/dev/null
    fi
    register_binfmt "$QEMU_ARCH"
}

# project_wheel DEST: the project's wheel (pure Python: py3-none-any) in DEST.
project_wheel() {
    local dest="$1" tmp
    tmp="$(mktemp -d)"
    # setuptools builds in the tree (build/lib): a file removed from the sources since the last
    # build would otherwise still ride along in the wheel
    rm -rf "$REPO"/build/lib "$REPO"/build/lib.* "$REPO"/build/bdist.* "$REPO"/build/temp.*
    pip_quiet wheel --quiet --no-deps --wheel-dir "$tmp" "$REPO"
    local whl=("$tmp"/edgefleet-*-py3-none-any.whl)
    if [ ! -f "${whl[0]}" ]; then
        echo "image.sh: expected a pure-Python project wheel, got: $(ls "$tmp")" >&2
        exit 1
    fi
    cp "${whl[0]}" "$dest/"
    rm -rf "$tmp"
}

# platform_wheel PURE_WHEEL ARCH DEST: the project's wheel for cp311 on linux ARCH: the pure
# wheel's files plus the tap built for that architecture, retagged (the `wheel` tool rewrites
# RECORD and the file name from the WHEEL file).
platform_wheel() {
    local pure="$1" arch="$2" dest="$3" tools="$REPO/build/tools" tmp
    if [ ! -d "$tools/wheel" ]; then
        pip_quiet install --quiet --target "$tools" "wheel==0.45.1"
    fi
    tmp="$(mktemp -d)"
    bash "$REPO/scripts/build-tap.sh" "$arch" "$tmp/so"
    PYTHONPATH="$tools" "$HOST_PYTHON" -m wheel unpack --dest "$tmp" "$pure" >/dev/null
    local root=("$tmp"/edgefleet-*/)
    cp "$tmp/so"/_tapfast.*.so "${root[0]}agent/"
    sed -i -e 's/^Root-Is-Purelib: true$/Root-Is-Purelib: false/' \
        -e "s/^Tag: .*/Tag: cp311-cp311-linux_$arch/" "${root[0]}"*.dist-info/WHEEL
    PYTHONPATH="$tools" "$HOST_PYTHON" -m wheel pack --dest-dir "$dest" "${root[0]}" >/dev/null
    rm -rf "$tmp"
}

cmd_wheelhouse() {
    log "wheelhouse: project wheel"
    rm -rf "$WHEELHOUSE"
    mkdir -p "$WHEELHOUSE"
    project_wheel "$WHEELHOUSE"
    local arch pure
    pure="$(echo "$WHEELHOUSE"/edgefleet-*-py3-none-any.whl)"
    for arch in aarch64 x86_64; do
        log "wheelhouse: runtime wheels for $arch"
        mapfile -t plat < <(platform_args "$arch")
        pip_quiet download --quiet --dest "$WHEELHOUSE" --only-binary=:all: "${plat[@]}" \
            --python-version 3.11 --implementation cp --abi cp311 --abi abi3 --abi none \
            --constraint "$REPO/docker/constraints.txt" \
            "$pure[controller]" "pip==$PIP_VERSION"
        log "wheelhouse: the project's wheel for $arch (with the compiled tap)"
        platform_wheel "$pure" "$arch" "$WHEELHOUSE"
    done
    # only the platform wheels: an image without the compiled tap fails its build's check
    rm -f "$pure"
    log "wheelhouse: $(find "$WHEELHOUSE" -name '*.whl' | wc -l) wheels, $(du -sh "$WHEELHOUSE" | cut -f1)"
}

cmd_lock() {
    local tmp report
    tmp="$(mktemp -d)"
    report="$tmp/report.json"
    project_wheel "$tmp"
    mapfile -t plat < <(platform_args aarch64)
    pip_quiet install --quiet --dry-run --ignore-installed --report "$report" \
        --target "$tmp/t" --only-binary=:all: "${plat[@]}" \
        --python-version 3.11 --implementation cp --abi cp311 --abi abi3 --abi none \
        "$(echo "$tmp"/edgefleet-*.whl)[controller]"
    {
        sed -n '1,/^[^#]/{/^#/p}' "$REPO/docker/constraints.txt"
        "$HOST_PYTHON" -c '
import json, re, sys
r = json.load(open(sys.argv[1]))
pins = sorted(
    (re.sub(r"[-_.]+", "-", i["metadata"]["name"]).lower(), i["metadata"]["version"])
    for i in r["install"] if i["metadata"]["name"] != "edgefleet"
)
print("\n".join(f"{n}=={v}" for n, v in pins))' "$report"
    } > "$tmp/constraints.txt"
    mv "$tmp/constraints.txt" "$REPO/docker/constraints.txt"
    rm -rf "$tmp"
    log "docker/constraints.txt rewritten"
}

cmd_base() {
    if [ "${FORCE_BASE:-0}" != 1 ] && podman image exists "$BASE_IMAGE"; then
        log "base: $BASE_IMAGE exists (FORCE_BASE=1 rebuilds it)"
        return 0
    fi
    case "$BASE_IMAGE" in
        localhost/*) ;;
        *) log "base: $BASE_IMAGE is not a local image; podman build will use it as it is"
           return 0 ;;
    esac
    local rootfs="$BUILD_DIR/rootfs-$ARCH"
    rm -rf "$rootfs"
    mkdir -p "$BUILD_DIR"
    log "base: debootstrap bookworm $ARCH (minbase + python3) from $DEBIAN_MIRROR"
    local t0=$SECONDS
    debootstrap --arch="$ARCH" --variant=minbase --include=python3,ca-certificates,netbase \
        bookworm "$rootfs" "$DEBIAN_MIRROR" > "$BUILD_DIR/debootstrap-$ARCH.log" 2>&1 || {
        tail -n 30 "$BUILD_DIR/debootstrap-$ARCH.log" >&2; exit 1; }
    log "base: debootstrap took $((SECONDS - t0)) s"
    # What the official slim image leaves out too: package caches, lists, docs, man pages.
    rm -rf "$rootfs"/var/cache/apt/* "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/log/* \
        "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* \
        "$rootfs"/tmp/* "$rootfs"/root/.cache
    find "$rootfs/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name 'locale.alias' \
        -exec rm -rf {} +
    tar --numeric-owner -C "$rootfs" -c . | podman import --quiet --arch "$ARCH" --os linux \
        --change 'CMD ["/usr/bin/python3"]' --message "debootstrap bookworm minbase + python3" \
        - "$BASE_IMAGE" >/dev/null
    rm -rf "$rootfs"
    log "base: imported $BASE_IMAGE ($(podman image inspect --format '{{.Size}}' "$BASE_IMAGE") bytes)"
}

cmd_build() {
    [ -n "$(find "$WHEELHOUSE" -name 'edgefleet-*.whl' 2>/dev/null)" ] || cmd_wheelhouse
    log "build: $IMAGE for linux/$ARCH on $BASE_IMAGE"
    local t0=$SECONDS
    podman build --quiet --pull=never --platform "linux/$ARCH" --format docker \
        --build-arg "BASE_IMAGE=$BASE_IMAGE" --build-arg "EDGEFLEET_VERSION=$VERSION" \
        --tag "$IMAGE" --file docker/Dockerfile docker/ >/dev/null
    log "build: took $((SECONDS - t0)) s"
    cmd_size
}

cmd_size() {
    local bytes
    bytes="$(podman image inspect --format '{{.Size}}' "$IMAGE")"
    echo "image $IMAGE: $((bytes / 1000000)) MB ($bytes bytes, uncompressed)"
}

cmd_test() {
    podman image exists "$IMAGE" || { echo "image.sh: no image $IMAGE; run make image" >&2; exit 1; }
    register_binfmt "$QEMU_ARCH"
    EDGEFLEET_IMAGE="$IMAGE" EDGEFLEET_IMAGE_ARCH="$ARCH" \
        "$REPO/.venv/bin/pytest" -p no:cacheprovider "$REPO/tests/test_image.py" "$@"
}

case "${1:-all}" in
    deps) cmd_deps ;;
    wheelhouse) cmd_wheelhouse ;;
    lock) cmd_lock ;;
    base) cmd_deps; cmd_base ;;
    build) cmd_build ;;
    size) cmd_size ;;
    test) shift; cmd_test "$@" ;;
    all) cmd_deps; cmd_wheelhouse; cmd_base; cmd_build ;;
    *) echo "usage: scripts/image.sh [all|deps|wheelhouse|base|build|size|test|lock]" >&2; exit 2 ;;
esac
