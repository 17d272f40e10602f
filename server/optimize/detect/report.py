"""report.png of a detector: mAP and latency, fp32 against INT8, side by side."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def write_detect_plot(report: dict[str, Any], path: Path) -> None:
    """Two panels: mAP@0.5 and mAP@0.5:0.95 per split, and median latency per contender."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 4.2), dpi=110)
    groups = [
        (f"{split}\n{metric}", report[split]["fp32"][key], report[split]["int8"][key])
        for split in ("validation", "test")
        for metric, key in (("mAP@0.5", "map50"), ("mAP@.5:.95", "map50_95"))
    ]
    xs = range(len(groups))
    w = 0.38
    left.bar([x - w / 2 for x in xs], [100 * g[1] for g in groups], w, label="fp32")
    left.bar([x + w / 2 for x in xs], [100 * g[2] for g in groups], w, label="INT8")
    left.set_xticks(list(xs), [g[0] for g in groups], fontsize=7)
    left.set_ylabel("mAP (%)" if report.get("mode") == "labelled" else "mAP vs fp32 boxes (%)")
    budget = report.get("budget", {})
    left.set_title(
        f"{budget.get('metric', 'mAP')}: drop {budget.get('drop_points', 0):.2f} pt "
        f"(budget {budget.get('max_drop_points', 0):g})",
        fontsize=8,
    )
    left.legend(fontsize=7)
    left.grid(alpha=0.3, axis="y")
    lat = report.get("latency_ms", {})
    names = list(lat)
    right.bar(
        names, [lat[k] for k in names], color=["tab:blue", "tab:orange", "tab:green"][: len(names)]
    )
    right.set_ylabel("median ms per frame")
    speedup = report.get("ratios", {}).get("int8_speedup", 0.0)
    right.set_title(f"{report.get('threads', 1)} thread(s): INT8 {speedup:.2f}x", fontsize=8)
    right.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
