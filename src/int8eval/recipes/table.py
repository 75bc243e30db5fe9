"""The seed-style table of a reproduction: the published numbers first, then what was measured (FP32 top-1, INT8
top-1, loss in points, speedup, size reduction). Its rows are the report's `reproduction` section, so the table
(seed_table.md / .json) is made from report.json alone."""

from __future__ import annotations

import json
from collections.abc import Iterable

from int8eval.config import Precision
from int8eval.parity import REFERENCE
from int8eval.recipes.reproduce import ReproRecipe
from int8eval.report import Report
from int8eval.report.schema import ReproductionRow, ReproductionSection, VariantResult

FULL_VAL_IMAGES = 50_000
CONTROL = "torch-fp32-finetuned"  # QAT's fine-tuning without quantization (session.qat_recipes)


def row(name: str, kind: str, fp32_top1: float | None, int8_top1: float | None, speedup: float | None = None,
        size_reduction: float | None = None, note: str = "") -> ReproductionRow:
    """A table row; the loss in points is FP32 top-1 minus INT8 top-1 where both are known."""
    loss = None if fp32_top1 is None or int8_top1 is None else fp32_top1 - int8_top1
    return ReproductionRow(name=name, kind=kind, fp32_top1=fp32_top1, int8_top1=int8_top1, loss_points=loss,
                           speedup=speedup, size_reduction=size_reduction, note=note)


def anchor_rows(recipe: ReproRecipe) -> list[ReproductionRow]:
    """The published numbers the recipe is compared with."""
    return [row(f"{key} (published)", "published", a.fp32_top1, a.int8_top1, a.speedup, a.reduction, a.source)
            for key, a in recipe.anchors.items()]


def measured_rows(variants: Iterable[VariantResult], *, on_gpu: bool) -> list[ReproductionRow]:
    """A row per measured INT8 variant (and the fine-tuned FP32 control) against the FP32 reference; speedups are
    ratios of the time each spent predicting the same batches, against TensorRT FP32 on a GPU, else the reference.
    Variants that failed or whose FP32 parity check failed get no row (`failure_notes` says why)."""
    live = {v.name: v for v in variants if v.status == "ok"}
    top1 = {name: 100 * v.top1 for name, v in live.items() if v.top1 is not None}
    ref = top1[REFERENCE.name]
    ref_size = live[REFERENCE.name].size_mb
    baseline = "tensorrt-fp32" if on_gpu and "tensorrt-fp32" in live else REFERENCE.name
    predict_s = {name: v.predict_s for name, v in live.items()}
    rows = []
    for name, v in live.items():
        if name == REFERENCE.name or v.precision != Precision.int8 and name != CONTROL:
            continue
        if name == CONTROL:
            rows.append(row(name, "measured", top1[name], None, note=(
                f"the control: QAT's fine-tuning without quantization ({top1[name] - ref:+.2f} points vs the original FP32)")))
            continue
        speed = predict_s[baseline] / predict_s[name] if predict_s.get(name) else None
        note = f"speedup vs {baseline}"
        if name.startswith("torch-int8-qat") and CONTROL in top1:
            note += f"; {top1[CONTROL] - top1[name]:+.2f} points below the fine-tuned FP32 control"
        if on_gpu and "tensorrt-fp16" in live and predict_s.get(name):
            note += f"; {predict_s['tensorrt-fp16'] / predict_s[name]:.2f}x vs tensorrt-fp16"
        size = v.size_mb
        rows.append(row(name, "measured", ref, top1[name], speed,
                        None if size is None or not ref_size else 1.0 - size / ref_size, note))
    return rows


def failure_notes(variants: Iterable[VariantResult]) -> list[str]:
    """Why each variant without a row has none."""
    return [f"{v.name} {'failed' if v.status == 'error' else 'failed its FP32 parity check'}: {v.error}"
            for v in variants if v.status != "ok"]


def _fmt(x: float | None, spec: str, suffix: str = "") -> str:
    return "—" if x is None else f"{format(x, spec)}{suffix}"


def render_table(section: ReproductionSection, *, num_images: int, data: str) -> str:
    """The seed-style Markdown table (seed_table.md), published numbers first."""
    r = ReproRecipe.model_validate(section.recipe)
    lines = [
        f"# {r.name}: {r.description}",
        "",
        f"- Model: {r.model} ({r.weights}); preprocessing resize {r.preprocessing.resize} "
        f"({r.preprocessing.interpolation.value}), crop {r.preprocessing.crop}",
        f"- Evaluated on {num_images} images from `{data}`"
        + (
            f" (the published numbers use the {FULL_VAL_IMAGES:,} ImageNet validation images: compare differences, "
            "not absolute values)"
            if num_images < FULL_VAL_IMAGES
            else ""
        ),
        "",
        "| variant | FP32 top-1 % | INT8 top-1 % | loss (points) | speedup | size reduction | note |",
        "|---|---|---|---|---|---|---|",
    ]
    for x in section.rows:
        lines.append(
            f"| {x.name} | {_fmt(x.fp32_top1, '.2f')} | {_fmt(x.int8_top1, '.2f')} | "
            f"{_fmt(x.loss_points, '+.2f')} | {_fmt(x.speedup, '.2f', 'x')} | "
            f"{_fmt(None if x.size_reduction is None else 100 * x.size_reduction, '.1f', '%')} | {x.note} |"
        )
    if section.notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in section.notes]
    return "\n".join(lines) + "\n"


def seed_table(report: Report) -> tuple[str, str]:
    """(seed_table.md, seed_table.json) of a report with a `reproduction` section."""
    section = report.reproduction
    data = report.data
    md = render_table(section, num_images=data.num_images, data=data.root)
    rows = [x.model_dump(mode="json") for x in section.rows]
    js = {"recipe": section.recipe, "num_images": data.num_images, "data": data.root,
          "train_images": (getattr(data, "training", None) or {}).get("num_images", 0),
          "calib_image_ids": data.calibration.image_ids if data.calibration else [],
          "rows": rows, "requirements": section.requirements, "notes": section.notes}
    return md, json.dumps(js, indent=2) + "\n"
