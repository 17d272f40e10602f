#!/usr/bin/env bash
# Optional: the Flower peer for `python -m bench.federated`. Makes .venv-flower, a virtualenv
# that sees .venv's locked packages and adds flwr at the versions of deploy/lock/flower-peer.txt
# (--no-deps: see that file for why), so .venv itself never changes. Then:
#     .venv-flower/bin/python -m bench.federated
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh"
ensure_venv
PEER="$EDGEFLEET_ROOT/.venv-flower"
if [ ! -x "$PEER/bin/python" ]; then
    say "creating $PEER on top of $VENV"
    "$VENV/bin/python" -m venv --without-pip "$PEER"
fi
site="$("$PEER/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
base="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
# Its own packages first, then .venv's: a .pth line is read after the venv's own dir.
echo "import site; site.addsitedir('$base')" > "$site/edgefleet-base.pth"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps \
    --target "$site" --upgrade -r "$EDGEFLEET_ROOT/deploy/lock/flower-peer.txt"
"$PEER/bin/python" -c 'import flwr, edgefleet.agent; print("flwr", flwr.__version__, "ready")'
