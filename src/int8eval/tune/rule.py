"""The stop rule: when a candidate is accepted on the tuning set, and when the confirmation set confirms it."""

from __future__ import annotations

from dataclasses import dataclass

from int8eval.config import Acceptance
from int8eval.report.sections import PairedSection, Verdict, VerdictSection
from int8eval.verdict import decide, decide_agreement

RULE = (
    "A candidate is accepted on the tuning images when the paired 95% CI of its top-1 drop against the PyTorch FP32 "
    "reference lies within the budget (verdict: pass), or, when the set is too small to settle that, when its top-1 "
    "agreement with the reference is at least 1 - budget: a drop in top-1 can never exceed the share of images whose "
    "answer changed, so its measured drop is then within the budget (accepted by: agreement). In each step the "
    "accepted candidate best for the objective is evaluated on the confirmation images, which nothing else uses, "
    "and confirmed by the same rule there; a failed confirmation sends the ladder on to the next step."
)
MIN_AGREEMENT_RULE = " With --min-agreement, a candidate's top-1 agreement must also reach it, on both sets."


@dataclass(frozen=True)
class Judgement:
    verdict: VerdictSection
    accepted: bool
    by: str | None  # "verdict" or "agreement"; None when not accepted


def judge(paired: PairedSection, acceptance: Acceptance, min_agreement: float | None = None) -> Judgement:
    """Accept `paired` (a candidate against the reference on one image set) by RULE; `min_agreement` (a fraction)
    is a floor on top-1 agreement on top of it."""
    top1 = paired.top1
    if acceptance.label == "agreement":  # --min-agreement as the budget (images without labels)
        verdict = decide_agreement(acceptance, paired.agreement_top1, paired.agreement_top1_ci95, paired.n)
    else:
        verdict = decide(acceptance, top1.ref, top1.diff, top1.diff_ci95, paired.n)
    if min_agreement is not None and paired.agreement_top1 < min_agreement - 1e-12:
        return Judgement(verdict, False, None)
    if verdict.verdict is Verdict.passed:
        return Judgement(verdict, True, "verdict")
    # 1e-12: agreement and budget are ratios of image counts; equal ones must compare equal.
    if paired.agreement_top1 >= 1.0 - verdict.budget - 1e-12:
        return Judgement(verdict, True, "agreement")
    return Judgement(verdict, False, None)
