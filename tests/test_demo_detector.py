"""The demo's detector part: the clock that turns event times into video frames, the judge of
events against the reference video's truth, and the part itself with a real broker on the
shipped secure profile, a real coordinator and a real agent process on the reference detector.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from edgefleet.agent.bundle import (
    ManifestBody,
    OperatingPoint,
    Provenance,
    Stage,
    TensorSpec,
    write_bundle,
)
from edgefleet.server.demo.checks import Checks
from edgefleet.server.demo.console import Story
from edgefleet.server.demo.detect_truth import (
    START_TOLERANCE,
    Sighting,
    TruthObject,
    VideoTruth,
    camera_frame,
    judge,
    pass_end,
    video_frame,
)
from edgefleet.server.demo.detector import DEVICE, DetectorAgent
from edgefleet.server.fleet.client import FleetClient
from edgefleet.server.fleet.ingest import IngestConfig
from edgefleet.server.fleet.service import Coordinator, CoordinatorConfig
from edgefleet.server.identity import IdentityDir
from edgefleet.server.keystore import FleetKey, init_key
from edgefleet.server.local.broker import MosquittoBroker
from edgefleet.server.local.identities import LocalIdentities
from edgefleet.server.reference import detect as ref

# A 100-frame video at 10 fps: a "3" in view for 3 s, a "7" for 2 s, a "1" for half a second.
TRUTH = VideoTruth(
    frames=100,
    fps=10.0,
    objects=(
        TruthObject(1, "3", 10, 39),
        TruthObject(2, "7", 50, 69),
        TruthObject(3, "1", 80, 84),
    ),
)


def test_truth_file_and_long_objects() -> None:
    truth = VideoTruth.load()
    assert truth.frames == 600 and truth.fps == 30.0
    # Every digit of the shipped video is in view for more than a second.
    assert [o.label for o in truth.long_objects()] == ["9", "1", "7", "7", "8", "4", "5", "6"]
    assert [o.label for o in TRUTH.long_objects()] == ["3", "7"]


def test_camera_frame_from_the_nearest_result() -> None:
    anchors = [(100.0, 31), (101.0, 61), (103.0, 121)]
    assert camera_frame(101.0, anchors, 30.0) == 61  # a result's own frame: exact
    assert camera_frame(100.5, anchors, 30.0) == 46
    assert camera_frame(102.2, anchors, 30.0) == 121 - 24  # nearer the later one
    assert camera_frame(99.0, anchors, 30.0) == 1  # before the first: extrapolated
    # A counter shows frame counter - 1 of the looped file.
    assert [video_frame(c, 600) for c in (1, 600, 601, 1250)] == [0, 599, 0, 49]
    with pytest.raises(ValueError):
        camera_frame(1.0, [], 30.0)


def test_judge_matches_each_long_object_once_per_pass() -> None:
    # Two passes (counters 1..200); the "3" first shows at counters 11 and 111.
    sightings = [
        Sighting(1, "3", 9),
        Sighting(2, "7", 53),
        Sighting(3, "3", 112),
        Sighting(4, "7", 151),
        Sighting(5, "1", 181),  # too short to be required, still an object in view
    ]
    v = judge(TRUTH, sightings, 1, 200, tolerance=3)
    assert v.ok and v.judged == 4 and v.events == 5
    assert sorted(v.offsets) == [-2, 0, 1, 2]


def test_judge_names_missed_objects_and_strays() -> None:
    v = judge(TRUTH, [Sighting(1, "3", 30), Sighting(2, "8", 55)], 1, 100, tolerance=3)
    assert not v.ok
    assert v.missed == ["digit 3 (#1) of frame 10", "digit 7 (#2) of frame 50"]
    assert v.strays == ["8 #2 at frame 54"] and v.events == 2  # no 8 in the video
    # The right class 4 frames late is a miss at a tolerance of 3, a match at 4.
    late = [Sighting(1, "3", 15), Sighting(2, "7", 51)]
    assert judge(TRUTH, late, 1, 100, tolerance=3).missed == ["digit 3 (#1) of frame 10"]
    assert judge(TRUTH, late, 1, 100, tolerance=4).ok
    # An event of a class in view at the wrong moment is a stray too; strays are counted,
    # not failed (a class flicker of the detector starts a short track).
    v = judge(TRUTH, [*late, Sighting(3, "7", 20)], 1, 100, tolerance=4)
    assert v.strays == ["7 #3 at frame 19"] and v.ok


def test_judge_only_objects_the_detector_saw_begin() -> None:
    # The detector ran from counter 30 to 152: the first pass's "3" (counter 11) began before
    # it, the second pass's "7" (counter 151) too late to be judged; the "7" of the first
    # pass and the "3" of the second are judged.
    v = judge(TRUTH, [Sighting(1, "7", 50)], 30, 152, tolerance=3)
    assert v.judged == 2 and v.missed == ["digit 3 (#1) of frame 10"]
    v = judge(TRUTH, [Sighting(1, "7", 50), Sighting(2, "3", 111)], 30, 152, tolerance=3)
    assert v.ok and v.judged == 2
    assert not judge(TRUTH, [], 30, 40, tolerance=3).ok  # nothing judged proves nothing
    # Waiting: from counter 1 one pass is enough; from 30 the next whole pass is needed.
    assert pass_end(1, TRUTH, tolerance=3) == 100
    assert pass_end(30, TRUTH, tolerance=3) == 200


def fp32_detect_bundle(root: Path) -> tuple[Path, FleetKey]:
    """The reference detector unchanged (fp32, every frame) as a signed detect bundle: what
    the demo's optimizer makes, without the minutes it takes."""
    key, _ = init_key(root / "keys")
    data = ref.DET_MODEL_PATH.read_bytes()
    body = ManifestBody(
        model_id="mnist-det",
        version=1,
        created_ts=time.time(),
        input=TensorSpec(name=ref.INPUT_NAME, shape=[1, 1, ref.INPUT_SIZE, ref.INPUT_SIZE]),
        preprocessing=ref.preprocessing(),
        task="detect",
        detection=ref.deployed_spec(),
        labels=list(ref.LABELS),
        stages=[Stage(file="model.onnx", inputs=[ref.INPUT_NAME], outputs=[])],
        operating_points=[OperatingPoint(name="always", thresholds=[])],
        provenance=Provenance(source_model_sha256=hashlib.sha256(data).hexdigest()),
    )
    write_bundle(root / "bundle", body, {"model.onnx": data}, key.private)
    return root / "bundle", key


