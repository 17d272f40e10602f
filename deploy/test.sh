#!/usr/bin/env bash
# The whole test suite: lint, types, then pytest against a real broker, onnxruntime and PostgreSQL.
# Installs what is missing first, at the locked versions (deploy/lock/all.txt). Extra arguments
# go to pytest. `--latest` first runs it all against the newest releases instead, in .venv-latest:
# the early warning of an upstream break, not a gate.
set -euo pipefail
if [ "${1:-}" = "--latest" ]; then
    shift
    export EDGEFLEET_LATEST=1
fi
source "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh"

ensure_venv
ensure_mosquitto
ensure_postgres
ensure_link_tools
cd "$EDGEFLEET_ROOT"

say "ruff"
"$VENV/bin/ruff" check edgefleet/__init__.py agent server tests bench training
say "mypy"
"$VENV/bin/mypy"
say "import contracts"
"$VENV/bin/lint-imports" --no-cache
say "pytest"
exec "$VENV/bin/python" -m pytest "$@"
