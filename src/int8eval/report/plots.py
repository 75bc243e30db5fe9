"""The report's figures as PNG bytes, drawn with matplotlib's Agg backend from report.json's contents only."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")  # no display: must be set before pyplot is imported

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from int8eval.report.schema import Report  # noqa: E402

VERDICT_COLOURS = {"pass": "#2e7d32", "fail": "#c62828", "inconclusive": "#ef6c00", None: "#546e7a"}
REFERENCE_COLOUR = "#1565c0"


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def speed_axis(report: Report) -> tuple[str, str]:
    """Which x axis the accuracy plot uses: ("throughput_ips", label) when a benchmark ran, else size."""
    if any(v.bench and v.bench.get("throughput_ips") for v in report.variants):
        return "throughput_ips", "throughput, images/s (higher is better)"
    return "size_mb", "artifact size, MB (no speed measured in this run)"


def _x_value(v, key: str) -> float | None:
    if key == "throughput_ips":
        return (v.bench or {}).get("throughput_ips")
    return v.size_mb


def accuracy_vs_speed(report: Report) -> bytes | None:
    """Top-1 (with its 95% CI) of each measured variant against its throughput, or its size when none was timed."""
    key, label = speed_axis(report)
    points = [(v, _x_value(v, key)) for v in report.variants if v.top1 is not None]
    points = [(v, x) for v, x in points if x is not None]
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.8))
    for v, x in points:
        verdict = (v.verdict or {}).get("verdict")
        colour = REFERENCE_COLOUR if v.reference else VERDICT_COLOURS.get(verdict, VERDICT_COLOURS[None])
        lo, hi = v.top1_ci95 or (v.top1, v.top1)
        ax.errorbar(
            x, 100 * v.top1, yerr=[[100 * (v.top1 - lo)], [100 * (hi - v.top1)]],
            fmt="o", color=colour, capsize=4, markersize=7,
        )
        ax.annotate(v.name, (x, 100 * v.top1), textcoords="offset points", xytext=(6, 6), fontsize=8)
    ax.set_xlabel(label)
    ax.set_ylabel("top-1 %, 95% CI")
    ax.set_title("Accuracy vs " + ("speed" if key == "throughput_ips" else "size"))
    ax.grid(alpha=0.3)
    handles = [
        plt.Line2D([], [], marker="o", ls="", color=c, label=name)
        for name, c in (("reference", REFERENCE_COLOUR), ("pass", VERDICT_COLOURS["pass"]), ("fail", VERDICT_COLOURS["fail"]),
                        ("inconclusive", VERDICT_COLOURS["inconclusive"]), ("no verdict", VERDICT_COLOURS[None]))
    ]
    ax.legend(handles=handles, fontsize=8, loc="best")
    return _png(fig)


def sensitivity_bars(sensitivity: dict) -> bytes | None:
    """Per layer, in execution order: output KL to FP32 when only that layer is INT8, and its local output SQNR."""
    layers = sensitivity.get("layers") or []
    if not layers:
        return None
    top = set(sensitivity.get("top_k") or [])
    names = [layer["module"] for layer in layers]
    kl = [((layer.get("only") or {}).get("kl") or 0.0) for layer in layers]
    sqnr = [((layer.get("sqnr_db") or {}).get("local")) for layer in layers]
    colours = ["#c62828" if n in top else "#546e7a" for n in names]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(max(8, 0.22 * len(names)), 7), sharex=True)
    ax1.bar(range(len(names)), [max(k, 1e-9) for k in kl], color=colours)
    ax1.set_yscale("log")
    ax1.set_ylabel("KL to FP32 logits\n(only this layer INT8)")
    ax1.set_title(f"Per-layer sensitivity (red: the {len(top)} most sensitive, kept in FP32 below)")
    ax1.grid(axis="y", alpha=0.3)
    ax2.bar(range(len(names)), [s if s is not None else 0.0 for s in sqnr], color=colours)
    ax2.set_ylabel("local output SQNR, dB\n(higher is better)")
    ax2.grid(axis="y", alpha=0.3)
    ax2.set_xticks(range(len(names)))
    ax2.set_xticklabels(names, rotation=90, fontsize=7)
    return _png(fig)


def flips_per_class(report: Report, *, max_classes: int = 15, max_variants: int = 6) -> bytes | None:
    """Per non-reference variant: the classes with the most flips, lost (left, red) and gained (right, green)."""
    variants = [v for v in report.variants if v.paired and v.paired.get("flips_by_class")][:max_variants]
    if not variants:
        return None
    rows = []
    for v in variants:
        flips = v.paired["flips_by_class"]
        ranked = sorted(flips.items(), key=lambda kv: (-(kv[1]["lost"] + kv[1]["gained"]), -kv[1]["lost"], kv[0]))
        rows.append((v, ranked[:max_classes]))
    height = sum(0.6 + 0.22 * len(r) for _, r in rows) + 0.5
    fig, axes = plt.subplots(len(rows), 1, figsize=(8, max(2.5, height)), squeeze=False)
    for ax, (v, ranked) in zip(axes[:, 0], rows):
        labels = [f"{(report_names().get(w) or w)[:28]} ({w})" for w, _ in ranked]
        ys = range(len(ranked))
        ax.barh(ys, [-f["lost"] for _, f in ranked], color="#c62828", label="lost (FP32 right → wrong)")
        ax.barh(ys, [f["gained"] for _, f in ranked], color="#2e7d32", label="gained (FP32 wrong → right)")
        ax.set_yticks(list(ys))
        ax.set_yticklabels(labels, fontsize=7)
        ax.invert_yaxis()
        ax.axvline(0, color="black", lw=0.8)
        total_lost, total_gained = v.paired["top1"]["ref_right_var_wrong"], v.paired["top1"]["ref_wrong_var_right"]
        ax.set_title(f"{v.name}: {total_lost} lost, {total_gained} gained", fontsize=9)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend(fontsize=7, loc="lower right")
    axes[-1, 0].set_xlabel("images per class")
    return _png(fig)


def report_names() -> dict[str, str]:
    from int8eval.data.synsets import synsets

    return dict(zip(*synsets()))
