#!/usr/bin/env bash
# Refresh the locks in deploy/lock/ from pyproject.toml: `bash deploy/lock.sh`.
#
#   all.txt    the agent, the server and dev extras: what the README's two commands and CI install
#   agent.txt  the agent alone, at the same versions: what deploy/install-agent.sh installs
#
# Both are universal (one file for Python 3.10 and newer, x86_64 and aarch64; markers pick the
# line) and pin the build tools too. Review the diff, then run `bash deploy/test.sh` (and the
# aarch64 check) before committing: the lock is what every new machine will get.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS="$ROOT/.venv-lock"
UV_VERSION="0.13.9"

if [ ! -x "$TOOLS/bin/uv" ] || [ "$("$TOOLS/bin/uv" --version | cut -d' ' -f2)" != "$UV_VERSION" ]; then
    python3 -m venv "$TOOLS"
    "$TOOLS/bin/python" -m pip install -q "uv==$UV_VERSION"
fi
cd "$ROOT"
compile() {
    "$TOOLS/bin/uv" pip compile --quiet --universal --python-version 3.10 \
        --custom-compile-command "bash deploy/lock.sh" "$@"
}
compile pyproject.toml deploy/lock/build.in --extra server --extra dev -o deploy/lock/all.txt
# The same versions for the agent: constrained by all.txt, so devices run what CI tested.
compile pyproject.toml deploy/lock/build.in -c deploy/lock/all.txt -o deploy/lock/agent.txt
echo "deploy/lock/all.txt: $(grep -c '==' deploy/lock/all.txt) pins; deploy/lock/agent.txt: $(grep -c '==' deploy/lock/agent.txt) pins"
