"""A one-stage, no-exit bundle from an ONNX classifier: the baseline every device can run."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import onnx

from edgefleet.agent.bundle import (
    ExitHead,
    Manifest,
    ManifestBody,
    Metrics,
    Preprocessing,
    Provenance,
    Stage,
    TensorSpec,
    write_bundle,
)
from edgefleet.server import __version__
from edgefleet.server.keystore import FleetKey
from edgefleet.server.optimize.golden import synthetic_inputs, write_bundle_with_health

_DTYPES = {
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.UINT8: "uint8",
    onnx.TensorProto.INT8: "int8",
}


class ModelInputError(ValueError):
    """The ONNX model does not look like a single-input image classifier."""


def describe_io(model: onnx.ModelProto, source: str) -> tuple[TensorSpec, str]:
    """The model's one image input as a TensorSpec, and its output name."""
    initializers = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise ModelInputError(f"{source}: expected one input tensor, found {len(inputs)}")
    if len(model.graph.output) != 1:
        raise ModelInputError(
            f"{source}: expected one output (class scores), found {len(model.graph.output)}"
        )
    tensor = inputs[0].type.tensor_type
    dtype = _DTYPES.get(tensor.elem_type)
    if dtype is None:
        raise ModelInputError(f"{source}: input element type {tensor.elem_type} is not supported")
    shape: list[int | str] = [
        d.dim_value if d.HasField("dim_value") else (d.dim_param or "N") for d in tensor.shape.dim
    ]
    return TensorSpec(name=inputs[0].name, shape=shape, dtype=dtype), model.graph.output[0].name


def plain_body(
    model_path: Path,
    *,
    model_id: str,
    version: int,
    preprocessing: Preprocessing,
    labels: list[str],
    metrics: Metrics | None = None,
    calibration: str | None = None,
) -> ManifestBody:
    """Manifest body of a bundle holding the model unchanged as its single stage."""
    data = model_path.read_bytes()
    model = onnx.load_from_string(data)
    spec, output = describe_io(model, str(model_path))
    return ManifestBody(
        model_id=model_id,
        version=version,
        created_ts=time.time(),
        input=spec,
        preprocessing=preprocessing,
        labels=labels,
        stages=[
            Stage(
                file="model.onnx", inputs=[spec.name], exit=ExitHead(output=output, kind="logits")
            )
        ],
        provenance=Provenance(
            source_model_sha256=hashlib.sha256(data).hexdigest(),
            source_model_name=model_path.name,
            optimizer={"passes": []},
            calibration=calibration,
            tool=f"edgefleet {__version__}",
        ),
        metrics=metrics or Metrics(),
    )


def write_plain_bundle(
    out_dir: Path, body: ManifestBody, model_path: Path, key: FleetKey, *, health: bool = True
) -> Manifest:
    """Sign and write a plain bundle (see agent.bundle.write_bundle).

    With health (the default) the bundle carries a golden file from a deterministic synthetic
    input (`golden_kind: synthetic`): there is no data here, so it is good for the device's
    load/NaN/determinism and latency checks only, not for accuracy.
    """
    files: dict[str, bytes | Path] = {"model.onnx": model_path}
    if not health:
        return write_bundle(out_dir, body, files, key.private)
    inputs = synthetic_inputs(body)
    return write_bundle_with_health(out_dir, body, files, key.private, inputs, kind="synthetic")
