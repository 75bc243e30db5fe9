"""What report.md and report.html both say about a tune (`Report.tune`), as plain strings: the sets, the stop rule,
the choice, each backend's outcome and its ladder. Each writer only escapes and wraps them (`esc`, `code` as in
report.content); the Pareto plot (report.plots.tune_pareto) takes its points from `pareto_points`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from int8eval.config import DropKind
from int8eval.report.format import DASH, ci, num, pct, pts
from int8eval.report.sections import TuneBackend, TuneCandidate, TuneSection

Wrap = Callable[[str], str]

PARETO_MARK = "★"

LADDER_HEADER = [
    PARETO_MARK, "step", "variant", "status", "tuning agreement % [95% CI]", "tuning Δ top-1 pts [95% CI]",
    "tuning verdict", "accepted", "confirmation agreement % [95% CI]", "confirmation Δ top-1 pts [95% CI]",
    "confirmation verdict", "confirmed", "latency ms", "images/s", "speedup vs FP32", "size MB", "size % of FP32",
    "step s",
]


def _same(text: str) -> str:
    return text


def _backticks(text: str) -> str:
    return f"`{text}`"


class LadderRow(NamedTuple):
    """One candidate of a backend's ladder, every value formatted; the names and verdict words kept apart so each
    writer can mark them up (the name as code, the verdict with its colour)."""

    pareto: str
    step: str
    name: str
    chosen: bool
    status: str
    tuning_agreement: str
    tuning_delta: str
    tuning_verdict: str | None  # the verdict word ("pass", ...), None when not judged
    accepted: str
    confirmation_agreement: str
    confirmation_delta: str
    confirmation_verdict: str | None
    confirmed: str
    latency_ms: str
    throughput_ips: str
    speedup: str
    size_mb: str
    size_pct: str
    time_s: str


def _agreement(paired) -> str:
    return DASH if paired is None else f"{pct(paired.agreement_top1)} {ci(paired.agreement_top1_ci95)}"


def _delta(paired) -> str:
    return DASH if paired is None else f"{pts(paired.top1.diff)} {ci(paired.top1.diff_ci95, signed=True)}"


def _yes_no(value: bool | None) -> str:
    return DASH if value is None else ("yes" if value else "no")


def backend_names(tune: TuneSection) -> list[str]:
    """The backends in the order of their outcomes, then any that only have candidates."""
    names = [b.backend for b in tune.backends]
    return names + list(dict.fromkeys(c.backend for c in tune.candidates if c.backend not in names))


def ladder(tune: TuneSection, backend: str) -> list[TuneCandidate]:
    """A backend's candidates in the order they were tried."""
    return [c for c in tune.candidates if c.backend == backend]


def outcome(tune: TuneSection, backend: str) -> TuneBackend | None:
    return next((b for b in tune.backends if b.backend == backend), None)


def ladder_rows(tune: TuneSection, backend: str) -> list[LadderRow]:
    """One row per candidate of `backend`, in ladder order."""
    b = outcome(tune, backend)
    front, chosen = (set(b.pareto), b.chosen) if b else (set(), None)
    rows = []
    for c in ladder(tune, backend):
        status = str(c.status) + (f": {c.error}" if c.error else "") + (" (reused)" if c.reused else "")
        accepted = (f"yes ({c.accepted_by})" if c.accepted_by else "yes") if c.accepted else "no"
        rows.append(LadderRow(
            pareto=PARETO_MARK if c.name in front else "",
            step=c.step,
            name=c.name,
            chosen=c.name == chosen,
            status=status,
            tuning_agreement=_agreement(c.tuning),
            tuning_delta=_delta(c.tuning),
            tuning_verdict=c.tuning_verdict.verdict if c.tuning_verdict else None,
            accepted=accepted,
            confirmation_agreement=_agreement(c.confirmation),
            confirmation_delta=_delta(c.confirmation),
            confirmation_verdict=c.confirmation_verdict.verdict if c.confirmation_verdict else None,
            confirmed=_yes_no(c.confirmed),
            latency_ms=num(c.latency_ms, ".2f"),
            throughput_ips=num(c.throughput_ips),
            speedup=DASH if c.speedup_vs_fp32 is None else f"{c.speedup_vs_fp32:.2f}×",
            size_mb=num(c.size_mb, ".2f"),
            size_pct=pct(c.size_vs_fp32, 0),
            time_s=num(c.time_s),
        ))
    return rows


