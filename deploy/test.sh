#!/usr/bin/env bash
# The whole test suite: lint, types, then pytest against a real broker, onnxruntime and PostgreSQL.
# Installs what is missing first. Extra arguments go to pytest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh"

ensure_venv
ensure_mosquitto
ensure_postgres
cd "$EDGEFLEET_ROOT"

say "ruff"
"$VENV/bin/ruff" check agent server tests bench
say "mypy"
"$VENV/bin/mypy"
say "pytest"
exec "$VENV/bin/python" -m pytest "$@"
