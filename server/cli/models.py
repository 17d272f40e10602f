"""`edgefleet models`: the coordinator's model catalogue, through its API.

`add` hands the coordinator a source model and its labelled data; `build` runs the optimizer
there as a background job (with --watch, its progress until it ends; exit status 0 only when
it succeeded); `ls` and `show` list models and their variants with accuracy, size, MACs, the
optimizer's latency estimate and the fleet's measured p95 per device class; `jobs`, `job`,
`cancel` follow builds; `import` registers a signed bundle a fleet already runs; `retire`
takes a variant out of the closed loop's choices.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from edgefleet.agent.bundle import pack
from edgefleet.server.catalogue.client import CatalogueClient
from edgefleet.server.catalogue.options import BuildOptions, ModelOptions
from edgefleet.server.catalogue.upload import pack_model
from edgefleet.server.catalogue.views import ClassLatencyView, JobView, VariantView

from .errors import CliError
from .fleet import _connection, _dump, table

ENDED = frozenset({"succeeded", "failed", "cancelled"})


def _preprocessing_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("preprocessing (as `edgefleet optimize`; default: inferred)")
    g.add_argument("--size", help="input HxW, or N for NxN")
    g.add_argument("--color", choices=["GRAY", "RGB", "BGR"], help="channel order")
    g.add_argument("--layout", choices=["NCHW", "NHWC"], help="input tensor layout")
    g.add_argument("--mean", help="per-channel, comma-separated, after scaling")
    g.add_argument("--std", help="per-channel, comma-separated")
    g.add_argument("--scale", type=float, help="pixel multiplier (optimizer default: 1/255)")
    g.add_argument(
        "--resize", choices=["stretch", "letterbox", "center_crop"],
        help="how a frame of another shape is fitted to the input",
    )
    g.add_argument(
        "--interpolation", choices=["nearest", "linear", "area", "cubic"],
        help="resampling used when resizing",
    )


def _build_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("optimizer options (default: the model's, else the optimizer's)")
    g.add_argument("--max-drop", type=float, help="accepted accuracy drop (0.01 = 1 pt)")
    g.add_argument(
        "--quantization", choices=["static", "dynamic", "fp16", "none"],
        help="static: INT8 weights and activations, calibrated on the data",
    )
    g.add_argument(
        "--calibration", choices=["minmax", "entropy", "percentile"],
        help="how static quantization picks activation ranges",
    )
    g.add_argument(
        "--head-precision", choices=["float", "int8"],
        help="float: pooling and a small final linear layer stay fp32",
    )
    g.add_argument("--exits", help="auto, none, or comma-separated tensor names")
    g.add_argument("--prune", type=float, help="fraction of conv channels to prune")
    g.add_argument("--low-rank", type=float, help="SVD energy to keep, e.g. 0.95")
    g.add_argument("--share", type=int, help="k-means clusters per weight channel")
    g.add_argument("--threads", type=int, help="threads for the latency figures")


def register(sub: Any) -> None:
    """Add `models add|build|ls|show|jobs|job|cancel|import|retire`."""
    p = sub.add_parser(
        "models",
        help="the coordinator's model catalogue: source models, builds, variants",
        parents=[_connection(defaults=True)],
        description="Source models kept by the coordinator, optimized variants it builds "
        "from them as background jobs, and how fast each runs on the fleet.",
    )
    ms = p.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    shared = [_connection(defaults=False)]

    a = ms.add_parser("add", help="store a source model and its labelled data", parents=shared)
    a.add_argument("source", type=Path, help="fp32 ONNX image classifier")
    a.add_argument(
        "--data", type=Path, required=True,
        help="folder split/label/image (or label/image) or .npz of <split>_images/_labels",
    )
    a.add_argument("--name", help="catalogue name (default: the model file's name)")
    a.add_argument(
        "--model-id", help="manifest model id of its variants (default: the catalogue name)"
    )
    _preprocessing_flags(a)
    a.add_argument("--json", action="store_true", help="machine-readable output")
    a.set_defaults(func=_add)

    b = ms.add_parser(
        "build", help="optimize a model into a new variant (a background job)", parents=shared
    )
    b.add_argument("model", help="catalogue name")
    _build_flags(b)
    _preprocessing_flags(b)
    b.add_argument("--watch", action="store_true", help="follow the job until it ends")
    b.add_argument("--json", action="store_true", help="machine-readable output")
    b.set_defaults(func=_build)

    ls = ms.add_parser("ls", help="one line per model", parents=shared)
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.set_defaults(func=_ls)

    sh = ms.add_parser("show", help="a model's variants and builds", parents=shared)
    sh.add_argument("model", help="catalogue name")
    sh.add_argument("--json", action="store_true", help="machine-readable output")
    sh.set_defaults(func=_show)

    js = ms.add_parser("jobs", help="build jobs, newest first", parents=shared)
    js.add_argument("--model", help="only this model's")
    js.add_argument(
        "--state", choices=["queued", "running", "succeeded", "failed", "cancelled"],
        help="only jobs in this state",
    )
    js.add_argument("--limit", type=int, default=20, help="at most this many")
    js.add_argument("--json", action="store_true", help="machine-readable output")
    js.set_defaults(func=_jobs)

    j = ms.add_parser("job", help="one build job: state, progress, log tail", parents=shared)
    j.add_argument("job", help="job id")
    j.add_argument("--log-lines", type=int, default=20, help="log lines shown")
    j.add_argument("--watch", action="store_true", help="follow it until it ends")
    j.add_argument("--json", action="store_true", help="machine-readable output")
    j.set_defaults(func=_job)

    c = ms.add_parser("cancel", help="cancel a queued or running build", parents=shared)
    c.add_argument("job", help="job id")
    c.set_defaults(func=_cancel)

    im = ms.add_parser(
        "import",
        help="register a signed bundle (directory or archive) as a variant of a model",
        parents=shared,
        description="For a bundle a fleet already runs: the coordinator verifies and keeps it, "
        "and the catalogue lists it with the figures its manifest carries.",
    )
    im.add_argument("bundle", type=Path, help="signed bundle directory or .tar.gz archive")
    im.add_argument("--model", required=True, help="catalogue name of its source model")
    im.add_argument("--json", action="store_true", help="machine-readable output")
    im.set_defaults(func=_import)

    r = ms.add_parser(
        "retire", help="take a variant out of the closed loop's choices", parents=shared
    )
    r.add_argument("variant", help="variant id, e.g. mnist-v3")
    r.add_argument("--undo", action="store_true", help="put it back")
    r.set_defaults(func=_retire)


def _client(args: argparse.Namespace, timeout: float = 30) -> CatalogueClient:
    return CatalogueClient(args.url, args.token, timeout=timeout)


# The coordinator checks an upload before it answers (the data is read through once).
UPLOAD_TIMEOUT_S = 900.0


def _floats(text: str | None, flag: str) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise CliError(f"--{flag} {text!r}: expected comma-separated numbers") from None


def _chosen(args: argparse.Namespace, names: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in names:
        value = getattr(args, name, None)
        if value is not None:
            out[name] = value
    return out


_PRE = ["size", "color", "layout", "scale", "resize", "interpolation"]
_BUILD = [
    "max_drop", "quantization", "calibration", "head_precision", "prune", "low_rank", "share",
    "threads",
]


def _options(args: argparse.Namespace, names: list[str]) -> dict[str, Any]:
    chosen = _chosen(args, names + _PRE)
    for flag in ("mean", "std"):
        values = _floats(getattr(args, flag, None), flag)
        if values is not None:
            chosen[flag] = values
    exits = getattr(args, "exits", None)
    if exits is not None:
        chosen["exits"] = exits if exits in ("auto", "none") else exits.split(",")
    return chosen


def _checked(model: type[BuildOptions], raw: dict[str, Any]) -> BuildOptions:
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = "--" + ".".join(str(p) for p in first["loc"]).replace("_", "-")
        raise CliError(f"{where}: {first['msg']}") from None


def _add(args: argparse.Namespace) -> int:
    if not args.source.is_file():
        raise CliError(f"{args.source}: no such file")
    if not args.data.exists():
        raise CliError(f"{args.data}: no such file or folder")
    raw = _options(args, [])
    if args.model_id:
        raw["model_id"] = args.model_id
    options = _checked(ModelOptions, raw)
    assert isinstance(options, ModelOptions)
    name = args.name or _default_name(args.source)
    upload = pack_model(args.source, args.data, options)
    view = _client(args, UPLOAD_TIMEOUT_S).add_model(name, upload)
    if args.json:
        _dump(view)
        return 0
    print(
        f"added model {view.name} (model id {view.model_id}): source {_bytes(view.source_bytes)}, "
        f"data {_bytes(view.data_bytes)}"
    )
    return 0


def _default_name(path: Path) -> str:
    stem = "".join(c if c.isalnum() or c in "_.-" else "-" for c in path.stem).strip("-._")
    return (stem or "model")[:64]


def _build(args: argparse.Namespace) -> int:
    options = _checked(BuildOptions, _options(args, _BUILD))
    client = _client(args)
    job = client.build(args.model, options.chosen())
    if not args.json:
        print(f"build job {job.job_id} queued for model {job.model}: {_text(job.options)}")
    if args.watch:
        job = watch(client, job.job_id)
    if args.json:
        _dump(job)
    if not args.watch:
        return 0
    return 0 if job.state == "succeeded" else 1


def _text(options: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in sorted(options.items())) or "optimizer defaults"


def _print(text: str) -> None:
    print(text, flush=True)


def ending(job: JobView) -> str:
    """The line that closes a job's story."""
    if job.state == "succeeded":
        return f"job {job.job_id} succeeded: variant {job.variant_id}"
    return f"job {job.job_id} {job.state}" + (f": {job.reason}" if job.reason else "")