def tune_items(tune: TuneSection, *, esc: Wrap = _same, code: Wrap = _backticks) -> list[str]:
    """The tune's overview: objective and budget, the stop rule as written, the three sets, the choice and why."""
    s = tune.sets
    choice = code(tune.choice) if tune.choice else "none"
    items = [
        f"Objective: {esc(tune.objective)}; budget: {esc(tune.budget.description)}",
        f"Stop rule: {esc(tune.rule)}",
        f"Sets: {s.calibration} calibration, {s.tuning} tuning (candidates ranked and chosen), {s.confirmation} "
        f"confirmation images (only the final verdict; {esc(s.confirmation_source)}); disjoint, their image ids are "
        "in report.json",
    ]
    if tune.ranking is not None:
        r = tune.ranking
        top = ", ".join(code(name) for name in r.layers[:5])
        items.append(f"Layer ranking (FP32-layers step): {esc(r.method)}, on {r.images} tuning images in "
                     f"{r.seconds:.0f} s; most sensitive first: {top}")
    return [*items, f"Choice: {choice}: {esc(tune.choice_reason)}"]


def backend_items(tune: TuneSection, backend: str, *, esc: Wrap = _same, code: Wrap = _backticks) -> list[str]:
    """A backend's FP32 baseline, its chosen model (or none) with where it was deployed, and why the ladder stopped."""
    b = outcome(tune, backend)
    if b is None:
        return ["No outcome recorded for this backend (see its candidates below)"]
    front = f" {PARETO_MARK}" if b.fp32 in b.pareto else ""
    items = [f"FP32: {code(b.fp32)}{front}, {num(b.fp32_throughput_ips)} images/s, {num(b.fp32_size_mb, '.2f')} MB"]
    if b.chosen:
        deployed = f", deployed to {code(b.deploy)}" if b.deploy else ""
        items.append(f"Chosen: {code(b.chosen)}{deployed}")
    else:
        items.append("Chosen: none")
    items.append(f"Stopped: {esc(b.stopped)}")
    if b.node:
        items.append(f"Climbed on the Ray worker at {esc(b.node)} (its speeds measured there)")
    return items


LADDER_NOTE = (f"{PARETO_MARK}: on the backend's Pareto front (accuracy × speed × size on the tuning set). Agreement "
               "and Δ are against the PyTorch FP32 reference with their paired 95% CIs; confirmation columns only for "
               "candidates tried there; speed and size against the same backend's FP32.")


class ParetoPoint(NamedTuple):
    """A candidate placed in the Pareto plot: Δ top-1 on the tuning set and its CI in points."""

    backend: str
    name: str
    step: str
    throughput_ips: float
    delta_pts: float
    ci_pts: tuple[float, float]
    size_mb: float | None
    pareto: bool
    chosen: bool


def pareto_points(tune: TuneSection) -> tuple[list[ParetoPoint], int]:
    """The candidates the Pareto plot shows (measured throughput and tuning-set statistics), and how many it leaves
    out for lacking either."""
    points, left_out = [], 0
    for c in tune.candidates:
        if not c.throughput_ips or c.tuning is None:
            left_out += 1
            continue
        b = outcome(tune, c.backend)
        t = c.tuning.top1
        points.append(ParetoPoint(
            c.backend, c.name, c.step, c.throughput_ips, 100 * t.diff, (100 * t.diff_ci95[0], 100 * t.diff_ci95[1]),
            c.size_mb, b is not None and c.name in b.pareto, b is not None and c.name == b.chosen,
        ))
    return points, left_out


def budget_pts(tune: TuneSection) -> float | None:
    """The allowed drop in points: from a candidate's verdict (a relative budget depends on the reference's top-1),
    else the declared absolute one; None when neither tells."""
    judged = next((c.tuning_verdict for c in tune.candidates if c.tuning_verdict), None)
    if judged is not None:
        return 100 * judged.budget
    return tune.budget.max_drop if tune.budget.drop == DropKind.absolute else None
