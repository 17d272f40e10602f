"""The systemd unit and the device installer, run for real into a temporary root."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgefleet.agent.config import CREDENTIAL_FILES, DEFAULT_PATH, AgentConfig, load_config

REPO = Path(__file__).resolve().parents[1]
UNIT = REPO / "systemd" / "edgefleet-agent.service"
INSTALL = REPO / "deploy" / "install-agent.sh"
VENV_PATH = "opt/edgefleet/venv"
Unit = dict[str, dict[str, list[str]]]


def parse_unit(text: str) -> Unit:
    """Sections -> key -> every value, in order (systemd keys may repeat, unlike INI's)."""
    sections: Unit = {}
    current: dict[str, list[str]] | None = None
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        assert not line.endswith("\\"), f"line {number}: keep unit lines unwrapped"
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, sep, value = line.partition("=")
        assert sep and current is not None, f"line {number}: not KEY=VALUE in a section: {raw!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def one(section: dict[str, list[str]], key: str) -> str:
    values = section.get(key)
    assert values, f"{key}= missing"
    assert len(values) == 1, f"{key}= given {len(values)} times"
    return values[0]


def check_unit(text: str) -> None:
    """The settings the agent, the installer and the hardening rely on."""
    unit = parse_unit(text)
    assert set(unit) == {"Unit", "Service", "Install"}
    u, s = unit["Unit"], unit["Service"]
    assert int(one(u, "StartLimitBurst")) >= 3
    assert int(one(u, "StartLimitIntervalSec")) >= 60

    assert one(s, "Type") == "notify"
    assert one(s, "NotifyAccess") == "main"
    # The same paths the installer and the agent's config defaults use.
    assert one(s, "ExecStart") == (f"/{VENV_PATH}/bin/edgefleet-agent run --config {DEFAULT_PATH}")
    assert one(s, "User") == one(s, "Group") == "edgefleet"
    assert "video" in one(s, "SupplementaryGroups").split()
    assert one(s, "WatchdogSec") == "30"
    assert one(s, "TimeoutStartSec") == "120"
    assert one(s, "TimeoutStopSec") == "10"
    assert one(s, "Restart") == "on-failure"
    assert one(s, "RestartSec") == "5"
    from edgefleet.agent.service import EXIT_CONFIG  # imports the runtime: only where it is needed

    assert one(s, "RestartPreventExitStatus") == str(EXIT_CONFIG)
    state_default = AgentConfig.model_fields["state_dir"].default
    assert Path("/var/lib") / one(s, "StateDirectory") == state_default
    assert Path("/etc") / one(s, "ConfigurationDirectory") == DEFAULT_PATH.parent
    credential = CREDENTIAL_FILES["mqtt_password"]
    assert one(s, "LoadCredential") == f"{credential}:/etc/edgefleet/credentials/{credential}"

    for key in (
        "NoNewPrivileges",
        "ProtectHome",
        "PrivateTmp",
        "ProtectKernelTunables",
        "ProtectKernelModules",
        "ProtectControlGroups",
        "RestrictSUIDSGID",
    ):
        assert one(s, key) == "yes", key
    assert one(s, "ProtectSystem") == "strict"
    assert one(s, "DevicePolicy") == "closed"
    assert "char-video4linux rw" in s["DeviceAllow"]
    # The camera and the GPU must stay reachable; psutil needs all of /proc.
    assert "PrivateDevices" not in s
    assert "ProcSubset" not in s
    assert one(unit["Install"], "WantedBy") == "multi-user.target"


def test_unit_has_the_required_settings() -> None:
    check_unit(UNIT.read_text())


@dataclass
class Installed:
    root: Path
    key: Path
    source: Path
    first: subprocess.CompletedProcess[str]
    private: Path


def make_keys(where: Path) -> tuple[Path, Path]:
    key = Ed25519PrivateKey.generate()
    pub, priv = where / "fleet.pub", where / "fleet.key"
    pub.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    priv.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return pub, priv


def run_install(*args: str | Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_")}
    return subprocess.run(
        ["bash", str(INSTALL), *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=280,
        check=False,
    )


def install_args(
    root: Path, key: Path, source: Path, broker: str = "localhost:1884"
) -> list[str | Path]:
    return [
        "--root",
        root,
        "--device-id",
        "pi-7",
        "--broker",
        broker,
        "--fleet-key",
        key,
        "--camera",
        "/dev/video0",
        "--group",
        "lab",
        "--no-enable",
        "--wheel",
        source,
        # Reuse this test's packages (onnxruntime, OpenCV, ...) instead of downloading them.
        "--python",
        sys.executable,
        "--reuse-site-packages",
        sys.executable,
    ]


def snapshot(base: Path) -> Path:
    """A copy of the checkout, so every run installs the same package while it is edited."""
    source = base / "src"
    shutil.copytree(
        REPO,
        source,
        ignore=shutil.ignore_patterns(
            ".*", "out", "build", "dist", "*.egg-info", "__pycache__", "tests"
        ),
    )
    return source


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    base = tmp_path_factory.mktemp("deploy")
    key, private = make_keys(base)
    source = snapshot(base)
    root = base / "root"
    result = run_install(*install_args(root, key, source))
    assert result.returncode == 0, result.stderr
    return Installed(root, key, source, result, private)


def test_install_tree(installed: Installed) -> None:
    root, log = installed.root, installed.first.stderr
    venv = root / VENV_PATH
    agent = venv / "bin" / "edgefleet-agent"
    assert os.access(agent, os.X_OK)
    version = subprocess.run([agent, "--version"], capture_output=True, text=True, check=True)
    assert version.stdout.startswith("edgefleet-agent ")
    where = subprocess.run(
        [venv / "bin" / "python", "-I", "-c", "import edgefleet.agent as a; print(a.__file__)"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert where.stdout.startswith(str(venv)), "the virtualenv runs its own copy of the agent"
    site = Path(
        subprocess.run(
            [
                venv / "bin" / "python",
                "-I",
                "-c",
                "import sysconfig; print(sysconfig.get_paths()['purelib'])",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    assert not list(site.glob("onnxruntime*")), "pip downloaded what it could reuse"

    etc = root / "etc" / "edgefleet"
    config = load_config(etc / "agent.toml", env={})
    assert config.device_id == "pi-7"
    assert config.group == "lab"
    assert config.mqtt.host == "localhost"
    assert config.mqtt.port == 1884
    assert config.mqtt.password is None
    assert config.mqtt.username is None and config.mqtt.tls is None  # anonymous, as asked
    assert config.camera.source == "/dev/video0"
    assert config.model.trusted_keys == [Path("/etc/edgefleet/fleet.pub")]  # the device's path
    assert (etc / "fleet.pub").read_bytes() == installed.key.read_bytes()

    creds = etc / "credentials"
    assert stat.S_IMODE(creds.stat().st_mode) == 0o700
    password = creds / "mqtt-password"
    assert password.read_bytes() == b""
    assert stat.S_IMODE(password.stat().st_mode) == 0o600

    unit = root / "etc" / "systemd" / "system" / "edgefleet-agent.service"
    assert unit.read_text() == UNIT.read_text()
    # --root: nothing outside the tree was touched, and the log says what was left out.
    assert "skipped: useradd" in log
    assert "skipped: systemctl" in log
    # Without a credential it still installs, and says what the shipped broker will do.
    assert "refuses anonymous devices" in log and "--mqtt-password-file" in log


def test_installed_unit_verifies(installed: Installed, tmp_path: Path) -> None:
    """The installed unit: the key checks everywhere, and systemd-analyze where it exists."""
    unit_text = (installed.root / "etc/systemd/system/edgefleet-agent.service").read_text()
    check_unit(unit_text)
    # verify insists that ExecStart's binary exists: point it at the one just installed.
    exe = installed.root / VENV_PATH / "bin" / "edgefleet-agent"
    local = tmp_path / "edgefleet-agent.service"
    exec_start = f"ExecStart=/{VENV_PATH}/bin/edgefleet-agent"
    local.write_text(unit_text.replace(exec_start, f"ExecStart={exe}"))
    assert str(exe) in local.read_text()
    analyze_unit(local, max_exposure=3.0)


def analyze_unit(local: Path, max_exposure: float) -> None:
    """systemd-analyze verify prints nothing, and the exposure is at most max_exposure.

    Skipped where systemd-analyze is missing; the exposure check needs systemd >= 250.
    """
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        return
    verify = subprocess.run(
        [analyze, "verify", local], capture_output=True, text=True, timeout=60, check=False
    )
    # verify exits 0 on unknown keys and bad values too: any output is a finding.
    assert verify.returncode == 0 and not (verify.stdout + verify.stderr).strip(), (
        verify.stdout + verify.stderr
    )
    security = subprocess.run(
        [analyze, "security", "--offline=yes", local],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    level = re.search(r"Overall exposure level for \S+: ([0-9.]+)", security.stdout)
    if level is not None:
        assert float(level.group(1)) <= max_exposure, security.stdout


def test_second_run_changes_nothing_and_keeps_the_owners_config(installed: Installed) -> None:
    root = installed.root
    etc = root / "etc" / "edgefleet"
    config = etc / "agent.toml"
    owned = config.read_text() + "\n# tuned by the owner\n[telemetry]\ninterval_s = 30.0\n"
    config.write_text(owned)
    (etc / "credentials" / "mqtt-password").write_text("s3cret\n")
    watched = [
        etc / "fleet.pub",
        etc / "credentials" / "mqtt-password",
        root / "etc/systemd/system/edgefleet-agent.service",
        root / VENV_PATH / "pyvenv.cfg",  # the virtualenv was not recreated
    ]
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in watched}

    again = run_install(*install_args(root, installed.key, installed.source))
    assert again.returncode == 0, again.stderr
    assert config.read_text() == owned
    assert "kept" in again.stderr
    assert "unchanged" in again.stderr  # the same package: a running agent is not restarted
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in watched} == before
    assert load_config(config, env={}).telemetry.interval_s == 30.0


def test_the_lock_decides_the_versions(installed: Installed, tmp_path: Path) -> None:
    # The default run installed with the checkout's lock ...
    assert "deploy/lock/agent.txt" in installed.first.stderr
    # ... and a lock pinning a version that does not exist makes pip fail, naming the lock.
    lock = tmp_path / "impossible.txt"
    lock.write_text("paho-mqtt==0.0.1\n")
    args = install_args(tmp_path / "root", installed.key, installed.source)
    res = run_install(*args, "--lock", lock)
    assert res.returncode == 1 and f"with the versions of {lock}" in res.stderr, res.stderr
    missing = run_install(*args, "--lock", tmp_path / "nope.txt")
    assert missing.returncode == 1 and "--lock:" in missing.stderr and "nope.txt" in missing.stderr


def test_missing_device_id_is_a_clear_error(tmp_path: Path) -> None:
    key, _ = make_keys(tmp_path)
    root = tmp_path / "root"
    result = run_install("--root", root, "--broker", "localhost", "--fleet-key", key)
    assert result.returncode != 0
    assert "missing required argument(s): --device-id" in result.stderr
    assert not root.exists(), "nothing is installed before the arguments are checked"


def test_missing_fleet_key_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "fleet.pub"
    result = run_install(
        "--root",
        tmp_path / "root",
        "--device-id",
        "pi-7",
        "--broker",
        "localhost",
        "--fleet-key",
        missing,
    )
    assert result.returncode != 0
    assert f"fleet key '{missing}' not found" in result.stderr


def test_private_key_and_bad_arguments_are_refused(tmp_path: Path) -> None:
    _, private = make_keys(tmp_path)
    root = tmp_path / "root"
    base: list[str | Path] = ["--root", root, "--device-id", "pi-7", "--broker", "localhost"]
    result = run_install(*base, "--fleet-key", private)
    assert result.returncode != 0 and "PRIVATE key" in result.stderr

    pub, _ = make_keys(tmp_path)
    for args, message in [
        (["--device-id", "pi/7"], "is not a valid id"),
        (["--broker", "mqtt://broker"], "not a URL"),
        (["--broker", "broker:99999"], "not in 1-65535"),
        (["--broker", "broker:mqtt"], "port must be a number"),
        (["--frobnicate"], "unknown argument"),
    ]:
        result = run_install(*base, "--fleet-key", pub, *args)
        assert result.returncode == 2 and message in result.stderr, (args, result.stderr)
    assert not root.exists()


COORDINATOR_UNIT = Path(__file__).resolve().parents[1] / "systemd/edgefleet-coordinator.service"


def test_coordinator_unit_verifies(tmp_path: Path) -> None:
    """The coordinator's unit: hardened, credentials by LoadCredential, clean verify."""
    text = COORDINATOR_UNIT.read_text()
    assert "LoadCredential=api-token:" in text and "DynamicUser=yes" in text
    assert "edgefleet-server run" in text
    # verify insists that ExecStart's binary exists: point it at this interpreter's script.
    exe = Path(sys.executable).parent / "edgefleet-server"
    assert exe.exists()
    local = tmp_path / "edgefleet-coordinator.service"
    local.write_text(text.replace("/opt/edgefleet/venv/bin/edgefleet-server", str(exe)))
    analyze_unit(local, max_exposure=2.5)


def test_bundle_install_verifies_switches_current_and_keeps_the_previous(
    installed: Installed, tmp_path: Path
) -> None:
    from edgefleet.agent.bundle import (
        generate_private_key,
        load_private_key,
        verify_bundle,
        write_bundle,
    )
    from edgefleet.agent.bundle import load_public_key as load_pub
    from edgefleet.agent.bundle.archive import pack
    from tests.bundle_helpers import two_stage_body, two_stage_files

    private = load_private_key(installed.private)
    write_bundle(tmp_path / "v3", two_stage_body(version=3), two_stage_files(), private)
    write_bundle(tmp_path / "v4", two_stage_body(version=4), two_stage_files(), private)
    archive = pack(tmp_path / "v4", tmp_path / "v4.tar.gz")
    base = install_args(installed.root, installed.key, installed.source)
    bundles = installed.root / "var/lib/edgefleet/bundles"
    current = bundles / "current"

    first = run_install(*base, "--bundle", tmp_path / "v3")
    assert first.returncode == 0, first.stderr
    assert "installed bundle tiny-cnn v3" in first.stderr
    assert current.is_symlink() and current.resolve() == (bundles / "tiny-cnn-v3").resolve()

    second = run_install(*base, "--bundle", archive)  # an archive from `edgefleet bundle pack`
    assert second.returncode == 0, second.stderr
    assert current.resolve() == (bundles / "tiny-cnn-v4").resolve()
    assert (bundles / "tiny-cnn-v3" / "manifest.json").exists()  # the previous one stays
    device_key = load_pub(installed.root / "etc/edgefleet/fleet.pub")
    assert verify_bundle(current, [device_key]).manifest.version == 4

    stranger = generate_private_key()
    write_bundle(tmp_path / "bad", two_stage_body(version=5), two_stage_files(), stranger)
    refused = run_install(*base, "--bundle", tmp_path / "bad")
    assert refused.returncode != 0
    assert "not installed (see above): the device keeps what it had" in refused.stderr
    assert current.resolve() == (bundles / "tiny-cnn-v4").resolve()
    assert sorted(p.name for p in bundles.iterdir()) == ["current", "tiny-cnn-v3", "tiny-cnn-v4"]


def test_bundle_with_a_link_is_refused_before_copying_and_tar_dot_archives_install(
    installed: Installed, tmp_path: Path
) -> None:
    """Links in a bundle directory are refused with the verifier's message, never followed."""
    from edgefleet.agent.bundle import load_private_key, write_bundle
    from tests.bundle_helpers import two_stage_body, two_stage_files

    private = load_private_key(installed.private)
    base = install_args(installed.root, installed.key, installed.source)
    bundles = installed.root / "var/lib/edgefleet/bundles"
    bundles.mkdir(parents=True, exist_ok=True)
    before = sorted(p.name for p in bundles.iterdir())
    current_before = (
        os.readlink(bundles / "current") if (bundles / "current").is_symlink() else None
    )
    outside = tmp_path / "outside"

    def stage_link(b: Path) -> str:
        # The right bytes behind the link: following it would install a valid bundle.
        (b / "stage1.onnx").rename(outside / "stage1.onnx")
        (b / "stage1.onnx").symlink_to(outside / "stage1.onnx")
        return "stage1.onnx"

    def directory_link(b: Path) -> str:
        (b / "heads").rename(outside / "heads")
        (outside / "heads" / "not-for-the-device").write_text("secret")
        (b / "heads").symlink_to(outside / "heads", target_is_directory=True)
        return "heads"

    def loop(b: Path) -> str:
        (b / "self").symlink_to(".", target_is_directory=True)
        return "self"

    for make_link in (stage_link, directory_link, loop):
        shutil.rmtree(outside, ignore_errors=True)
        outside.mkdir()
        bundle = tmp_path / make_link.__name__
        write_bundle(bundle, two_stage_body(version=6), two_stage_files(), private)
        rel = make_link(bundle)
        refused = run_install(*base, "--bundle", bundle)
        assert refused.returncode != 0, refused.stderr
        assert f"{rel} is a symbolic link; bundles hold plain files only" in refused.stderr
        assert "not installed (see above): the device keeps what it had" in refused.stderr
        assert sorted(p.name for p in bundles.iterdir()) == before
        assert not list(installed.root.rglob("not-for-the-device"))

    # `tar -C DIR .` writes './manifest.json' and the '.' entry itself: a valid archive.
    dot = tmp_path / "v7"
    write_bundle(dot, two_stage_body(version=7), two_stage_files(), private)
    archive = tmp_path / "v7.tar.gz"
    subprocess.run(["tar", "-czf", str(archive), "-C", str(dot), "."], check=True)
    accepted = run_install(*base, "--bundle", archive)
    try:
        assert accepted.returncode == 0, accepted.stderr
        assert "installed bundle tiny-cnn v7" in accepted.stderr
        assert (bundles / "current").resolve() == (bundles / "tiny-cnn-v7").resolve()
    finally:
        # Leave the shared install as it was for the other tests of this module.
        (bundles / "current").unlink(missing_ok=True)
        if current_before is not None:
            (bundles / "current").symlink_to(current_before)
        shutil.rmtree(bundles / "tiny-cnn-v7", ignore_errors=True)
