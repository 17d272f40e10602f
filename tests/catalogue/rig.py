"""A catalogue on real parts for the tests: SQLite store, archive store, fleet key, the
reference model and its data."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from edgefleet.server.catalogue.files import CatalogueFiles
from edgefleet.server.catalogue.jobs import JobRunner
from edgefleet.server.catalogue.models import add_model
from edgefleet.server.catalogue.options import ModelOptions
from edgefleet.server.fleet.store import open_store
from edgefleet.server.fleet.store.base import Store
from edgefleet.server.keystore import FleetKey, init_key
from edgefleet.server.optimize.data import write_splits_npz
from edgefleet.server.reference import MODEL_PATH, load_reference_split
from edgefleet.server.rollout.archives import ArchiveStore

# The reference model's preprocessing (tests/test_optimize.py); its input size is fixed.
REFERENCE_OPTIONS = ModelOptions(mean=[0.1307], std=[0.3081])


def reference_npz(path: Path) -> Path:
    """The reference digits in the optimizer's .npz layout."""
    if not path.exists():
        write_splits_npz(load_reference_split(), path)
    return path


@dataclass
class Rig:
    root: Path
    store: Store
    files: CatalogueFiles
    archives: ArchiveStore
    key: FleetKey

    @property
    def db(self) -> str:
        return f"sqlite:///{self.root / 'fleet.db'}"

    @property
    def key_file(self) -> Path:
        return self.key.directory / "fleet.key"

    def runner(self, **kw: object) -> JobRunner:
        return JobRunner(self.store, self.files, self.archives, self.key_file, **kw)  # type: ignore[arg-type]

    def add_reference(self, name: str, npz: Path, model_id: str | None = None) -> None:
        options = REFERENCE_OPTIONS.model_copy(update={"model_id": model_id})
        add_model(self.store, self.files, name, MODEL_PATH, npz, options)

    def report(self, job_id: str) -> dict[str, object]:
        return dict(json.loads((self.files.job_dir(job_id) / "report.json").read_text()))


@contextlib.contextmanager
def rig(root: Path, store_url: str | None = None) -> Iterator[Rig]:
    """A catalogue under root on a SQLite store there, or on store_url (PostgreSQL)."""
    key, _ = init_key(root / "keys")
    store = open_store(store_url or f"sqlite:///{root / 'fleet.db'}")
    try:
        yield Rig(
            root=root,
            store=store,
            files=CatalogueFiles(root / "catalogue"),
            archives=ArchiveStore(root / "bundles", [key.public]),
            key=key,
        )
    finally:
        store.close()


def alive(pid: int) -> bool:
    """The process runs (a zombie, dead but not yet reaped, does not count)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def pid_of(files: CatalogueFiles, job_id: str) -> int:
    return int(files.pid_file(job_id).read_text().strip())


def kill_quietly(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, 9)
