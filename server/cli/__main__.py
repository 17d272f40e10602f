"""`python -m edgefleet.server.cli` runs the operator CLI (same as `edgefleet`)."""

import sys

from edgefleet.server.cli.app import main

sys.exit(main())
