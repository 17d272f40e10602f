"""The agent's configuration: TOML file, environment overrides, secrets from systemd credentials.

Every key is validated (`extra="forbid"`: a misspelt key is an error, not a default) and an
error names the key and the file, so a device owner can fix it from the message alone.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from edgefleet.agent.detect.zones import Zone
from edgefleet.agent.protocol.ids import ID_PATTERN

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10 (JetPack 6): the same parser, from its backport
    import tomli as tomllib

DEFAULT_PATH = Path("/etc/edgefleet/agent.toml")
ENV_PREFIX = "EDGEFLEET_"
# systemd's LoadCredential= puts secrets here (readable by the service only, never in the file).
CREDENTIAL_FILES = {"mqtt_password": "mqtt-password"}
# Where the unit's LoadCredential= reads them from (handed over as $CREDENTIALS_DIRECTORY).
DEFAULT_CREDENTIALS_DIR = Path("/etc/edgefleet/credentials")


class ConfigError(Exception):
    """The configuration cannot be used; the message names the file and key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CameraConfig(_Section):
    """Where frames come from."""

    source: str | int = Field(0, description="V4L2 index, /dev/videoN, a video file, or a URL")
    loop: bool = Field(False, description="restart a video file at its end")
    width: int | None = Field(None, ge=16, le=8192)
    height: int | None = Field(None, ge=16, le=8192)
    fps: float | None = Field(None, gt=0, le=1000, description="request; files: pace playback")
    realtime: bool = Field(
        True,
        description="files only: false hands over every frame as soon as inference took the "
        "previous one (replaying a recording: none dropped, no pacing)",
    )
    reconnect_initial_s: float = Field(0.5, gt=0, le=60)
    reconnect_max_s: float = Field(30.0, gt=0, le=3600)

    @property
    def kind(self) -> Literal["device", "url", "file"]:
        """What the source is: a V4L2 device (index or /dev path), a stream URL, or a file."""
        return source_kind(self.source)

    @model_validator(mode="after")
    def _backoff(self) -> CameraConfig:
        if self.reconnect_max_s < self.reconnect_initial_s:
            raise ValueError("reconnect_max_s must be >= reconnect_initial_s")
        if not self.realtime and self.kind != "file":
            raise ValueError(
                f"realtime = false replays video files; source {self.source!r} is a "
                f"{self.kind}, which delivers at its own rate"
            )
        if not self.realtime and self.fps is not None:
            raise ValueError("fps paces real-time playback; with realtime = false leave it out")
        return self


def source_kind(source: str | int) -> Literal["device", "url", "file"]:
    """A camera source's kind: V4L2 device (index or /dev path), stream URL, or video file."""
    if isinstance(source, int) or source.isdigit() or source.startswith("/dev/"):
        return "device"
    return "url" if "://" in source else "file"


class ModelConfig(_Section):
    """Which bundle runs, who may sign it, and how it runs."""

    bundle: Path | None = Field(
        None,
        description="bundle dir to run until the coordinator installs one (an installed "
        "state_dir/bundles/current wins); default: the installed current one",
    )
    trusted_keys: list[Path] = Field(
        default_factory=lambda: [Path("/etc/edgefleet/fleet.pub")], min_length=1
    )
    threads: int = Field(2, ge=1, le=64)
    providers: list[str] = Field(default_factory=lambda: ["CPUExecutionProvider"], min_length=1)
    operating_point: int | None = Field(None, ge=0, description="pin at start; default: manifest")
    warmup_runs: int = Field(
        3, ge=0, le=100, description="runs of every stage on a blank input at load (0: none)"
    )


class TlsConfig(_Section):
    """Broker TLS: CA to trust, and a client certificate for mutual TLS."""

    ca: Path
    cert: Path | None = None
    key: Path | None = None

    @model_validator(mode="after")
    def _pair(self) -> TlsConfig:
        if (self.cert is None) != (self.key is None):
            raise ValueError("tls.cert and tls.key go together")
        return self


class MqttConfig(_Section):
    """The broker and how to reach it."""

    host: str = Field("localhost", min_length=1)
    port: int = Field(1883, ge=1, le=65535)
    keepalive_s: int = Field(30, ge=5, le=3600)
    topic_root: str = "edgefleet/v1"
    username: str | None = None
    password: str | None = Field(None, description="prefer the mqtt-password credential")
    tls: TlsConfig | None = None


class TelemetryConfig(_Section):
    """How often and what the agent reports."""

    interval_s: float = Field(10.0, ge=1, le=3600)
    results: Literal["off", "on_change", "every"] = "on_change"
    results_max_hz: float = Field(2.0, gt=0, le=100)


class GovernorConfig(_Section):
    """Moves between the bundle's operating points when the device is slow or hot."""

    enabled: bool = True
    target_p95_ms: float | None = Field(None, gt=0, description="latency target; None: no target")
    hot_c: float = Field(80.0, gt=0, le=150, description="temperature that counts as hot")
    recover_margin: float = Field(0.7, gt=0, lt=1, description="p95 below target*margin recovers")
    windows_to_recover: int = Field(3, ge=1, le=100, description="hysteresis before moving back")


