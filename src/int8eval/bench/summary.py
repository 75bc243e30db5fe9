"""Which variant to deploy: the fastest whose accuracy passes, and what a faster, still-unsettled one would give.

The question a user brings is "which reduced-precision model can I ship, and how much faster is it?". FP32
variants are the baseline that question is asked against, not an answer to it: they are never the pick, and the
pick's speed is given as a multiple of the fastest FP32 variant. A faster variant whose verdict is inconclusive
is named with how much faster it is and roughly how many evaluated images would settle its verdict.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

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


def field_of(v: Any, key: str) -> Any:
    """`key` of a report variant given as a dict or an object."""
    return v.get(key) if isinstance(v, Mapping) else getattr(v, key, None)


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


def _precision(v: Any) -> str | None:
    return field_of(v, "precision") or (field_of(v, "bench") or {}).get("precision")


def _thr(v: Any) -> float:
    return field_of(v, "bench")["throughput_ips"]


def _inconclusive(v: Any) -> dict | None:
    verdict = field_of(v, "verdict")
    if isinstance(verdict, Mapping) and verdict.get("verdict") == "inconclusive":
        return verdict
    return None


def _settle(v: Any, verdict: Mapping) -> int | None:
    from int8eval.verdict import images_to_settle

    try:
        return images_to_settle(dict(verdict), (field_of(v, "paired") or {}).get("n"))
    except (KeyError, TypeError, ValueError):  # a verdict written by hand, without the numbers
        return None


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
    timed = [
        v for v in variants
        if field_of(v, "status") in (None, "ok") and (field_of(v, "bench") or {}).get("throughput_ips") is not None
    ]
    if not timed:
        return None
    baselines = [v for v in timed if field_of(v, "reference") or _precision(v) == BASELINE]
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
        fastest_lat = min(ok, key=lambda v: field_of(v, "bench")["latency_ms_p50"])
        out.update(
            throughput=field_of(best, "name"),
            throughput_ips=_thr(best),
            throughput_batch=field_of(best, "bench").get("throughput_batch"),
            latency=field_of(fastest_lat, "name"),
            latency_ms_p50=field_of(fastest_lat, "bench")["latency_ms_p50"],
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
            "images_now": (field_of(v, "paired") or {}).get("n"),
            "estimate_within_budget": verdict.get("drop") is not None and verdict.get("budget") is not None
            and verdict["drop"] <= verdict["budget"],
        })
    return out


def summary_lines(fastest: Mapping | None, *, batch: int | None = None) -> list[str]:
    """The summary in words (Markdown): the pick, its speedup over FP32, and each faster inconclusive variant."""
    if not fastest:
        return []
    lines = []
    fp32 = f"{fastest['fp32']} ({fastest['fp32_ips']:.1f} images/s)" if fastest.get("fp32") else None
    at = f" at batch {fastest.get('throughput_batch') or batch}" if (fastest.get("throughput_batch") or batch) else ""
    if fastest.get("throughput"):
        speedup = f", {fastest['speedup_vs_fp32']:.2f}× the fastest FP32 variant, {fp32}" if fastest.get("speedup_vs_fp32") else ""
        lines.append(
            f"**Fastest variant that passes** ({fastest['criterion']}): **{fastest['throughput']}**, "
            f"{fastest['throughput_ips']:.1f} images/s{at}{speedup}; lowest batch-1 latency: {fastest['latency']} "
            f"({fastest['latency_ms_p50']:.2f} ms p50)."
        )
        if fastest.get("speedup_vs_fp32") is not None and fastest["speedup_vs_fp32"] < 1:
            lines.append(f"It is slower than FP32 on this machine: {fastest['fp32']} is the faster choice here.")
    else:
        lines.append(
            f"**No INT8 or reduced-precision variant passes** ({fastest['criterion']})"
            + (f": the FP32 baseline stays the fastest choice, {fp32}." if fp32 else ".")
        )
    for f in fastest.get("faster_inconclusive") or []:
        faster = f"{f['times_faster']:.2f}× faster than {f['than']}" if f.get("times_faster") else "faster"
        settle = (
            f"roughly {f['images_to_settle']:,} evaluated images (now {f['images_now']:,}) would settle it"
            if f.get("images_to_settle") and f.get("images_now") else "more evaluated images would settle it"
        )
        leaning = "its drop estimate is within the budget" if f.get("estimate_within_budget") else "its drop estimate exceeds the budget"
        lines.append(f"- **{f['name']}** is {faster} ({f['throughput_ips']:.1f} images/s) but its verdict is inconclusive ({leaning}): {settle}.")
    lines.append(
        "FP32 variants are the baseline every speedup is measured against, not candidates: the question is which "
        "reduced-precision variant to ship instead."
    )
    return lines
