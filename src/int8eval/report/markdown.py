"""report.md, rendered from report.json only. Every value taken from report.json goes through `md_text` or `md_code`:
it shows as written and is never Markdown or HTML (report.json may come from someone else)."""

from __future__ import annotations

import re

from int8eval.report.bench import bench_markdown
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
from int8eval.report.tune import LADDER_HEADER, LADDER_NOTE, backend_items, backend_names, ladder_rows, tune_items

__all__ = ["md_code", "md_text", "render_markdown", "verdict_label"]

_LINE_BREAKS = re.compile(r"[\x00-\x1f\x7f\x85\u2028\u2029]")  # a value is one line: no new paragraph, row or block
_MARKUP = re.compile(r"([\\`*\[\]<>|&~$#])")  # emphasis, code, links, HTML, entities, table cells, math, headings
_LONE_UNDERSCORE = re.compile(r"(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])")  # snake_case stays readable: only these emphasise


def md_text(value) -> str:
    """A value as Markdown text that reads as written: every markup character backslash-escaped, one line, and no
    list, heading or quote where it starts a line; bare URLs are not linked."""
    text = _LINE_BREAKS.sub(" ", str(value)).strip()  # leading spaces would indent it into a code block, trailing
    # ones stop ** from closing
    text = _LONE_UNDERSCORE.sub(r"\_", _MARKUP.sub(r"\\\1", text))
    text = re.sub(r"^([+\-=])", r"\\\1", text)  # a list item or setext underline where it starts a line
    text = re.sub(r"^(\d+)([.)])", r"\1\\\2", text)  # an ordered list where it starts a line
    return text.replace("://", ":\\/\\/").replace("www.", "www\\.")  # no autolinks


