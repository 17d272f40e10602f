"""Why a catalogue request was refused; the HTTP routes map each kind to its status."""

from __future__ import annotations


class CatalogueError(Exception):
    """A catalogue request that cannot be done; the message names what is wrong."""


class UnknownModel(CatalogueError):
    """No model of that name in the catalogue (404)."""

    def __init__(self, name: str) -> None:
        super().__init__(f"no model {name!r} in the catalogue")
        self.name = name


class UnknownJob(CatalogueError):
    """No build job with that id (404)."""

    def __init__(self, job_id: str) -> None:
        super().__init__(f"no build job {job_id!r}")
        self.job_id = job_id


class ModelExists(CatalogueError):
    """The name is taken (409)."""


class InvalidInput(CatalogueError):
    """What was sent cannot be used: not ONNX, unreadable data, bad options (422)."""


class NotPossible(CatalogueError):
    """Not in the current state: the job has ended, the variant is registered, builds need a
    signing key the coordinator lacks (409)."""
