"""`python -m edgefleet.server.catalogue.checker`: the optimizer's own checks, run for the
coordinator in a process of its own.

The coordinator never imports the optimizer (pyproject's import contract: it stays free of
onnx and the quantization tools, and a model that crashes a parser crashes only this
process). Two questions, one JSON line of answer on stdout:

    checker model SOURCE DATA OPTIONS_JSON   -> {"error": null | "what is wrong"}
    checker macs BUNDLE_DIR                  -> {"macs": [per stage]}
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

from edgefleet.agent.bundle import MANIFEST_NAME
from edgefleet.server.catalogue.options import ModelOptions


def check_model(source: Path, data: Path, options: ModelOptions) -> str | None:
    """What the optimizer could not use, in one line: the model, the preprocessing options
    against its input, the data, or the data's labels against its outputs; None if nothing."""
    import onnx

    from edgefleet.server.optimize.data import load_labelled
    from edgefleet.server.optimize.errors import OptimizeError
    from edgefleet.server.optimize.preprocessing import infer_preprocessing

    try:
        model = onnx.load(source, load_external_data=False)
    except Exception as exc:  # protobuf decode errors of every kind
        return f"the source model is not an ONNX model ({exc})"
    o = options
    try:
        infer_preprocessing(
            source,
            size=o.size,
            color=o.color,
            layout=o.layout,
            mean=o.mean,
            std=o.std,
            # The defaults of `edgefleet optimize` where the options say nothing.
            scale=o.scale if o.scale is not None else 1 / 255,
            resize=o.resize or "stretch",
            interpolation=o.interpolation or "linear",
        )
    except OptimizeError as exc:
        return f"the source model cannot be used: {_short(exc, source)}"
    try:
        data_set = load_labelled(data)
    except OptimizeError as exc:
        return f"the data cannot be used: {_short(exc, data)}"
    classes = _output_classes(model)
    if classes is not None and classes != len(data_set.names):
        return (
            f"the source model outputs {classes} classes but the data has "
            f"{len(data_set.names)} labels {data_set.names[:10]}"
        )
    return None


def _short(exc: Exception, path: Path) -> str:
    """The optimizer's message without the temporary path it names."""
    return str(exc).replace(f"{path}: ", "").replace(str(path), path.name)


def _output_classes(model: object) -> int | None:
    """The last dimension of the model's first output when it is fixed."""
    try:
        dims = model.graph.output[0].type.tensor_type.shape.dim  # type: ignore[attr-defined]
        last = dims[-1]
        return int(last.dim_value) if last.HasField("dim_value") and last.dim_value > 0 else None
    except (AttributeError, IndexError):
        return None


def stage_macs(bundle_dir: Path) -> list[int]:
    """Multiply-accumulates of each stage file of a bundle, counted from its graph."""
    import onnx

    from edgefleet.server.optimize.macs import total_macs

    manifest = json.loads((bundle_dir / MANIFEST_NAME).read_text())
    return [total_macs(onnx.load(bundle_dir / s["file"])) for s in manifest["stages"]]


def main(argv: Sequence[str]) -> int:
    if len(argv) == 4 and argv[0] == "model":
        options = ModelOptions.model_validate_json(argv[3])
        print(json.dumps({"error": check_model(Path(argv[1]), Path(argv[2]), options)}))
        return 0
    if len(argv) == 2 and argv[0] == "macs":
        print(json.dumps({"macs": stage_macs(Path(argv[1]))}))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
