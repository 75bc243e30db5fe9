"""report.md, rendered from report.json only."""

from __future__ import annotations

from int8eval.report.schema import Report


def _pct(x: float | None, digits: int = 2) -> str:
    return "—" if x is None else f"{100 * x:.{digits}f}"


def _ci(ci) -> str:
    return "—" if ci is None else f"[{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def _num(x: float | None, fmt: str = ".1f") -> str:
    return "—" if x is None else format(x, fmt)


def _pts(x: float | None, digits: int = 2, sign: bool = True) -> str:
    return "—" if x is None else f"{100 * x:{'+' if sign else ''}.{digits}f}"


def _ci_pts(ci) -> str:
    return "—" if ci is None else f"[{100 * ci[0]:+.2f}, {100 * ci[1]:+.2f}]"


def _p(p: float | None) -> str:
    return "—" if p is None else (f"{p:.2g}" if p < 0.001 else f"{p:.3f}")


VERDICT_MARK = {"pass": "PASS", "fail": "FAIL", "inconclusive": "INCONCLUSIVE"}


def verdict_label(v) -> str:
    """Short verdict text for a variant (shared by the Markdown and HTML writers)."""
    if v.reference:
        return "reference"
    if v.verdict:
        return VERDICT_MARK.get(v.verdict["verdict"], v.verdict["verdict"])
    return "—"


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
            f"| {v.name} | {verdict_label(v)} | {_pts(t1['diff'])} | {_ci_pts(t1['diff_ci95'])} | "
            f"{t1['ref_right_var_wrong']} | {t1['ref_wrong_var_right']} | {_p(t1['mcnemar_p'])} | "
            f"{_pct(s['agreement_top1'])} | {_ci(s['agreement_top1_ci95'])} | {_pts(t5['diff']) if t5 else '—'} | "
            f"{_num(s.get('kl_mean'), '.2e')} | {_num(s.get('cos_mean'), '.5f')} |"
        )
    if report.acceptance:
        lines += ["", f"### Verdicts ({report.acceptance['description']})", ""]
        for v in paired:
            if v.verdict:
                lines.append(f"- **{v.name}: {verdict_label(v)}** — {v.verdict['reason']}")
    else:
        lines += ["", "No acceptance criterion was declared (`--max-drop POINTS [--drop relative]` or `--mlperf`), so no verdicts."]
    losers = [v for v in paired if v.paired.get("classes_lost_most")]
    if losers:
        lines += ["", "### Classes that lost most (net images, reference right → variant wrong minus the reverse)", ""]
        for v in losers:
            worst = ", ".join(
                f"{c['name']} ({c['wnid']}) −{c['net']} of {c['n']}" for c in v.paired["classes_lost_most"][:5]
            )
            lines.append(f"- {v.name}: {worst}")
    return lines


def _sensitivity_section(report: Report) -> list[str]:
    s = report.sensitivity
    if not s:
        return []
    spec = s.get("spec", {})
    whole = s.get("all_quantized", {})
    lines = [
        "",
        "## Per-layer sensitivity",
        "",
        f"Fake INT8 in PyTorch ({s.get('spec_description', spec)}), {s.get('num_calib')} calibration images, "
        f"{s.get('num_images')} evaluation images; agreement = top-1 agreement with FP32. Everything quantized: "
        f"agreement {_pct(whole.get('agreement'))}%, mean KL {_num(whole.get('kl'), '.2e')}; weights only "
        f"{_pct(s.get('weights_only', {}).get('agreement'))}%, activations only "
        f"{_pct(s.get('activations_only', {}).get('agreement'))}%.",
        "",
        f"Most sensitive layers (ranked by {s.get('rank_by')}):",
        "",
        "| # | PyTorch module | ONNX node | only this layer INT8: agreement % / KL | all but this layer: agreement % | "
        "only weights / only activations: KL | output SQNR dB (local w+a / w / a / in the INT8 model) |",
        "|---|---|---|---|---|---|---|",
    ]
    layers = {layer["module"]: layer for layer in s.get("layers", [])}
    for i, name in enumerate(s.get("ranking", [])[: max(len(s.get("top_k", [])), 5)], 1):
        layer = layers[name]
        only, allbut = layer.get("only") or {}, layer.get("all_but") or {}
        ow, oa, q = layer.get("only_weight") or {}, layer.get("only_act") or {}, layer.get("sqnr_db") or {}
        lines.append(
            f"| {i} | `{name}` | `{layer.get('onnx_node') or '—'}` | {_pct(only.get('agreement'))} / "
            f"{_num(only.get('kl'), '.2e')} | {_pct(allbut.get('agreement'))} | {_num(ow.get('kl'), '.2e')} / "
            f"{_num(oa.get('kl'), '.2e')} | {_num(q.get('local'))} / {_num(q.get('local_weight'))} / "
            f"{_num(q.get('local_act'))} / {_num(q.get('accumulated'))} |"
        )
    keep = s.get("keep_fp32")
    if keep:
        lines += [
            "",
            f"Keeping the top {len(keep['layers'])} in FP32: agreement {_pct(whole.get('agreement'))}% → "
            f"{_pct(keep.get('agreement'))}%, mean KL {_num(whole.get('kl'), '.2e')} → {_num(keep.get('kl'), '.2e')}.",
        ]
    confirm = s.get("confirm")
    if confirm:
        a, k = confirm["all_quantized"], confirm["keep_fp32"]
        lines.append(
            f"On {k['n']} other images: agreement {_pct(a['agreement'])}% with every layer INT8, "
            f"{_pct(k['agreement'])}% with the top {len(confirm['layers'])} in FP32."
        )
    return lines


