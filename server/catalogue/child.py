"""`python -m edgefleet.server.catalogue.child PARENT_PID optimize ...`: the `edgefleet` CLI
run as a coordinator's build, which dies with the coordinator.

Linux's parent-death signal kills the build when the thread that started it ends, so a
coordinator killed outright leaves no optimizer writing into a work directory that the next
coordinator is about to remove. Elsewhere (no prctl) the next coordinator's recover() kills
it by the pid file instead.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def main() -> int:
    parent = int(sys.argv[1])
    # Not Linux (no prctl): recover() is the safety net.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL))
    if os.getppid() != parent:
        print("edgefleet optimize: error: the coordinator stopped before the build began")
        return 1
    from edgefleet.server.cli.app import main as cli

    return cli(sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
