"""The upload of `models add`: one tar archive (plain or gzip) holding

    source.onnx            the fp32 ONNX model
    data.npz  or  data/... its labelled data (the optimizer's two formats)
    options.json           optional: ModelOptions (preprocessing, model_id, build defaults)

and nothing else. It is checked member by member before a byte is written (names inside the
upload, plain files and folders only, no duplicates, a size and count limit), like a bundle
archive, but with room for a data folder of many images.
"""

from __future__ import annotations

import io
import os
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from pydantic import ValidationError

from edgefleet.server.catalogue.errors import InvalidInput
from edgefleet.server.catalogue.files import DATA_DIR, DATA_NPZ, OPTIONS_NAME, SOURCE_NAME
from edgefleet.server.catalogue.options import ModelOptions

MAX_MEMBERS = 500_000
MAX_OPTIONS_BYTES = 64 << 10


@dataclass(frozen=True)
class ModelUpload:
    """An unpacked, checked upload: where its files are and the options it carried."""

    source: Path
    data: Path
    options: ModelOptions


def _name(member: tarfile.TarInfo) -> str:
    pure = PurePosixPath(member.name)
    if pure.is_absolute() or ".." in pure.parts:
        raise InvalidInput(f"upload member {member.name!r} would escape the upload")
    name = pure.as_posix() if pure.parts else ""
    top = pure.parts[0] if pure.parts else ""
    if member.isdir():
        if name not in ("", DATA_DIR) and top != DATA_DIR:
            raise InvalidInput(f"upload folder {member.name!r}: only data/ may hold folders")
        return ""
    if not member.isfile():
        raise InvalidInput(f"upload member {member.name!r} is not a plain file")
    if name in (SOURCE_NAME, DATA_NPZ, OPTIONS_NAME) or (top == DATA_DIR and len(pure.parts) > 1):
        return name
    raise InvalidInput(
        f"upload member {member.name!r} is not one of {SOURCE_NAME}, {DATA_NPZ}, {DATA_DIR}/..., "
        f"{OPTIONS_NAME}"
    )


def unpack_model(archive: Path, dest: Path, max_bytes: int) -> ModelUpload:
    """Check and unpack an upload into the new directory dest; InvalidInput naming the
    problem (nothing is written for a refused upload)."""
    try:
        with tarfile.open(archive, mode="r:*") as tar:
            files = _check(tar, max_bytes)
            options = _options(tar, files.get(OPTIONS_NAME))
            _extract(tar, files, dest)
    except (tarfile.TarError, EOFError, OSError, UnicodeDecodeError) as exc:
        shutil.rmtree(dest, ignore_errors=True)
        raise InvalidInput(f"the upload is not a readable tar archive ({exc})") from None
    except InvalidInput:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    return ModelUpload(
        source=dest / SOURCE_NAME,
        data=dest / (DATA_NPZ if DATA_NPZ in files else DATA_DIR),
        options=options,
    )


def _check(tar: tarfile.TarFile, max_bytes: int) -> dict[str, tarfile.TarInfo]:
    files: dict[str, tarfile.TarInfo] = {}
    total = count = 0
    for member in tar:  # stops early on a bad member, before reading the rest
        count += 1
        if count > MAX_MEMBERS:
            raise InvalidInput(f"the upload has more than {MAX_MEMBERS} members")
        name = _name(member)
        if not name:
            continue
        if name in files:
            raise InvalidInput(f"upload member {member.name!r} appears twice")
        files[name] = member
        total += member.size
        if total > max_bytes:
            raise InvalidInput(f"the upload unpacks to more than {max_bytes} bytes")
    if SOURCE_NAME not in files:
        raise InvalidInput(f"the upload has no {SOURCE_NAME} (the source model)")
    folder = any(n.startswith(f"{DATA_DIR}/") for n in files)
    if (DATA_NPZ in files) == folder:
        raise InvalidInput(
            f"the upload needs its data as exactly one of {DATA_NPZ} or a {DATA_DIR}/ folder"
        )
    if OPTIONS_NAME in files and files[OPTIONS_NAME].size > MAX_OPTIONS_BYTES:
        raise InvalidInput(f"{OPTIONS_NAME} is larger than {MAX_OPTIONS_BYTES} bytes")
    return files


def _extract(tar: tarfile.TarFile, files: dict[str, tarfile.TarInfo], dest: Path) -> None:
    dest.mkdir(parents=True)
    for name, member in files.items():
        src = tar.extractfile(member)
        if src is None:  # pragma: no cover - isfile() members always have data
            raise InvalidInput(f"upload member {member.name!r} has no data")
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        with src, target.open("xb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
            out.flush()
            os.fsync(out.fileno())


def _options(tar: tarfile.TarFile, member: tarfile.TarInfo | None) -> ModelOptions:
    if member is None:
        return ModelOptions()
    src = tar.extractfile(member)
    raw = src.read(MAX_OPTIONS_BYTES + 1) if src is not None else b""
    try:
        return ModelOptions.model_validate_json(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "options"
        raise InvalidInput(f"{OPTIONS_NAME}: {where}: {first['msg']}") from None


def pack_model(source: Path, data: Path, options: ModelOptions) -> bytes:
    """The upload for `models add` (a plain tar: the data is compressed already, if at all)."""
    buf = io.BytesIO()
    # dereference: a link the operator points at is the file they mean.
    with tarfile.open(
        fileobj=buf, mode="w", format=tarfile.PAX_FORMAT, dereference=True
    ) as tar:
        tar.add(source, SOURCE_NAME, recursive=False)
        if data.is_dir():
            _add_tree(tar, data)
        else:
            tar.add(data, DATA_NPZ, recursive=False)
        raw = options.model_dump_json(exclude_none=True).encode()
        info = tarfile.TarInfo(OPTIONS_NAME)
        info.size = len(raw)
        tar.addfile(info, io.BytesIO(raw))
    return buf.getvalue()


def _add_tree(tar: tarfile.TarFile, root: Path) -> None:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        here = Path(dirpath)
        for f in sorted(filenames):
            path = here / f
            if not path.is_file():
                raise ValueError(f"{path}: not a file; the data folder must hold image files")
            rel = path.relative_to(root).as_posix()
            tar.add(path, f"{DATA_DIR}/{rel}", recursive=False)
