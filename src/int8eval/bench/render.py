"""The speed-and-size section as Markdown lines, from report variants and the report's `bench` section."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from int8eval.bench.summary import field_of, summary_lines
from int8eval.bench.timing import BENCH_DEFAULTS

# Short words for how a row was timed (`BenchResult.timed_call`), for the table.
_TIMED_AS = {"static": "static shape", "native": "native", "predict": "dynamic batch"}


def fmt(x: float | None, spec: str = ".1f") -> str:
    """A number, or "—" for None."""
    return "—" if x is None else format(x, spec)


def times(x: float | None) -> str:
    """A speedup: 3.30×, or "—"."""
    return "—" if x is None else f"{x:.2f}×"


def _timed_as(b: Mapping) -> str:
    if b.get("execution") == "eager":
        return "eager"
    if "inductor" in (b.get("execution") or ""):
        return "inductor, static shape"
    return _TIMED_AS.get(b.get("timed_call"), b.get("timed_call") or "?")


def _row(name: str, agr: str, b: Mapping) -> str:
    if b.get("throughput_ips") is None:
        return f"| {name} | {agr} | — | — | {b.get('error', 'not measured')} | | | | | {fmt(b.get('size_mb'))} | |"
    red = b.get("size_reduction_vs_fp32")
    half = b.get("speedup_throughput_vs_bf16", b.get("speedup_throughput_vs_fp16"))
    return (
        f"| {name} | {agr} | {_timed_as(b)} | {b.get('threads') or '?'} | {b['latency_ms_p50']:.2f} / "
        f"{b['latency_ms_p90']:.2f} / {b['latency_ms_p99']:.2f} | {b['throughput_ips']:.1f} ({b['throughput_batch']}) | "
        f"{times(b.get('speedup_throughput_vs_fp32'))} | {times(b.get('speedup_latency_vs_fp32'))} | {times(half)} | "
        f"{fmt(b.get('size_mb'))} | {'—' if red is None else f'-{100 * red:.0f}%'} |"
    )


def render_markdown(variants: Iterable[Any], section: Mapping | None) -> list[str]:
    """Markdown lines of the speed-and-size section, from report variants (objects or dicts) and the bench section
    (whose `speed_only` rows, timed but not evaluated, are listed after the variants)."""
    section = section or {}
    rows = []
    for v in variants:
        b = field_of(v, "bench")
        if b:
            agreement = field_of(v, "agreement_top1")
            agr = "ref." if field_of(v, "reference") else fmt(None if agreement is None else 100 * agreement)
            rows.append(_row(field_of(v, "name"), agr, b))
    extra = section.get("speed_only") or {}
    rows += [_row(name, "not evaluated", b) for name, b in extra.items()]
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
    settings = section.get("settings") or {}
    sizes = settings.get("batch_sizes", BENCH_DEFAULTS["batch_sizes"])
    if settings:
        lines += [
            "",
            f"Latency over ≥{settings.get('min_runs')} calls at batch {min(sizes)}, throughput "
            f"over ≥{settings.get('throughput_min_runs')} calls at batch {max(sizes)}, "
            f"after {settings.get('warmup')} and {settings.get('throughput_warmup')} warm-up calls, on "
            f"{settings.get('input')}; data loading excluded. Each batch size is timed as a deployment runs it: "
            "a static input shape (OpenVINO reshaped and compiled, ONNX Runtime a session with the batch fixed, "
            "PyTorch compiled by inductor, FP32 too, so that INT8 × FP32 compares compiled with compiled; the "
            "`-eager` row is PyTorch FP32 as the accuracy pass ran it). Speedups (×) compare with the same "
            "backend's FP32 and BF16 variants: above 1 is faster.",
        ]
    noted = [(field_of(v, "name"), field_of(v, "bench") or {}) for v in variants] + list(extra.items())
    notes = [f"- {name}: {b['note']}" for name, b in noted if b.get("note")]
    if notes:
        lines += ["", *notes]
    fastest = section.get("fastest")
    if fastest:
        lines += ["", *summary_lines(fastest, batch=max(sizes))]
    machine = section.get("machine") or {}
    cpu = machine.get("cpu") or {}
    if cpu:
        isa = ", ".join(k for k, on in cpu.get("isa", {}).items() if on) or "none of note"
        lines += ["", f"Machine: {cpu.get('model')} ({cpu.get('logical_cores')} logical cores; {isa}); GPU: {machine.get('gpu') or 'none'}."]
    for w in section.get("warnings") or []:
        lines.append(f"\n> **Warning:** {w}")
    return lines
