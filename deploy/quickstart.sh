#!/usr/bin/env bash
# The main job: installs what is missing, then runs the edgefleet demo end to end.
# Extra arguments go to `edgefleet demo`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh"

ensure_venv
ensure_mosquitto
cd "$EDGEFLEET_ROOT"
exec "$VENV/bin/edgefleet" demo "$@"
