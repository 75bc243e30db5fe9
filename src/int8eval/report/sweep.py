"""sweep.json, the truth of an `int8eval sweep` (int8eval.commands.sweep), and sweep.md / sweep.html rendered from it:
a table per model (each cell's variants against that model's FP32 on the cell's images) and the accuracy drop of
every INT8 variant against its speed (or its size when no cell was timed) across models.

Accuracies are fractions in [0, 1], as in report.json; they are rounded only when rendered.
"""

from __future__ import annotations

import base64
import io
import json
from html import escape
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from int8eval.report.folder import write_atomic
from int8eval.report.format import DASH, ci, num, pct, pts
from int8eval.report.schema import Report

SWEEP_SCHEMA_VERSION = "1.0"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="null")


class SweepRow(_Model):
    """One variant of a cell, from its report.json. `delta_top1` and its CI are against the PyTorch FP32 reference of
    the same cell (the same images), in fractions; speed only when the cell was timed (spec `bench: true`, or a tune
    cell's short timing)."""

    variant: str
    backend: str
    precision: str
    status: str
    error: str | None = None
    reference: bool = False
    top1: float | None = None
    top1_ci95: tuple[float, float] | None = None
    delta_top1: float | None = None
    delta_ci95: tuple[float, float] | None = None
    agreement_top1: float | None = None
    kl_mean: float | None = None
    size_mb: float | None = None
    throughput_ips: float | None = None
    latency_ms_p50: float | None = None
    speedup_vs_fp32: float | None = None
    verdict: str | None = None


class SweepCell(_Model):
    """One run folder of the sweep: its status, whether it was reused from an earlier sweep, and its rows."""

    model: str  # the label the cell is filed under
    model_name: str
    kind: Literal["run", "tune"]
    backend: str | None = None  # None for a tune cell (its backends are in its report)
    folder: str  # relative to the sweep folder
    status: Literal["ok", "failed"]
    reused: bool = False
    error: str | None = None
    seconds: float | None = None
    run_id: str | None = None
    num_images: int | None = None
    tune_choice: str | None = None
    rows: list[SweepRow] = []


class SweepReport(_Model):
    schema_version: str = SWEEP_SCHEMA_VERSION
    created: str
    command: list[str] = []
    spec_file: str | None = None
    out: str
    spec: dict
    cells: list[SweepCell]
    environment: dict = {}

    @property
    def failed(self) -> list[SweepCell]:
        return [c for c in self.cells if c.status == "failed"]

    def models(self) -> list[str]:
        return list(dict.fromkeys(c.model for c in self.cells))

    @classmethod
    def read(cls, path: Path) -> SweepReport:
        return cls.model_validate(json.loads(Path(path).read_text(encoding="utf-8")))


def rows_from_report(report: Report) -> list[SweepRow]:
    """The rows of one cell's report.json; a tune cell's speeds come from its candidates' short timing."""
    timed = {}
    if report.tune is not None:
        timed = {c.name: (c.throughput_ips, c.latency_ms, c.speedup_vs_fp32) for c in report.tune.candidates}
        timed |= {b.fp32: (b.fp32_throughput_ips, None, 1.0) for b in report.tune.backends if b.fp32_throughput_ips}
    rows = []
    for v in report.variants:
        bench = v.bench
        speed = ((bench.throughput_ips, bench.latency_ms_p50, bench.speedup_throughput_vs_fp32) if bench
                 else timed.get(v.name, (None, None, None)))
        t1 = v.paired.top1 if v.paired else None
        rows.append(SweepRow(
            variant=v.name, backend=str(v.backend), precision=str(v.precision), status=str(v.status), error=v.error,
            reference=v.reference, top1=v.top1, top1_ci95=v.top1_ci95,
            delta_top1=t1.diff if t1 else v.delta_top1, delta_ci95=t1.diff_ci95 if t1 else None,
            agreement_top1=v.agreement_top1, kl_mean=v.paired.kl_mean if v.paired else None, size_mb=v.size_mb,
            throughput_ips=speed[0], latency_ms_p50=speed[1], speedup_vs_fp32=speed[2],
            verdict=str(v.verdict.verdict) if v.verdict else None,
        ))
    return rows


