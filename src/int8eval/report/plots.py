"""The report's figures as PNG bytes, drawn with matplotlib's Agg backend from report.json's contents only."""

from __future__ import annotations

import io
import re

import matplotlib

matplotlib.use("Agg")  # no display: must be set before pyplot is imported

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from int8eval.data.synsets import wnid_to_name  # noqa: E402
from int8eval.report.schema import Report  # noqa: E402
from int8eval.report.sections import Sensitivity, TuneSection  # noqa: E402
from int8eval.report.tune import backend_names, budget_pts, pareto_points  # noqa: E402

VERDICT_COLOURS = {"pass": "#2e7d32", "fail": "#c62828", "inconclusive": "#ef6c00", None: "#546e7a"}
REFERENCE_COLOUR = "#1565c0"
BACKEND_COLOURS = ["#1565c0", "#ef6c00", "#2e7d32", "#6a1b9a", "#00838f", "#ad1457"]  # the tune plot, by backend


def _plain(text) -> str:
    """A label from report.json drawn as written: a `$` would start matplotlib's mathtext (and fail to parse)."""
    return re.sub(r"[\x00-\x1f\x7f]", " ", str(text)).replace("$", r"\$")


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def speed_axis(report: Report) -> tuple[str, str]:
    """Which x axis the accuracy plot uses: ("throughput_ips", label) when a benchmark ran, else size."""
    if any(v.bench and v.bench.throughput_ips for v in report.variants):
        return "throughput_ips", "throughput, images/s (higher is better)"
    return "size_mb", "artifact size, MB (no speed measured in this run)"


def _x_value(v, key: str) -> float | None:
    if key == "throughput_ips":
        return v.bench.throughput_ips if v.bench else None
    return v.size_mb


def accuracy_vs_speed(report: Report) -> bytes | None:
    """Top-1 (with its 95% CI) of each measured variant against its throughput, or its size when none was timed."""
    key, label = speed_axis(report)
    points = [(v, _x_value(v, key)) for v in report.variants if v.top1 is not None]
    points = [(v, x) for v, x in points if x is not None]
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.8))
    placed: list[tuple[float, float]] = []
    span_x = (max(x for _, x in points) - min(x for _, x in points)) or 1.0
    span_y = 100 * ((max(v.top1 for v, _ in points) - min(v.top1 for v, _ in points)) or 0.01)
    for v, x in points:
        # Variants at (nearly) the same spot, e.g. FP32 of two backends, get their labels stacked, not overprinted.
        near = sum(abs(x - px) < 0.05 * span_x and abs(100 * v.top1 - py) < 0.05 * span_y for px, py in placed)
        placed.append((x, 100 * v.top1))
        verdict = v.verdict.verdict if v.verdict else None
        colour = REFERENCE_COLOUR if v.reference else VERDICT_COLOURS.get(verdict, VERDICT_COLOURS[None])
        lo, hi = v.top1_ci95 or (v.top1, v.top1)
        ax.errorbar(
            # Clamped: an interval that ends at the estimate can come out 1e-17 on the wrong side of it.
            x, 100 * v.top1, yerr=[[max(0.0, 100 * (v.top1 - lo))], [max(0.0, 100 * (hi - v.top1))]],
            fmt="o", color=colour, capsize=4, markersize=7,
        )
        ax.annotate(_plain(v.name), (x, 100 * v.top1), textcoords="offset points", xytext=(6, 6 - 11 * near), fontsize=8)
    ax.set_xlabel(label)
    ax.set_ylabel("top-1 %, 95% CI")
    ax.set_title("Accuracy vs " + ("speed" if key == "throughput_ips" else "size"))
    ax.grid(alpha=0.3)
    present = {"reference" if v.reference else (v.verdict.verdict if v.verdict else "no verdict") for v, _ in points}
    colours = {"reference": REFERENCE_COLOUR, "no verdict": VERDICT_COLOURS[None],
               **{k: c for k, c in VERDICT_COLOURS.items() if k is not None}}
    handles = [plt.Line2D([], [], marker="o", ls="", color=c, label=k) for k, c in colours.items() if k in present]
    ax.legend(handles=handles, fontsize=8, loc="best")
    if key == "size_mb":
        ax.set_xlim(0, 1.25 * max(x for _, x in points))  # from 0: sizes read as fractions of the FP32 one
    else:
        ax.margins(x=0.15)
    return _png(fig)


def sensitivity_bars(sensitivity: Sensitivity) -> bytes | None:
    """Per layer, in execution order: output KL to FP32 when only that layer is INT8, and its local output SQNR."""
    layers = sensitivity.layers
    if not layers:
        return None
    top = set(sensitivity.top_k)
    names = [layer.module for layer in layers]
    kl = [layer.only.kl or 0.0 for layer in layers]
    sqnr = [layer.sqnr_db.local if layer.sqnr_db else None for layer in layers]
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
    ax2.set_xticklabels([_plain(n) for n in names], rotation=90, fontsize=7)
    return _png(fig)


