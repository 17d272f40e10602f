"""A digits early-exit bundle and a round engine on a real store, for the round tests.

The bundle is real ONNX over real data: scikit-learn's 8x8 digits as uint8 camera frames;
stage 0 passes the image on and pools it 2x2 into 16 early-exit features, stage 1 classifies
all 64 pixels (a softmax regression fitted here). The early exit's head (an .npz, the part a
round trains) was fitted only where digits 0-4 appeared, so devices seeing every digit have
something to teach it. Devices are simulated the way the agent trains (agent/federated): the
base bundle's own features of their frames, train_head from the base head, the delta encoded
as the protocol carries it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from onnx import TensorProto, helper, numpy_helper

from edgefleet.agent.bundle import (
    ExitHead,
    ManifestBody,
    OperatingPoint,
    Preprocessing,
    Provenance,
    Stage,
    TensorSpec,
    verify_bundle,
    write_bundle,
)
from edgefleet.agent.federated import (
    EncodedArray,
    HeadWeights,
    encode_update,
    evaluate,
    train_head,
)
from edgefleet.agent.federated.wire import flatten_heads, to_tensors
from edgefleet.agent.protocol import FedTask, FedUpdate, Hardware, Status
from edgefleet.server.federated.evaluate import Holdout, exit_values, preprocess
from edgefleet.server.federated.rounds import RoundEngine
from edgefleet.server.federated.spec import RoundSpec
from edgefleet.server.fleet.store import (
    FedUpdateIn,
    IngestBatch,
    StatusIn,
    Store,
    open_store,
)
from edgefleet.server.rollout.archives import ArchiveStore
from edgefleet.server.rollout.engine import EngineSettings, RolloutEngine
from tests.rollout.fakes import Clock, Publisher, Sender

T0 = 1_767_225_600.0
LABELS = [str(i) for i in range(10)]
F32 = npt.NDArray[np.float32]


@dataclass(frozen=True)
class Digits:
    """Frames (uint8 8x8) and labels: train and test splits, stratified, seed 0."""

    train_images: npt.NDArray[np.uint8]
    train_labels: npt.NDArray[np.int64]
    test_images: npt.NDArray[np.uint8]
    test_labels: npt.NDArray[np.int64]


@cache
def digits() -> Digits:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    frames = (x.reshape(-1, 8, 8) * 15).astype(np.uint8)  # 0..16 -> 0..240, a grey frame
    tr, te, y_tr, y_te = train_test_split(
        frames, y, test_size=0.3, random_state=0, stratify=y
    )
    return Digits(tr, y_tr.astype(np.int64), te, y_te.astype(np.int64))


def holdout() -> Holdout:
    d = digits()
    return Holdout(list(d.test_images), [str(v) for v in d.test_labels.tolist()], "digits test")


def _model(graph: onnx.GraphProto) -> bytes:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _stage0() -> bytes:
    nodes = [
        helper.make_node("Identity", ["image"], ["f1"]),
        helper.make_node("AveragePool", ["image"], ["p0"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["p0"], ["e0"]),
    ]
    graph = helper.make_graph(
        nodes,
        "stage0",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 1, 8, 8])],
        [
            helper.make_tensor_value_info("f1", TensorProto.FLOAT, [1, 1, 8, 8]),
            helper.make_tensor_value_info("e0", TensorProto.FLOAT, [1, 16]),
        ],
    )
    return _model(graph)


def _stage1(final: HeadWeights) -> bytes:
    w = numpy_helper.from_array(final.weight.astype(np.float32), "w1")
    b = numpy_helper.from_array(final.bias.astype(np.float32), "b1")
    nodes = [
        helper.make_node("Flatten", ["f1"], ["x1"]),
        helper.make_node("Gemm", ["x1", "w1", "b1"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "stage1",
        [helper.make_tensor_value_info("f1", TensorProto.FLOAT, [1, 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 10])],
        [w, b],
    )
    return _model(graph)


def _inputs(frames: npt.NDArray[np.uint8]) -> F32:
    """What the bundle's preprocessing makes of the frames, batched: (N, 64) in [0, 0.94]."""
    return (frames.reshape(len(frames), -1) / 255.0).astype(np.float32)


def _pooled(frames: npt.NDArray[np.uint8]) -> F32:
    x = _inputs(frames).reshape(-1, 4, 2, 4, 2).mean(axis=(2, 4)).reshape(-1, 16)
    return x.astype(np.float32)


def _sgd(base: HeadWeights, x: F32, y: npt.NDArray[np.int64], epochs: int) -> HeadWeights:
    return train_head(
        base, x, y, epochs=epochs, lr=0.5, batch_size=32, weight_decay=1e-4, prox_mu=0.0,
        rng=np.random.default_rng(0),
    ).head


@cache
def _heads() -> tuple[HeadWeights, HeadWeights]:
    """(final classifier on 64 pixels, skewed early head on 16 pooled features)."""
    d = digits()
    final = _sgd(
        HeadWeights(np.zeros((10, 64), np.float32), np.zeros(10, np.float32)),
        _inputs(d.train_images),
        d.train_labels,
        30,
    )
    skew = d.train_labels < 5
    early = _sgd(
        HeadWeights(np.zeros((10, 16), np.float32), np.zeros(10, np.float32)),
        _pooled(d.train_images[skew]),
        d.train_labels[skew],
        20,
    )
    return final, early