@dataclass
class _Fleet:
    broker: MosquittoBroker
    coordinator: Coordinator
    client: FleetClient
    agent: DetectorAgent


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[_Fleet]:
    """The demo's secure broker and a coordinator, the detector agent provisioned."""
    creds = LocalIdentities(IdentityDir(tmp_path / "identity"))
    broker = MosquittoBroker(tmp_path / "broker", identity=creds.ids)
    agent = DetectorAgent(tmp_path / "device")
    agent.provision(creds)
    token = secrets.token_hex(8)
    coordinator = Coordinator(
        CoordinatorConfig(
            store=f"sqlite:///{tmp_path / 'coordinator.db'}",
            mqtt=IngestConfig(
                host=broker.host,
                port=broker.port,
                client_id="coord",
                username="coord",
                password=creds.coordinator("coord"),
            ),
            http_port=0,
            token=token,
        )
    )
    broker.start()
    coordinator.start()
    try:
        assert coordinator.ingestor.wait_connected(10)
        yield _Fleet(broker, coordinator, FleetClient(coordinator.url, token), agent)
    finally:
        agent.close()
        coordinator.stop()
        broker.stop()


def test_detector_agent_shows_and_checks_its_objects(fleet: _Fleet, tmp_path: Path) -> None:
    bundle, key = fp32_detect_bundle(tmp_path / "det")
    lines: list[str] = []
    story, checks = Story(1, lines.append), Checks()
    fleet.agent.start(bundle, key, fleet.broker)
    fleet.agent.wait_reporting(fleet.coordinator.store, checks, 60)
    result = fleet.agent.show_and_check(fleet.client, fleet.coordinator.store, story, checks)
    print("\n".join(lines + checks.lines()))
    assert checks.passed, fleet.agent.log.read_text()[-2000:]
    names = [c.name for c in checks.items]
    assert "detector's objects match the video's truth" in names
    assert result["exit_code"] == 0 and result["judged"] >= 8 and not result["missed"]
    assert result["object_starts"] >= 8 and result["object_ends"] >= 1
    text = "\n".join(lines)
    assert f"$ edgefleet fleet show {DEVICE}" in text and "objects:" in text
    assert all(abs(o) <= START_TOLERANCE for o in result["start_offsets"])