def watch(
    client: CatalogueClient,
    job_id: str,
    poll_s: float = 1.0,
    say: Callable[[str], None] = _print,
    timeout_s: float | None = None,
) -> JobView:
    """Say each new state and progress line of a job until it has ended."""
    last = ""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        job = client.job(job_id, log_lines=0)
        if job.state in ENDED:
            say(ending(job))
            return job
        text = job.progress if job.state == "running" and job.step else job.state
        if text != last:
            say(text)
            last = text
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} not finished after {timeout_s:g} s: {text}")
        time.sleep(poll_s)


def _ls(args: argparse.Namespace) -> int:
    views = _client(args).models()
    if args.json:
        _dump(views)
        return 0
    if not views:
        print("no models in the catalogue")
        return 0
    rows = [["MODEL", "MODEL ID", "VARIANTS", "BUILDING", "SOURCE", "DATA", "OPTIONS"]]
    for v in views:
        rows.append(
            [
                v.name,
                v.model_id,
                str(v.variants),
                v.open_job or "-",
                _bytes(v.source_bytes),
                _bytes(v.data_bytes),
                _text({k: o for k, o in v.options.items() if k != "model_id"}),
            ]
        )
    print(table(rows))
    return 0


def _bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{n} B"  # pragma: no cover


def _acc(value: float | None) -> str:
    return "-" if value is None else f"{value:.2%}"


