"""Agent configuration: every mistake is named with its file and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgefleet.agent.config import ConfigError, load_config

MINIMAL = 'device_id = "pi-7"\n'


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path


def test_minimal_config_has_documented_defaults(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, MINIMAL), env={})
    assert cfg.device_id == "pi-7"
    assert cfg.telemetry.interval_s == 10
    assert cfg.mqtt.port == 1883 and cfg.mqtt.topic_root == "edgefleet/v1"
    assert cfg.model.trusted_keys == [Path("/etc/edgefleet/fleet.pub")]


def test_misspelt_key_names_file_and_key(tmp_path: Path) -> None:
    path = _write(tmp_path, MINIMAL + "[telemetry]\ninterval = 5\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, env={})
    assert f"{path}: telemetry.interval: Extra inputs are not permitted" in str(err.value)


def test_out_of_range_value(tmp_path: Path) -> None:
    path = _write(tmp_path, MINIMAL + "[mqtt]\nport = 70000\n")
    with pytest.raises(
        ConfigError, match=r"mqtt\.port: Input should be less than or equal to 65535"
    ):
        load_config(path, env={})


def test_bad_device_id(tmp_path: Path) -> None:
    path = _write(tmp_path, 'device_id = "pi/7#"\n')
    with pytest.raises(ConfigError, match=r"device_id: String should match pattern"):
        load_config(path, env={})


def test_not_toml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"agent\.toml: not valid TOML"):
        load_config(_write(tmp_path, "device_id = \n"), env={})
    with pytest.raises(ConfigError, match=r"nope\.toml: config file not found"):
        load_config(tmp_path / "nope.toml", env={})


def test_environment_overrides(tmp_path: Path) -> None:
    env = {
        "EDGEFLEET_MQTT__HOST": "broker.lan",
        "EDGEFLEET_MQTT__PORT": "8883",
        "EDGEFLEET_CAMERA__SOURCE": "/dev/video2",
        "EDGEFLEET_DEVICE_ID": "pi-9",
        "EDGEFLEET_HOME": "/ignored",
    }
    cfg = load_config(_write(tmp_path, MINIMAL), env=env)
    assert (cfg.mqtt.host, cfg.mqtt.port) == ("broker.lan", 8883)
    assert cfg.camera.source == "/dev/video2"
    assert cfg.device_id == "pi-9"


def test_password_from_systemd_credentials(tmp_path: Path) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "mqtt-password").write_text("s3cret\n")
    cfg = load_config(_write(tmp_path, MINIMAL), env={"CREDENTIALS_DIRECTORY": str(creds)})
    assert cfg.mqtt.password == "s3cret"


def test_tls_cert_and_key_go_together(tmp_path: Path) -> None:
    path = _write(tmp_path, MINIMAL + '[mqtt.tls]\nca = "/etc/ca.pem"\ncert = "/etc/c.pem"\n')
    with pytest.raises(
        ConfigError, match=r"mqtt\.tls: Value error, tls\.cert and tls\.key go together"
    ):
        load_config(path, env={})


def test_empty_password_credential_means_no_password(tmp_path: Path) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "mqtt-password").write_text("\n")  # what the installer creates by default
    cfg = load_config(_write(tmp_path, MINIMAL), env={"CREDENTIALS_DIRECTORY": str(creds)})
    assert cfg.mqtt.password is None


def test_environment_values_keep_their_field_types(tmp_path: Path) -> None:
    env = {
        "EDGEFLEET_DEVICE_ID": "1234",  # all digits, still a string id
        "EDGEFLEET_MQTT__PASSWORD": "123456",
        "EDGEFLEET_STATE_DIR": str(tmp_path / "state"),
        "EDGEFLEET_GROUP": "kitchen",
        "EDGEFLEET_MODEL__PROVIDERS": '["CUDAExecutionProvider", "CPUExecutionProvider"]',
        "EDGEFLEET_CAMERA__LOOP": "true",
        "EDGEFLEET_CAMERA__SOURCE": "0",
        "EDGEFLEET_API_TOKEN": "not-an-agent-key",  # another program's variable: ignored
    }
    cfg = load_config(_write(tmp_path, MINIMAL), env=env)
    assert cfg.device_id == "1234" and cfg.mqtt.password == "123456"
    assert cfg.state_dir == tmp_path / "state" and cfg.group == "kitchen"
    assert cfg.model.providers == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert cfg.camera.loop is True and cfg.camera.kind == "device"


def test_a_bad_environment_value_is_blamed_on_its_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, MINIMAL), env={"EDGEFLEET_MQTT__PORT": "eighty"})
    assert str(err.value).startswith("environment EDGEFLEET_MQTT__PORT: mqtt.port: ")


def test_unreadable_password_credential_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "mqtt-password").write_bytes(b"\xff\xfe not utf-8")
    with pytest.raises(ConfigError, match=r"mqtt-password: cannot read the MQTT password"):
        load_config(_write(tmp_path, MINIMAL), env={"CREDENTIALS_DIRECTORY": str(bad)})


def test_unknown_power_profile_is_named(tmp_path: Path) -> None:
    path = _write(tmp_path, MINIMAL + '[power]\nprofile = "raspberry-pi-9"\n')
    with pytest.raises(ConfigError, match=r"power: Value error, profile 'raspberry-pi-9' unknown"):
        load_config(path, env={})
