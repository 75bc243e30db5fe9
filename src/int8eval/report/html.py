"""report.html, rendered from report.json only: one self-contained file (inline CSS, figures as base64 PNGs)."""

from __future__ import annotations

import base64
from html import escape
from typing import NamedTuple

from int8eval.report import plots
from int8eval.report.content import (
    RECIPE_HEADER,
    VERDICT_MARK,
    classes_lost_most,
    comparison_items,
    environment_items,
    gate_items,
    keep_fp32_sentences,
    overview_items,
    recipe_rows,
    sensitivity_rows,
    skipped_items,
    verdict_label,
)
from int8eval.report.format import ci, num, p_value, pct, pts
from int8eval.report.schema import Report
from int8eval.report.tune import (
    LADDER_HEADER,
    LADDER_NOTE,
    backend_items,
    backend_names,
    ladder_rows,
    pareto_points,
    tune_items,
)

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 2em auto; max-width: 1350px;
       color: #212121; padding: 0 1em; line-height: 1.45; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 1.8em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.86em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.55em; text-align: right; }
th { background: #f3f5f7; } td.l, th.l { text-align: left; } td:not(.l) { white-space: nowrap; }
tr.reference td { background: #eef4fc; }
.v-pass { text-align: center; background: #e8f5e9; color: #1b5e20; font-weight: 600; }
.v-fail { text-align: center; background: #ffebee; color: #b71c1c; font-weight: 600; }
.v-inconclusive { text-align: center; background: #fff3e0; color: #e65100; font-weight: 600; }
.note { color: #555; font-size: 0.9em; } code { font-size: 0.92em; }
img { max-width: 100%; border: 1px solid #eee; }
.scroll { overflow-x: auto; }
ul.reasons li { margin: 0.25em 0; }
"""


# Only in the page of a tune report, so every other page stays as it was.
TUNE_CSS = "tr.chosen td { background: #e8f5e9; }\n"


class Raw(str):
    """HTML the template built itself, every value in it escaped: a table cell that is put in as it is."""


class Cell(NamedTuple):
    """A whole table cell with one of the template's own CSS classes (never a value from report.json)."""

    html: Raw
    css: str


# The verdict words report.json may hold (the schema checks them) and their CSS classes; anything else gets none.
VERDICT_CSS = {"pass": "v-pass", "fail": "v-fail", "inconclusive": "v-inconclusive"}


def _code(text: str) -> Raw:
    return Raw(f"<code>{escape(str(text))}</code>")


def _bold(text: str) -> str:
    return f"<b>{escape(text)}</b>"


def _items(items: list[str]) -> str:
    return "".join(f"<li>{i}</li>" for i in items)


def _img(png: bytes | None, alt: str) -> str:
    if not png:
        return ""
    return f'<p><img alt="{escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}"></p>'


def _table(header: list[str], rows: list[list], *, left: int = 1, row_classes: list[str] | None = None) -> str:
    """An HTML table; the first `left` columns are left-aligned. Every cell is escaped text, except the template's
    own markup (`Raw`, `Cell`); `row_classes` are the template's own CSS classes."""

    def cell(tag: str, i: int, text) -> str:
        if isinstance(text, Cell):
            return f'<{tag} class="{text.css}">{text.html}</{tag}>'
        cls = ' class="l"' if i < left else ""
        body = text if isinstance(text, Raw) else escape(str(text))
        return f"<{tag}{cls}>{body}</{tag}>"

    out = ['<div class="scroll"><table>', "<tr>" + "".join(cell("th", i, h) for i, h in enumerate(header)) + "</tr>"]
    for j, row in enumerate(rows):
        cls = f' class="{row_classes[j]}"' if row_classes and row_classes[j] else ""
        out.append(f"<tr{cls}>" + "".join(cell("td", i, c) for i, c in enumerate(row)) + "</tr>")
    out.append("</table></div>")
    return "\n".join(out)


def _verdict_cell(v) -> Cell:
    word = v.verdict.verdict if v.verdict else None
    return Cell(Raw(escape(verdict_label(v))), VERDICT_CSS.get(word, "l"))


def _summary(report: Report) -> str:
    key, _ = plots.speed_axis(report)
    header = ["variant", "backend", "precision", "status", "verdict", "top-1 %", "95% CI", "top-5 %", "Δ top-1 pts",
              "Δ 95% CI", "lost", "gained", "McNemar p", "agreement %", "size MB"]
    if key == "throughput_ips":
        header.append("images/s")
    rows, classes = [], []
    for v in report.variants:
        t1 = v.paired.top1 if v.paired else None
        status = v.status if v.parity is None or v.parity.passed else f"{v.status} (parity failed)"
        row = [
            v.name + (" (reference)" if v.reference else ""), v.backend, v.precision, status, _verdict_cell(v),
            pct(v.top1), ci(v.top1_ci95), pct(v.top5), pts(t1.diff if t1 else v.delta_top1),
            ci(t1 and t1.diff_ci95, signed=True), str(t1.ref_right_var_wrong if t1 else "—"),
            str(t1.ref_wrong_var_right if t1 else "—"), p_value(t1 and t1.mcnemar_p), pct(v.agreement_top1), num(v.size_mb),
        ]
        if key == "throughput_ips":
            row.append(num(v.bench.throughput_ips if v.bench else None))
        rows.append(row)
        classes.append("reference" if v.reference else "")
    return _table(header, rows, left=5, row_classes=classes)


def _verdicts(report: Report) -> str:
    if not report.acceptance:
        return ('<p class="note">No acceptance criterion was declared (<code>--max-drop POINTS [--drop relative]</code> '
                "or <code>--mlperf</code>), so no verdicts.</p>")
    items = [
        f'<li><span class="{VERDICT_CSS.get(v.verdict.verdict, "")}">{escape(verdict_label(v))}</span> '
        f"<b>{escape(v.name)}</b>: {escape(v.verdict.reason)}</li>"
        for v in report.variants
        if v.verdict
    ]
    head = f"<p>Criterion: <b>{escape(report.acceptance.description)}</b>, judged on the 95% CI of the drop.</p>"
    return head + (f'<ul class="reasons">{"".join(items)}</ul>' if items else "<p>No variant to judge.</p>")


def _paired_details(report: Report) -> str:
    paired = [v for v in report.variants if v.paired]
    if not paired:
        return ""
    rows = []
    for v in paired:
        s = v.paired
        t5 = s.top5
        rows.append([
            v.name, str(s.n), pct(s.agreement_top1), ci(s.agreement_top1_ci95), pts(t5 and t5.diff),
            ci(t5 and t5.diff_ci95, signed=True), p_value(t5 and t5.mcnemar_p), num(s.kl_mean, ".2e"),
            num(s.cos_mean, ".5f"),
        ])
    table = _table(["variant", "images", "agreement %", "95% CI", "Δ top-5 pts", "Δ 95% CI", "McNemar p (top-5)",
                    "KL mean", "cosine mean"], rows)
    losers = [f"<li><b>{escape(name)}</b>: {escape(text)}</li>" for name, text in classes_lost_most(paired, limit=8)]
    note = (f'<p class="note">Paired over the same images; CIs: {escape(paired[0].paired.ci_method)}; '
            f'test: {escape(paired[0].paired.test)}.</p>')
    out = note + table
    if losers:
        out += "<h3>Classes that lost most</h3><ul>" + "".join(losers) + "</ul>"
    return out


def _sensitivity(report: Report) -> str:
    s = report.sensitivity
    if s is None:
        return ""
    whole = s.all_quantized
    split = any(layer.only_weight is not None for layer in s.layers)  # network-level weight/activation runs
    rows = []
    for r in sensitivity_rows(s, min_rows=10):
        row = [r.rank, _code(r.module), _code(r.onnx_node), r.type, r.only_agreement, r.only_kl, r.all_but_agreement]
        if split:
            row += [r.only_weight_kl, r.only_act_kl]
        rows.append(row + [r.sqnr_local, r.sqnr_local_weight, r.sqnr_local_act, r.sqnr_accumulated])
    header = ["#", "PyTorch module", "ONNX node", "type", "only this INT8: agree %", "KL", "all but this: agree %"]
    if split:
        header += ["only weights INT8: KL", "only input INT8: KL"]
    header += ["SQNR dB, local w+a", "local w", "local a", "in the INT8 model"]
    table = _table(header, rows, left=4)
    keep_text = "".join(f"<p>{text}</p>" for text in keep_fp32_sentences(s, strong=_bold) if text)
    intro = (f"<p>Fake INT8 in PyTorch ({escape(s.spec_description)}), {s.num_calib} "
             f"calibration images, {s.num_images} evaluation images. Everything quantized: agreement with FP32 "
             f"{pct(whole.agreement)}%; weights only {pct(s.weights_only and s.weights_only.agreement)}%; "
             f"activations only {pct(s.activations_only and s.activations_only.agreement)}%. Ranked by "
             f"{escape(s.rank_by)}. Output SQNR: local = the layer's own error with FP32 inputs (w: its "
             "weights only, a: its input only); in the INT8 model = the error accumulated up to its output when "
             "every layer is INT8.</p>")
    return intro + table + keep_text + _img(plots.sensitivity_bars(s), "per-layer sensitivity bar chart")


def _tune_verdict(word) -> Cell | str:
    return Cell(Raw(escape(VERDICT_MARK[word])), VERDICT_CSS[word]) if word else "—"


def _tune(report: Report) -> list[str]:
    """The tuning section: the overview, each backend's outcome and ladder, the Pareto plot."""
    tune = report.tune
    if tune is None:
        return []
    out = ["<h2>Tuning</h2>", "<ul>" + _items(tune_items(tune, esc=escape, code=_code)) + "</ul>",
           f'<p class="note">{escape(LADDER_NOTE)}</p>']
    for backend in backend_names(tune):
        items = backend_items(tune, backend, esc=escape, code=_code)
        out += [f"<h3>{escape(backend)}</h3>", "<ul>" + _items(items) + "</ul>"]
        rows = ladder_rows(tune, backend)
        if rows:
            cells = [[r.pareto, r.step, Raw(_code(r.name) + (" (chosen)" if r.chosen else "")), r.status,
                      r.tuning_agreement, r.tuning_delta, _tune_verdict(r.tuning_verdict), r.accepted,
                      r.confirmation_agreement, r.confirmation_delta, _tune_verdict(r.confirmation_verdict),
                      r.confirmed, r.latency_ms, r.throughput_ips, r.speedup, r.size_mb, r.size_pct, r.time_s]
                     for r in rows]
            out.append(_table(LADDER_HEADER, cells, left=4, row_classes=["chosen" if r.chosen else "" for r in rows]))
    points, left_out = pareto_points(tune)
    plot = plots.tune_pareto(tune)
    if plot:
        one = left_out == 1
        left = (f" {left_out} candidate{'' if one else 's'} without a measured throughput or tuning-set statistics "
                f"{'is' if one else 'are'} left out." if left_out else "")
        out += ["<h3>Accuracy vs speed of the candidates</h3>",
                f'<p class="note">{len(points)} candidates; Δ top-1 on the tuning set against the PyTorch FP32 '
                "reference with its 95% CI; marker area: size; black edge: Pareto front; ringed: chosen; diamonds: "
                f"each backend's FP32, drawn at Δ = 0; dashed line: the budget.{left}</p>",
                _img(plot, "tuning candidates: top-1 change against throughput")]
    return out


def _overview(report: Report) -> str:
    return "<ul>" + _items(overview_items(report, esc=escape, code=_code)) + "</ul>"


def _footer(report: Report) -> str:
    parts = []
    errors = [v for v in report.variants if v.error]
    if errors:
        parts.append("<h2>Errors</h2><ul>" + "".join(f"<li><b>{escape(v.name)}</b>: {escape(v.error)}</li>" for v in errors) + "</ul>")
    if report.data.skipped:
        skipped = skipped_items(report.data.skipped, limit=50, esc=escape, code=_code)
        parts.append(f"<h2>Skipped ({report.data.num_skipped})</h2><ul>" + _items(skipped) + "</ul>")
    parts.append("<h2>Environment</h2><ul>" + _items(environment_items(report, esc=escape)) + "</ul>")
    return "\n".join(parts)


def render_html(report: Report) -> str:
    """The whole report as one standalone HTML page (no external resources)."""
    key, axis = plots.speed_axis(report)
    speed_note = ("" if key == "throughput_ips" else
                  '<p class="note">No speed was measured in this run, so accuracy is plotted against artifact size.</p>')
    ref = report.reference
    body = [
        f"<h1>int8eval report: {escape(report.model.name)}</h1>",
        _overview(report),
        *_tune(report),
    ]
    if report.variants:  # a run folder `int8eval diagnose` wrote has none
        body += [
            "<h2>Summary</h2>",
            f'<p class="note">Δ and flips are against {escape(ref.name) if ref else "the reference"}: lost = FP32 right '
            "→ variant wrong, gained = the reverse.</p>",
            _summary(report),
            "<h2>Verdicts</h2>",
            _verdicts(report),
            "<h2>Accuracy vs " + ("speed" if key == "throughput_ips" else "size") + "</h2>",
            speed_note,
            _img(plots.accuracy_vs_speed(report), f"top-1 against {axis}"),
        ]
    details = _paired_details(report)
    if details:
        body += ["<h2>Paired statistics</h2>", details]
    flips = plots.flips_per_class(report)
    if flips:
        body += ["<h2>Flips per class</h2>", _img(flips, "flips per class")]
    gate = gate_items(report, esc=escape)
    if gate:
        body += ["<h2>FP32 parity gate</h2>", "<ul>" + _items(gate) + "</ul>"]
    compared = comparison_items(report, esc=escape)
    if compared:
        body += ["<h2>QAT against its FP32 control and post-training INT8</h2>", "<ul>" + _items(compared) + "</ul>"]
    recipes = recipe_rows(report)
    if recipes:
        body += ["<h2>How the INT8 variants were built</h2>",
                 _table(RECIPE_HEADER, recipes, left=6)]
    sens = _sensitivity(report)
    if sens:
        body += ["<h2>Per-layer sensitivity</h2>", sens]
    body.append(_footer(report))
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>int8eval: {escape(report.model.name)}</title><style>{CSS}{TUNE_CSS if report.tune else ''}</style>"
        "</head><body>\n"
        + "\n".join(b for b in body if b)
        + "\n</body></html>\n"
    )