class OutboxConfig(_Section):
    """The on-disk queue used while the broker is unreachable."""

    max_messages: int = Field(100_000, ge=10)
    max_bytes: int = Field(64 * 2**20, ge=2**16)


class PowerConfig(_Section):
    """Power source: detected, or forced; the estimate profile for devices without a sensor."""

    source: Literal["auto", "rapl", "hwmon", "ina3221", "pmic", "estimate", "none"] = "auto"
    profile: str | None = Field(None, description="estimate profile name, e.g. 'raspberry-pi-4'")

    @model_validator(mode="after")
    def _known_profile(self) -> PowerConfig:
        from edgefleet.agent.power.estimate import PROFILES  # the power package imports psutil

        if self.profile is not None and self.profile not in PROFILES:
            raise ValueError(
                f"profile {self.profile!r} unknown; one of {', '.join(sorted(PROFILES))}"
            )
        return self


class UpdateConfig(_Section):
    """Bundles pushed by the coordinator: download window, disk budget, trial."""

    enabled: bool = Field(True, description="false: install_bundle is refused")
    disk_budget_mb: float = Field(
        512, ge=1, description="bundles + partial downloads; old versions are pruned to fit"
    )
    window: int = Field(8, ge=1, le=64, description="chunks asked for at a time")
    rerequest_s: float = Field(20.0, gt=0, le=3600, description="ask again for a chunk after")
    give_up_s: float = Field(900.0, gt=0, description="no progress this long fails the install")
    confirm_frames: int = Field(
        20, ge=0, le=100_000, description="frames on a new model before it is confirmed"
    )

    @property
    def disk_budget_bytes(self) -> int:
        """The budget in bytes."""
        return int(self.disk_budget_mb * 2**20)


class FederatedConfig(_Section):
    """Federated rounds: features collected on the device, local training of exit heads.

    Off by default: collecting costs a full-depth run every probe_every-th frame, and the
    device subscribes to rounds only when this is on (docs/agent.md, "Federated rounds").
    """

    enabled: bool = Field(
        False, description="collect exit features and take part in the coordinator's rounds"
    )
    probe_every: int = Field(
        10,
        ge=1,
        le=100_000,
        description="every n-th frame runs at full depth (no early exit) to give a pseudo "
        "label and every exit's features; 1 probes every frame",
    )
    buffer_size: int = Field(
        2000,
        ge=16,
        le=1_000_000,
        description="probed frames kept (features only, oldest dropped first); memory is "
        "buffer_size x the early exits' feature widths x 4 bytes",
    )
    supplied_buffer_size: int = Field(
        1000,
        ge=1,
        le=1_000_000,
        description="examples with supplied labels kept, apart from the probed frames",
    )
    labels_dir: Path | None = Field(
        None,
        description="watched folder of LABEL/IMAGE.png|jpg files with supplied labels; each is "
        "read once and moved to .done/ (or .rejected/); None: no folder",
    )
    labels_scan_s: float = Field(
        5.0, ge=0.1, le=3600, description="how often labels_dir is scanned for new images"
    )
    min_confidence: float | None = Field(
        None,
        ge=0,
        le=1,
        description="pseudo labels only from final predictions this sure; None: the round's",
    )
    max_cpu_s: float | None = Field(
        None,
        gt=0,
        le=3600,
        description="cap on a round's CPU seconds on this device; None: the round's budget",
    )
    nice: int = Field(
        10, ge=0, le=19, description="nice value of the training thread (Linux, per thread)"
    )


class TrackerConfig(_Section):
    """How detections become tracked objects (agent/detect/tracker.py).

    Tracking counts frames the detector ran: frames the motion gate skipped neither confirm
    nor end a track (docs/detect.md, "Agent").
    """

    iou: float = Field(0.3, gt=0, lt=1, description="IoU with a track's last box that continues it")
    min_hits: int = Field(
        3, ge=1, le=1000, description="detector frames a track needs before object_start"
    )
    max_missed: int = Field(
        10, ge=1, le=100_000, description="detector frames without a match before object_end"
    )
    update_interval_s: float | None = Field(
        None,
        gt=0,
        le=86_400,
        description="an object_update event per live track at most this often; None: none",
    )
    # Default on: the detector misreads a class for a few frames while an object slides in
    # or overlaps another, and per-class matching turned each misread into a track of its
    # own (57 object_start for 8 digits on the reference video). Off only for a detector
    # whose classes never flicker and whose objects of different classes overlap a lot.
    class_agnostic: bool = Field(
        True,
        description="match detections to tracks across classes, the track's class by "
        "summed score votes; false: a track only continues with its own class",
    )


