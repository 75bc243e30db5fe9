"""What report.md and report.html both say, as plain strings: each writer only escapes and wraps them.

Helpers whose text carries markup take it as callables: `esc` escapes a value taken from report.json, `code` shows
one as inline code, `strong` emphasises one; the defaults are Markdown's (no escaping, backticks, no emphasis).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from int8eval.report.format import DASH, ci, num, p_value, pct, pts
from int8eval.report.schema import Report
from int8eval.report.sections import Sensitivity, Tally

Wrap = Callable[[str], str]

VERDICT_MARK = {"pass": "PASS", "fail": "FAIL", "inconclusive": "INCONCLUSIVE"}


def _same(text: str) -> str:
    return text


def _backticks(text: str) -> str:
    return f"`{text}`"


def verdict_label(v) -> str:
    """Short verdict text for a variant (shared by the Markdown and HTML writers)."""
    if v.reference:
        return "reference"
    if v.verdict:
        return VERDICT_MARK[v.verdict.verdict]
    return DASH


def overview_items(report: Report, *, esc: Wrap = _same, code: Wrap = _backticks) -> list[str]:
    """The overview list: weights, preprocessing, data, calibration and run time."""
    m, d = report.model, report.data
    p = m.preprocessing
    items = [
        f"Weights: {esc(m.source)} ({m.num_params / 1e6:.2f} M parameters)",
        f"Preprocessing: resize {p.resize} ({p.interpolation.value}{', square' * (p.resize_mode.value == 'square')}), "
        f"center-crop {p.crop}, {p.channel_order.value.upper()} on {p.value_range.value}, "
        f"mean {list(p.mean)}, std {list(p.std)}" + (f", {p.layout.value.upper()}" if p.layout else ""),
        f"Data: {code(d.root)} ({esc(d.layout)}): {d.num_images} images evaluated, {d.num_skipped} skipped",
    ]
    if d.labels_free:
        items.append("Labels: none used, so no accuracy: the reference's top-1 answers stand in for the labels (top-1 "
                     "% of a variant is its agreement with the reference; lost = answers changed)")
    check = report.preprocessing_check
    if check is not None and check.warning:
        items.append(f"WARNING: {esc(check.warning)}")
    elif check is not None:
        items.append(f"Published top-1 {pct(check.published_top1)}% ({esc(check.published_source)}); the FP32 "
                     f"reference's {pct(check.measured_top1)}% ({check.confidence:.0%} CI {ci(check.measured_ci)}) is "
                     "consistent with it: no sign of a preprocessing mismatch")
    if d.calibration:
        c = d.calibration
        items.append(f"Calibration: {c.num_images} images from {esc(c.source)} (seed {c.seed}), excluded from evaluation")
    t = report.timing
    if t:
        speed = f", {t['images_per_s']:.1f} images/s for the evaluation pass" if t.get("images_per_s") is not None else ""
        parts = [f"{label} {t[key]:.1f} s" for key, label in (
            ("open_s", "opening"), ("build_s", "building"), ("eval_s", "evaluating"),
            ("eval_wait_s", "of which waiting for images"), ("stats_s", "statistics")) if t.get(key) is not None]
        where = f" ({', '.join(parts)})" if parts else ""
        items.append(f"Run: {t.get('total_s') or 0:.1f} s in all{where}{speed}")
    ref = next((v for v in report.variants if v.reference), None)
    execution = (ref.details or {}).get("execution") if ref else None
    if execution:
        items.append(f"FP32 reference in the pass: {reference_execution(execution)}")
    return items


def reference_execution(e: dict) -> str:
    """How the reference ran (backends.fast_reference's record), in words."""
    check = e.get("check")
    checked = (f"checked against eager on {check['check_images']} seeded evaluation images: top-1 the same on "
               f"{check['top1_same']}, max |logit difference| {check['max_abs_logit_diff']:.1e}") if check else ""
    if e.get("mode") == "compiled":
        return f"compiled by inductor ({check['compile_s']:.0f} s to compile), {checked}"
    return f"eager: {e.get('why', '')}" + (f" ({checked})" if checked else "")


def gate_items(report: Report, *, esc: Wrap = _same) -> list[str]:
    """The FP32 parity gate: each backend's FP32 against the reference, then which FP32 variant gated each variant."""
    items = []
    for v in report.variants:
        if v.parity is not None:
            verdict = "passes" if v.parity.passed else "FAILS: the variants it gates are not trustworthy"
            items.append(f"{esc(v.name)} agrees with the reference on {pct(v.parity.agreement_top1)}% of images "
                         f"(needs {pct(v.parity.threshold, 1)}%): {verdict}")
    by_name = {v.name: v for v in report.variants}
    for v in report.variants:
        if v.gated_by is None:
            continue
        gate = by_name.get(v.gated_by)
        if gate is not None and gate.reference:
            how = "the reference itself: same runtime, same weights"
        elif gate is not None and gate.parity is not None:
            how = "passed" if gate.parity.passed else "FAILED"
        else:
            how = "not checked: " + (esc(gate.error or gate.status) if gate is not None else "missing")
        items.append(f"{esc(v.name)} is gated by {esc(v.gated_by)} ({how})")
    controls = [v for v in report.variants if v.precision == "fp32" and (v.recipe or {}).get("qat_epochs")]
    for v in controls:
        items.append(f"{esc(v.name)} is a fine-tuned control, a model of its own: compared with the reference, "
                     "never used as a gate")
    return items


def comparison_items(report: Report, *, esc: Wrap = _same) -> list[str]:
    """QAT against its fine-tuned FP32 control and against post-training INT8 (paired, same images)."""
    items = []
    for v in report.variants:
        for other, s in (v.compared_with or {}).items():
            t = s.top1
            items.append(
                f"{esc(v.name)} vs {esc(other)}: top-1 {pct(t.var)}% vs {pct(t.ref)}%, "
                f"Δ {pts(t.diff)} pts (95% CI {ci(t.diff_ci95, signed=True)}), McNemar p {p_value(t.mcnemar_p)}, "
                f"agreement {pct(s.agreement_top1)}% (n = {s.n})"
            )
    return items


def classes_lost_most(variants, limit: int) -> list[tuple[str, str]]:
    """(variant name, its `limit` classes that lost most, as text) for each paired variant that lost any."""
    out = []
    for v in variants:
        worst = v.paired.classes_lost_most if v.paired else []
        if worst:
            out.append((v.name, ", ".join(f"{c.name}{f' ({c.wnid})' * (c.name != c.wnid)} −{c.net} of {c.n}" for c in worst[:limit])))
    return out


class LayerRow(NamedTuple):
    """One ranked layer of the sensitivity table, every value formatted."""

    rank: str
    module: str
    onnx_node: str
    type: str
    only_agreement: str
    only_kl: str
    all_but_agreement: str
    only_weight_kl: str
    only_act_kl: str
    sqnr_local: str
    sqnr_local_weight: str
    sqnr_local_act: str
    sqnr_accumulated: str


def _kl(tally: Tally | None) -> str:
    return num(None if tally is None else tally.kl, ".2e")


def sensitivity_rows(sensitivity: Sensitivity, min_rows: int) -> list[LayerRow]:
    """The most sensitive layers in ranking order: the top-k kept in FP32, and at least `min_rows` of them."""
    layers = {layer.module: layer for layer in sensitivity.layers}
    rows = []
    for i, name in enumerate(sensitivity.ranking[: max(len(sensitivity.top_k), min_rows)], 1):
        layer = layers[name]
        q = layer.sqnr_db
        rows.append(LayerRow(
            str(i), name, layer.onnx_node or DASH, layer.type, pct(layer.only.agreement), _kl(layer.only),
            pct(layer.all_but and layer.all_but.agreement), _kl(layer.only_weight), _kl(layer.only_act),
            *(num(None if q is None else getattr(q, k)) for k in ("local", "local_weight", "local_act", "accumulated")),
        ))
    return rows


def keep_fp32_sentences(sensitivity: Sensitivity, *, strong: Wrap = _same) -> tuple[str | None, str | None]:
    """What keeping the top-k in FP32 gave on the sweep's images, and on the confirmation images (None: not run)."""
    whole, keep, confirm = sensitivity.all_quantized, sensitivity.keep_fp32, sensitivity.confirm
    keep_text = confirm_text = None
    if keep:
        keep_text = (f"Keeping the top {len(keep.layers)} in FP32: agreement {pct(whole.agreement)}% → "
                     f"{strong(pct(keep.agreement) + '%')}, mean KL {num(whole.kl, '.2e')} → "
                     f"{num(keep.kl, '.2e')}.")
    if confirm:
        a, k = confirm.all_quantized, confirm.keep_fp32
        confirm_text = (f"On {k.n} other images: agreement {pct(a.agreement)}% with every layer INT8, "
                        f"{strong(pct(k.agreement) + '%')} with the top {len(confirm.layers)} in FP32.")
    return keep_text, confirm_text


def skipped_items(skipped: list[dict], limit: int, *, esc: Wrap = _same, code: Wrap = _backticks) -> list[str]:
    """The first `limit` skipped images with their reasons, and a line counting the rest."""
    items = [f"{code(s['path'])}: {esc(s['reason'])}" for s in skipped[:limit]]
    if len(skipped) > limit:
        items.append(f"… and {len(skipped) - limit} more (see report.json)")
    return items


def environment_items(report: Report, *, esc: Wrap = _same) -> list[str]:
    """CPU with its instruction sets of note, GPU, library versions, schema and creation time."""
    env = report.environment
    cpu = env.get("cpu", {})
    isa = ", ".join(k for k, on in cpu.get("isa", {}).items() if on) or "none of note"
    libs = ", ".join(f"{k} {v}" for k, v in env.get("libraries", {}).items())
    return [
        f"CPU: {esc(str(cpu.get('model')))} ({esc(str(cpu.get('logical_cores')))} logical cores); ISA: {esc(isa)}",
        f"GPU: {esc(str(env.get('gpu') or 'none'))}",
        f"Libraries: {esc(libs)}",
        f"Schema {esc(report.schema_version)}, created {esc(report.created)}",
    ]


RECIPE_HEADER = ["variant", "calibration", "weights", "bias correction", "kept in FP32", "backend specifics", "build s"]

# Keys of a variant's `details` worth a reader's eye (the rest stays in report.json).
_DETAIL_KEYS = (
    "flow", "act_qmax", "depthwise_act_qmax", "weight_qmax", "activation_type", "exact_int8_kernels",
    "bias_corrected_layers", "first_layer_fp32", "nncf", "adaround", "why",  # why: the CPU-dependent choice and its reason
)


def recipe_rows(report: Report) -> list[list[str]]:
    """One row per INT8 variant: how it was built, from its recipe and the backend's `details` in report.json."""
    rows = []
    for v in report.variants:
        r = v.recipe or {}
        if v.precision != "int8" or not r:
            continue
        calib = r.get("calib", DASH)
        if calib == "percentile":
            calib = f"percentile {r.get('percentile', 0):g}"
        details = v.details or {}
        bc = r.get("bias_correction")
        bc_text = DASH if bc is None else ("int8eval's" if bc else "off")
        kept = r.get("keep_fp32") or []
        kept_text = DASH if not kept else f"{len(kept)}: " + ", ".join(kept[:3]) + (", ..." if len(kept) > 3 else "")
        specifics = "; ".join(f"{k} {_short(details[k])}" for k in _DETAIL_KEYS if details.get(k) is not None)
        rows.append([
            v.name, calib, "per-channel" if r.get("per_channel", True) else "per-tensor", bc_text, kept_text,
            specifics or DASH, num(v.prepare_s),
        ])
    return rows


def _short(value) -> str:
    if isinstance(value, list):
        return ", ".join(map(str, value))
    if isinstance(value, dict):
        return ", ".join(f"{k}={val:.3g}" if isinstance(val, float) else f"{k}={val}"
                         for k, val in value.items() if k != "calibration_images")
    return str(value)
