#!/usr/bin/env bash
# Install the edgefleet agent on a device (Raspberry Pi, Jetson, x86 gateway) as a systemd
# service. Run it again at any time: it upgrades the package and changes nothing else that is
# already in place; a device owner's agent.toml is never overwritten, and the MQTT password
# and broker CA only when given again (--mqtt-password-file, --broker-ca).
# One file of ~700 lines on purpose: a device owner copies this single script to a device and
# runs it; its sections (arguments, virtualenv, service user, config, bundle, unit) run in order.
set -euo pipefail

PROG="install-agent.sh"
SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CHECKOUT="$(cd "$SCRIPT_DIR/.." && pwd)"
UNIT_NAME="edgefleet-agent.service"
SERVICE_USER="edgefleet"
# Paths on the device; with --root they are created under DIR instead.
VENV_PATH="/opt/edgefleet/venv"
ETC_PATH="/etc/edgefleet"
BUNDLES_PATH="/var/lib/edgefleet/bundles"
UNIT_PATH="/etc/systemd/system/$UNIT_NAME"
ID_RE='^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$'

usage() {
    cat <<EOF
usage: sudo bash deploy/$PROG --broker HOST[:PORT] --device-id ID --fleet-key PATH
           [--mqtt-password-file PATH --broker-ca PATH] [options]

Installs the edgefleet agent as the systemd service $UNIT_NAME:
  /opt/edgefleet/venv              virtualenv with edgefleet (the agent, no server extras)
  /etc/edgefleet/agent.toml        configuration, written only if it does not exist yet
  /etc/edgefleet/fleet.pub         the fleet's public key: only bundles it signed will run
  /etc/edgefleet/broker-ca.pem     with --broker-ca: the fleet's broker CA (TLS to the broker)
  /etc/edgefleet/credentials/      mqtt-password (root only, handed to the agent by systemd)
  /etc/systemd/system/$UNIT_NAME
  /var/lib/edgefleet/bundles/      with --bundle: the model, verified with the fleet key
and enables and starts the service (it starts once a bundle is installed).

required:
  --broker HOST[:PORT]     MQTT broker (port 8883 with --broker-ca, else 1883, when omitted;
                           [IPv6]:PORT for IPv6)
  --device-id ID           this device's id: letters, digits, '_', '.', '-' (1-64)
  --fleet-key PATH         the fleet's PUBLIC key (edgefleet keys show; never the private one)
the broker identity (from 'edgefleet fleet provision ID --out ID.secret' on the broker's host;
without them the agent connects anonymously, which the broker as deploy/mosquitto configures
it refuses):
  --mqtt-password-file PATH  the device's broker password (ID.secret); installed as
                           /etc/edgefleet/credentials/mqtt-password (root only, never shown),
                           replacing the one there; without it an existing one is kept
  --broker-ca PATH         the fleet's broker CA (ca.pem of the identity directory, never
                           ca.key); installed as /etc/edgefleet/broker-ca.pem, the agent
                           verifies the broker with it (TLS)
  --mqtt-username NAME     the broker username (default: the device id, as provisioned)
options:
  --camera SRC             V4L2 index, /dev/videoN, a video file or a URL (default 0)
  --group G                fleet group of this device (rollouts target groups)
  --bundle PATH            a signed bundle (directory, or archive from 'edgefleet bundle
                           pack' or 'tar -C DIR .') to install as the current model; checked
                           against --fleet-key first, refused if it does not verify or
                           holds a symbolic link (links are never followed)
  --wheel PATH_OR_SPEC     what to pip install: a wheel, a source directory, or a requirement
                           such as 'edgefleet==0.2.0' (default: this checkout, $CHECKOUT)
  --lock FILE              exact versions for edgefleet's dependencies and its build (default:
                           deploy/lock/agent.txt of this checkout, the versions CI tested);
                           'none' lets pip take the newest releases
  --python PY              interpreter for the virtualenv (default python3; 3.10 or newer)
  --root DIR               install under DIR instead of / (tests, staging); never runs
                           useradd, chown or systemctl. The virtualenv only works at DIR/...:
                           to build an image, run this script inside the image's chroot.
  --no-enable              install, but do not enable or start the service
  --reuse-site-packages PY development and tests: let the virtualenv see the packages already
                           installed for PY (same Python version) instead of downloading them
  -h, --help               this help

pip honours its usual settings, e.g. an offline device with a wheelhouse:
  sudo PIP_NO_INDEX=1 PIP_FIND_LINKS=/media/usb/wheels bash deploy/$PROG ...
EOF
}

say() { printf '[edgefleet-install] %s\n' "$*" >&2; }
skipped() { say "skipped: $*"; }
die() {
    printf '[edgefleet-install] error: %s\n' "$*" >&2
    exit 1
}
usage_error() {
    printf '[edgefleet-install] error: %s\n' "$*" >&2
    printf 'run "bash deploy/%s --help" for the options\n' "$PROG" >&2
    exit 2
}

