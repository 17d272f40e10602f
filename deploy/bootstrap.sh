#!/usr/bin/env bash
# Sourced by quickstart.sh and test.sh: install whatever is missing on a Debian/Ubuntu machine
# (python3-venv, a virtualenv with edgefleet and its extras, Mosquitto) and nothing more.
set -euo pipefail

EDGEFLEET_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${EDGEFLEET_VENV:-$EDGEFLEET_ROOT/.venv}"
PY="${PYTHON:-python3}"
# One set of extras for both commands, so running one after the other never reinstalls.
EXTRAS="server,dev"

say() { printf '[edgefleet] %s\n' "$*" >&2; }

_SUDO=""
if [ "$(id -u)" -ne 0 ]; then _SUDO="sudo"; fi
_APT_UPDATED=0

apt_install() {
    if ! command -v apt-get >/dev/null 2>&1; then
        say "need $* but apt-get is not available: install them with your package manager"
        return 1
    fi
    if [ "$_APT_UPDATED" -eq 0 ]; then
        say "apt-get update"
        $_SUDO apt-get update -qq
        _APT_UPDATED=1
    fi
    say "apt-get install $*"
    DEBIAN_FRONTEND=noninteractive $_SUDO apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

ensure_python() {
    if ! command -v "$PY" >/dev/null 2>&1; then
        apt_install python3 python3-venv
    fi
    # Debian ships venv without ensurepip unless python3-venv (or python3.X-venv) is installed.
    if ! "$PY" -c 'import ensurepip, venv' >/dev/null 2>&1; then
        local ver
        ver="$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
        apt_install "python${ver}-venv" || apt_install python3-venv
    fi
}

# The exact versions every install gets (deploy/lock.sh refreshes them). EDGEFLEET_LATEST=1
# installs the newest releases instead, in a virtualenv of its own: the early warning of an
# upstream break (deploy/test.sh --latest), never the default.
LOCK="$EDGEFLEET_ROOT/deploy/lock/all.txt"
if [ "${EDGEFLEET_LATEST:-0}" = 1 ]; then
    VENV="${EDGEFLEET_VENV:-$EDGEFLEET_ROOT/.venv-latest}"
fi

ensure_venv() {
    ensure_python
    if [ ! -x "$VENV/bin/python" ]; then
        say "creating virtualenv $VENV"
        "$PY" -m venv "$VENV"
    fi
    # Reinstall only when the package metadata or the lock changed since the last install.
    local stamp="$VENV/.edgefleet-installed"
    local want
    if [ "${EDGEFLEET_LATEST:-0}" = 1 ]; then
        want="latest $(date +%F) $(sha256sum "$EDGEFLEET_ROOT/pyproject.toml" | cut -d' ' -f1)"
    else
        want="$(cat "$EDGEFLEET_ROOT/pyproject.toml" "$LOCK" | sha256sum | cut -d' ' -f1) $EXTRAS"
    fi
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
        return 0
    fi
    local pip=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
    if [ "${EDGEFLEET_LATEST:-0}" = 1 ]; then
        say "installing edgefleet[$EXTRAS] with the NEWEST releases into $VENV"
        # setuptools and wheel too: the packaging test builds a wheel without build isolation.
        "${pip[@]}" --upgrade pip setuptools wheel
        "${pip[@]}" --upgrade --upgrade-strategy eager -e "$EDGEFLEET_ROOT[$EXTRAS]"
    else
        say "installing edgefleet[$EXTRAS] at the versions of deploy/lock/all.txt into $VENV" \
            "(first run takes a few minutes)"
        # The lock holds pip, setuptools and wheel too, so the build below is locked as well.
        "${pip[@]}" -r "$LOCK"
        "${pip[@]}" --no-deps --no-build-isolation -e "$EDGEFLEET_ROOT[$EXTRAS]"
    fi
    "$VENV/bin/python" -m pip check >&2 || { say "the installed packages conflict (pip check above)"; return 1; }
    printf '%s' "$want" > "$stamp"
}

find_mosquitto() {
    command -v mosquitto 2>/dev/null || { [ -x /usr/sbin/mosquitto ] && echo /usr/sbin/mosquitto; } || true
}

ensure_mosquitto() {
    if [ -z "$(find_mosquitto)" ]; then
        apt_install mosquitto
        # The distribution's service is not needed: edgefleet starts its own broker(s).
        $_SUDO systemctl disable --now mosquitto >/dev/null 2>&1 || true
    fi
}

ensure_link_tools() {
    # The slow-link tests (tests/harness/netns.py): namespaces and tc from iproute2, and
    # iptables for packet loss where the kernel has no netem.
    local missing=()
    command -v ip >/dev/null 2>&1 && command -v tc >/dev/null 2>&1 || missing+=(iproute2)
    command -v iptables >/dev/null 2>&1 || missing+=(iptables)
    if [ "${#missing[@]}" -gt 0 ]; then
        apt_install "${missing[@]}"
    fi
}

ensure_postgres() {
    # A running local server, or initdb/pg_ctl for a throwaway cluster, is enough.
    if "$VENV/bin/python" - <<'PY' >/dev/null 2>&1
import psycopg, sys
for dsn in ("host=/var/run/postgresql dbname=postgres",
            "host=127.0.0.1 port=5432 user=postgres dbname=postgres"):
    try:
        psycopg.connect(dsn, connect_timeout=3).close()
        sys.exit(0)
    except psycopg.Error:
        pass
sys.exit(1)
PY
    then
        return 0
    fi
    if command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
        return 0
    fi
    apt_install postgresql
}
