"""What `int8eval tune` chooses among measured candidates: the objective's order, each backend's Pareto front, and the
report's `tune` section with the one model to ship."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from int8eval.config import Objective, TuneConfig
from int8eval.report.sections import (
    AcceptanceRecord, Status, TuneBackend, TuneCandidate, TuneSection, TuneSets,
)
from int8eval.tune.rule import MIN_AGREEMENT_RULE, RULE


def objective_key(objective: Objective) -> Callable[[TuneCandidate], float]:
    """Sort key: best for the objective first; an unmeasured value sorts last."""
    inf = float("inf")
    if objective is Objective.latency:
        return lambda c: c.latency_ms if c.latency_ms is not None else inf
    if objective is Objective.size:
        return lambda c: c.size_mb if c.size_mb is not None else inf
    return lambda c: -c.throughput_ips if c.throughput_ips is not None else inf


def pareto(candidates: Sequence[TuneCandidate]) -> list[str]:
    """Names of the candidates no other beats or equals on all of: top-1 change on the tuning images (higher is
    better), throughput (higher) and size (lower), with one strictly better."""
    points = [(c.name, c.tuning.top1.diff, c.throughput_ips, -c.size_mb) for c in candidates
              if c.status is Status.ok and c.tuning is not None and c.throughput_ips and c.size_mb]

    def dominates(a, b) -> bool:
        return all(x >= y for x, y in zip(a[1:], b[1:])) and any(x > y for x, y in zip(a[1:], b[1:]))

    return [p[0] for p in points if not any(dominates(q, p) for q in points if q is not p)]


def tune_section(config: TuneConfig, sets: TuneSets, candidates: list[TuneCandidate],
                 backends: list[TuneBackend]) -> TuneSection:
    """The report's `tune` section: the budget and rule, the sets, every candidate, each backend's outcome, and the
    one model to ship for `config.objective` among the backends' chosen ones."""
    chosen = [c for c in candidates if c.name in {b.chosen for b in backends}]
    best = sorted(chosen, key=objective_key(config.objective))
    if best:
        b = best[0]
        what = {"throughput": f"{b.throughput_ips:.1f} images/s" if b.throughput_ips else "throughput not measured",
                "latency": f"{b.latency_ms:.2f} ms at batch 1" if b.latency_ms else "latency not measured",
                "size": f"{b.size_mb:.1f} MB" if b.size_mb else "size not measured"}[config.objective.value]
        reason = (f"the best {config.objective.value} ({what}) of the models that kept the budget and were "
                  f"confirmed: {b.name}, drop {-100 * b.confirmation.top1.diff:.2f} pts on {b.confirmation.n} "
                  f"confirmation images, {b.speedup_vs_fp32 or float('nan'):.2f}x its backend's FP32 throughput, "
                  f"{100 * (b.size_vs_fp32 or float('nan')):.0f}% of its size")
    else:
        reason = "no backend's ladder found a model that kept the budget on both the tuning and confirmation images"
    a = config.acceptance
    return TuneSection(
        objective=config.objective.value,
        budget=AcceptanceRecord(**a.model_dump(), description=a.describe()),
        rule=RULE + (MIN_AGREEMENT_RULE.replace("--min-agreement", f"--min-agreement {config.min_agreement:g}%")
                     if config.min_agreement is not None else ""),
        sets=sets,
        candidates=candidates,
        backends=backends,
        choice=best[0].name if best else None,
        choice_reason=reason,
    )
