"""report.md, rendered from report.json only."""

from __future__ import annotations

from int8eval.report.content import (
    RECIPE_HEADER,
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

__all__ = ["render_markdown", "verdict_label"]


def _paired_section(report: Report) -> list[str]:
    ref = report.reference
    paired = [v for v in report.variants if v.paired]
    if ref is None or not paired:
        return []
    n = paired[0].paired["n"]
    lines = [
        "",
        f"## Paired comparison with {ref.name}",
        "",
        f"The same {n} images for every variant. Δ = variant − reference in top-1 points, with the "
        f"{paired[0].paired['ci_method']} 95% CI; lost = reference right → variant wrong, gained = the reverse; "
        "p = McNemar's exact test on the lost and gained images.",
        "",
        "| variant | verdict | Δ top-1 pts | 95% CI | lost | gained | McNemar p | agreement % | 95% CI | Δ top-5 pts | KL mean | cos mean |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for v in paired:
        s = v.paired
        t1, t5 = s["top1"], s.get("top5")
        lines.append(
            f"| {v.name} | {verdict_label(v)} | {pts(t1['diff'])} | {ci(t1['diff_ci95'], signed=True)} | "
            f"{t1['ref_right_var_wrong']} | {t1['ref_wrong_var_right']} | {p_value(t1['mcnemar_p'])} | "
            f"{pct(s['agreement_top1'])} | {ci(s['agreement_top1_ci95'])} | {pts(t5['diff']) if t5 else '—'} | "
            f"{num(s.get('kl_mean'), '.2e')} | {num(s.get('cos_mean'), '.5f')} |"
        )
    if report.acceptance:
        lines += ["", f"### Verdicts ({report.acceptance['description']})", ""]
        for v in paired:
            if v.verdict:
                lines.append(f"- **{v.name}: {verdict_label(v)}** — {v.verdict['reason']}")
    else:
        lines += ["", "No acceptance criterion was declared (`--max-drop POINTS [--drop relative]` or `--mlperf`), so no verdicts."]
    losers = classes_lost_most(paired, limit=5)
    if losers:
        lines += ["", "### Classes that lost most (net images, reference right → variant wrong minus the reverse)", ""]
        lines += [f"- {name}: {worst}" for name, worst in losers]
    return lines


def _recipe_section(report: Report) -> list[str]:
    rows = recipe_rows(report)
    if not rows:
        return []
    lines = ["", "## How the INT8 variants were built", "", "| " + " | ".join(RECIPE_HEADER) + " |",
             "|" + "---|" * len(RECIPE_HEADER)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _sensitivity_section(report: Report) -> list[str]:
    s = report.sensitivity
    if not s:
        return []
    spec = s.get("spec", {})
    whole = s.get("all_quantized") or {}
    lines = [
        "",
        "## Per-layer sensitivity",
        "",
        f"Fake INT8 in PyTorch ({s.get('spec_description', spec)}), {s.get('num_calib')} calibration images, "
        f"{s.get('num_images')} evaluation images; agreement = top-1 agreement with FP32. Everything quantized: "
        f"agreement {pct(whole.get('agreement'))}%, mean KL {num(whole.get('kl'), '.2e')}; weights only "
        f"{pct(s.get('weights_only', {}).get('agreement'))}%, activations only "
        f"{pct(s.get('activations_only', {}).get('agreement'))}%.",
        "",
        f"Most sensitive layers (ranked by {s.get('rank_by')}):",
        "",
        "| # | PyTorch module | ONNX node | only this layer INT8: agreement % / KL | all but this layer: agreement % | "
        "only weights / only activations: KL | output SQNR dB (local w+a / w / a / in the INT8 model) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in sensitivity_rows(s, min_rows=5):
        lines.append(
            f"| {r.rank} | `{r.module}` | `{r.onnx_node}` | {r.only_agreement} / {r.only_kl} | {r.all_but_agreement} | "
            f"{r.only_weight_kl} / {r.only_act_kl} | {r.sqnr_local} / {r.sqnr_local_weight} / {r.sqnr_local_act} / "
            f"{r.sqnr_accumulated} |"
        )
    keep, confirm = keep_fp32_sentences(s)
    if keep:
        lines += ["", keep]
    if confirm:
        lines.append(confirm)
    return lines


def render_markdown(report: Report) -> str:
    d = report.data
    lines = [f"# int8eval report: {report.model.name}", ""] + [f"- {item}" for item in overview_items(report)]
    lines += [
        "",
        "## Variants",
        "",
        "| variant | backend | precision | status | top-1 % | 95% CI | top-5 % | agreement % | Δ top-1 pts | size MB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for v in report.variants:
        status = v.status if v.parity is None or v.parity.passed else f"{v.status} (parity FAILED)"
        lines.append(
            f"| {v.name}{' (reference)' if v.reference else ''} | {v.backend} | {v.precision} | {status} | "
            f"{pct(v.top1)} | {ci(v.top1_ci95)} | {pct(v.top5)} | {pct(v.agreement_top1)} | {pts(v.delta_top1)} | "
            f"{num(v.size_mb)} |"
        )
    lines += _paired_section(report)
    lines += _recipe_section(report)
    lines += _sensitivity_section(report)
    if report.bench or any(v.bench for v in report.variants):
        from int8eval.bench import render_markdown as bench_markdown  # the speed section is bench's to render

        bench_lines = bench_markdown(report.variants, report.bench)
        if bench_lines:
            lines += [""] + bench_lines
    errors = [v for v in report.variants if v.error]
    if errors:
        lines += ["", "## Errors", ""] + [f"- **{v.name}**: {v.error}" for v in errors]
    gate = gate_items(report)
    if gate:
        lines += ["", "## FP32 parity gate", ""] + [f"- {item}" for item in gate]
    compared = comparison_items(report)
    if compared:
        lines += ["", "## QAT against its FP32 control and post-training INT8", ""] + [f"- {item}" for item in compared]
    if d.skipped:
        lines += ["", f"## Skipped ({d.num_skipped})", ""]
        lines += [f"- {item}" for item in skipped_items(d.skipped, limit=50)]
    lines += ["", "## Environment", ""] + [f"- {item}" for item in environment_items(report)] + [""]
    return "\n".join(lines)