def _best(v: VariantView) -> str:
    """The point with the best validation accuracy (the fastest among equals)."""
    scored = [(p.val_accuracy, i, p) for i, p in enumerate(v.points) if p.val_accuracy is not None]
    if not scored:
        return "-"
    acc, _i, p = max(scored, key=lambda s: (s[0], s[1]))
    return f"{_acc(acc)} ({p.name})"


def estimate(v: VariantView) -> str:
    """The optimizer's latency: the default point and every exit off, on its machine."""
    est = v.estimate
    lat = est.get("latency_ms") or {}
    where = est.get("measured_on") or "build machine"
    default = lat.get("staged_default")
    no_exit = lat.get("staged_no_exit")
    parts = []
    if isinstance(default, int | float):
        parts.append(f"{default:.3g} ms")
    if isinstance(no_exit, int | float):
        parts.append(f"{no_exit:.3g} ms no-exit")
    if parts:
        return f"{' / '.join(parts)} on {where}"
    by_class = est.get("by_class") or {}
    return ", ".join(f"{ms:.3g} ms no-exit on {cls}" for cls, ms in sorted(by_class.items())) or "-"


def fleet_p95(v: VariantView) -> str:
    """p95 by device class as the fleet measured it: at the default point where measured,
    else the point with most windows (named)."""
    by_class: dict[str, list[ClassLatencyView]] = {}
    for row in v.fleet:
        by_class.setdefault(row.device_class, []).append(row)
    parts = []
    for cls, rows in sorted(by_class.items()):
        at_default = [r for r in rows if r.operating_point == v.default_point]
        row = at_default[0] if at_default else max(rows, key=lambda r: r.windows)
        where = "" if at_default else f" @p{row.operating_point}"
        pred = row.predicted_p95_ms  # the closed loop's, before any device of cls ran it
        if not row.windows:
            parts.append(f"{cls} predicted {pred or row.p95_ms:.3g} ms{where}")
        elif pred:
            err = row.p95_ms / pred - 1
            parts.append(f"{cls} {row.p95_ms:.3g} ms{where} (predicted {pred:.3g}, {err:+.0%})")
        else:
            parts.append(f"{cls} {row.p95_ms:.3g} ms{where}")
    return ", ".join(parts) or "-"


