"""The FP32 parity gate: before an INT8 (or BF16/FP16) number counts, the same backend running the *same weights* in
FP32 must agree with the PyTorch reference. Otherwise a drop could come from the export or the runtime, not INT8.

Which FP32 variant gates which is decided from the recipes alone (`gate_for`), so a fine-tuned FP32 control -- a
different model on purpose -- can never stand in for a backend's FP32.
"""

from __future__ import annotations

from int8eval.config import Backend, Precision, Recipe
from int8eval.report.schema import ParityCheck, Status, VariantResult

PARITY_THRESHOLD = 0.999
REFERENCE = Recipe(backend=Backend.torch, precision=Precision.fp32)


def gate_for(recipe: Recipe) -> Recipe | None:
    """The FP32 recipe whose parity with the reference gates `recipe`: its backend (and emulation) running the
    reference's weights in FP32. QAT starts from those weights in PyTorch, so the reference itself gates it.
    None for FP32 recipes: the reference, each backend's FP32 (checked, not gated) and the fine-tuned control."""
    if recipe.precision is Precision.fp32:
        return None
    return Recipe(backend=recipe.backend, precision=Precision.fp32, emulate=recipe.emulate)


def is_parity_check(recipe: Recipe) -> bool:
    """A backend's FP32 of the reference's weights (not the reference itself, not a fine-tuned control)."""
    return recipe.precision is Precision.fp32 and not recipe.qat_epochs and recipe != REFERENCE


def plan_recipes(recipes: tuple[Recipe, ...]) -> list[Recipe]:
    """The PyTorch FP32 reference first, then the FP32 variant that gates each recipe, then the recipes."""
    plan = [REFERENCE]
    for recipe in recipes:
        gate = gate_for(recipe)
        if gate is not None and gate not in plan:
            plan.append(gate)
    plan += [r for r in recipes if r not in plan]
    return plan


def apply_gate(plan: list[Recipe], results: dict[str, VariantResult], threshold: float = PARITY_THRESHOLD) -> None:
    """Check every backend FP32 variant against the reference (`agreement_top1` must be filled), record on each
    gated variant which FP32 variant gated it, and mark `parity_failed` those whose gate failed or could not be
    checked. Mutates `results`."""
    for recipe in plan:
        result = results[recipe.name]
        if is_parity_check(recipe) and result.status == Status.ok:
            agreement = result.agreement_top1
            result.parity = ParityCheck(agreement_top1=agreement, threshold=threshold, passed=agreement >= threshold)
    for recipe in plan:
        gate = gate_for(recipe)
        result = results[recipe.name]
        if gate is None:
            continue
        result.gated_by = gate.name
        if result.status != Status.ok or gate == REFERENCE:
            continue
        checked = results[gate.name]
        if checked.status != Status.ok:
            result.status = Status.parity_failed
            result.error = f"{gate.name} could not be checked against the reference ({checked.error}), so its {result.precision.upper()} numbers cannot be trusted"
        elif not checked.parity.passed:
            result.status = Status.parity_failed
            result.error = (
                f"{gate.name} agrees with the PyTorch reference on only {100 * checked.parity.agreement_top1:.2f}% "
                f"of images (needs {100 * threshold:.1f}%)"
            )
