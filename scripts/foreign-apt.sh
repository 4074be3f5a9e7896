# Sourced by scripts/test-arm64.sh and scripts/build-tap.sh: apt-get on a private state under
# APTDIR for Debian bookworm packages of another architecture (or of this one, unpacked
# elsewhere): the host's package database and sources are never read or changed.
#
#   foreign_apt_init APTDIR DEB_ARCH     the state (main, updates, security; an empty package
#                                        database) and fresh package lists
#   foreign_apt APTDIR DEB_ARCH ARGS...  apt-get ARGS on it
#
# DEBIAN_MIRROR and DEBIAN_SECURITY override the mirrors.

foreign_apt_init() {
    local aptdir="$1" arch="$2" keyring=/usr/share/keyrings/debian-archive-keyring.gpg
    local mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
    local security="${DEBIAN_SECURITY:-http://deb.debian.org/debian-security}"
    mkdir -p "$aptdir"/etc/apt/{apt.conf.d,preferences.d,sources.list.d} \
        "$aptdir"/var/lib/apt/lists/partial "$aptdir"/var/cache/apt/archives/partial \
        "$aptdir"/var/lib/dpkg
    : > "$aptdir/var/lib/dpkg/status"
    cat > "$aptdir/etc/apt/sources.list" <<SOURCES
deb [arch=$arch signed-by=$keyring] $mirror bookworm main
deb [arch=$arch signed-by=$keyring] $mirror bookworm-updates main
deb [arch=$arch signed-by=$keyring] $security bookworm-security main
SOURCES
    foreign_apt "$aptdir" "$arch" update >/dev/null
}

foreign_apt() {
    local aptdir="$1" arch="$2"
    shift 2
    apt-get -o "Dir=$aptdir" -o "Dir::Etc=$aptdir/etc/apt" \
        -o "Dir::State::status=$aptdir/var/lib/dpkg/status" \
        -o "APT::Architecture=$arch" -o "APT::Architectures=$arch" \
        -o Debug::NoLocking=1 -o APT::Sandbox::User=root -q "$@"
}
