"""A declared acceptance criterion and the verdict it gives each variant: pass, fail, or inconclusive.

The verdict compares the 95% confidence interval of the top-1 drop (FP32 reference minus variant, from the paired
statistics) with the budget, not the point estimate alone: a 0.4-point drop measured on 800 images is not evidence
that the drop on ImageNet is under 1 point. Inconclusive means the interval straddles the budget, and the reason
says roughly how many images would settle it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from int8eval import stats
from int8eval.config import Acceptance, DropKind, Precision
from int8eval.errors import ConfigError
from int8eval.report import Report, folder, write_rendered
from int8eval.report.format import pct
from int8eval.report.schema import VariantResult
from int8eval.report.sections import AcceptanceRecord, PairedSection, Status, Verdict, VerdictSection

if TYPE_CHECKING:  # imported where used: evaluate reaches the backends, which judging needs not
    from int8eval.evaluate import Predictions

# Floating-point slack when comparing a limit with the budget: "exactly at the budget" must not flip on 1e-17.
_TOL = 1e-9


def acceptance_from_flags(max_drop: float | None, drop: str | None, mlperf: bool,
                          min_agreement: float | None = None) -> Acceptance | None:
    """The CLI's `--max-drop X --drop absolute|relative`, `--mlperf` or `--min-agreement P` as an Acceptance (None
    when none)."""
    if min_agreement is not None:
        if max_drop is not None or drop is not None or mlperf:
            raise ConfigError("--min-agreement is a budget of its own (on agreement, not accuracy): give either it or "
                              "--max-drop/--mlperf")
        return Acceptance.agreement(min_agreement)
    if mlperf:
        if max_drop is not None or drop not in (None, DropKind.relative.value):
            raise ConfigError("--mlperf already means --max-drop 1 --drop relative; give either --mlperf or --max-drop")
        return Acceptance.mlperf()
    if max_drop is None:
        if drop is not None:
            raise ConfigError(f"--drop {drop} needs a budget: add --max-drop POINTS (e.g. --max-drop 1.0)")
        return None
    if not 0 <= max_drop <= 100:
        raise ConfigError(f"--max-drop {max_drop} is out of range; give points between 0 and 100 (e.g. 1.0)")
    return Acceptance(max_drop=max_drop, drop=DropKind(drop or DropKind.absolute.value))


def check_judgeable(acceptance: Acceptance | None, labels_free: bool) -> None:
    """A ConfigError when images without labels would be judged on accuracy."""
    if labels_free and acceptance is not None and acceptance.label != "agreement":
        raise ConfigError(f"the images carry no labels, so there is no accuracy to judge '{acceptance.describe()}' "
                          "on: give --min-agreement PERCENT instead")


def _settle_count(n: int | None, drop: float, half_width: float, budget: float) -> int | None:
    # The interval narrows roughly as 1/sqrt(n) if the flip rate stays the same: a rough guide, not a promise.
    gap = abs(budget - drop)
    if not n or gap < _TOL or half_width <= 0:
        return None
    return math.ceil(n * (half_width / gap) ** 2)


def _images_to_settle(n: int | None, drop: float, half_width: float, budget: float) -> str:
    needed = _settle_count(n, drop, half_width, budget)
    return "" if needed is None else f"; roughly {needed:,} images (now {n:,}) would settle it"


def images_to_settle(verdict: VerdictSection, n: int | None) -> int | None:
    """Roughly how many evaluated images would settle an inconclusive verdict (from `decide`) measured on `n`
    images; None for a verdict that is not inconclusive or cannot tell."""
    if verdict.verdict is not Verdict.inconclusive:
        return None
    drop, (lo, hi), budget = verdict.drop, verdict.drop_ci95, verdict.budget
    return _settle_count(n, drop, hi - drop if drop <= budget + _TOL else drop - lo, budget)


def decide(
    acceptance: Acceptance, ref_top1: float, diff: float, diff_ci: tuple[float, float], n: int | None = None
) -> VerdictSection:
    """Verdict for one variant from its paired top-1 difference (variant - reference) and its 95% CI.

    pass: the whole CI of the drop is within the budget (its upper limit may touch it);
    fail: the whole CI is beyond the budget; inconclusive: the CI straddles it (or starts exactly at it).
    Returns the verdict with its reason, the budget, the drop and its CI (fractions) and the criterion.
    """
    budget = acceptance.budget(ref_top1)
    drop = -diff
    lo, hi = -diff_ci[1], -diff_ci[0]  # the drop's CI is the difference's, mirrored
    shown = f"drop {pct(drop)} pts (95% CI {pct(lo)} to {pct(hi)})"
    if acceptance.drop is DropKind.relative:
        limit = f"the {pct(budget)}-pt budget ({acceptance.max_drop:g}% of FP32's {pct(ref_top1)}%)"
    else:
        limit = f"the {pct(budget)}-pt budget"
    if hi <= budget + _TOL:
        verdict, reason = Verdict.passed, f"{shown} is within {limit}"
    elif lo > budget + _TOL:
        verdict, reason = Verdict.failed, f"{shown} exceeds {limit}"
    elif drop <= budget + _TOL:
        verdict = Verdict.inconclusive
        reason = f"{shown}: the estimate is within {limit} but the CI reaches beyond it"
        reason += _images_to_settle(n, drop, hi - drop, budget)
    else:
        verdict = Verdict.inconclusive
        reason = f"{shown}: the estimate exceeds {limit} but the CI reaches back within it"
        reason += _images_to_settle(n, drop, drop - lo, budget)
    return VerdictSection(
        verdict=verdict, reason=reason, budget=budget, drop=drop, drop_ci95=(lo, hi), criterion=acceptance.describe()
    )


def paired_for(preds: Predictions, name: str, reference: str, *, labels_free: bool = False,
               class_names: list[str] | None = None) -> PairedSection:
    """Paired statistics of variant `name` against `reference` on the images of `preds`. `labels_free`: the
    reference's top-1 answers stand in for the labels, so top-1 "accuracy" is agreement, its flips the images whose
    answer changed, and top-5 whether the reference's answer is in the variant's top 5."""
    if labels_free:
        ref_top1, top1 = preds.top1(reference), preds.top1(name)
        return _paired(
            np.ones(len(ref_top1), bool), top1 == ref_top1, ref_top1, top1,
            correct5_ref=np.ones(len(ref_top1), bool), correct5_var=(preds.top5[name] == ref_top1[:, None]).any(axis=1),
            kl=preds.kl_to_ref.get(name), cos=preds.cos_to_ref.get(name),
        )
    return _paired(
        preds.correct1(reference),
        preds.correct1(name),
        preds.top1(reference),
        preds.top1(name),
        labels=preds.labels,
        correct5_ref=preds.correct5(reference),
        correct5_var=preds.correct5(name),
        kl=preds.kl_to_ref.get(name),
        cos=preds.cos_to_ref.get(name),
        class_names=class_names,
    )


def _paired(*args, **kwargs) -> PairedSection:
    """stats.paired_stats (plain, JSON-ready numbers) as the report's typed section."""
    return PairedSection.model_validate(stats.paired_stats(*args, **kwargs))


