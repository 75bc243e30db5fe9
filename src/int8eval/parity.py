"""The FP32 parity gate: before an INT8 (or BF16/FP16) number counts, the same backend running the *same weights* in
FP32 must agree with the reference: PyTorch's FP32, or for an ONNX file ONNX Runtime's (`reference_for`). Otherwise a drop could come from the export or the runtime, not INT8.

Which FP32 variant gates which is decided from the recipes alone (`gate_for`), so a fine-tuned FP32 control -- a
different model on purpose -- can never stand in for a backend's FP32.
"""

from __future__ import annotations

from int8eval.config import Backend, Precision, Recipe
from int8eval.report.schema import ParityCheck, Status, VariantResult

PARITY_THRESHOLD = 0.999
REFERENCE = Recipe(backend=Backend.torch, precision=Precision.fp32)
ONNX_REFERENCE = Recipe(backend=Backend.onnxruntime, precision=Precision.fp32)


def reference_for(model: str) -> Recipe:
    """The FP32 reference of `model` (a model name, as SessionSpec.model): PyTorch's FP32, or for an ONNX file, which
    no PyTorch module holds, ONNX Runtime's FP32 run of the file."""
    from int8eval.models.onnx_file import handles

    return ONNX_REFERENCE if handles(model) else REFERENCE


def gate_for(recipe: Recipe) -> Recipe | None:
    """The FP32 recipe whose parity with the reference gates `recipe`: its backend (and emulation) running the
    reference's weights in FP32. QAT starts from those weights in PyTorch, so the reference itself gates it.
    None for FP32 recipes: the reference, each backend's FP32 (checked, not gated) and the fine-tuned control."""
    if recipe.precision is Precision.fp32:
        return None
    return Recipe(backend=recipe.backend, precision=Precision.fp32, emulate=recipe.emulate)


def is_parity_check(recipe: Recipe, reference: Recipe = REFERENCE) -> bool:
    """A backend's FP32 of the reference's weights (not the reference itself, not a fine-tuned control)."""
    return recipe.precision is Precision.fp32 and not recipe.qat_epochs and recipe != reference


def plan_recipes(recipes: tuple[Recipe, ...], reference: Recipe = REFERENCE) -> list[Recipe]:
    """The FP32 reference first (`reference_for`), then the FP32 variant that gates each recipe, then the recipes."""
    plan = [reference]
    for recipe in recipes:
        gate = gate_for(recipe)
        if gate is not None and gate not in plan:
            plan.append(gate)
    plan += [r for r in recipes if r not in plan]
    return plan


def apply_gate(plan: list[Recipe], results: dict[str, VariantResult], threshold: float = PARITY_THRESHOLD) -> None:
    """Check every backend FP32 variant against the reference (the plan's first recipe; `agreement_top1` must be
    filled), record on each gated variant which FP32 variant gated it, and mark `parity_failed` those whose gate
    failed or could not be checked. Mutates `results`."""
    reference = plan[0]
    for recipe in plan:
        result = results[recipe.name]
        if is_parity_check(recipe, reference) and result.status == Status.ok:
            agreement = result.agreement_top1
            result.parity = ParityCheck(agreement_top1=agreement, threshold=threshold, passed=agreement >= threshold)
    for recipe in plan:
        gate = gate_for(recipe)
        result = results[recipe.name]
        if gate is None:
            continue
        result.gated_by = gate.name
        if result.status != Status.ok or gate == reference:
            continue
        checked = results[gate.name]
        if checked.status != Status.ok:
            result.status = Status.parity_failed
            result.error = f"{gate.name} could not be checked against the reference ({checked.error}), so its {result.precision.upper()} numbers cannot be trusted"
        elif not checked.parity.passed:
            result.status = Status.parity_failed
            result.error = (
                f"{gate.name} agrees with the reference {reference.name} on only {100 * checked.parity.agreement_top1:.2f}% "
                f"of images (needs {100 * threshold:.1f}%)"
            )