def render_markdown(report: Report) -> str:
    m, d = report.model, report.data
    p = m.preprocessing
    lines = [
        f"# int8eval report: {m.name}",
        "",
        f"- Weights: {m.source} ({m.num_params / 1e6:.2f} M parameters)",
        f"- Preprocessing: resize {p.resize} ({p.interpolation.value}), center-crop {p.crop}, "
        f"mean {list(p.mean)}, std {list(p.std)}",
        f"- Data: `{d.root}` ({d.layout}): {d.num_images} images evaluated, {d.num_skipped} skipped",
    ]
    if d.calibration:
        c = d.calibration
        lines.append(f"- Calibration: {c.num_images} images from {c.source} (seed {c.seed}), excluded from evaluation")
    t = report.timing
    if t:
        lines.append(f"- Run: {t.get('total_s', 0):.1f} s in all, {t.get('images_per_s', 0):.1f} images/s for the evaluation pass")
    lines += [
        "",
        "## Variants",
        "",
        "| variant | backend | precision | status | top-1 % | 95% CI | top-5 % | agreement % | Δ top-1 pts | size MB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for v in report.variants:
        status = v.status if v.parity is None or v.parity.passed else f"{v.status} (parity FAILED)"
        delta = "—" if v.delta_top1 is None else f"{100 * v.delta_top1:+.2f}"
        lines.append(
            f"| {v.name}{' (reference)' if v.reference else ''} | {v.backend} | {v.precision} | {status} | "
            f"{_pct(v.top1)} | {_ci(v.top1_ci95)} | {_pct(v.top5)} | {_pct(v.agreement_top1)} | {delta} | "
            f"{_num(v.size_mb)} |"
        )
    lines += _paired_section(report)
    lines += _sensitivity_section(report)
    if report.bench or any(v.bench for v in report.variants):
        from int8eval.bench import render_markdown as bench_markdown  # the speed section is bench's to render

        bench_lines = bench_markdown(report.variants, report.bench)
        if bench_lines:
            lines += [""] + bench_lines
    errors = [v for v in report.variants if v.error]
    if errors:
        lines += ["", "## Errors", ""] + [f"- **{v.name}**: {v.error}" for v in errors]
    parity = [v for v in report.variants if v.parity is not None]
    if parity:
        lines += ["", "## FP32 parity across backends", ""]
        for v in parity:
            verdict = "passes" if v.parity.passed else "FAILS: its INT8 numbers are not trustworthy"
            lines.append(
                f"- {v.name}: agrees with the reference on {_pct(v.parity.agreement_top1)}% of images "
                f"(needs {_pct(v.parity.threshold, 1)}%): {verdict}"
            )
    if d.skipped:
        lines += ["", f"## Skipped ({d.num_skipped})", ""]
        lines += [f"- `{s['path']}`: {s['reason']}" for s in d.skipped[:50]]
        if len(d.skipped) > 50:
            lines.append(f"- … and {len(d.skipped) - 50} more (see report.json)")
    env = report.environment
    cpu = env.get("cpu", {})
    lines += [
        "",
        "## Environment",
        "",
        f"- CPU: {cpu.get('model')} ({cpu.get('logical_cores')} logical cores); "
        f"ISA: {', '.join(k for k, on in cpu.get('isa', {}).items() if on) or 'none of note'}",
        f"- GPU: {env.get('gpu') or 'none'}",
        f"- Libraries: {', '.join(f'{k} {v}' for k, v in env.get('libraries', {}).items())}",
        f"- Schema {report.schema_version}, created {report.created}",
        "",
    ]
    return "\n".join(lines)
