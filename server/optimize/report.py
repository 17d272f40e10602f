"""report.json and report.png: the trade-off a person looks at before shipping a bundle."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_json(report: dict[str, Any], path: Path) -> None:
    """Pretty JSON with a trailing newline."""
    path.write_text(json.dumps(report, indent=2, sort_keys=False) + "\n")


def write_plot(report: dict[str, Any], path: Path) -> None:
    """Validation accuracy vs expected MACs of every operating point, plus fp32 and INT8."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    total = float(report["model"]["macs"])
    points = report.get("exits", {}).get("operating_points", [])
    if points:
        xs = [100 * p["expected_macs"] / total for p in points]
        ys = [100 * p["val_accuracy"] for p in points]
        ax.plot(xs, ys, "o-", color="tab:blue", label="INT8 + early exits (operating points)")
        d = report["exits"]["default"]
        ax.plot(xs[d], ys[d], "*", color="tab:red", markersize=16, label="default operating point")
        for p, x, y in zip(points, xs, ys, strict=True):
            ax.annotate(p["name"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ref = 100 * report["budget"]["reference_val_accuracy"]
    ax.axhline(ref, color="gray", lw=1, ls="--", label="fp32 validation accuracy")
    ax.axhline(
        ref - 100 * report["budget"]["max_drop"],
        color="tab:orange",
        lw=1,
        ls=":",
        label="accuracy budget",
    )
    q = report.get("quantization", {})
    if q.get("val_accuracy") is not None:
        ax.plot(
            100, 100 * q["val_accuracy"], "s", color="tab:green", label=f"{q['mode']} full model"
        )
    ax.set_xlabel("expected compute per frame (% of full model MACs)")
    ax.set_ylabel("validation accuracy (%)")
    lat = report.get("latency_ms", {})
    if lat:
        parts = [f"{k} {v:.2f} ms" for k, v in lat.items() if isinstance(v, float)]
        ax.set_title("measured here: " + ", ".join(parts), fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