def flips_per_class(report: Report, *, max_classes: int = 15, max_variants: int = 6) -> bytes | None:
    """Per non-reference variant: the classes with the most flips, lost (left, red) and gained (right, green)."""
    variants = [v for v in report.variants if v.paired and v.paired.flips_by_class][:max_variants]
    if not variants:
        return None
    rows = []
    for v in variants:
        flips = v.paired.flips_by_class
        ranked = sorted(flips.items(), key=lambda kv: (-(kv[1].lost + kv[1].gained), -kv[1].lost, kv[0]))
        rows.append((v, ranked[:max_classes]))
    heights = [max(2, len(r)) for _, r in rows]
    fig, axes = plt.subplots(
        len(rows), 1, figsize=(8, 1.2 + 0.25 * sum(heights) + 0.5 * len(rows)), squeeze=False,
        gridspec_kw={"height_ratios": heights},
    )
    names = wnid_to_name()
    for ax, (v, ranked) in zip(axes[:, 0], rows):
        labels = [_plain(f"{(names.get(w) or w)[:28]} ({w})") for w, _ in ranked]
        ys = range(len(ranked))
        ax.barh(ys, [-f.lost for _, f in ranked], color="#c62828", label="lost (FP32 right → wrong)")
        ax.barh(ys, [f.gained for _, f in ranked], color="#2e7d32", label="gained (FP32 wrong → right)")
        ax.set_yticks(list(ys))
        ax.set_yticklabels(labels, fontsize=7)
        ax.set_ylim(len(ranked) - 0.5, -0.5)  # most flips on top, bars of one height whatever the count
        # Symmetric around 0 so lost and gained read at the same scale in every panel.
        m = max(max(f.lost, f.gained) for _, f in ranked) + 0.5
        ax.set_xlim(-m, m)
        ax.axvline(0, color="black", lw=0.8)
        total_lost, total_gained = v.paired.top1.ref_right_var_wrong, v.paired.top1.ref_wrong_var_right
        ax.set_title(f"{_plain(v.name)}: {total_lost} lost, {total_gained} gained (top {len(ranked)} classes)", fontsize=9)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(axis="x", alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="upper center", ncol=2, bbox_to_anchor=(0.5, 1.0))
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    axes[-1, 0].set_xlabel("images per class")
    return _png(fig)


def tune_pareto(tune: TuneSection) -> bytes | None:
    """The tuner's candidates: Δ top-1 on the tuning set (95% CI) against throughput, marker area by size, one colour
    per backend; each backend's FP32 at Δ = 0, the chosen models ringed, the budget as a line at -max_drop."""
    points, _ = pareto_points(tune)
    if not points:
        return None
    backends = backend_names(tune)
    colour = {b: BACKEND_COLOURS[i % len(BACKEND_COLOURS)] for i, b in enumerate(backends)}
    fp32 = [(b, b.fp32_throughput_ips) for b in tune.backends if b.fp32_throughput_ips]
    xs = [p.throughput_ips for p in points] + [x for _, x in fp32]
    sizes = [p.size_mb for p in points if p.size_mb]
    biggest = max(sizes, default=1.0)
    fig, ax = plt.subplots(figsize=(8.5, 5))
    for p in points:
        area = 40 + 260 * (p.size_mb / biggest) if p.size_mb else 60
        lo, hi = p.ci_pts
        # Clamped: an interval that ends at the estimate can come out 1e-15 on the wrong side of it.
        ax.errorbar(p.throughput_ips, p.delta_pts, yerr=[[max(0.0, p.delta_pts - lo)], [max(0.0, hi - p.delta_pts)]],
                    fmt="none", ecolor=colour[p.backend], alpha=0.6, capsize=3, zorder=2)
        ax.scatter(p.throughput_ips, p.delta_pts, s=area, color=colour[p.backend], alpha=0.85, zorder=3,
                   edgecolors="black" if p.pareto else "none", linewidths=0.8)
        if p.chosen:
            ax.scatter(p.throughput_ips, p.delta_pts, s=area + 220, facecolors="none", edgecolors="black",
                       linewidths=2.2, zorder=4)
            ax.annotate(_plain(p.name), (p.throughput_ips, p.delta_pts), textcoords="offset points", xytext=(8, 8),
                        fontsize=8)
    for b, x in fp32:
        ax.scatter(x, 0.0, marker="D", s=70, facecolors="white", edgecolors=colour[b.backend], linewidths=2, zorder=5)
    budget = budget_pts(tune)
    if budget is not None:
        ax.axhline(-budget, color="#c62828", ls="--", lw=1)
    ax.axhline(0, color="#9e9e9e", lw=0.8)
    if max(xs) > 10 * min(xs):
        ax.set_xscale("log")
    ax.margins(x=0.12, y=0.15)
    ax.set_xlabel("throughput, images/s (higher is better)")
    ax.set_ylabel("Δ top-1 vs PyTorch FP32 on the tuning set, points (95% CI)")
    ax.set_title("Tuning candidates: accuracy vs speed (marker area: size)")
    ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], marker="o", ls="", color=colour[b], label=_plain(b)) for b in backends
               if any(p.backend == b for p in points)]
    handles += [
        plt.Line2D([], [], marker="D", ls="", markerfacecolor="white", markeredgecolor="#424242", label="backend FP32"),
        plt.Line2D([], [], marker="o", ls="", markerfacecolor="none", markeredgecolor="black", markersize=11,
                   markeredgewidth=2, label="chosen"),
        plt.Line2D([], [], marker="o", ls="", color="#bdbdbd", markeredgecolor="black", label="Pareto front"),
    ]
    if budget is not None:
        handles.append(plt.Line2D([], [], color="#c62828", ls="--", label=f"budget: -{budget:.2f} pts"))
    ax.legend(handles=handles, fontsize=8, loc="best")
    return _png(fig)
