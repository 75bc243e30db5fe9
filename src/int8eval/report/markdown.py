"""report.md, rendered from report.json only."""

from __future__ import annotations

from int8eval.report.schema import Report


def _pct(x: float | None, digits: int = 2) -> str:
    return "—" if x is None else f"{100 * x:.{digits}f}"


def _ci(ci) -> str:
    return "—" if ci is None else f"[{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def _num(x: float | None, fmt: str = ".1f") -> str:
    return "—" if x is None else format(x, fmt)


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
