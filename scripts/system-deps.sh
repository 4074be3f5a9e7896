#!/usr/bin/env bash
# Install the Debian packages the demo and the tests run for real (a broker, a Prometheus, a web
# server, a C compiler, a PostgreSQL server), when they are missing. Each argument is a command;
# the package that brings it is installed. As root this uses apt-get; otherwise it says what to
# run.
#   scripts/system-deps.sh mosquitto prometheus nginx gcc pg_ctl
set -euo pipefail
missing=()
for pkg in "$@"; do
    command -v "$pkg" >/dev/null 2>&1 || [ -x "/usr/sbin/$pkg" ] || [ -x "/usr/bin/$pkg" ] \
        || compgen -G "/usr/lib/postgresql/*/bin/$pkg" >/dev/null \
        || case "$pkg" in
            gcc) missing+=(build-essential) ;;  # gcc alone lacks the C library's headers
            pg_ctl) missing+=(postgresql) ;;  # Debian keeps it in /usr/lib/postgresql/V/bin
            *) missing+=("$pkg") ;;
        esac
done
[ "${#missing[@]}" -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
    echo "missing Debian packages: ${missing[*]} (run: sudo apt-get install ${missing[*]})" >&2
    exit 1
fi
echo "installing Debian packages: ${missing[*]}"
apt-get update -q
DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
