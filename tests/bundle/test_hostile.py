"""Bundles an attacker crafts: links in a directory, odd archives, duplicate manifest keys.

One rule for links (agent/bundle/tree.py): the verifier, `pack` and the installer's copy refuse
any link inside a bundle with the same message and never follow one.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgefleet.agent.bundle import (
    BadSignature,
    BundleError,
    ExtraFile,
    MalformedManifest,
    UnsafeArchive,
    pack,
    save_public_key,
    unpack,
    verify_bundle,
)
from edgefleet.agent.bundle import tree as tree_module
from edgefleet.agent.bundle.keys import sign
from edgefleet.agent.bundle.tree import MAX_DEPTH, MAX_ENTRIES, copy_tree, plain_tree


def _link_message(rel: str) -> str:
    return f"{rel} is a symbolic link; bundles hold plain files only"


# --- links in a bundle directory ------------------------------------------------------


def _stage_links_outside(bundle: Path, outside: Path) -> str:
    # The right bytes behind the link: a copy that follows it would install a valid bundle.
    (bundle / "stage1.onnx").rename(outside / "stage1.onnx")
    (bundle / "stage1.onnx").symlink_to(outside / "stage1.onnx")
    return "stage1.onnx"


def _alias_inside(bundle: Path, outside: Path) -> str:
    (bundle / "alias.onnx").symlink_to("stage0.onnx")
    return "alias.onnx"


def _directory_links_outside(bundle: Path, outside: Path) -> str:
    (bundle / "heads").rename(outside / "heads")
    (bundle / "heads").symlink_to(outside / "heads", target_is_directory=True)
    return "heads"


def _loop(bundle: Path, outside: Path) -> str:
    (bundle / "self").symlink_to(".", target_is_directory=True)
    return "self"


def _dangling(bundle: Path, outside: Path) -> str:
    (bundle / "gone").symlink_to(outside / "does-not-exist")
    return "gone"


def _nested_link_to_system(bundle: Path, outside: Path) -> str:
    (bundle / "heads" / "etc").symlink_to("/etc", target_is_directory=True)
    return "heads/etc"


LINKS = [
    _stage_links_outside,
    _alias_inside,
    _directory_links_outside,
    _loop,
    _dangling,
    _nested_link_to_system,
]


@pytest.mark.parametrize("make_link", LINKS, ids=lambda f: f.__name__.strip("_"))
def test_copy_refuses_every_link_like_the_verifier(
    bundle: Path, key: Ed25519PrivateKey, tmp_path: Path, make_link: Any
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    rel = make_link(bundle, outside)
    dest = tmp_path / "staged"
    with pytest.raises(ExtraFile) as copied:
        copy_tree(bundle, dest)
    assert copied.value.detail == _link_message(rel)
    assert not dest.exists()  # refused before anything was written
    with pytest.raises(ExtraFile) as verified:
        verify_bundle(bundle, [key.public_key()])
    assert verified.value.detail == copied.value.detail


def test_copy_of_a_plain_bundle_verifies(
    bundle: Path, key: Ed25519PrivateKey, tmp_path: Path
) -> None:
    (bundle / "empty").mkdir()
    copied = copy_tree(bundle, tmp_path / "copy")
    assert copied.files == (
        "heads/exit0.npz",
        "manifest.json",
        "manifest.sig",
        "stage0.onnx",
        "stage1.onnx",
    )
    assert copied.dirs == ("empty", "heads")
    (tmp_path / "copy" / "empty").rmdir()
    assert verify_bundle(tmp_path / "copy", [key.public_key()]).manifest.version == 3
    with pytest.raises(BundleError, match="already exists"):
        copy_tree(bundle, tmp_path / "copy")


def test_the_bundle_path_itself_may_be_a_link(
    bundle: Path, key: Ed25519PrivateKey, tmp_path: Path
) -> None:
    # The agent loads bundles/current, a link to the installed version.
    current = tmp_path / "current"
    current.symlink_to(bundle, target_is_directory=True)
    assert verify_bundle(current, [key.public_key()]).manifest.version == 3
    copy_tree(current, tmp_path / "copy")
    assert not (tmp_path / "copy").is_symlink()


def test_special_file_is_refused_without_blocking(
    bundle: Path, key: Ed25519PrivateKey, tmp_path: Path
) -> None:
    os.mkfifo(bundle / "heads" / "pipe")
    with pytest.raises(ExtraFile, match=r"heads/pipe is not a regular file"):
        copy_tree(bundle, tmp_path / "staged")
    assert not (tmp_path / "staged").exists()
    with pytest.raises(ExtraFile, match=r"heads/pipe is not a regular file"):
        verify_bundle(bundle, [key.public_key()])


def test_link_swapped_in_after_the_check_is_refused_not_followed(
    bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = tmp_path / "secret"
    secret.write_text("root's eyes only")
    checked = tree_module.plain_tree

    def check_then_swap(root: Path) -> tree_module.Tree:
        result = checked(root)
        (bundle / "stage1.onnx").unlink()
        (bundle / "stage1.onnx").symlink_to(secret)
        return result

    monkeypatch.setattr(tree_module, "plain_tree", check_then_swap)
    with pytest.raises(ExtraFile) as err:
        copy_tree(bundle, tmp_path / "staged")
    assert err.value.detail == _link_message("stage1.onnx")
    assert not (tmp_path / "staged").exists()


def test_too_many_entries_and_too_deep_are_refused(tmp_path: Path) -> None:
    wide = tmp_path / "wide"
    wide.mkdir()
    for i in range(MAX_ENTRIES + 1):
        (wide / f"f{i:04d}").write_bytes(b"")
    with pytest.raises(BundleError, match=f"holds more than {MAX_ENTRIES} files and directories"):
        plain_tree(wide)
    deep = tmp_path / "deep"
    (deep / "/".join(["d"] * MAX_DEPTH)).mkdir(parents=True)
    assert len(plain_tree(deep).dirs) == MAX_DEPTH
    (deep / "/".join(["d"] * (MAX_DEPTH + 1))).mkdir()
    with pytest.raises(BundleError, match=f"nested more than {MAX_DEPTH} levels deep"):
        copy_tree(deep, tmp_path / "staged")
    assert not (tmp_path / "staged").exists()


def test_pack_refuses_a_link_instead_of_packing_its_target(bundle: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    _stage_links_outside(bundle, outside)
    archive = tmp_path / "b.tar.gz"
    with pytest.raises(ExtraFile, match=re.escape(_link_message("stage1.onnx"))):
        pack(bundle, archive)
    assert not archive.exists()


# --- archives -------------------------------------------------------------------------


def test_tar_dash_c_dot_archive_is_accepted(
    bundle: Path, key: Ed25519PrivateKey, tmp_path: Path
) -> None:
    archive = tmp_path / "dot.tar.gz"
    subprocess.run(["tar", "-czf", str(archive), "-C", str(bundle), "."], check=True)
    with tarfile.open(archive) as tar:
        names = tar.getnames()
    assert "./manifest.json" in names and any(n in (".", "./") for n in names)
    out = unpack(archive, tmp_path / "out")
    assert verify_bundle(out, [key.public_key()]).manifest.version == 3


def test_tarfile_dot_entry_and_dot_slash_names_are_accepted(
    bundle: Path, key: Ed25519PrivateKey, tmp_path: Path
) -> None:
    archive = tmp_path / "dot.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(bundle, arcname=".")
    with tarfile.open(archive) as tar:
        assert tar.getnames()[0] == "."
    out = unpack(archive, tmp_path / "out")
    assert verify_bundle(out, [key.public_key()]).manifest.version == 3


def _archive(tmp_path: Path, *members: tuple[tarfile.TarInfo, bytes]) -> Path:
    path = tmp_path / "evil.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for info, data in members:
            info.size = len(data) if info.isfile() else 0
            tar.addfile(info, io.BytesIO(data) if info.isfile() else None)
    return path


def _member(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info


@pytest.mark.parametrize(
    ("member", "message"),
    [
        (_member("../x"), r"member '\.\./x' would escape the bundle directory"),
        (_member("./../x"), r"member '\./\.\./x' would escape the bundle directory"),
        (_member("a/../../x"), r"member 'a/\.\./\.\./x' would escape"),
        (_member("/etc/cron.d/x"), r"member '/etc/cron\.d/x' would escape"),
        (_member("./s", tarfile.SYMTYPE, "/etc/passwd"), r"member '\./s' is a symbolic link"),
        (_member("./h", tarfile.LNKTYPE, "/etc/passwd"), r"member '\./h' is a hard link"),
        (_member("./c", tarfile.CHRTYPE), r"member '\./c' is a character device"),
        (_member("./b", tarfile.BLKTYPE), r"member '\./b' is a block device"),
        (_member("./p", tarfile.FIFOTYPE), r"member '\./p' is a FIFO"),
        (_member("."), r"member '\.' has no file name"),
    ],
    ids=lambda v: v.name if isinstance(v, tarfile.TarInfo) else "",
)
def test_real_escapes_are_refused_naming_the_member(
    tmp_path: Path, member: tarfile.TarInfo, message: str
) -> None:
    archive = _archive(tmp_path, (_member(".", tarfile.DIRTYPE), b""), (member, b"data"))
    with pytest.raises(UnsafeArchive, match=message):
        unpack(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_one_file_twice_is_refused(tmp_path: Path) -> None:
    archive = _archive(
        tmp_path, (_member("manifest.json"), b"a"), (_member("./manifest.json"), b"b")
    )
    with pytest.raises(UnsafeArchive, match=r"member '\./manifest\.json' appears twice"):
        unpack(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_name_both_file_and_directory_is_refused(tmp_path: Path) -> None:
    archive = _archive(tmp_path, (_member("heads"), b"a"), (_member("heads/exit0.npz"), b"b"))
    with pytest.raises(UnsafeArchive, match=r"member 'heads' is both a file and a directory"):
        unpack(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --- duplicate keys in manifest.json --------------------------------------------------


def _dumps_duplicating(value: Any, at: tuple[str, ...], key: str, extra: Any) -> str:
    """JSON text of value with `key` written a second time (as `extra`) in the object at `at`."""
    if isinstance(value, dict):
        parts = []
        for k, v in value.items():
            text = _dumps_duplicating(v, at[1:], key, extra) if at and at[0] == k else json.dumps(v)
            parts.append(f"{json.dumps(k)}: {text}")
            if not at and k == key:
                parts.append(f"{json.dumps(k)}: {json.dumps(extra)}")
        return "{" + ", ".join(parts) + "}"
    assert isinstance(value, list) and at
    items = [
        _dumps_duplicating(v, at[1:], key, extra) if str(i) == at[0] else json.dumps(v)
        for i, v in enumerate(value)
    ]
    return "[" + ", ".join(items) + "]"


def _resign_with_duplicate(
    bundle: Path, key: Ed25519PrivateKey, at: tuple[str, ...], name: str, extra: Any = None
) -> None:
    raw = json.loads((bundle / "manifest.json").read_bytes())
    target = raw
    for part in at:
        target = target[int(part)] if isinstance(target, list) else target[part]
    data = _dumps_duplicating(raw, at, name, target[name] if extra is None else extra).encode()
    (bundle / "manifest.json").write_bytes(data)
    (bundle / "manifest.sig").write_bytes(sign(key, data))


@pytest.mark.parametrize(
    ("at", "name", "extra", "where"),
    [
        ((), "version", 9, "the top-level object"),
        ((), "model_id", None, "the top-level object"),  # the same value twice: still refused
        (("preprocessing",), "height", 8, "object preprocessing"),
        (("stages", "1", "exit"), "rule", "margin", "object stages.1.exit"),
        (("files",), "stage0.onnx", None, "object files"),
    ],
)
def test_duplicate_key_is_refused_naming_it(
    bundle: Path, key: Ed25519PrivateKey, at: tuple[str, ...], name: str, extra: Any, where: str
) -> None:
    _resign_with_duplicate(bundle, key, at, name, extra)
    with pytest.raises(MalformedManifest) as err:
        verify_bundle(bundle, [key.public_key()])
    assert err.value.detail == f"manifest.json: key {name!r} appears twice in {where}"


def test_deeply_nested_manifest_is_an_error_not_a_crash(
    bundle: Path, key: Ed25519PrivateKey
) -> None:
    data = b"[" * 200_000 + b"]" * 200_000
    (bundle / "manifest.json").write_bytes(data)
    with pytest.raises(BadSignature):  # unsigned: the signer's claim is read, safely
        verify_bundle(bundle, [key.public_key()])
    (bundle / "manifest.sig").write_bytes(sign(key, data))
    with pytest.raises(MalformedManifest, match="is not valid JSON"):
        verify_bundle(bundle, [key.public_key()])


def _cli(*args: str | Path, home: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "EDGEFLEET_HOME": str(home)}
    return subprocess.run(
        [sys.executable, "-m", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )


def test_both_verify_commands_refuse_duplicates_and_links(
    bundle: Path, key: Ed25519PrivateKey, tmp_path: Path
) -> None:
    pub = tmp_path / "fleet.pub"
    save_public_key(key.public_key(), pub)
    _resign_with_duplicate(bundle, key, (), "version", 9)
    (bundle / "alias.onnx").symlink_to("stage0.onnx")
    commands = [
        ("edgefleet.server.cli", "bundle", "verify", bundle, "--key", pub),
        ("edgefleet.agent", "verify", bundle, "--key", pub),
    ]
    for command in commands:
        res = _cli(*command, home=tmp_path)
        assert res.returncode == 1, res
        assert _link_message("alias.onnx") in res.stderr, res.stderr  # links: before reading
        assert "Traceback" not in res.stderr
    (bundle / "alias.onnx").unlink()
    for command in commands:
        res = _cli(*command, home=tmp_path)
        assert res.returncode == 1, res
        assert "key 'version' appears twice in the top-level object" in res.stderr, res.stderr
        assert "Traceback" not in res.stderr