# --------------------------------------------------------------------------------------------------------------
# Rendering: the same rows for Markdown and HTML

HEADER = ["variant", "backend", "cell", "status", "top-1 %", "Δ top-1 pts", "Δ 95% CI", "agreement %", "KL",
          "size MB", "images/s", "verdict"]


def _table_rows(sweep: SweepReport, model: str) -> list[list[str]]:
    """The model's rows: its FP32 reference once per set of images (a tune cell's confirmation images differ), then
    every other variant of each cell."""
    rows, references = [], set()
    for cell in (c for c in sweep.cells if c.model == model):
        for r in cell.rows:
            if r.reference:
                if (cell.num_images, r.top1) in references:
                    continue
                references.add((cell.num_images, r.top1))
            status = r.status + (" (reused)" if cell.reused else "")
            rows.append([r.variant + (" (reference)" if r.reference else ""), r.backend, cell.folder, status,
                         pct(r.top1), pts(r.delta_top1), ci(r.delta_ci95, signed=True), pct(r.agreement_top1),
                         num(r.kl_mean, ".3g"), num(r.size_mb, ".2f"), num(r.throughput_ips), r.verdict or DASH])
    return rows


def _failures(sweep: SweepReport, model: str) -> list[str]:
    """The model's failed cells, then the variants a finished cell could not measure or trust, each with why."""
    cells = [c for c in sweep.cells if c.model == model]
    failed = [f"{c.folder}: {c.error}" for c in cells if c.status == "failed"]
    return failed + [f"{c.folder} {r.variant} ({r.status}): {r.error}" for c in cells for r in c.rows if r.error]


def _summary(sweep: SweepReport) -> str:
    reused = sum(c.reused for c in sweep.cells)
    return (f"{len(sweep.cells)} cells, {len(sweep.failed)} failed, {reused} reused from an earlier sweep; "
            f"Δ is against the model's PyTorch FP32 on the same cell's images")


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_sweep_markdown(sweep: SweepReport) -> str:
    """sweep.md: a table per model and the failed cells with their errors."""
    lines = ["# int8eval sweep", "", _summary(sweep) + ".", ""]
    if sweep.spec_file:
        lines += [f"Spec: `{sweep.spec_file}`; created {sweep.created}.", ""]
    for model in sweep.models():
        name = next(c.model_name for c in sweep.cells if c.model == model)
        lines += [f"## {_md_cell(model)}" + (f" ({_md_cell(name)})" if name != model else ""), ""]
        rows = _table_rows(sweep, model)
        if rows:
            lines += ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
            lines.append("")
        for failure in _failures(sweep, model):
            lines.append(f"- **failed** {failure}".replace("\n", " "))
        lines.append("")
    lines += ["The accuracy-drop plot is in sweep.html.", ""]
    return "\n".join(lines)


def _points(sweep: SweepReport) -> tuple[list[tuple[str, SweepRow]], str]:
    """(model, row) of every measured non-FP32 variant, and the x axis: throughput when any was timed, else size."""
    rows = [(c.model, r) for c in sweep.cells for r in c.rows
            if not r.reference and r.precision != "fp32" and r.delta_top1 is not None]
    key = "throughput_ips" if any(r.throughput_ips for _, r in rows) else "size_mb"
    return [(m, r) for m, r in rows if getattr(r, key) is not None], key