class DetectConfig(_Section):
    """What a detect bundle reports: per-class thresholds, zones, tracking, boxes in results.

    Only read when the running bundle's manifest says task = "detect"; a classifier ignores it.
    """

    class_thresholds: dict[str, float] = Field(
        default_factory=dict,
        description="label -> score threshold on this device, over the bundle's own; a label "
        "the bundle does not have refuses the start",
    )
    zones: list[Zone] = Field(
        default_factory=list,
        max_length=64,
        description="polygons objects must stand in (box bottom centre); none: the whole frame",
    )
    tracker: TrackerConfig = Field(default_factory=TrackerConfig)
    results: Literal["tracked", "all"] = Field(
        "tracked",
        description="boxes in results: 'tracked' only confirmed tracks (with their id), 'all' "
        "every detection in a zone (track_id null until confirmed)",
    )

    @model_validator(mode="after")
    def _thresholds(self) -> DetectConfig:
        for label, t in self.class_thresholds.items():
            if not 0.0 < t <= 1.0:
                raise ValueError(f"class_thresholds[{label!r}] = {t} outside (0, 1]")
        names = [z.name for z in self.zones]
        if len(set(names)) != len(names):
            raise ValueError(f"zone names must be unique, got {names}")
        return self


class AgentConfig(_Section):
    """The whole agent configuration."""

    device_id: str = Field(pattern=ID_PATTERN)
    group: str | None = Field(None, pattern=ID_PATTERN)
    state_dir: Path = Field(Path("/var/lib/edgefleet"), description="outbox, bundles, lock file")
    camera: CameraConfig = Field(default_factory=CameraConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    mqtt: MqttConfig = Field(default_factory=MqttConfig)
    telemetry: TelemetryConfig = Field(default_factory=TelemetryConfig)
    governor: GovernorConfig = Field(default_factory=GovernorConfig)
    outbox: OutboxConfig = Field(default_factory=OutboxConfig)
    power: PowerConfig = Field(default_factory=PowerConfig)
    update: UpdateConfig = Field(default_factory=UpdateConfig)
    federated: FederatedConfig = Field(default_factory=FederatedConfig)
    detect: DetectConfig = Field(default_factory=DetectConfig)


def _set_path(data: dict[str, Any], keys: list[str], value: str) -> None:
    node = data
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"environment override {'.'.join(keys)}: {key} is not a section")
        node = child
    node[keys[-1]] = _env_value(value)


def _env_value(value: str) -> Any:
    """The plain string, which the model converts per field ("8883" -> 8883, "true" -> True).

    Only an explicit TOML array, table or quoted string is parsed as TOML: parsing every
    value would turn EDGEFLEET_DEVICE_ID=1234 into a number that a string field refuses.
    """
    if value[:1] in ("[", "{", '"', "'"):
        try:
            return tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            return value
    return value


# Top-level keys that are values, not sections: EDGEFLEET_<KEY> overrides them.
_TOP_LEVEL_ENV = ("device_id", "group", "state_dir")


def _env_overrides(env: Mapping[str, str]) -> dict[tuple[str, ...], str]:
    """Config path -> variable name, for every EDGEFLEET_ variable that overrides a key."""
    found: dict[tuple[str, ...], str] = {}
    for name in sorted(env):
        if not name.startswith(ENV_PREFIX):
            continue
        keys = name[len(ENV_PREFIX) :].lower().split("__")
        if len(keys) > 1 or keys[0] in _TOP_LEVEL_ENV:
            found[tuple(keys)] = name
    return found


def _format(
    exc: ValidationError, source: str, from_env: Mapping[tuple[str, ...], str] | None = None
) -> str:
    lines = []
    for err in exc.errors()[:5]:
        loc = tuple(str(p) for p in err["loc"])
        key = ".".join(loc) or "(top level)"
        # A value that came from the environment is blamed on its variable, not the file.
        var = next((v for p, v in (from_env or {}).items() if loc[: len(p)] == p), None)
        where = f"environment {var}" if var else source
        lines.append(f"{where}: {key}: {err['msg']}")
    more = exc.error_count() - 5
    return "\n".join(lines) + (f"\n{source}: and {more} more error(s)" if more > 0 else "")


def load_config(path: Path = DEFAULT_PATH, env: Mapping[str, str] | None = None) -> AgentConfig:
    """Read, override from EDGEFLEET_SECTION__KEY variables, add credentials, validate."""
    env = os.environ if env is None else env
    try:
        data: dict[str, Any] = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    from_env = _env_overrides(env)
    for keys, name in from_env.items():
        _set_path(data, list(keys), env[name])
    cred_dir = env.get("CREDENTIALS_DIRECTORY")
    if cred_dir:
        secret = Path(cred_dir) / CREDENTIAL_FILES["mqtt_password"]
        try:
            password = secret.read_text().strip() if secret.is_file() else ""
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{secret}: cannot read the MQTT password: {exc}") from None
        # An empty file means "no password": systemd needs the file to exist either way.
        if password:
            data.setdefault("mqtt", {})["password"] = password
    try:
        return AgentConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format(exc, str(path), from_env)) from None