# ---------------------------------------------------------------- arguments
BROKER="" DEVICE_ID="" FLEET_KEY="" CAMERA="0" GROUP="" ROOT="" WHEEL="" PYTHON="python3" BUNDLE=""
REUSE_FROM="" ENABLE=1 BUILD_TMP="" LOCK="$CHECKOUT/deploy/lock/agent.txt"
PASSWORD_FILE="" BROKER_CA="" MQTT_USERNAME=""
while [ $# -gt 0 ]; do
    opt="$1"
    val=""
    case "$opt" in
        -h | --help) usage; exit 0 ;;
        --no-enable) ENABLE=0; shift; continue ;;
        --*=*) val="${opt#*=}"; opt="${opt%%=*}"; shift ;;
        --broker | --device-id | --fleet-key | --camera | --group | --root | --wheel | --python \
            | --reuse-site-packages | --bundle | --lock | --mqtt-password-file | --broker-ca \
            | --mqtt-username)
            [ $# -ge 2 ] || usage_error "$opt needs a value"
            val="$2"
            shift 2
            ;;
        *) usage_error "unknown argument: $opt" ;;
    esac
    case "$opt" in
        --broker) BROKER="$val" ;;
        --device-id) DEVICE_ID="$val" ;;
        --fleet-key) FLEET_KEY="$val" ;;
        --camera) CAMERA="$val" ;;
        --group) GROUP="$val" ;;
        --root) ROOT="$val" ;;
        --wheel) WHEEL="$val" ;;
        --python) PYTHON="$val" ;;
        --reuse-site-packages) REUSE_FROM="$val" ;;
        --bundle) BUNDLE="$val" ;;
        --lock) LOCK="$val" ;;
        --mqtt-password-file) PASSWORD_FILE="$val" ;;
        --broker-ca) BROKER_CA="$val" ;;
        --mqtt-username) MQTT_USERNAME="$val" ;;
        --no-enable | -h | --help) usage_error "$opt takes no value" ;;
        *) usage_error "unknown argument: $opt" ;;
    esac
done

