"""`python -m server.cli` runs the operator CLI (same as `edgefleet`)."""

import sys

from server.cli import main

sys.exit(main())
