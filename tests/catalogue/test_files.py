"""The catalogue directory and the `models add` upload: atomic, hashed, strictly checked."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from pathlib import Path

import pytest

from edgefleet.server.catalogue.errors import InvalidInput
from edgefleet.server.catalogue.files import CatalogueFiles
from edgefleet.server.catalogue.options import ModelOptions
from edgefleet.server.catalogue.upload import pack_model, unpack_model


def _tar(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _file(name: str, data: bytes = b"x") -> tuple[tarfile.TarInfo, bytes]:
    return tarfile.TarInfo(name), data


def _link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info, None


def test_a_model_lands_whole_with_the_sha256_of_what_is_stored(tmp_path: Path) -> None:
    source = tmp_path / "m.onnx"
    source.write_bytes(b"onnx bytes")
    data = tmp_path / "images"
    (data / "train" / "cat").mkdir(parents=True)
    (data / "train" / "cat" / "1.png").write_bytes(b"png one")
    (data / "train" / "dog").mkdir()
    (data / "train" / "dog" / "2.png").write_bytes(b"png two")
    files = CatalogueFiles(tmp_path / "catalogue")
    stored = files.put_model("cats", source, data, '{"mean": [0.5]}')
    assert stored.source_path == "models/cats/source.onnx"
    assert stored.source_sha256 == hashlib.sha256(b"onnx bytes").hexdigest()
    assert files.path(stored.data_path).is_dir() and stored.data_bytes == 14
    listing = "".join(
        f"{hashlib.sha256(b).hexdigest()}  {p}\n"
        for p, b in [("train/cat/1.png", b"png one"), ("train/dog/2.png", b"png two")]
    )
    assert stored.data_sha256 == hashlib.sha256(listing.encode()).hexdigest()
    assert (files.model_dir("cats") / "options.json").read_text() == '{"mean": [0.5]}'
    # Only the finished directory is visible: no temporary left beside it.
    assert sorted(p.name for p in files.models_dir.iterdir()) == ["cats"]
    with pytest.raises(FileExistsError):
        files.put_model("cats", source, data, "{}")


def test_a_link_in_the_data_is_refused_and_nothing_is_left(tmp_path: Path) -> None:
    source = tmp_path / "m.onnx"
    source.write_bytes(b"onnx")
    data = tmp_path / "images"
    (data / "a").mkdir(parents=True)
    os.symlink("/etc/passwd", data / "a" / "p.png")
    files = CatalogueFiles(tmp_path / "catalogue")
    with pytest.raises(ValueError, match="not a plain file"):
        files.put_model("m", source, data, "{}")
    assert list(files.models_dir.iterdir()) == []


def test_sweep_removes_what_a_killed_process_left(tmp_path: Path) -> None:
    files = CatalogueFiles(tmp_path)
    (files.models_dir / ".m.tmp-abc").mkdir(parents=True)
    (files.models_dir / "kept").mkdir()
    for job in ("job-dead", "job-live"):
        files.fresh_work_dir(job)
        (files.job_dir(job) / "build.log").write_text("log")
        (files.pid_file(job)).write_text("1")
    removed = files.sweep(active_jobs={"job-live"})
    assert sorted(Path(p).name for p in removed) == [".m.tmp-abc", "pid", "work"]
    assert sorted(p.name for p in files.models_dir.iterdir()) == ["kept"]
    assert sorted(p.name for p in files.job_dir("job-dead").iterdir()) == ["build.log"]
    assert files.work_dir("job-live").is_dir()


def test_pack_and_unpack_round_trip(tmp_path: Path) -> None:
    source = tmp_path / "m.onnx"
    source.write_bytes(b"model")
    npz = tmp_path / "anything.npz"
    npz.write_bytes(b"npz")
    archive = tmp_path / "up.tar"
    archive.write_bytes(pack_model(source, npz, ModelOptions(model_id="mid", mean=[0.1])))
    got = unpack_model(archive, tmp_path / "u", 1 << 20)
    assert got.source.read_bytes() == b"model" and got.data.name == "data.npz"
    assert got.options == ModelOptions(model_id="mid", mean=[0.1])


@pytest.mark.parametrize(
    ("members", "says"),
    [
        ([_file("data.npz")], "no source.onnx"),
        ([_file("source.onnx")], "exactly one of data.npz or a data/ folder"),
        ([_file("source.onnx"), _file("data.npz"), _file("data/a/1.png")], "exactly one of"),
        ([_file("source.onnx"), _file("data.npz"), _file("../evil")], "escape"),
        ([_file("source.onnx"), _file("data.npz"), _file("/etc/evil")], "escape"),
        ([_file("source.onnx"), _file("data.npz"), _file("notes.txt")], "is not one of"),
        ([_file("source.onnx"), _file("data/a/1.png"), _link("data/a/2.png", "/etc/passwd")],
         "not a plain file"),
        ([_file("source.onnx"), _file("data.npz"), _link("data/x", "data.npz", tarfile.LNKTYPE)],
         "not a plain file"),
        ([_file("source.onnx"), _file("source.onnx"), _file("data.npz")], "appears twice"),
        ([_file("source.onnx"), _file("data.npz", b"x" * 2000)], "more than 1000 bytes"),
        ([_file("source.onnx"), _file("data.npz"), _file("options.json", b'{"colour": "RGB"}')],
         "options.json: colour: Extra inputs are not permitted"),
        ([_file("source.onnx"), _file("data.npz"), _file("options.json", b'{"prune": 3}')],
         "options.json: prune: Input should be less than 1"),
    ],
)
def test_bad_uploads_are_refused_naming_the_problem(
    tmp_path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]], says: str
) -> None:
    archive = tmp_path / "up.tar"
    archive.write_bytes(_tar(members))
    with pytest.raises(InvalidInput, match=says.replace("(", r"\(")):
        unpack_model(archive, tmp_path / "u", 1000)
    assert not (tmp_path / "u").exists()


def test_not_a_tar_is_refused(tmp_path: Path) -> None:
    archive = tmp_path / "up.tar"
    archive.write_bytes(b"\x00" * 10 + b"definitely not a tar archive" * 40)
    with pytest.raises(InvalidInput, match="not a readable tar archive"):
        unpack_model(archive, tmp_path / "u", 1 << 20)