def digits_bundle(root: Path, key: Ed25519PrivateKey, version: int = 4) -> Path:
    """The digits early-exit bundle, signed; one early exit (head file heads/exit0.npz)."""
    final, early = _heads()
    body = ManifestBody(
        model_id="digits-ee",
        version=version,
        created_ts=T0,
        input=TensorSpec(name="image", shape=[1, 1, 8, 8]),
        preprocessing=Preprocessing(
            height=8, width=8, color="GRAY", scale=1 / 255, mean=[0.0], std=[1.0]
        ),
        labels=LABELS,
        stages=[
            Stage(
                file="stage0.onnx",
                inputs=["image"],
                outputs=["f1"],
                exit=ExitHead(output="e0", kind="features", head_file="heads/exit0.npz"),
            ),
            Stage(file="stage1.onnx", inputs=["f1"], exit=ExitHead(output="logits", kind="logits")),
        ],
        operating_points=[
            OperatingPoint(name="balanced", thresholds=[0.6]),
            OperatingPoint(name="accurate", thresholds=[0.95]),
        ],
        provenance=Provenance(source_model_sha256="0" * 64),
    )
    out = root / f"digits-ee-v{version}"
    write_bundle(
        out,
        body,
        {
            "stage0.onnx": _stage0(),
            "stage1.onnx": _stage1(final),
            "heads/exit0.npz": early.to_npz_bytes(),
        },
        key,
    )
    return out


def head_of(bundle: Path, key: Ed25519PrivateKey) -> HeadWeights:
    verified = verify_bundle(bundle, [key.public_key()])
    return HeadWeights.from_npz_bytes(verified.read("heads/exit0.npz"))


# -- simulated devices --------------------------------------------------------------------


def partitions(n_devices: int, seed: int = 0) -> list[npt.NDArray[np.int64]]:
    """Non-IID shares of the train split: each device sees its own class mix."""
    d = digits()
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[] for _ in range(n_devices)]
    for cls in range(10):
        rows = np.flatnonzero(d.train_labels == cls)
        share = rng.dirichlet(np.full(n_devices, 2.0))
        cuts = (np.cumsum(share)[:-1] * len(rows)).astype(int)
        for i, chunk in enumerate(np.split(rng.permutation(rows), cuts)):
            parts[i].extend(chunk.tolist())
    return [np.array(sorted(p), dtype=np.int64) for p in parts]


@dataclass
class Fleet:
    """Features of the train frames through the base bundle, and devices that train on them."""

    features: F32
    final_logits: F32
    base_head: HeadWeights
    pseudo: npt.NDArray[np.int64] = field(init=False)

    def __post_init__(self) -> None:
        self.pseudo = self.final_logits.argmax(axis=1).astype(np.int64)

    def delta(
        self, rows: npt.NDArray[np.int64], epochs: int = 10
    ) -> tuple[dict[str, F32], dict[str, float]]:
        """Train from the base head on these frames (pseudo labels, 80/20), as a device does."""
        cut = int(len(rows) * 0.8)
        fit, val = rows[:cut], rows[cut:]
        trained = _sgd(self.base_head, self.features[fit], self.pseudo[fit], epochs)
        _, before = evaluate(self.base_head, self.features[val], self.pseudo[val])
        _, after = evaluate(trained, self.features[val], self.pseudo[val])
        delta = trained.delta(self.base_head)
        figures = {"samples": len(fit), "val_samples": len(val), "before": before, "after": after}
        return {k: np.asarray(v, np.float32) for k, v in delta.items()}, figures


def fleet_of(bundle: Path, key: Ed25519PrivateKey) -> Fleet:
    verified = verify_bundle(bundle, [key.public_key()])
    h = Holdout(list(digits().train_images), ["0"] * len(digits().train_images), "train")
    ev = exit_values(verified, preprocess(verified, h))
    return Fleet(ev.values[0], ev.final_logits, head_of(bundle, key))


def fed_update(
    task: FedTask,
    device_id: str,
    delta: dict[str, Any],
    figures: dict[str, float],
    *,
    base: str | None = None,
    scheme: str = "fp16",
) -> FedUpdate:
    """What a device publishes: exit0's delta encoded, its counts and validation figures."""
    named = flatten_heads({0: delta})
    if scheme == "raw":
        # The bytes as they are, NaN included: what a broken or hostile device could send
        # (the agent's own encoder refuses non-finite values).
        encoded = {
            k: EncodedArray("fp32", np.shape(v), np.asarray(v, "<f4").tobytes(), 0.0, 0.0)
            for k, v in named.items()
        }
    else:
        encoded = encode_update(named, scheme, np.random.default_rng(0))  # type: ignore[arg-type]
    squares = sum(np.nansum(np.square(np.asarray(v, np.float64))) for v in named.values())
    norm = float(np.sqrt(squares))  # what the device claims; the coordinator measures again
    return FedUpdate(
        round_id=task.round_id,
        device_id=device_id,
        model_id=task.model_id,
        base_manifest_sha256=base or task.base_manifest_sha256,
        base_version=task.base_version,
        samples=int(figures["samples"]),
        val_samples=int(figures["val_samples"]),
        tensors=to_tensors(encoded),
        val_accuracy_before=figures["before"],
        val_accuracy_after=figures["after"],
        norm=norm,
        epochs_done=10,
        cpu_s=0.5,
        raw_bytes=4 * sum(int(np.asarray(v).size) for v in named.values()),
        encoded_bytes=sum(e.nbytes for e in encoded.values()),
        ts=task.created_ts + 1,
    )


