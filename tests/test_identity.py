"""Provisioning on disk: mosquitto's hash format, file modes, ACL, CLI and the shipped files."""

from __future__ import annotations

import base64
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from edgefleet.server.cli import app as cli_app
from edgefleet.server.identity import BrokerConf, IdentityDir, IdentityError, render_conf
from edgefleet.server.identity.acl import render_acl
from edgefleet.server.identity.passwd import hash_password, read_password_file, verify_password
from edgefleet.server.identity.registry import Registry

DEPLOY = Path(__file__).resolve().parents[1] / "deploy" / "mosquitto"


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_hashes_are_mosquitto_passwd_s_format_both_ways(tmp_path: Path) -> None:
    tool = shutil.which("mosquitto_passwd")
    if tool is None:
        pytest.fail("mosquitto_passwd is missing: install mosquitto (deploy/test.sh)")
    pw = tmp_path / "pw"
    subprocess.run([tool, "-b", "-c", str(pw), "alice", "s3cret"], check=True)
    theirs = read_password_file(pw)["alice"]
    assert verify_password("s3cret", theirs) and not verify_password("s3creT", theirs)
    ours = hash_password("s3cret", salt=bytes(range(12)))
    prefix, iterations, salt, _digest = ours.split("$")[1:]
    assert (prefix, iterations, salt) == ("7", "101", "AAECAwQFBgcICQoL")
    assert verify_password("s3cret", ours) and not verify_password("x", ours)
    # Same salt and rounds as mosquitto_passwd chose: the same digest.
    _, _, it, their_salt, _ = theirs.split("$")
    assert hash_password("s3cret", salt=base64.b64decode(their_salt), iterations=int(it)) == theirs


def test_provisioning_keeps_secrets_private_and_passwords_stable(tmp_path: Path) -> None:
    ids = IdentityDir(tmp_path / "id")
    first = ids.provision("cam-01", group="lab")
    assert first.password and len(first.password) >= 40
    for secret in (ids.passwd, ids.ca_key, ids.key, ids.registry_path, ids.acl):
        assert _mode(secret) == 0o600, secret
    assert _mode(ids.directory) == 0o700
    hashed = read_password_file(ids.passwd)["cam-01"]
    assert first.password not in ids.passwd.read_text()
    assert verify_password(first.password, hashed)
    moved = ids.provision("cam-01", group="yard")  # a group change keeps the password
    assert moved.password is None and read_password_file(ids.passwd)["cam-01"] == hashed
    assert "group/yard/cmd" in ids.acl.read_text() and "group/lab/cmd" not in ids.acl.read_text()
    rotated = ids.provision("cam-01", group="yard", rotate=True)
    assert rotated.password and not verify_password(
        first.password, read_password_file(ids.passwd)["cam-01"]
    )
    with pytest.raises(IdentityError, match="already provisioned as a device"):
        ids.provision("cam-01", role="coordinator")
    with pytest.raises(ValueError):
        ids.provision("cam/01")  # would be a topic level of its own
    ids.revoke("cam-01")
    assert "cam-01" not in read_password_file(ids.passwd) and "cam-01" not in ids.acl.read_text()
    with pytest.raises(IdentityError, match="no identity 'cam-01'"):
        ids.revoke("cam-01")


def test_acl_grants_devices_their_own_topics_and_coordinators_the_tree() -> None:
    reg = Registry.model_validate(
        {"identities": {"cam-01": {"role": "device", "group": "lab"},
                        "coord-a": {"role": "coordinator"}, "cam-02": {"role": "device"}}}
    )  # fmt: skip
    text = render_acl(reg, root="site/v1")
    assert "pattern write site/v1/dev/%u/telemetry" in text
    assert "pattern read site/v1/dev/%u/cmd" in text
    assert "user cam-01\ntopic read site/v1/group/lab/cmd" in text
    assert "user coord-a\ntopic readwrite site/v1/#" in text
    assert "cam-02" not in text  # no group: the patterns say everything
    assert "pattern write site/v1/dev/%u/cmd" not in text and "%c" not in text


def test_the_shipped_files_are_what_provisioning_and_the_test_broker_use() -> None:
    assert (DEPLOY / "edgefleet.conf").read_text() == render_conf(BrokerConf())
    assert (DEPLOY / "acl").read_text() == render_acl(Registry())
    conf = render_conf(BrokerConf())
    for line in ("allow_anonymous false", "use_username_as_clientid true", "listener 8883"):
        assert line in conf


def test_cli_prints_the_password_once_and_revoke_says_how_to_reload(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = ["--dir", str(tmp_path / "id"), "--pid-file", str(tmp_path / "none.pid")]
    assert cli_app.main(["fleet", "provision", "cam-01", "--group", "lab", *d]) == 0
    out, err = capsys.readouterr()
    password = out.split("password: ", 1)[1].split()[0]
    assert verify_password(password, read_password_file(tmp_path / "id" / "passwd")["cam-01"])
    assert "not reloaded" in err and "systemctl reload mosquitto" in err
    assert cli_app.main(["fleet", "provision", "cam-01", *d]) == 0
    assert password not in capsys.readouterr().out  # shown once only
    creds = tmp_path / "creds" / "mqtt-password"
    assert cli_app.main(["fleet", "provision", "--coordinator", "--out", str(creds), *d]) == 0
    assert _mode(creds) == 0o600 and creds.read_text().strip() not in capsys.readouterr().out
    assert cli_app.main(["fleet", "provision", "--coordinator", "--group", "lab", *d]) == 1
    assert cli_app.main(["fleet", "provision", *d]) == 1
    capsys.readouterr()
    # The credential goes even when the broker cannot be told, and the operator hears it.
    assert cli_app.main(["fleet", "revoke", "cam-01", *d]) == 1
    err = capsys.readouterr().err
    assert "cam-01 is still accepted by the running broker" in err and "systemctl reload" in err
    assert "cam-01" not in read_password_file(tmp_path / "id" / "passwd")
    assert cli_app.main(["fleet", "revoke", "cam-01", *d]) == 1
    assert "no identity 'cam-01'" in capsys.readouterr().err
