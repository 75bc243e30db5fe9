"""The speed-and-size section as Markdown lines, from report variants and the report's `bench` section, and the
summary in words of which variant to deploy (`bench.summary.fastest_variant` decides it; this only words it).

Every string taken from the report goes through `esc` (default: as it is; report.md passes its Markdown escaper).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from int8eval.report.sections import BenchSection, FastestSection, VariantBench

Wrap = Callable[[str], str]

# Short words for how a row was timed (`BenchResult.timed_call`), for the table.
_TIMED_AS = {"static": "static shape", "native": "native", "predict": "dynamic batch"}


def _same(text: str) -> str:
    return text


def fmt(x: float | None, spec: str = ".1f") -> str:
    """A number, or "—" for None."""
    return "—" if x is None else format(x, spec)


def times(x: float | None) -> str:
    """A speedup: 3.30×, or "—"."""
    return "—" if x is None else f"{x:.2f}×"


def field_of(v: Any, key: str) -> Any:
    """`key` of a report variant given as a dict or an object."""
    return v.get(key) if isinstance(v, Mapping) else getattr(v, key, None)


def _timed_as(b: VariantBench) -> str:
    if b.execution == "eager":
        return "eager"
    if "inductor" in (b.execution or ""):
        return "inductor, static shape"
    return _TIMED_AS.get(b.timed_call, b.timed_call or "?")


def _row(name: str, agr: str, b: VariantBench, esc: Wrap) -> str:
    if b.throughput_ips is None:
        error = esc(b.error) if b.error is not None else "not measured"
        return f"| {esc(name)} | {agr} | — | — | {error} | | | | | {fmt(b.size_mb)} | |"
    red = b.size_reduction_vs_fp32
    half = b.speedup_throughput_vs_bf16 if b.speedup_throughput_vs_bf16 is not None else b.speedup_throughput_vs_fp16
    return (
        f"| {esc(name)} | {agr} | {esc(_timed_as(b))} | {b.threads or '?'} | {b.latency_ms_p50:.2f} / "
        f"{b.latency_ms_p90:.2f} / {b.latency_ms_p99:.2f} | {b.throughput_ips:.1f} ({b.throughput_batch}) | "
        f"{times(b.speedup_throughput_vs_fp32)} | {times(b.speedup_latency_vs_fp32)} | {times(half)} | "
        f"{fmt(b.size_mb)} | {'—' if red is None else f'-{100 * red:.0f}%'} |"
    )


def _shown(x: Any, esc: Wrap) -> Any:
    # The machine section is free-form: only its strings are text to escape.
    return esc(x) if isinstance(x, str) else x


def _typed(model, value):
    # bench.json's writer (`int8eval bench`) keeps its rows and section as plain dicts: read them as the report does.
    return model.model_validate(value) if isinstance(value, Mapping) else value


def bench_markdown(variants: Iterable[Any], section: BenchSection | Mapping | None, *, esc: Wrap = _same) -> list[str]:
    """Markdown lines of the speed-and-size section, from report variants (VariantResults, or dicts with `name`,
    `bench` and optionally `agreement_top1`, `reference`) and the bench section (whose `speed_only` rows, timed but
    not evaluated, are listed after the variants)."""
    variants = list(variants)
    section = _typed(BenchSection, section) or BenchSection()
    timed = [(field_of(v, "name"), v, _typed(VariantBench, field_of(v, "bench"))) for v in variants]
    rows = []
    for name, v, b in timed:
        if b is not None:
            agreement = field_of(v, "agreement_top1")
            agr = "ref." if field_of(v, "reference") else fmt(None if agreement is None else 100 * agreement)
            rows.append(_row(name, agr, b, esc))
    rows += [_row(name, "not evaluated", b, esc) for name, b in section.speed_only.items()]
    if not rows:
        return []
    lines = [
        "## Speed and size",
        "",
        "| variant | top-1 agreement % | timed as | threads | batch-1 p50 / p90 / p99 ms | images/s (batch) | × FP32 thr | "
        "× FP32 lat | × BF16 thr | size MB | size vs FP32 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
    ]
    settings = section.settings
    sizes = settings.batch_sizes if settings is not None else None
    if settings is not None:
        lines += [
            "",
            f"Latency over ≥{settings.min_runs} calls at batch {min(sizes)}, throughput "
            f"over ≥{settings.throughput_min_runs} calls at batch {max(sizes)}, "
            f"after {settings.warmup} and {settings.throughput_warmup} warm-up calls, on "
            f"{esc(str(settings.input))}; data loading excluded. Each batch size is timed as a deployment runs it: "
            "a static input shape (OpenVINO reshaped and compiled, ONNX Runtime a session with the batch fixed, "
            "PyTorch compiled by inductor, FP32 too, so that INT8 × FP32 compares compiled with compiled; the "
            "`-eager` row is PyTorch FP32 as the accuracy pass ran it). Speedups (×) compare with the same "
            "backend's FP32 and BF16 variants: above 1 is faster.",
        ]
    noted = [(name, b) for name, _, b in timed if b is not None] + list(section.speed_only.items())
    notes = [f"- {esc(name)}: {esc(b.note)}" for name, b in noted if b.note]
    if notes:
        lines += ["", *notes]
    if section.fastest is not None:
        lines += ["", *summary_lines(section.fastest, batch=max(sizes) if sizes else None, esc=esc)]
    machine = section.machine or {}
    cpu = machine.get("cpu") or {}
    if cpu:
        isa = ", ".join(esc(k) for k, on in cpu.get("isa", {}).items() if on) or "none of note"
        lines += ["", f"Machine: {_shown(cpu.get('model'), esc)} ({_shown(cpu.get('logical_cores'), esc)} logical cores; "
                      f"{isa}); GPU: {_shown(machine.get('gpu'), esc) or 'none'}."]
    for w in section.warnings:
        lines.append(f"\n> **Warning:** {esc(w)}")
    return lines


def summary_lines(fastest: FastestSection | Mapping | None, *, batch: int | None = None, esc: Wrap = _same) -> list[str]:
    """The summary in words (Markdown): the pick, its speedup over FP32, and each faster inconclusive variant."""
    fastest = _typed(FastestSection, fastest)
    if fastest is None:
        return []
    f = fastest
    lines = []
    fp32 = f"{esc(f.fp32)} ({f.fp32_ips:.1f} images/s)" if f.fp32 else None
    at = f" at batch {f.throughput_batch or batch}" if (f.throughput_batch or batch) else ""
    if f.throughput:
        speedup = f", {f.speedup_vs_fp32:.2f}× the fastest FP32 variant, {fp32}" if f.speedup_vs_fp32 else ""
        lines.append(
            f"**Fastest variant that passes** ({esc(f.criterion)}): **{esc(f.throughput)}**, "
            f"{f.throughput_ips:.1f} images/s{at}{speedup}; lowest batch-1 latency: {esc(f.latency)} "
            f"({f.latency_ms_p50:.2f} ms p50)."
        )
        if f.speedup_vs_fp32 is not None and f.speedup_vs_fp32 < 1:
            lines.append(f"It is slower than FP32 on this machine: {esc(f.fp32)} is the faster choice here.")
    else:
        lines.append(
            f"**No INT8 or reduced-precision variant passes** ({esc(f.criterion)})"
            + (f": the FP32 baseline stays the fastest choice, {fp32}." if fp32 else ".")
        )
    for x in f.faster_inconclusive:
        faster = f"{x.times_faster:.2f}× faster than {esc(x.than)}" if x.times_faster else "faster"
        settle = (
            f"roughly {x.images_to_settle:,} evaluated images (now {x.images_now:,}) would settle it"
            if x.images_to_settle and x.images_now else "more evaluated images would settle it"
        )
        leaning = "its drop estimate is within the budget" if x.estimate_within_budget else "its drop estimate exceeds the budget"
        lines.append(f"- **{esc(x.name)}** is {faster} ({x.throughput_ips:.1f} images/s) but its verdict is inconclusive ({leaning}): {settle}.")
    lines.append(
        "FP32 variants are the baseline every speedup is measured against, not candidates: the question is which "
        "reduced-precision variant to ship instead."
    )
    return lines