def drop_plot(sweep: SweepReport) -> bytes | None:
    """PNG: Δ top-1 (points, 95% CI) of every INT8 variant against its throughput (or size), one colour per model."""
    points, key = _points(sweep)
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.5, 5))
    colours = plt.get_cmap("tab10")
    models = list(dict.fromkeys(m for m, _ in points))
    all_x = [getattr(r, key) for _, r in points]
    all_y = [100 * r.delta_top1 for _, r in points]
    span_x, span_y = (max(all_x) - min(all_x)) or 1.0, (max(all_y) - min(all_y)) or 1.0
    placed: list[tuple[float, float]] = []
    for i, model in enumerate(models):
        mine = [r for m, r in points if m == model]
        xs = [getattr(r, key) for r in mine]
        ys = [100 * r.delta_top1 for r in mine]
        # Clamped: an interval that ends at the estimate can come out 1e-17 on the wrong side of it.
        lo = [max(0.0, y - 100 * r.delta_ci95[0]) if r.delta_ci95 else 0.0 for y, r in zip(ys, mine)]
        hi = [max(0.0, 100 * r.delta_ci95[1] - y) if r.delta_ci95 else 0.0 for y, r in zip(ys, mine)]
        ax.errorbar(xs, ys, yerr=[lo, hi], fmt="o", color=colours(i % 10), capsize=3, label=model.replace("$", r"\$"))
        for x, y, r in zip(xs, ys, mine):
            # Variants at (nearly) the same spot get their labels stacked, not overprinted.
            near = sum(abs(x - px) < 0.03 * span_x and abs(y - py) < 0.03 * span_y for px, py in placed)
            placed.append((x, y))
            ax.annotate(r.variant.replace("$", r"\$"), (x, y), textcoords="offset points", xytext=(5, 5 - 10 * near),
                        fontsize=7)
    if min(all_x) > 0 and max(all_x) > 10 * min(all_x):  # models of very different sizes or speeds
        ax.set_xscale("log")
    ax.axhline(0, color="#9e9e9e", lw=0.8)
    ax.set_xlabel("throughput, images/s (higher is better)" if key == "throughput_ips"
                  else "artifact size, MB (no cell was timed)")
    ax.set_ylabel("Δ top-1 vs the model's FP32, points (95% CI)")
    ax.set_title("Accuracy drop vs " + ("speed" if key == "throughput_ips" else "size") + " across models")
    ax.grid(alpha=0.3)
    ax.margins(x=0.15, y=0.15)
    ax.legend(fontsize=8, loc="best")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _html_table(rows: list[list[str]]) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in HEADER)
    body = "".join("<tr>" + "".join(f'<td{" class=l" if i < 4 else ""}>{escape(str(c))}</td>' for i, c in enumerate(row))
                   + "</tr>" for row in rows)
    return f'<div class="scroll"><table><tr>{head}</tr>{body}</table></div>'


def render_sweep_html(sweep: SweepReport) -> str:
    """sweep.html: one standalone page, the plot embedded as a base64 PNG."""
    from int8eval.report.html import CSS

    body = ["<h1>int8eval sweep</h1>", f"<p>{escape(_summary(sweep))}.</p>"]
    for model in sweep.models():
        body.append(f"<h2>{escape(model)}</h2>")
        rows = _table_rows(sweep, model)
        if rows:
            body.append(_html_table(rows))
        failures = _failures(sweep, model)
        if failures:
            body.append("<ul>" + "".join(f"<li><b>failed</b> {escape(f)}</li>" for f in failures) + "</ul>")
    png = drop_plot(sweep)
    _, key = _points(sweep)
    body.append("<h2>Accuracy drop vs " + ("speed" if key == "throughput_ips" else "size") + "</h2>")
    if png:
        body.append(f'<p><img alt="accuracy drop across models" '
                    f'src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}"></p>')
    else:
        body.append('<p class="note">No INT8 variant was measured.</p>')
    return ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>int8eval sweep</title>'
            f"<style>{CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def write_sweep(sweep: SweepReport, out: Path) -> list[Path]:
    """Write OUT/sweep.md, sweep.html, then sweep.json (each atomically)."""
    out = Path(out)
    paths = [out / "sweep.md", out / "sweep.html", out / "sweep.json"]
    texts = [render_sweep_markdown(sweep), render_sweep_html(sweep), sweep.model_dump_json(indent=2) + "\n"]
    for path, text in zip(paths, texts):
        write_atomic(path, text)
    return paths
