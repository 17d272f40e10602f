"""Adding a source model to the catalogue: check what was given, keep its files, record it.

The checks are the optimizer's own (its ONNX loader and preprocessing inference, its data
loader), so a model the catalogue takes is one `edgefleet optimize` can start on; a build
may still fail later for reasons only a build finds (the accuracy budget).
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from pathlib import Path

from edgefleet.server.catalogue.errors import InvalidInput, ModelExists, UnknownModel
from edgefleet.server.catalogue.files import CatalogueFiles
from edgefleet.server.catalogue.options import ModelOptions
from edgefleet.server.catalogue.process import ask_checker
from edgefleet.server.fleet.store.catalogue_base import CatalogueStore, ModelRecord

log = logging.getLogger(__name__)

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
# Adds of one process take turns between "is the name free" and "recorded": a second add of
# the same name must not take the first one's fresh files for leftovers of a crash.
_ADDING = threading.Lock()


def model_options(record: ModelRecord) -> ModelOptions:
    """The options a model was added with (an unreadable record counts as none)."""
    try:
        return ModelOptions.model_validate_json(record.options_json or "{}")
    except ValueError:
        log.warning("model %s: ignoring unreadable options %r", record.name, record.options_json)
        return ModelOptions()


def model_id_of(record: ModelRecord) -> str:
    """The manifest model_id of the model's variants: as given at add, else its name."""
    return model_options(record).model_id or record.name


def need_model(store: CatalogueStore, name: str) -> ModelRecord:
    """The model, or UnknownModel."""
    record = store.model(name)
    if record is None:
        raise UnknownModel(name)
    return record


def check_model_files(source: Path, data: Path, options: ModelOptions) -> None:
    """InvalidInput naming what the optimizer could not use (checker.py, in a process of its
    own: the coordinator never imports the optimizer)."""
    try:
        answer = ask_checker(["model", str(source), str(data), options.model_dump_json()])
    except RuntimeError as exc:
        raise InvalidInput(f"the upload could not be checked: {exc}") from None
    if answer.get("error"):
        raise InvalidInput(str(answer["error"]))


def add_model(
    store: CatalogueStore,
    files: CatalogueFiles,
    name: str,
    source: Path,
    data: Path,
    options: ModelOptions,
) -> ModelRecord:
    """Check, copy into the catalogue directory and record a source model with its data.

    ModelExists when the name (or the model id) is taken, InvalidInput when a file or an
    option cannot be used. The files are in place before the record: a crash in between
    leaves files the next add of that name replaces, never a record without files.
    """
    if not re.fullmatch(NAME_PATTERN, name):
        raise InvalidInput(
            f"invalid model name {name!r}: letters, digits, '_', '.', '-', starting with a "
            "letter or digit, at most 64 characters"
        )
    check_model_files(source, data, options)
    with _ADDING:
        record = _record(store, files, name, source, data, options)
    log.info(
        "catalogue: added model %s (model id %s, source %s, %d bytes of data in %s)",
        name,
        options.model_id or name,
        record.source_sha256[:12],
        record.data_bytes,
        record.data_path,
    )
    return record


def _record(
    store: CatalogueStore,
    files: CatalogueFiles,
    name: str,
    source: Path,
    data: Path,
    options: ModelOptions,
) -> ModelRecord:
    """Files in place, then the record (under _ADDING)."""
    if store.model(name) is not None:
        raise ModelExists(f"model {name!r} is already in the catalogue")
    model_id = options.model_id or name
    for other in store.models():
        if model_id_of(other) == model_id:
            raise ModelExists(
                f"model id {model_id!r} is already that of catalogue model {other.name!r}: "
                "two models would number one model id's versions"
            )
    if files.model_dir(name).exists():
        log.warning("model %s: removing files left by an add that never recorded it", name)
        files.remove_model(name)
    options_json = json.dumps(options.model_dump(mode="json", exclude_none=True), sort_keys=True)
    try:
        stored = files.put_model(name, source, data, options_json)
    except FileExistsError:
        raise ModelExists(f"model {name!r} is being added by another request") from None
    record = ModelRecord(
        name=name,
        source_sha256=stored.source_sha256,
        source_path=stored.source_path,
        source_bytes=stored.source_bytes,
        data_sha256=stored.data_sha256,
        data_path=stored.data_path,
        data_bytes=stored.data_bytes,
        options_json=options_json,
        added_at=time.time(),
    )
    try:
        store.add_model(record)
    except ValueError as exc:
        files.remove_model(name)
        raise ModelExists(str(exc)) from None
    return record
