"""Which variant to deploy: the fastest whose accuracy passes, and what a faster, still-unsettled one would give.

The question a user brings is "which reduced-precision model can I ship, and how much faster is it?". FP32
variants are the baseline that question is asked against, not an answer to it: they are never the pick, and the
pick's speed is given as a multiple of the fastest FP32 variant. A faster variant whose verdict is inconclusive
is named with how much faster it is and roughly how many evaluated images would settle its verdict.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import ValidationError

from int8eval.report.bench import field_of
from int8eval.report.sections import VariantBench, Verdict, VerdictSection
from int8eval.verdict import images_to_settle

# Without a verdict from the accuracy budget, a variant counts as accurate enough when its top-1 agrees with the
# FP32 reference on at least this fraction of images.
AGREEMENT_BUDGET = 0.99
BASELINE = "fp32"  # the precision every speedup is measured against; never the answer

_PASS_WORDS = {"pass", "passed", "ok", "good", "meets", "meets_budget", "within_budget", "accept", "accepted", "yes", "true"}
# "inconclusive" (the drop's CI straddles the budget) is not shown to be within it, so it does not qualify.
_FAIL_WORDS = {
    "fail", "failed", "bad", "exceeds", "exceeds_budget", "over_budget", "reject", "rejected", "no", "false", "inconclusive",
}


def meets_budget(verdict: Any) -> bool | None:
    """Whether a variant's accuracy verdict says it is within the accuracy budget (None: cannot tell).

    Accepts a bool, a word ("pass", "within_budget", "fail", ...), or a dict/object with a boolean field
    (`meets_budget`, `within_budget`, `passed`, `ok`, `accepted`) or a word field (`status`, `verdict`, `label`).
    """
    if verdict is None:
        return None
    if isinstance(verdict, bool):
        return verdict
    if isinstance(verdict, str):
        word = verdict.strip().lower().replace(" ", "_").replace("-", "_")
        if word in _PASS_WORDS:
            return True
        if word in _FAIL_WORDS or word.startswith(("fail", "exceed", "over_")):
            return False
        return None
    get = verdict.get if isinstance(verdict, Mapping) else (lambda k: getattr(verdict, k, None))
    for key in ("meets_budget", "within_budget", "passed", "ok", "accepted", "pass"):
        value = get(key)
        if isinstance(value, bool):
            return value
    for key in ("status", "verdict", "label", "decision"):
        value = get(key)
        if isinstance(value, str):
            return meets_budget(value)
    return None


def accurate_enough(v: Any, *, budget: float = AGREEMENT_BUDGET) -> bool | None:
    """Whether a report variant meets the accuracy budget: its `verdict` where it has one, else top-1 agreement
    with the FP32 reference >= `budget`; the reference itself always does. None when nothing was measured."""
    if field_of(v, "reference"):
        return True
    verdict = meets_budget(field_of(v, "verdict"))
    if verdict is not None:
        return verdict
    agreement = field_of(v, "agreement_top1")
    return None if agreement is None else agreement >= budget


def _bench(v: Any) -> VariantBench | None:
    """A variant's speed: a VariantResult's `bench`, or a row's as the plain dict bench_run keeps."""
    b = field_of(v, "bench")
    return VariantBench.model_validate(b) if isinstance(b, Mapping) else b


def _inconclusive(v: Any) -> Any | None:
    """The variant's verdict (a VerdictSection, or a dict of that shape) when it is inconclusive, else None."""
    verdict = field_of(v, "verdict")
    return verdict if field_of(verdict, "verdict") == Verdict.inconclusive else None


def _settle(v: Any, verdict: Any) -> int | None:
    try:
        verdict = VerdictSection.model_validate(verdict) if isinstance(verdict, Mapping) else verdict
    except ValidationError:  # a verdict written by hand, without the numbers
        return None
    paired = field_of(v, "paired")
    return images_to_settle(verdict, None if paired is None else field_of(paired, "n"))


def fastest_variant(variants: Iterable[Any], *, budget: float = AGREEMENT_BUDGET) -> dict | None:
    """The answer to "which variant to deploy": the fastest non-FP32 variant whose accuracy passes (highest
    large-batch throughput; and the lowest batch-1 p50 latency), its speedup over the fastest FP32 variant, and each
    faster variant whose verdict is inconclusive with how much faster it is and how many images would settle it.

    Accuracy passes as `accurate_enough` says; when no variant has any accuracy (a speed-only run) every
    candidate qualifies and the criterion says so.

    Args:
        variants: VariantResult objects or dicts with `name`, `bench` and optionally `precision`, `status`,
            `verdict`, `paired`, `agreement_top1`, `reference`.
    """
    variants = list(variants)
    speed = {id(v): _bench(v) for v in variants}

    def _thr(v: Any) -> float:
        return speed[id(v)].throughput_ips

    timed = [
        v for v in variants
        if field_of(v, "status") in (None, "ok") and speed[id(v)] is not None and speed[id(v)].throughput_ips is not None
    ]
    if not timed:
        return None
    baselines = [v for v in timed if field_of(v, "reference") or (field_of(v, "precision") or speed[id(v)].precision) == BASELINE]
    candidates = [v for v in timed if v not in baselines]
    measured = any(field_of(v, "agreement_top1") is not None or field_of(v, "verdict") is not None for v in candidates)
    if not measured:
        criterion, ok = "speed only (accuracy not measured)", candidates
    else:
        has_verdict = any(field_of(v, "verdict") is not None for v in candidates)
        criterion = ("accuracy verdict pass, else " if has_verdict else "") + (
            f"top-1 agreement with the FP32 reference >= {100 * budget:g}%"
        )
        ok = [v for v in candidates if accurate_enough(v, budget=budget)]
    out: dict[str, Any] = {"criterion": criterion, "throughput": None, "latency": None, "faster_inconclusive": []}
    fp32 = max(baselines, key=_thr) if baselines else None
    if fp32 is not None:
        out.update(fp32=field_of(fp32, "name"), fp32_ips=_thr(fp32))
    best = max(ok, key=_thr) if ok else None
    if best is not None:
        fastest_lat = min(ok, key=lambda v: speed[id(v)].latency_ms_p50)
        out.update(
            throughput=field_of(best, "name"),
            throughput_ips=_thr(best),
            throughput_batch=speed[id(best)].throughput_batch,
            latency=field_of(fastest_lat, "name"),
            latency_ms_p50=speed[id(fastest_lat)].latency_ms_p50,
            speedup_vs_fp32=None if fp32 is None else _thr(best) / _thr(fp32),
        )
    # Faster than the pick (or than the FP32 baseline when nothing passes) but not settled either way.
    bar = best if best is not None else fp32
    for v in sorted(candidates, key=_thr, reverse=True):
        verdict = _inconclusive(v)
        if verdict is None or v in ok or (bar is not None and _thr(v) <= _thr(bar)):
            continue
        out["faster_inconclusive"].append({
            "name": field_of(v, "name"),
            "throughput_ips": _thr(v),
            "times_faster": None if bar is None else _thr(v) / _thr(bar),
            "than": None if bar is None else field_of(bar, "name"),
            "images_to_settle": _settle(v, verdict),
            "images_now": None if field_of(v, "paired") is None else field_of(field_of(v, "paired"), "n"),
            "estimate_within_budget": field_of(verdict, "drop") is not None and field_of(verdict, "budget") is not None
            and field_of(verdict, "drop") <= field_of(verdict, "budget"),
        })
    return out