def _show(args: argparse.Namespace) -> int:
    detail = _client(args).model(args.model)
    if args.json:
        _dump(detail)
        return 0
    m = detail.model
    print(
        f"model {m.name} (model id {m.model_id}): source {_bytes(m.source_bytes)} "
        f"{m.source_sha256[:12]}, data {_bytes(m.data_bytes)}"
        + (f", building: {m.open_job}" if m.open_job else "")
    )
    opts = {k: o for k, o in m.options.items() if k != "model_id"}
    if opts:
        print(f"  build defaults: {_text(opts)}")
    if not detail.variants:
        print("no variants yet: edgefleet models build " + m.name)
    else:
        rows = [
            [
                "VARIANT", "POINT", "VAL ACC", "TEST ACC", "BEST VAL", "SIZE", "MACS",
                "OPTIMIZER EST", "FLEET P95 BY CLASS",
            ]
        ]
        for v in detail.variants:
            point = v.points[v.default_point] if v.default_point < len(v.points) else None
            rows.append(
                [
                    v.variant_id + (" (retired)" if v.retired_at else ""),
                    point.name if point else "-",
                    _acc(point.val_accuracy if point else None),
                    _acc(point.test_accuracy if point else None),
                    _best(v),
                    _bytes(v.size_bytes),
                    f"{v.macs / 1e6:.1f}M",
                    estimate(v),
                    fleet_p95(v),
                ]
            )
        print(table(rows))
        print("POINT: the default operating point; VAL/TEST ACC at it; BEST VAL: the most "
              "accurate point")
    if detail.jobs:
        print("builds:")
        for j in detail.jobs[:5]:
            print(f"  {_job_line(j)}")
    return 0


def _job_line(j: JobView) -> str:
    if j.state == "succeeded":
        tail = f"variant {j.variant_id}"
    elif j.state == "running":
        tail = j.progress or "starting"
    else:
        tail = j.reason or ""
    return f"{j.job_id} {j.state} ({j.origin}): {tail}".rstrip(": ")


def _jobs(args: argparse.Namespace) -> int:
    views = _client(args).jobs(args.model, args.state, args.limit)
    if args.json:
        _dump(views)
        return 0
    if not views:
        print("no build jobs")
        return 0
    rows = [["JOB", "MODEL", "ORIGIN", "STATE", "STEP", "RESULT"]]
    for j in views:
        step = f"{j.step}/{j.steps}" if j.steps else "-"
        result = j.variant_id or j.reason or (j.progress if j.state == "running" else "")
        rows.append([j.job_id, j.model, j.origin, j.state, step, (result or "-")[:90]])
    print(table(rows))
    return 0


def _job(args: argparse.Namespace) -> int:
    client = _client(args)
    if args.watch:
        watch(client, args.job)
    job = client.job(args.job, log_lines=args.log_lines)
    if args.json:
        _dump(job)
        return 0
    print(_job_line(job))
    if job.steps:
        print(f"  step {job.step}/{job.steps}: {job.progress}")
    print(f"  options: {_text(job.options)}")
    for line in job.log_tail or []:
        print(f"  | {line}")
    return 0 if not args.watch or job.state == "succeeded" else 1


def _cancel(args: argparse.Namespace) -> int:
    print(ending(_client(args).cancel_job(args.job)))
    return 0


def _import(args: argparse.Namespace) -> int:
    client = _client(args, UPLOAD_TIMEOUT_S)
    if args.bundle.is_dir():
        with tempfile.TemporaryDirectory() as tmp:
            archive = pack(args.bundle, Path(tmp) / "bundle.tar.gz")
            raw = archive.read_bytes()
    elif args.bundle.is_file():
        raw = args.bundle.read_bytes()
    else:
        raise CliError(f"{args.bundle}: no such bundle directory or archive")
    stored = client.upload_bundle(raw)
    view = client.register_variant(args.model, stored.sha256)
    if args.json:
        _dump(view)
        return 0
    print(
        f"registered {view.model_id} v{view.version} as variant {view.variant_id} of model "
        f"{view.model} (archive {view.bundle_sha256[:12]}, {_bytes(view.size_bytes)})"
    )
    return 0


def _retire(args: argparse.Namespace) -> int:
    view = _client(args).retire_variant(args.variant, retire=not args.undo)
    state = "retired" if view.retired_at else "back among the loop's choices"
    print(f"variant {view.variant_id}: {state}")
    return 0