# -- the engine on a real store -------------------------------------------------------------


class Tasks:
    """The broker's retained fed/{round}/task messages, and every publish and clear."""

    def __init__(self) -> None:
        self.retained: dict[str, FedTask] = {}
        self.log: list[tuple[str, str]] = []
        self.gen = 1

    def publish_task(self, task: FedTask) -> None:
        self.retained[task.round_id] = task
        self.log.append(("publish", task.round_id))

    def clear_task(self, round_id: str) -> None:
        self.retained.pop(round_id, None)
        self.log.append(("clear", round_id))

    def generation(self) -> int:
        return self.gen


class Rig:
    """A round engine over a real SQLite store, real archives and the digits bundle."""

    def __init__(
        self,
        tmp_path: Path,
        key: Ed25519PrivateKey,
        *,
        signing: bool = True,
        with_holdout: bool = True,
    ) -> None:
        self.tmp = tmp_path
        self.key = key
        self.clock = Clock()
        self.store: Store = open_store(str(tmp_path / "fleet.db"))
        self.archives = ArchiveStore(tmp_path / "archives", [key.public_key()])
        self.sender = Sender()
        self.rollouts = RolloutEngine(
            self.store, self.archives, self.sender, Publisher(),
            settings=EngineSettings(resend_s=1e6), clock=self.clock,
        )
        self.tasks = Tasks()
        self.signing = signing
        self.with_holdout = with_holdout
        self.bundle = digits_bundle(tmp_path / "bundles", key)
        self.base = self.archives.add(self.bundle)
        self.engine = self.new_engine()
        self.seq = 0

    def new_engine(self) -> RoundEngine:
        """A fresh engine on the same store: what a restarted coordinator has."""
        return RoundEngine(
            self.store,
            self.archives,
            self.rollouts,
            self.tasks,
            work_dir=self.tmp / "state" / "fed",
            signing_key=self.key if self.signing else None,
            holdout=holdout() if self.with_holdout else None,
            clock=self.clock,
        )

    def status(
        self,
        device_id: str,
        *,
        bundle: str | None = None,
        online: bool = True,
        group: str = "lab",
        operating_point: int = 0,
    ) -> None:
        self.clock.now += 0.01
        birth = Status(
            device_id=device_id,
            online=online,
            ts=self.clock.now,
            agent_version="0.1.0",
            model_id="digits-ee",
            model_version=4,
            operating_point=operating_point,
            group=group,
            hardware=Hardware(machine="x86_64", system="Linux", cpu_count=2, ram_mb=1024.0),
            boot_id="3f1c2a4e-7b5d-4e8f-9a0b-1c2d3e4f5a6b",
            bundle_sha256=bundle or self.base.manifest_sha256,
        )
        self.store.ingest(IngestBatch(statuses=[StatusIn(self.clock.now, birth)]))

    def devices(self, *ids: str) -> None:
        for d in ids:
            self.status(d)

    def start(self, **spec: Any) -> str:
        fields: dict[str, Any] = {"group": "lab", "deadline_s": 600, "quorum": "2"}
        fields.update(spec)
        round_id = self.engine.create(RoundSpec.model_validate(fields))
        self.tick()  # announce
        return round_id

    def task(self, round_id: str) -> FedTask:
        r = self.store.fed_round(round_id)
        assert r is not None
        return FedTask.model_validate_json(r.task_json)

    def send(self, *updates: FedUpdate) -> Any:
        self.clock.now += 0.01
        return self.store.ingest(
            IngestBatch(fed_updates=[FedUpdateIn(self.clock.now, u) for u in updates])
        )

    def tick(self, engine: RoundEngine | None = None) -> None:
        self.clock.now += 0.01
        (engine or self.engine).tick()

    def state(self, round_id: str) -> tuple[str, str]:
        r = self.store.fed_round(round_id)
        assert r is not None
        return r.state, r.phase

    def statuses(self, round_id: str) -> dict[str, tuple[str, str | None]]:
        return {u.device_id: (u.status, u.reason) for u in self.store.fed_updates(round_id)}

    def until_done(self, round_id: str, ticks: int = 10) -> None:
        for _ in range(ticks):
            if self.state(round_id)[0] != "running":
                return
            self.tick()


def ids(prefix: str, n: int) -> Sequence[str]:
    return [f"{prefix}-{i}" for i in range(n)]