def md_code(value, *, table: bool = False) -> str:
    """A value as inline code: a backtick fence longer than any run inside it, one line; in a table, pipes escaped."""
    text = _LINE_BREAKS.sub(" ", str(value))
    if not text.strip():
        return md_text(text)
    if table:
        text = text.replace("|", "\\|")
    fence = "`" * (max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
    pad = " " if text[0] in "` " or text[-1] in "` " else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _paired_section(report: Report) -> list[str]:
    ref = report.reference
    paired = [v for v in report.variants if v.paired]
    if ref is None or not paired:
        return []
    n = paired[0].paired.n
    lines = [
        "",
        f"## Paired comparison with {md_text(ref.name)}",
        "",
        f"The same {n} images for every variant. Δ = variant − reference in top-1 points, with the "
        f"{md_text(paired[0].paired.ci_method)} 95% CI; lost = reference right → variant wrong, gained = the reverse; "
        "p = McNemar's exact test on the lost and gained images.",
        "",
        "| variant | verdict | Δ top-1 pts | 95% CI | lost | gained | McNemar p | agreement % | 95% CI | Δ top-5 pts | KL mean | cos mean |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for v in paired:
        s = v.paired
        t1, t5 = s.top1, s.top5
        lines.append(
            f"| {md_text(v.name)} | {md_text(verdict_label(v))} | {pts(t1.diff)} | {ci(t1.diff_ci95, signed=True)} | "
            f"{t1.ref_right_var_wrong} | {t1.ref_wrong_var_right} | {p_value(t1.mcnemar_p)} | "
            f"{pct(s.agreement_top1)} | {ci(s.agreement_top1_ci95)} | {pts(t5.diff) if t5 else '—'} | "
            f"{num(s.kl_mean, '.2e')}{_mean_ci(s.kl_mean_ci95, '.2e')} | {num(s.cos_mean, '.5f')}{_mean_ci(s.cos_mean_ci95, '.5f')} |"
        )
    if report.acceptance:
        lines += ["", f"### Verdicts ({md_text(report.acceptance.description)})", ""]
        for v in paired:
            if v.verdict:
                lines.append(f"- **{md_text(v.name)}: {md_text(verdict_label(v))}** — {md_text(v.verdict.reason)}")
    else:
        lines += ["", "No acceptance criterion was declared (`--max-drop POINTS [--drop relative]` or `--mlperf`), so no verdicts."]
    losers = classes_lost_most(paired, limit=5)
    if losers:
        lines += ["", "### Classes that lost most (net images, reference right → variant wrong minus the reverse)", ""]
        lines += [f"- {md_text(name)}: {md_text(worst)}" for name, worst in losers]
    return lines


def _recipe_section(report: Report) -> list[str]:
    rows = recipe_rows(report)
    if not rows:
        return []
    lines = ["", "## How the INT8 variants were built", "", "| " + " | ".join(RECIPE_HEADER) + " |",
             "|" + "---|" * len(RECIPE_HEADER)]
    return lines + ["| " + " | ".join(map(md_text, row)) + " |" for row in rows]


def _sensitivity_section(report: Report) -> list[str]:
    s = report.sensitivity
    if s is None:
        return []
    whole = s.all_quantized
    lines = [
        "",
        "## Per-layer sensitivity",
        "",
        f"Fake INT8 in PyTorch ({md_text(s.spec_description)}), {md_text(s.num_calib)} calibration "
        f"images, {md_text(s.num_images)} evaluation images; agreement = top-1 agreement with FP32. Everything quantized: "
        f"agreement {pct(whole.agreement)}%, mean KL {num(whole.kl, '.2e')}; weights only "
        f"{pct(s.weights_only and s.weights_only.agreement)}%, activations only "
        f"{pct(s.activations_only and s.activations_only.agreement)}%.",
        "",
        f"Most sensitive layers (ranked by {md_text(s.rank_by)}):",
        "",
        "| # | PyTorch module | ONNX node | only this layer INT8: agreement % / KL | all but this layer: agreement % | "
        "only weights / only activations: KL | output SQNR dB (local w+a / w / a / in the INT8 model) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in sensitivity_rows(s, min_rows=5):
        r = row._replace(**{k: md_text(x) for k, x in row._asdict().items()})
        lines.append(
            f"| {r.rank} | {md_code(row.module, table=True)} | {md_code(row.onnx_node, table=True)} | {r.only_agreement} / "
            f"{r.only_kl} | {r.all_but_agreement} | {r.only_weight_kl} / {r.only_act_kl} | {r.sqnr_local} / "
            f"{r.sqnr_local_weight} / {r.sqnr_local_act} / {r.sqnr_accumulated} |"
        )
    keep, confirm = keep_fp32_sentences(s)
    if keep:
        lines += ["", keep]
    if confirm:
        lines.append(confirm)
    return lines


def _verdict_word(word) -> str:
    return VERDICT_MARK[word] if word else "—"


def _tune_section(report: Report) -> list[str]:
    tune = report.tune
    if tune is None:
        return []
    lines = ["", "## Tuning", ""] + [f"- {item}" for item in tune_items(tune, esc=md_text, code=md_code)]
    lines += ["", LADDER_NOTE]
    for backend in backend_names(tune):
        lines += ["", f"### {md_text(backend)}", ""]
        lines += [f"- {item}" for item in backend_items(tune, backend, esc=md_text, code=md_code)]
        rows = ladder_rows(tune, backend)
        if not rows:
            continue
        lines += ["", "| " + " | ".join(LADDER_HEADER) + " |", "|" + "---|" * len(LADDER_HEADER)]
        for r in rows:
            cells = [r.pareto, md_text(r.step), md_code(r.name, table=True) + (" (chosen)" if r.chosen else ""),
                     md_text(r.status), r.tuning_agreement, r.tuning_delta, _verdict_word(r.tuning_verdict),
                     md_text(r.accepted), r.confirmation_agreement, r.confirmation_delta,
                     _verdict_word(r.confirmation_verdict), r.confirmed, r.latency_ms, r.throughput_ips, r.speedup,
                     r.size_mb, r.size_pct, r.time_s]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def render_markdown(report: Report) -> str:
    d = report.data
    lines = [f"# int8eval report: {md_text(report.model.name)}", ""]
    lines += [f"- {item}" for item in overview_items(report, esc=md_text, code=md_code)]
    lines += _tune_section(report)
    if report.variants:  # a run folder `int8eval diagnose` wrote has none
        lines += [
            "",
            "## Variants",
            "",
            "| variant | backend | precision | status | top-1 % | 95% CI | top-5 % | agreement % | Δ top-1 pts | size MB |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
    for v in report.variants:
        status = v.status if v.parity is None or v.parity.passed else f"{v.status} (parity FAILED)"  # a StrEnum: its word
        lines.append(
            f"| {md_text(v.name)}{' (reference)' if v.reference else ''} | {v.backend} | {v.precision} | {status} | "
            f"{pct(v.top1)} | {ci(v.top1_ci95)} | {pct(v.top5)} | {pct(v.agreement_top1)} | {pts(v.delta_top1)} | "
            f"{num(v.size_mb)} |"
        )
    lines += _paired_section(report)
    lines += _recipe_section(report)
    lines += _sensitivity_section(report)
    bench_lines = bench_markdown(report.variants, report.bench, esc=md_text)
    if bench_lines:
        lines += [""] + bench_lines
    errors = [v for v in report.variants if v.error]
    if errors:
        lines += ["", "## Errors", ""] + [f"- **{md_text(v.name)}**: {md_text(v.error)}" for v in errors]
    gate = gate_items(report, esc=md_text)
    if gate:
        lines += ["", "## FP32 parity gate", ""] + [f"- {item}" for item in gate]
    compared = comparison_items(report, esc=md_text)
    if compared:
        lines += ["", "## QAT against its FP32 control and post-training INT8", ""] + [f"- {item}" for item in compared]
    if d.skipped:
        lines += ["", f"## Skipped ({d.num_skipped})", ""]
        lines += [f"- {item}" for item in skipped_items(d.skipped, limit=50, esc=md_text, code=md_code)]
    lines += ["", "## Environment", ""] + [f"- {item}" for item in environment_items(report, esc=md_text)] + [""]
    return "\n".join(lines)


def _mean_ci(interval, fmt: str) -> str:
    return f" [{num(interval[0], fmt)}, {num(interval[1], fmt)}]" if interval else ""