def add_paired_stats(report: Report, predictions: Predictions, acceptance: Acceptance | None = None) -> Report:
    """Fill `paired` for every non-reference variant with predictions, and `verdict` for each one that is not an
    FP32 parity check when `acceptance` is given; record the criterion in `report.acceptance`. Mutates `report`.

    Call after accuracy is filled, before report.json is written:
        >>> add_paired_stats(report, outcome.predictions, Acceptance(max_drop=1.0))
    """
    ref = report.reference
    if ref is None or ref.name not in predictions.top5:
        return report
    labels_free = report.data.labels_free
    check_judgeable(acceptance, labels_free)
    report.acceptance = None if acceptance is None else AcceptanceRecord(
        **acceptance.model_dump(), description=acceptance.describe()
    )
    for v in report.variants:
        if v.reference or v.name not in predictions.top5 or v.status not in (Status.ok, Status.parity_failed):
            continue
        v.paired = paired_for(predictions, v.name, ref.name, labels_free=labels_free,
                              class_names=report.data.class_names)
        v.verdict = _verdict_for(v, acceptance) if acceptance is not None and v.precision != Precision.fp32 else None
        others = [o for o in _compared_with(v, report.variants) if o in predictions.top5]
        v.compared_with = {o: _paired_against(predictions, v.name, o) for o in others} or None
    return report