missing=()
[ -n "$BROKER" ] || missing+=("--broker HOST[:PORT]")
[ -n "$DEVICE_ID" ] || missing+=("--device-id ID")
[ -n "$FLEET_KEY" ] || missing+=("--fleet-key PATH")
if [ ${#missing[@]} -gt 0 ]; then
    usage_error "missing required argument(s): ${missing[*]}"
fi

[[ "$DEVICE_ID" =~ $ID_RE ]] ||
    usage_error "--device-id '$DEVICE_ID' is not a valid id: 1-64 letters, digits, '_', '.', '-', starting with a letter or digit"
if [ -n "$GROUP" ] && ! [[ "$GROUP" =~ $ID_RE ]]; then
    usage_error "--group '$GROUP' is not a valid group name: 1-64 letters, digits, '_', '.', '-'"
fi
if [[ "$CAMERA" =~ [[:cntrl:]] ]]; then
    usage_error "--camera contains a control character: $(printf '%q' "$CAMERA")"
fi

# HOST, HOST:PORT, [V6]:PORT or a bare IPv6 address.
case "$BROKER" in
    *://*) usage_error "--broker takes HOST[:PORT], not a URL: '$BROKER'" ;;
esac
# Without a port: 8883 (MQTT over TLS) when there is a CA to verify the broker, else 1883.
DEFAULT_PORT=1883
[ -z "$BROKER_CA" ] || DEFAULT_PORT=8883
BROKER_PORT="$DEFAULT_PORT"
if [[ "$BROKER" =~ ^\[([0-9A-Fa-f:.]+)\](:([0-9]+))?$ ]]; then
    BROKER_HOST="${BASH_REMATCH[1]}"
    BROKER_PORT="${BASH_REMATCH[3]:-$DEFAULT_PORT}"
elif [[ "$BROKER" == *:*:* ]]; then
    BROKER_HOST="$BROKER"
elif [[ "$BROKER" =~ ^([^:]+):([0-9]+)$ ]]; then
    BROKER_HOST="${BASH_REMATCH[1]}"
    BROKER_PORT="${BASH_REMATCH[2]}"
elif [[ "$BROKER" == *:* ]]; then
    usage_error "--broker '$BROKER': the port must be a number"
else
    BROKER_HOST="$BROKER"
fi
[[ "$BROKER_HOST" =~ ^[A-Za-z0-9._:-]+$ ]] ||
    usage_error "--broker '$BROKER': '$BROKER_HOST' is not a host name or address"
if [ "${#BROKER_PORT}" -gt 5 ] || [ "$((10#$BROKER_PORT))" -lt 1 ] ||
    [ "$((10#$BROKER_PORT))" -gt 65535 ]; then
    usage_error "--broker '$BROKER': port $BROKER_PORT is not in 1-65535"
fi
BROKER_PORT="$((10#$BROKER_PORT))"

# The broker identity. Checked before anything is installed; the password is never printed
# (no set -x here), and what is wrong with a file is said without quoting its content.
if [ -n "$PASSWORD_FILE" ]; then
    [ -e "$PASSWORD_FILE" ] || usage_error "--mqtt-password-file '$PASSWORD_FILE' not found"
    [ -f "$PASSWORD_FILE" ] || usage_error "--mqtt-password-file '$PASSWORD_FILE' is not a regular file"
    [ -r "$PASSWORD_FILE" ] && head -c 1 "$PASSWORD_FILE" >/dev/null 2>&1 ||
        usage_error "--mqtt-password-file '$PASSWORD_FILE' is not readable (run as root, or check its owner)"
    # The agent strips surrounding whitespace; nothing else left means no password at all.
    [ -n "$(tr -d '[:space:]' <"$PASSWORD_FILE")" ] ||
        usage_error "--mqtt-password-file '$PASSWORD_FILE' is empty: use the file 'edgefleet fleet provision $DEVICE_ID --out FILE' wrote"
    [ "$(grep -c . "$PASSWORD_FILE")" -le 1 ] ||
        usage_error "--mqtt-password-file '$PASSWORD_FILE' has more than one line: it must hold the password alone"
    PASSWORD_FILE="$(cd "$(dirname "$PASSWORD_FILE")" && pwd)/$(basename "$PASSWORD_FILE")"
fi
if [ -n "$BROKER_CA" ]; then
    [ -e "$BROKER_CA" ] || usage_error "--broker-ca '$BROKER_CA' not found"
    [ -f "$BROKER_CA" ] && [ -r "$BROKER_CA" ] ||
        usage_error "--broker-ca '$BROKER_CA' is not a readable file"
    # ca.key sits next to ca.pem in the identity directory: the mix-up that must never reach a device.
    if grep -q "PRIVATE KEY" "$BROKER_CA"; then
        usage_error "--broker-ca '$BROKER_CA' holds a PRIVATE key: copy ca.pem, never ca.key (it must stay on the broker's host)"
    fi
    grep -q -- "-----BEGIN CERTIFICATE-----" "$BROKER_CA" && grep -q -- "-----END CERTIFICATE-----" "$BROKER_CA" ||
        usage_error "--broker-ca '$BROKER_CA' is not a PEM certificate (-----BEGIN CERTIFICATE-----): copy ca.pem of the broker's identity directory"
    BROKER_CA="$(cd "$(dirname "$BROKER_CA")" && pwd)/$(basename "$BROKER_CA")"
    if [ "$BROKER_PORT" -eq 1883 ]; then
        say "warning: --broker-ca with port 1883: the broker as deploy/mosquitto configures it has TLS on 8883 (1883 is its loopback listener)"
    fi
fi
MQTT_USERNAME="${MQTT_USERNAME:-$DEVICE_ID}"
[[ "$MQTT_USERNAME" =~ $ID_RE ]] ||
    usage_error "--mqtt-username '$MQTT_USERNAME' is not a valid name: 1-64 letters, digits, '_', '.', '-' (provisioning names identities so)"

[ -e "$FLEET_KEY" ] ||
    die "fleet key '$FLEET_KEY' not found: copy the fleet's public key to this device (on the coordinator: edgefleet keys show)"
if [ ! -f "$FLEET_KEY" ] || [ ! -r "$FLEET_KEY" ]; then
    die "fleet key '$FLEET_KEY' is not a readable file"
fi
if grep -q "PRIVATE KEY" "$FLEET_KEY"; then
    die "'$FLEET_KEY' is a PRIVATE key: a device needs only the public half (edgefleet keys show); the private key must stay on the signing machine"
fi
FLEET_KEY="$(cd "$(dirname "$FLEET_KEY")" && pwd)/$(basename "$FLEET_KEY")"

if [ -n "$BUNDLE" ]; then
    [ -e "$BUNDLE" ] || die "bundle '$BUNDLE' not found"
    BUNDLE="$(cd "$(dirname "$BUNDLE")" && pwd)/$(basename "$BUNDLE")"
fi

if [ -z "$WHEEL" ]; then
    [ -f "$CHECKOUT/pyproject.toml" ] ||
        usage_error "no edgefleet checkout around $SCRIPT_DIR: give --wheel PATH_OR_SPEC"
    WHEEL="$CHECKOUT"
fi
if [ -e "$WHEEL" ]; then
    # pip reads a bare name as a requirement ('src' from PyPI), never as the local path.
    WHEEL="$(cd "$(dirname "$WHEEL")" && pwd)/$(basename "$WHEEL")"
fi
UNIT_SRC="$CHECKOUT/systemd/$UNIT_NAME"
[ -f "$UNIT_SRC" ] || die "unit file $UNIT_SRC is missing from this checkout"

if [ -n "$ROOT" ]; then
    mkdir -p "$ROOT"
    ROOT="$(cd "$ROOT" && pwd)"
    [ "$ROOT" != "/" ] || ROOT=""
    STAGING=1
else
    STAGING=0
    [ "$(id -u)" -eq 0 ] ||
        die "run as root (sudo bash deploy/$PROG ...), or give --root DIR to install into a directory"
fi
VENV="$ROOT$VENV_PATH"
ETC="$ROOT$ETC_PATH"
BUNDLES="$ROOT$BUNDLES_PATH"
UNIT_DEST="$ROOT$UNIT_PATH"

# ---------------------------------------------------------------- Python and the virtualenv
command -v "$PYTHON" >/dev/null 2>&1 || die "Python interpreter '$PYTHON' not found (--python)"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' ||
    die "$PYTHON is Python $("$PYTHON" -c 'import platform; print(platform.python_version())'); edgefleet needs 3.10 or newer"
if ! "$PYTHON" -c 'import ensurepip, venv' >/dev/null 2>&1; then
    # Debian and Ubuntu ship venv without ensurepip until python3-venv is installed.
    pyver="$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
    if [ "$STAGING" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
        say "apt-get install python${pyver}-venv"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "python${pyver}-venv" >/dev/null ||
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null ||
            die "could not install python${pyver}-venv"
    else
        die "$PYTHON cannot create virtualenvs: install python${pyver}-venv (or python3-venv)"
    fi
fi

if [ -e "$VENV" ] && ! "$VENV/bin/python" -I -c '' >/dev/null 2>&1; then
    say "virtualenv $VENV is broken (Python upgraded?): recreating it"
    rm -rf "$VENV"
fi
if [ ! -e "$VENV" ]; then
    say "creating virtualenv $VENV"
    mkdir -p "$(dirname "$VENV")"
    venv_args=()
    # Reusing packages includes pip itself: skip installing a second copy (saves seconds).
    [ -z "$REUSE_FROM" ] || venv_args=(--without-pip)
    "$PYTHON" -m venv ${venv_args[@]+"${venv_args[@]}"} "$VENV" || die "$PYTHON -m venv $VENV failed"
fi

reuse_pth="$("$VENV/bin/python" -I -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/_edgefleet_reuse.pth"
if [ -n "$REUSE_FROM" ]; then
    command -v "$REUSE_FROM" >/dev/null 2>&1 || die "--reuse-site-packages: '$REUSE_FROM' not found"
    version_of() { "$1" -I -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")'; }
    [ "$(version_of "$REUSE_FROM")" = "$(version_of "$VENV/bin/python")" ] ||
        die "--reuse-site-packages: $REUSE_FROM is Python $(version_of "$REUSE_FROM"), the virtualenv $(version_of "$VENV/bin/python")"
    # A .pth line appends a directory to sys.path, after the virtualenv's own site-packages:
    # whatever pip installs into the virtualenv wins over the reused copies.
    want="$("$REUSE_FROM" -I -c 'import sysconfig; p = sysconfig.get_paths(); print(p["purelib"]); print(p["platlib"])' | awk '!seen[$0]++')"
    if [ ! -f "$reuse_pth" ] || [ "$(cat "$reuse_pth")" != "$want" ]; then
        say "reusing the packages of $REUSE_FROM"
        printf '%s\n' "$want" >"$reuse_pth"
    fi
elif [ -e "$reuse_pth" ]; then
    say "no longer reusing another interpreter's packages ($reuse_pth removed)"
    rm -f "$reuse_pth"
fi
if ! "$VENV/bin/python" -I -m pip --version >/dev/null 2>&1; then
    "$VENV/bin/python" -I -m ensurepip --default-pip >/dev/null || die "cannot install pip into $VENV"
fi

package_state() {
    # The installed files' hashes (RECORD): changes exactly when pip changed the package.
    "$VENV/bin/python" -I - <<'PY' 2>/dev/null || true
import hashlib, importlib.metadata as md, sysconfig
site = sysconfig.get_paths()["purelib"]
for dist in md.distributions(path=[site]):
    if (dist.metadata["Name"] or "").lower() == "edgefleet":
        # direct_url.json names the (temporary) build directory: not part of the package.
        lines = [x for x in (dist.read_text("RECORD") or "").splitlines() if "direct_url" not in x]
        print(dist.version, hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16])
PY
}

pip_target="$WHEEL"
if [ -d "$WHEEL" ]; then
    # Build from a clean copy: pip builds a directory in place, which would leave root-owned
    # build/ and *.egg-info in the checkout, and modules deleted since in build/lib.
    BUILD_TMP="$(mktemp -d)"
    trap 'rm -rf "$BUILD_TMP"' EXIT
    pip_target="$BUILD_TMP/src"
    "$VENV/bin/python" -I - "$WHEEL" "$pip_target" <<'PY' || die "cannot copy $WHEEL to build it"
import shutil, sys
from pathlib import Path

src = Path(sys.argv[1])
def skip(folder: str, names: list[str]) -> list[str]:
    top = Path(folder) == src  # .git, .venv, the demo's out/, earlier build output
    return [n for n in names if n == "__pycache__" or n.endswith(".egg-info")
            or (top and (n.startswith(".") or n in ("out", "build", "dist")))]
shutil.copytree(src, sys.argv[2], ignore=skip, symlinks=True)
PY
fi

# The lock as pip constraints: the dependencies at exactly the versions CI tested, and (through
# the environment, which pip's isolated build inherits) setuptools and wheel for the build too.
lock_env=()
if [ "$LOCK" != "none" ]; then
    [ -f "$LOCK" ] || die "--lock: '$LOCK' does not exist (use --lock none for the newest releases)"
    lock_env=("PIP_CONSTRAINT=$(cd "$(dirname "$LOCK")" && pwd)/$(basename "$LOCK")")
fi
before="$(package_state)"
say "pip install $WHEEL${lock_env[*]:+ with the versions of $LOCK} (this can take a few minutes on a Pi)"
env ${lock_env[@]+"${lock_env[@]}"} "$VENV/bin/python" -I -m pip install --quiet \
    --disable-pip-version-check --no-input --progress-bar off --upgrade \
    --upgrade-strategy only-if-needed "$pip_target" ||
    die "pip could not install '$WHEEL' into $VENV${lock_env[*]:+ with the versions of $LOCK}"
after="$(package_state)"
[ -x "$VENV/bin/edgefleet-agent" ] || die "pip installed '$WHEEL' but $VENV/bin/edgefleet-agent is missing: is it edgefleet?"
version="$("$VENV/bin/edgefleet-agent" --version)" || die "$VENV/bin/edgefleet-agent does not run"
PACKAGE_CHANGED=0
if [ "$before" = "$after" ]; then
    say "$version in $VENV: unchanged"
else
    PACKAGE_CHANGED=1
    say "$version in $VENV: installed (${before:-none} -> $after)"
fi

# From here on the installed package itself checks what we write, with the device's rules.
"$VENV/bin/python" -I - "$FLEET_KEY" <<'PY' || die "'$FLEET_KEY' cannot be the fleet key"
import sys
from edgefleet.agent.bundle import KeyFileError, load_public_key
try:
    load_public_key(sys.argv[1])
except KeyFileError as exc:
    sys.exit(f"[edgefleet-install] error: {exc}")
PY
if [ -n "$BROKER_CA" ]; then
    # The grep above caught the usual mix-ups early; this parses it (and refuses broker.pem,
    # a server certificate that cannot verify anything) before the device is pointed at it.
    ca_problem="$("$VENV/bin/python" -I - "$BROKER_CA" <<'PY'
import sys
from cryptography import x509

def refuse(why: str) -> None:
    print(why)  # the caller names the option and the file
    sys.exit(1)

try:
    certs = x509.load_pem_x509_certificates(open(sys.argv[1], "rb").read())
except ValueError as exc:
    refuse(f"is not a PEM certificate ({exc})")
for cert in certs:
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        refuse(f"holds '{cert.subject.rfc4514_string()}', which is not a CA certificate: "
               "copy ca.pem of the broker's identity directory, not broker.pem")
PY
)" || usage_error "--broker-ca '$BROKER_CA' ${ca_problem:-cannot be read as a certificate}"
fi

# ---------------------------------------------------------------- the service user
if [ "$STAGING" -eq 1 ]; then
    skipped "useradd $SERVICE_USER (--root): create the system user '$SERVICE_USER' (in group video) on the device"
elif getent passwd "$SERVICE_USER" >/dev/null 2>&1; then
    # An existing user (an earlier install, or made by hand) joins video too.
    if getent group video >/dev/null 2>&1 && ! id -nG "$SERVICE_USER" | tr ' ' '\n' | grep -qx video; then
        say "adding $SERVICE_USER to group video"
        usermod -a -G video "$SERVICE_USER" || say "warning: could not add $SERVICE_USER to group video"
    fi
elif ! command -v useradd >/dev/null 2>&1; then
    skipped "useradd is not available: create the system user '$SERVICE_USER' (in group video) yourself"
else
    groups=()
    if getent group video >/dev/null 2>&1; then
        groups=(--groups video)
    else
        say "warning: there is no 'video' group: cameras will not be accessible and SupplementaryGroups=video fails the start"
    fi
    say "creating system user $SERVICE_USER"
    useradd --system --user-group ${groups[@]+"${groups[@]}"} --home-dir /var/lib/edgefleet \
        --no-create-home --shell "$(command -v nologin || echo /usr/sbin/nologin)" \
        --comment "edgefleet agent" "$SERVICE_USER"
fi

# ---------------------------------------------------------------- configuration
[ -d "$ETC" ] || install -d -m 0755 "$ETC"

toml_str() {
    # A TOML basic string (every value was checked for control characters above).
    local s="$1"
    s="${s//\\/\\\\}"
    s="${s//\"/\\\"}"
    printf '"%s"' "$s"
}

config_check() {
    # Validates a config with the installed agent's own loader; prints its device_id.
    "$VENV/bin/python" -I - "$1" <<'PY'
import sys
from pathlib import Path
from edgefleet.agent.config import ConfigError, load_config
try:
    print(load_config(Path(sys.argv[1]), env={}).device_id)
except ConfigError as exc:
    sys.exit(str(exc))
PY
}

identity_gaps() {
    # What a kept config lacks to use the identity given now (one line each; none: nothing).
    "$VENV/bin/python" -I - "$1" "$MQTT_USERNAME" "$PASSWORD_FILE" "$BROKER_CA" "$ETC_PATH/broker-ca.pem" <<'PY' 2>/dev/null || true
import sys
from pathlib import Path
from edgefleet.agent.config import load_config
path, username, password_file, ca, device_ca = sys.argv[1:]
mqtt = load_config(Path(path), env={}).mqtt
if password_file and mqtt.username != username:
    print(f'[mqtt] username = "{username}" (it has {repr(mqtt.username) if mqtt.username else "none"})')
if ca and (mqtt.tls is None or str(mqtt.tls.ca) != device_ca):
    print(f'[mqtt.tls] ca = "{device_ca}" (it has {str(mqtt.tls.ca) if mqtt.tls else "no [mqtt.tls]"})')
PY
}

CONFIG="$ETC/agent.toml"
if [ -e "$CONFIG" ]; then
    if existing_id="$(config_check "$CONFIG" 2>&1)"; then
        if [ "$existing_id" != "$DEVICE_ID" ]; then
            say "warning: kept $CONFIG: its device_id is '$existing_id', not '$DEVICE_ID' (edit it or remove it and run again)"
        else
            say "kept $CONFIG (never overwritten)"
        fi
        gaps="$(identity_gaps "$CONFIG")"
        if [ -n "$gaps" ]; then
            say "warning: the kept $CONFIG does not use the broker identity given; edit it to have:"
            printf '%s\n' "$gaps" | sed 's/^/  /' >&2
        fi
    else
        say "warning: kept $CONFIG, but it does not validate and the agent will not start with it:"
        printf '%s\n' "$existing_id" >&2
    fi
else
    if [[ "$CAMERA" =~ ^[0-9]+$ ]]; then camera_value="$CAMERA"; else camera_value="$(toml_str "$CAMERA")"; fi
    if [ -n "$GROUP" ]; then group_line="group = $(toml_str "$GROUP")"; else group_line='# group = "lab"'; fi
    if [ -n "$PASSWORD_FILE" ]; then
        username_line="username = $(toml_str "$MQTT_USERNAME")"
    else
        username_line="# username = $(toml_str "$MQTT_USERNAME")   # with a provisioned password"
    fi
    if [ -n "$BROKER_CA" ]; then
        tls_lines="
[mqtt.tls]
# The fleet's broker CA: the agent connects only to a broker whose certificate it signed.
ca = $(toml_str "$ETC_PATH/broker-ca.pem")"
    else
        tls_lines="# TLS: [mqtt.tls] ca = \"$ETC_PATH/broker-ca.pem\" (install it with --broker-ca)"
    fi
    tmp_config="$ETC/.agent.toml.new"
    cat >"$tmp_config" <<EOF
# edgefleet agent configuration: written once by deploy/$PROG, yours to edit from now on
# (re-running the installer never overwrites it). Every key is checked at start; the keys and
# their defaults are in agent/config.py. EDGEFLEET_SECTION__KEY environment variables override.

device_id = $(toml_str "$DEVICE_ID")
$group_line
# state_dir = "/var/lib/edgefleet"   # outbox, bundles; the unit's StateDirectory=

[camera]
source = $camera_value

[model]
# Only bundles signed by one of these keys are run.
trusted_keys = [$(toml_str "$ETC_PATH/fleet.pub")]

[mqtt]
host = $(toml_str "$BROKER_HOST")
port = $BROKER_PORT
$username_line
# No password here: it is in $ETC_PATH/credentials/mqtt-password (root only); systemd hands
# it to the agent as a credential.
$tls_lines
EOF
    if ! problem="$(config_check "$tmp_config" 2>&1)"; then
        rm -f "$tmp_config"
        die "the generated agent.toml does not validate: $problem"
    fi
    if [ "$STAGING" -eq 0 ] && getent group "$SERVICE_USER" >/dev/null 2>&1; then
        chmod 0640 "$tmp_config"
        chgrp "$SERVICE_USER" "$tmp_config"
    else
        chmod 0644 "$tmp_config"
        [ "$STAGING" -eq 0 ] || skipped "chgrp $SERVICE_USER agent.toml (--root): it stays readable by all (mode 0644)"
    fi
    mv "$tmp_config" "$CONFIG"
    say "wrote $CONFIG"
fi

if ! cmp -s "$FLEET_KEY" "$ETC/fleet.pub"; then
    [ ! -e "$ETC/fleet.pub" ] || say "replacing $ETC/fleet.pub with $FLEET_KEY (key rotation)"
    install -m 0644 "$FLEET_KEY" "$ETC/fleet.pub"
    say "installed $ETC/fleet.pub"
fi

if [ -n "$BROKER_CA" ] && ! cmp -s "$BROKER_CA" "$ETC/broker-ca.pem"; then
    # Public: the agent (not root) opens it to verify the broker.
    [ ! -e "$ETC/broker-ca.pem" ] || say "replacing $ETC/broker-ca.pem with $BROKER_CA (CA rotation)"
    install -m 0644 "$BROKER_CA" "$ETC/.broker-ca.pem.new"
    mv "$ETC/.broker-ca.pem.new" "$ETC/broker-ca.pem"
    say "installed $ETC/broker-ca.pem"
fi

# LoadCredential= fails the start when its file is missing, so an empty file means
# "no password"; systemd (root) reads it, the agent never sees this directory.
CRED="$ETC/credentials"
[ -d "$CRED" ] || install -d -m 0700 "$CRED"
chmod 0700 "$CRED"
if [ -n "$PASSWORD_FILE" ]; then
    if cmp -s "$PASSWORD_FILE" "$CRED/mqtt-password"; then
        say "kept $CRED/mqtt-password (the same password)"
    else
        # Written root-only from the first byte, then renamed: never readable by others, and
        # a restart in between sees the old password or the new one, not half of it.
        verb="installed"
        [ ! -s "$CRED/mqtt-password" ] || verb="replaced"
        (umask 077 && cat "$PASSWORD_FILE" >"$CRED/.mqtt-password.new")
        chmod 0600 "$CRED/.mqtt-password.new"
        mv "$CRED/.mqtt-password.new" "$CRED/mqtt-password"
        say "$verb $CRED/mqtt-password (from $PASSWORD_FILE; the agent's broker username is $MQTT_USERNAME)"
    fi
elif [ ! -e "$CRED/mqtt-password" ]; then
    (umask 077 && : >"$CRED/mqtt-password")
    say "created an empty $CRED/mqtt-password (no password)"
fi
if [ ! -s "$CRED/mqtt-password" ]; then
    say "warning: no broker password: the agent connects anonymously, and a broker configured as deploy/mosquitto ships it refuses anonymous devices. On the broker's host run 'edgefleet fleet provision $DEVICE_ID --out $DEVICE_ID.secret', copy $DEVICE_ID.secret and the identity directory's ca.pem here, and run this again with --mqtt-password-file $DEVICE_ID.secret --broker-ca ca.pem"
elif [ -n "$PASSWORD_FILE" ] && [ -z "$BROKER_CA" ] && [ ! -e "$ETC/broker-ca.pem" ]; then
    say "warning: a password without --broker-ca goes to the broker unencrypted; a broker configured as deploy/mosquitto accepts devices only over TLS (give --broker-ca ca.pem)"
fi

# ---------------------------------------------------------------- the bundle
if [ -n "$BUNDLE" ]; then
    # Verified with the device's own code and the installed fleet key, staged next to its
    # final place, then `current` is switched by an atomic rename; the previous version stays.
    # A directory is copied by the package's copy_tree, which refuses any link inside it (the
    # verifier's rule) before copying anything; an archive is unpacked member by member.
    installed_bundle="$("$VENV/bin/python" -I - "$BUNDLE" "$ETC/fleet.pub" "$BUNDLES" <<'PY'
import os, shutil, sys, tempfile
from pathlib import Path
from edgefleet.agent.bundle import BundleError, KeyFileError, load_public_key, verify_bundle
from edgefleet.agent.bundle.archive import UnsafeArchive, unpack
from edgefleet.agent.bundle.tree import copy_tree

src, key, dest = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
dest.mkdir(parents=True, exist_ok=True)
tmp = Path(tempfile.mkdtemp(dir=dest, prefix=".incoming-"))
try:
    staged = tmp / "bundle"
    if src.is_dir():
        # Never through a link: one inside the bundle is refused before anything is copied.
        copy_tree(src, staged)
    else:
        unpack(src, staged)
    m = verify_bundle(staged, [load_public_key(key)]).manifest
    final = dest / f"{m.model_id}-v{m.version}"
    if final.exists():
        shutil.rmtree(final)
    staged.rename(final)
    link = dest / ".current.new"
    link.unlink(missing_ok=True)
    link.symlink_to(final.name)
    os.replace(link, dest / "current")
    print(f"{m.model_id} v{m.version} -> {final}")
except (BundleError, KeyFileError, UnsafeArchive, OSError) as exc:
    sys.exit(f"{exc}")
finally:
    shutil.rmtree(tmp, ignore_errors=True)
PY
)" || die "bundle '$BUNDLE' not installed (see above): the device keeps what it had"
    say "installed bundle $installed_bundle (current)"
fi
# The bundle the agent will load: model.bundle from the config, else the installed current.
AGENT_BUNDLE="$("$VENV/bin/python" -I - "$CONFIG" <<'PY' 2>/dev/null || true
import sys
from pathlib import Path
from edgefleet.agent.config import load_config
cfg = load_config(Path(sys.argv[1]), env={})
print(cfg.model.bundle or cfg.state_dir / "bundles" / "current")
PY
)"

