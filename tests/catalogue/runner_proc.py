"""A coordinator's build runner as a process of its own, for the test that kills it mid-build:
`python -m tests.catalogue.runner_proc STORE CATALOGUE_DIR BUNDLES_DIR KEYDIR/fleet.key`."""

from __future__ import annotations

import sys
from pathlib import Path

from edgefleet.agent.bundle import load_public_key
from edgefleet.server.catalogue.files import CatalogueFiles
from edgefleet.server.catalogue.jobs import JobRunner
from edgefleet.server.fleet.store import open_store
from edgefleet.server.rollout.archives import ArchiveStore


def main(argv: list[str]) -> int:
    store_url, catalogue, bundles, key_file = argv
    store = open_store(store_url)
    public = load_public_key(Path(key_file).with_name("fleet.pub"))
    archives = ArchiveStore(Path(bundles), [public])
    runner = JobRunner(store, CatalogueFiles(Path(catalogue)), archives, Path(key_file))
    runner.run_next()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