def _compared_with(v: VariantResult, variants: list[VariantResult]) -> list[str]:
    """What a QAT variant is judged against besides the reference, as the seed intends: its FP32 control (the same
    fine-tuning without quantization) and PyTorch's post-training INT8 of the reference's weights."""
    recipe = v.recipe or {}
    if not recipe.get("qat_epochs") or v.precision != Precision.int8:
        return []
    control = [
        o.name for o in variants
        if o.precision == Precision.fp32 and o.status == Status.ok
        and (o.recipe or {}).get("qat_epochs") == recipe["qat_epochs"] and (o.recipe or {}).get("lr") == recipe.get("lr")
    ]
    ptq = [
        o.name for o in variants
        if o.backend == v.backend and o.precision == Precision.int8 and o.status == Status.ok
        and not (o.recipe or {}).get("qat_epochs")
    ]
    return control + ptq


def _paired_against(preds: Predictions, name: str, other: str) -> PairedSection:
    # KL and cosine in the predictions are to the reference's logits, so they are left out here.
    return _paired(
        preds.correct1(other), preds.correct1(name), preds.top1(other), preds.top1(name),
        correct5_ref=preds.correct5(other), correct5_var=preds.correct5(name),
    )


def decide_agreement(acceptance: Acceptance, agreement: float, ci: tuple[float, float], n: int | None = None
                     ) -> VerdictSection:
    """`decide` on top-1 agreement (Acceptance.agreement): the share of changed answers is the drop, the budget is
    100 - min_agreement points. pass: the whole CI of the agreement is at or above the minimum."""
    out = decide(acceptance, 1.0, agreement - 1.0, (ci[0] - 1.0, ci[1] - 1.0), n)
    floor = 1.0 - out.budget
    shown = f"agreement {pct(agreement)}% (95% CI {pct(ci[0])} to {pct(ci[1])})"
    settle = out.reason.split("; roughly", 1)[1:] if "; roughly" in out.reason else []
    out.reason = {
        Verdict.passed: f"{shown} is at least {pct(floor)}% over its whole CI",
        Verdict.failed: f"{shown} is below {pct(floor)}% over its whole CI",
        Verdict.inconclusive: f"{shown}: the CI straddles {pct(floor)}%",
    }[out.verdict] + "".join(f"; roughly{rest}" for rest in settle)
    return out


def _verdict_for(v: VariantResult, acceptance: Acceptance) -> VerdictSection:
    t = v.paired.top1
    if acceptance.label == "agreement":
        out = decide_agreement(acceptance, v.paired.agreement_top1, v.paired.agreement_top1_ci95, v.paired.n)
    else:
        out = decide(acceptance, t.ref, t.diff, t.diff_ci95, v.paired.n)
    if v.status == Status.parity_failed:
        # The backend's own FP32 does not match the reference, so its INT8 drop cannot be attributed to INT8.
        out.verdict = Verdict.inconclusive
        out.reason = f"{v.error}; measured {out.reason}"
    return out


def apply_to_run_dir(run_dir: Path, acceptance: Acceptance | None) -> Report:
    """Recompute paired statistics and verdicts of a finished run from RUN_DIR/predictions.npz (e.g. with another
    budget), rewrite report.json and re-render report.md/.html (`int8eval.report.rendered_paths`). Nothing is
    re-evaluated."""
    from int8eval.evaluate import Predictions

    run_dir = Path(run_dir)
    with folder.locked(run_dir):  # no run may replace the folder's files while they are judged
        folder.recover(run_dir)
        report = Report.read(run_dir / "report.json")
        folder.verify(run_dir, report)  # never judge the predictions of another run
        preds_path = run_dir / "predictions.npz"
        preds = Predictions.load(preds_path)
        folder.check_predictions(report, preds, preds_path)
        add_paired_stats(report, preds, acceptance)
        write_rendered(report, run_dir)  # a report.json that cannot be rendered is refused before it is rewritten
        report.write(run_dir / "report.json")
    return report
