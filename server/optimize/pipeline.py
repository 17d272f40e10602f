"""`edgefleet optimize`: fp32 ONNX + labelled images -> signed INT8 early-exit bundle + report.

The order is fixed: prepare, measure fp32, optional compression passes, quantize with
accuracy control, cut and fit exits, calibrate thresholds, write and verify the bundle, then
evaluate on the test split (which no step above ever sees) and measure latency.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx

from edgefleet.agent.bundle import Preprocessing, verify_bundle
from edgefleet.agent.bundle.manifest import Manifest, Metrics
from edgefleet.agent.runtime.preprocess import Preprocessor
from edgefleet.agent.runtime.staged import StagedModel
from edgefleet.server.keystore import FleetKey

from .accuracy_control import Certify, quantize_within_budget
from .assemble import assemble_bundle, point_names
from .compress import run_passes
from .data import LabelledData, check_channels, load_labelled
from .errors import BudgetError, ModelError, OutputExistsError
from .exits import ExitPlan, choose_cuts, collect_features, plan_exits
from .figures import check_manifest_figures
from .guard import check_collapse, compare_outputs, input_stats
from .latency import compare
from .macs import total_macs
from .node_timing import speed_fallback
from .options import OptimizeOptions, use_reduce_range
from .prepare import prepare_model
from .quantize import float_head_nodes, quantize_dynamic_matmul, to_fp16
from .report import write_json, write_plot
from .risk import drop_bound, min_samples
from .runner import accuracy, logits_of, make_session
from .split import StageGraph, split_stages

Progress = Callable[[str], None]
F32 = npt.NDArray[np.float32]


def _load_model(path: Path) -> onnx.ModelProto:
    try:
        return onnx.load(path)
    except FileNotFoundError:
        raise ModelError(f"{path}: no such file") from None
    except Exception as exc:  # protobuf's DecodeError and friends
        raise ModelError(f"{path}: not an ONNX model ({exc})") from exc


def _preprocess(data: LabelledData, spec: Preprocessing) -> dict[str, F32]:
    pre = Preprocessor(spec)
    out: dict[str, F32] = {}
    for split, frames in data.images.items():
        try:
            out[split] = np.asarray(pre.batch(frames), dtype=np.float32)
        except ValueError as exc:
            raise ModelError(f"split {split!r}: {exc}") from exc
    return out


def _quantize(
    model: onnx.ModelProto,
    input_name: str,
    x: dict[str, F32],
    y: dict[str, npt.NDArray[np.int64]],
    opts: OptimizeOptions,
    ref_acc: float,
    ref_correct: npt.NDArray[np.bool_],
    ref_logits: F32,
    progress: Progress,
) -> tuple[onnx.ModelProto, dict[str, Any], onnx.ModelProto | None]:
    """The quantized model, its report, and the model to fall back on (speed control's only)."""
    mode = opts.quantization
    info: dict[str, Any] = {"mode": mode}
    if mode == "none":
        info["val_accuracy"] = ref_acc
        return model, info, None
    if mode == "fp16":
        q = to_fp16(model)
    elif mode == "dynamic":
        q = quantize_dynamic_matmul(model)
    else:
        rr = use_reduce_range(opts.reduce_range)
        head = float_head_nodes(model) if opts.head_precision == "float" else []
        info.update(
            float_head=head,
            method=opts.calibration,
            reduce_range=rr,
            per_channel=True,
            calibration_images=int(x["calibration"].shape[0]),
        )
        # Quantization may use half the budget; exits get what is left (documented).
        outcome = quantize_within_budget(
            model,
            input_name,
            x["calibration"],
            x["validation"],
            y["validation"],
            reference_accuracy=ref_acc,
            max_drop=opts.max_drop / 2,
            method=opts.calibration,
            reduce_range=rr,
            keep_float=head,
            certify=(
                None
                if opts.confidence is None
                else Certify(ref_correct, opts.confidence, opts.max_drop)
            ),
            reference_logits=ref_logits,
            progress=progress,
        )
        info.update(
            val_accuracy=outcome.accuracy,
            excluded=outcome.excluded,
            sensitivity=outcome.sensitivity,
            drop_bound=outcome.bound or None,
            output_agreement=outcome.agreement,
        )
        if opts.speed_control == "off":
            return outcome.model, info, None
        progress(f"      speed control: per-node fp32 vs INT8 time, {opts.threads} thread(s)")
        faster, speed = speed_fallback(
            model,
            input_name,
            x["calibration"],
            [*head, *outcome.excluded],
            samples=x["validation"][:16],
            threads=opts.threads,
            method=opts.calibration,
            reduce_range=rr,
            progress=lambda m: progress("      " + m),
        )
        info["speed"] = speed
        if not speed["speed_excluded"]:
            return outcome.model, info, None
        # Nodes back in fp32 can only help accuracy, but the bits differ: measure again, and
        # keep the faster model only where the budget still holds as accuracy control required.
        logits = logits_of(faster, x["validation"])
        acc = accuracy(logits, y["validation"])
        holds = ref_acc - acc <= opts.max_drop / 2
        if holds and opts.confidence is not None:
            bound = drop_bound(ref_correct, logits.argmax(-1) == y["validation"], opts.confidence)
            holds = bound.within(opts.max_drop)
            info["drop_bound"] = bound.to_report()
        if not holds:
            progress("      speed control's model misses the budget: keeping accuracy control's")
            info["speed"]["kept"] = False
            return outcome.model, info, None
        # What to restore should the faster model fail the split check later.
        info["speed"].update(
            kept=True,
            accuracy_control={
                "val_accuracy": outcome.accuracy,
                "drop_bound": outcome.bound or None,
                "excluded": outcome.excluded,
            },
        )
        info.update(val_accuracy=acc, excluded=speed["excluded"])
        return faster, info, outcome.model
    logits = logits_of(q, x["validation"])
    agreement = compare_outputs([ref_logits], [logits], classifier=True)
    info["output_agreement"] = agreement.to_report()
    check_collapse(
        agreement,
        calib_stats=input_stats(x["calibration"]),
        val_stats=input_stats(x["validation"]),
    )
    info["val_accuracy"] = accuracy(logits, y["validation"])
    if ref_acc - info["val_accuracy"] > opts.max_drop / 2:
        raise BudgetError(
            f"{mode} conversion drops validation accuracy from {ref_acc:.4f} to "
            f"{info['val_accuracy']:.4f}, more than half the budget ({opts.max_drop / 2:.4f})"
        )
    if opts.confidence is not None:
        bound = drop_bound(ref_correct, logits.argmax(-1) == y["validation"], opts.confidence)
        info["drop_bound"] = bound.to_report()
        if not bound.within(opts.max_drop):
            raise BudgetError(
                f"{mode} conversion: validation drop {100 * bound.drop:.2f} pt, upper bound "
                f"{100 * bound.upper:.2f} pt at {opts.confidence:.0%} confidence on "
                f"{bound.n} images, over the budget of {100 * opts.max_drop:.2f} pt"
            )
    return q, info, None


def _check_certifiable(n: int, opts: OptimizeOptions) -> None:
    """Refuse early when the validation split is too small to certify the budget at all."""
    if opts.confidence is None or (opts.quantization == "none" and opts.exits == "none"):
        return  # nothing changes the fp32 model's answers: the drop is exactly zero
    need = min_samples(opts.max_drop, opts.confidence)
    if n < need:
        raise BudgetError(
            f"validation split has {n} images: certifying a drop of at most "
            f"{100 * opts.max_drop:.2f} pt at {opts.confidence:.0%} confidence needs at least "
            f"{need} even if none is lost; give more validation images, a larger --max-drop, "
            "a lower --confidence, or --confidence none (measured drop only)"
        )


def _check_split_identical(
    stages: list[onnx.ModelProto], names: list[list[str]], whole: onnx.ModelProto, x: F32
) -> bool:
    """The staged run must reproduce the unsplit model's logits bit for bit."""
    full = logits_of(whole, x)
    sessions = [make_session(s) for s in stages]
    outs = []
    for i in range(x.shape[0]):
        feeds: dict[str, Any] = {sessions[0].get_inputs()[0].name: x[i : i + 1]}
        for sess, passed in zip(sessions, names, strict=True):
            res = sess.run(None, feeds)
            feeds = dict(zip(passed, res[: len(passed)], strict=True))
        outs.append(np.asarray(res[-1], dtype=np.float32).reshape(1, -1))
    return bool(np.array_equal(np.concatenate(outs), full))


def optimize(
    model_path: Path,
    data_path: Path,
    out_dir: Path,
    spec: Preprocessing,
    key: FleetKey,
    opts: OptimizeOptions,
    progress: Progress = print,
) -> dict[str, Any]:
    """Run the whole optimizer; returns the report also written to out_dir/report.json."""
    if out_dir.exists():
        raise OutputExistsError(f"{out_dir}: output directory exists; choose a new one")
    t_start = time.monotonic()
    source_bytes = model_path.read_bytes() if model_path.is_file() else b""
    original = _load_model(model_path)
    progress(f"[1/7] preparing {model_path.name}")
    prepared = prepare_model(
        original,
        str(model_path),
        channels=spec.channels,
        height=spec.height,
        width=spec.width,
        layout=spec.layout,
    )
    for step in prepared.steps:
        progress(f"      {step}")
    data = load_labelled(data_path, opts.labels)
    check_channels(data, spec, opts.color_given)
    if len(data.names) != prepared.classes:
        raise ModelError(
            f"{model_path}: outputs {prepared.classes} classes but the data has "
            f"{len(data.names)} labels {data.names[:10]}"
        )
    progress("      data: " + ", ".join(f"{k} {n}" for k, n in data.sizes().items()))
    x = _preprocess(data, spec)
    y = data.labels
    fp32 = prepared.model
    _check_certifiable(len(y["validation"]), opts)
    # The fp32 model's right and wrong answers, per sample: every drop is measured in pairs
    # against them (risk.py), on calibration (to order candidates) and validation (to test).
    ref_logits = {split: logits_of(fp32, x[split]) for split in ("calibration", "validation")}
    ref_correct = {split: ref_logits[split].argmax(-1) == y[split] for split in ref_logits}
    ref_acc = float(ref_correct["validation"].mean())
    progress(f"[2/7] fp32 validation accuracy {ref_acc:.4f}, {total_macs(fp32) / 1e6:.1f} M MACs")

    progress("[3/7] compression passes")
    fp32, passes = run_passes(fp32, x, y, opts, ref_acc, progress)
    unchanged = fp32 is prepared.model

    progress(f"[4/7] quantization: {opts.quantization}")
    qmodel, qinfo, fallback = _quantize(
        fp32,
        prepared.input_name,
        x,
        y,
        opts,
        ref_acc,
        ref_correct["validation"],
        ref_logits["validation"],
        progress,
    )
    progress(f"      validation accuracy {qinfo['val_accuracy']:.4f}")

    progress("[5/7] early exits")

    def exits_and_stages(q: onnx.ModelProto) -> tuple[ExitPlan | None, list[StageGraph], bool]:
        plan: ExitPlan | None = None
        cuts = []
        if opts.exits != "none":
            names = None if opts.exits == "auto" else list(opts.exits)
            cuts = choose_cuts(q, fractions=opts.exit_fractions, names=names)
        if cuts:
            feats = collect_features(q, cuts, x, grid=opts.exit_grid, threads=opts.threads)
            plan = plan_exits(
                q,
                cuts,
                feats,
                y,
                classes=prepared.classes,
                reference_accuracy=ref_acc,
                max_drop=opts.max_drop,
                rule=opts.exit_rule,
                reference_correct=ref_correct,
                confidence=opts.confidence,
                first_is_reference=unchanged and opts.quantization == "none",
                progress=progress,
            )
            op = plan.points[plan.default]
            progress(
                f"      default operating point {plan.default}: validation accuracy "
                f"{op.accuracy:.4f}, {op.mean_cost / plan.costs[-1]:.0%} of MACs, "
                f"exits {op.exit_rates}"
            )
            if not plan.within_budget:
                raise BudgetError(
                    f"no operating point keeps validation accuracy within {opts.max_drop:.4f} "
                    f"of fp32 {ref_acc:.4f}; best is {max(p.accuracy for p in plan.points):.4f}"
                    + _bound_text(plan.certification)
                )
        else:
            progress("      none (disabled or no valid cut point)")
        try:
            stages = split_stages(
                q, [c.tensor for c in cuts], opts.exit_grid, layout=opts.stage_layout
            )
            identical = _check_split_identical(
                [s.model for s in stages], [s.outputs for s in stages], q, x["validation"][:64]
            )
        except Exception as exc:
            if fallback is None or q is fallback:
                raise
            # A graph that is partly fp32 for speed can defeat the cut analysis (a stage that
            # reads a tensor of an earlier one): that model is dropped, never shipped.
            progress(f"      speed control's model cannot be split ({type(exc).__name__}: {exc})")
            return plan, [], False
        return plan, stages, identical

    plan, stages, identical = exits_and_stages(qmodel)
    if not identical and fallback is not None:
        # Nodes kept fp32 for speed can leave a Q/DQ pair at a cut that onnxruntime fuses away
        # in the whole model but not across two stage sessions: the split would not reproduce
        # it. Speed is never worth that; accuracy control's model splits as it always did.
        progress("      speed control's model does not split bit-identically: dropping it")
        qmodel, qinfo["speed"]["kept"] = fallback, False
        qinfo.update(qinfo["speed"]["accuracy_control"])
        plan, stages, identical = exits_and_stages(qmodel)
    if not identical:
        raise ModelError("staged execution does not reproduce the unsplit model; refusing to ship")

    progress("[6/7] writing and verifying the signed bundle")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        model_id = opts.model_id or _model_id(model_path)

        def assemble(where: Path, metrics: Metrics) -> Manifest:
            return assemble_bundle(
                where,
                stages=stages,
                plan=plan,
                spec=spec,
                labels=data.names,
                input_name=prepared.input_name,
                input_shape=prepared.input_shape,
                model_id=model_id,
                version=opts.version,
                source_sha256=hashlib.sha256(source_bytes).hexdigest(),
                source_name=model_path.name,
                opts=opts,
                calibration=_calibration_text(data, qinfo),
                key=key,
                golden_inputs=x["validation"][:8],
                metrics=metrics,
            )

        # Built twice: the test figures come from running the signed bundle through the
        # agent's runtime, and then go into the manifest's metrics of the bundle that ships.
        assemble(tmp / "draft", Metrics())
        draft = verify_bundle(tmp / "draft", [key.public])
        check_manifest_figures(draft, x["validation"], y["validation"])
        report = _evaluate(draft, fp32, qmodel, x, y, opts, progress)
        shutil.rmtree(tmp / "draft")
        manifest = assemble(tmp / "bundle", _metrics(report))
        verify_bundle(tmp / "bundle", [key.public])  # what ships verifies as it is
        report.update(
            model={
                "path": str(model_path),
                "sha256": manifest.provenance.source_model_sha256,
                "classes": prepared.classes,
                "input_shape": prepared.input_shape,
                "macs": total_macs(fp32),
                "prepared": prepared.steps,
            },
            data={"source": str(data_path), "sizes": data.sizes(), **data.provenance},
            budget={
                "max_drop": opts.max_drop,
                "reference_val_accuracy": ref_acc,
                "confidence": opts.confidence,
                "quantization_bound": qinfo.get("drop_bound"),
                "default_bound": (
                    plan.certification["default"]
                    if plan is not None and plan.certification
                    else qinfo.get("drop_bound")
                ),
            },
            passes=passes,
            quantization=qinfo,
            exits=_exits_report(plan, total_macs(fp32)),
            bundle={
                "path": str(out_dir / "bundle"),
                "model_id": model_id,
                "version": opts.version,
                "key_id": key.id,
                "split_identical": identical,
            },
            seconds=round(time.monotonic() - t_start, 1),
        )
        # The unsplit models, for inspection and side-by-side benchmarks (not shipped).
        (tmp / "models").mkdir()
        onnx.save(fp32, tmp / "models" / "fp32.onnx")
        onnx.save(qmodel, tmp / "models" / f"{opts.quantization}.onnx")
        write_json(report, tmp / "report.json")
        write_plot(report, tmp / "report.png")
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    progress(f"done in {report['seconds']} s: {out_dir}/bundle, report.json, report.png")
    return report


def _bound_text(certification: dict[str, Any] | None) -> str:
    if not certification:
        return ""
    b = certification["default"]
    return (
        f" (with every exit off, drop {100 * b['drop']:.2f} pt has an upper bound of "
        f"{100 * b['drop_upper']:.2f} pt at {certification['confidence']:.0%} confidence "
        f"on {b['n']} validation images)"
    )


def _model_id(path: Path) -> str:
    stem = "".join(c if c.isalnum() or c in "_.-" else "-" for c in path.stem).strip("-._")
    return (stem or "model")[:64]


def _calibration_text(data: LabelledData, qinfo: dict[str, Any]) -> str:
    n = qinfo.get("calibration_images")
    src = data.provenance.get("source", "?")
    return f"{n} images of the calibration split of {src}" if n else f"none ({qinfo['mode']})"


def _exits_report(plan: ExitPlan | None, total: int) -> dict[str, Any]:
    if plan is None:
        return {"cuts": [], "operating_points": [], "default": 0}
    return {
        "cuts": [
            {"tensor": c.tensor, "source": c.source, "macs_fraction": c.macs / total}
            for c in plan.cuts
        ],
        "rule": plan.rule,
        "head_l2": plan.head_l2,
        "val_exit_accuracy": plan.val_exit_accuracy,
        "certification": plan.certification,
        "operating_points": [
            p.to_operating_point(name).model_dump()
            for p, name in zip(plan.points, point_names(len(plan.points)), strict=True)
        ],
        "default": plan.default,
    }


def _metrics(report: dict[str, Any]) -> Metrics:
    """The manifest's metrics: the test split through the agent runtime, this host's latency."""
    test = report["test"]
    return Metrics(
        accuracy=test["accuracy"],
        accuracy_per_exit=test["accuracy_per_exit"],
        exit_rates=test["exit_rates"],
        latency_ms={k: float(v) for k, v in report["latency_ms"].items()},
        extra={
            "test_fp32_accuracy": test["fp32_accuracy"],
            "test_quantized_accuracy": test["quantized_accuracy"],
            "test_mean_macs_fraction": test["mean_macs_fraction"],
            "test_images": float(test["images"]),
            "threads": float(report["threads"]),
        },
    )


def _evaluate(
    verified: Any,
    fp32: onnx.ModelProto,
    qmodel: onnx.ModelProto,
    x: dict[str, F32],
    y: dict[str, npt.NDArray[np.int64]],
    opts: OptimizeOptions,
    progress: Progress,
) -> dict[str, Any]:
    """Test-split accuracy through the agent's own runtime, then latency side by side."""
    progress("[7/7] test split through the agent runtime, latency on this machine")
    staged = StagedModel(verified, threads=opts.threads)
    preds = [staged.predict(x["test"][i : i + 1]) for i in range(x["test"].shape[0])]
    exits = np.array([p.exit_index for p in preds])
    classes = np.array([p.class_index for p in preds])
    correct = classes == y["test"]
    n_exits = len(staged.early_exits) + 1
    macs = [s.macs or 0 for s in verified.manifest.stages]
    cum = np.cumsum(macs)
    early = staged.early_exits
    exit_cost = [float(cum[k]) for k in early] + [float(cum[-1])]
    fp32_acc = accuracy(logits_of(fp32, x["test"]), y["test"])
    q_acc = accuracy(logits_of(qmodel, x["test"]), y["test"])
    rates = [float((exits == e).mean()) for e in range(n_exits)]
    test: dict[str, Any] = {
        "fp32_accuracy": fp32_acc,
        "quantized_accuracy": q_acc,
        "accuracy": float(correct.mean()),
        "accuracy_per_exit": [
            float(correct[exits == e].mean()) if (exits == e).any() else None
            for e in range(n_exits)
        ],
        "exit_rates": rates,
        "mean_macs_fraction": float(np.mean([exit_cost[e] for e in exits]) / exit_cost[-1]),
        "images": len(exits),
    }
    progress(
        f"      test accuracy fp32 {fp32_acc:.4f}, {opts.quantization} {q_acc:.4f}, "
        f"with exits {test['accuracy']:.4f} (exit rates {[round(r, 3) for r in rates]})"
    )
    samples = [x["test"][i : i + 1] for i in range(min(opts.latency_samples, x["test"].shape[0]))]
    sf, sq = make_session(fp32, opts.threads), make_session(qmodel, opts.threads)
    nf, nq = sf.get_inputs()[0].name, sq.get_inputs()[0].name
    no_exit = StagedModel(verified, threads=opts.threads)
    if no_exit.early_exits:
        no_exit.set_thresholds([None] * len(no_exit.early_exits))
    lat = compare(
        {
            "fp32": lambda s: sf.run(None, {nf: s}),
            "quantized": lambda s: sq.run(None, {nq: s}),
            "staged_no_exit": no_exit.predict,
            "staged_default": staged.predict,
        },
        samples,
    )
    progress("      latency ms: " + ", ".join(f"{k} {v:.3f}" for k, v in lat.items()))
    return {
        "test": test,
        "latency_ms": lat,
        "threads": opts.threads,
        "ratios": {
            "quantized_speedup": lat["fp32"] / lat["quantized"],
            "exits_speedup": lat["fp32"] / lat["staged_default"],
            "split_overhead": lat["staged_no_exit"] / lat["quantized"] - 1.0,
        },
        "sizes": {
            "fp32_bytes": len(fp32.SerializeToString()),
            "quantized_bytes": len(qmodel.SerializeToString()),
            "bundle_bytes": sum(f.size for f in verified.manifest.files.values()),
        },
    }