# ---------------------------------------------------------------- the unit
UNIT_CHANGED=0
if ! cmp -s "$UNIT_SRC" "$UNIT_DEST"; then
    install -d -m 0755 "$(dirname "$UNIT_DEST")"
    install -m 0644 "$UNIT_SRC" "$UNIT_DEST"
    UNIT_CHANGED=1
    say "installed $UNIT_DEST"
fi

if [ "$STAGING" -eq 1 ]; then
    skipped "systemctl (--root): on the device, run: systemctl daemon-reload && systemctl enable --now ${UNIT_NAME%.service}"
elif ! command -v systemctl >/dev/null 2>&1 || [ ! -d /run/systemd/system ]; then
    skipped "systemctl: systemd is not running here; on the device, run: systemctl enable --now ${UNIT_NAME%.service}"
else
    [ "$UNIT_CHANGED" -eq 0 ] || systemctl daemon-reload
    if [ "$UNIT_CHANGED" -eq 1 ] || [ "$PACKAGE_CHANGED" -eq 1 ]; then
        # A running agent picks up the new package or unit; a stopped one stays stopped.
        systemctl try-restart "$UNIT_NAME" ||
            die "restarting $UNIT_NAME failed: journalctl -u ${UNIT_NAME%.service} -e"
    fi
    if [ "$ENABLE" -eq 1 ] && [ -n "$AGENT_BUNDLE" ] && [ ! -e "$AGENT_BUNDLE" ]; then
        # The agent refuses to run without a verified model (exit 2, no restart).
        systemctl enable "$UNIT_NAME" || die "systemctl enable $UNIT_NAME failed"
        say "$UNIT_NAME is enabled but not started: no bundle at $AGENT_BUNDLE yet (run again with --bundle PATH, then: systemctl start ${UNIT_NAME%.service})"
    elif [ "$ENABLE" -eq 1 ]; then
        # Not `enable --now`: with Type=notify that blocks until READY=1 (model loaded, first
        # frame), and an unplugged camera keeps the unit starting for as long as it is away.
        systemctl enable "$UNIT_NAME" || die "systemctl enable $UNIT_NAME failed"
        systemctl start --no-block "$UNIT_NAME" || die "systemctl start $UNIT_NAME failed"
        state="activating"
        for _ in $(seq 1 120); do
            state="$(systemctl is-active "$UNIT_NAME" 2>/dev/null || true)"
            [ "$state" = "activating" ] || [ "$state" = "reloading" ] || break
            sleep 1
        done
        case "$state" in
            active) say "$UNIT_NAME is enabled and running" ;;
            activating)
                say "$UNIT_NAME is enabled and still starting: $(systemctl show -p StatusText --value "$UNIT_NAME" 2>/dev/null) (journalctl -u ${UNIT_NAME%.service} -f)"
                ;;
            *) die "$UNIT_NAME did not start ($state): journalctl -u ${UNIT_NAME%.service} -e" ;;
        esac
    else
        say "not enabled (--no-enable): systemctl enable --now ${UNIT_NAME%.service}"
    fi
fi
say "done: config $ETC_PATH/agent.toml, state /var/lib/edgefleet, logs: journalctl -u ${UNIT_NAME%.service}"
