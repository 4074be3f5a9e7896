#!/usr/bin/env bash
# Install the Debian packages the demo and the tests run for real (a broker, a Prometheus, a web
# server), when they are missing. As root this uses apt-get; otherwise it says what to run.
#   scripts/system-deps.sh mosquitto prometheus nginx
set -euo pipefail
missing=()
for pkg in "$@"; do
    command -v "$pkg" >/dev/null 2>&1 || [ -x "/usr/sbin/$pkg" ] || [ -x "/usr/bin/$pkg" ] \
        || missing+=("$pkg")
done
[ "${#missing[@]}" -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
    echo "missing Debian packages: ${missing[*]} (run: sudo apt-get install ${missing[*]})" >&2
    exit 1
fi
echo "installing Debian packages: ${missing[*]}"
apt-get update -q
DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
