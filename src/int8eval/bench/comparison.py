"""A benchmark over many variants: each timed as deployed, and compared with its backend's FP32 and BF16/FP16.

Example:
    >>> run = bench_run(variants, loaded.input_shape, reference="torch-fp32")
    >>> run.variants["openvino-int8-minmax"]["speedup_throughput_vs_fp32"]
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from int8eval.bench import deploy, machine as machine_mod
from int8eval.bench.summary import fastest_variant
from int8eval.bench.timing import BENCH_DEFAULTS, BenchResult, benchmark

# Precisions a variant's speed is compared against on its own backend: FP32, and the fast float baseline (BF16 on
# CPUs with AMX/AVX512-BF16, FP16 on GPUs), so INT8 is not credited with what any reduced precision would buy.
BASELINE_PRECISIONS = ("fp32", "bf16", "fp16")
# Timing for a BF16 variant on a CPU without BF16 hardware: emulated, ~10x slower than FP32; a few batch-1 calls
# show that, while batch-32 runs would take minutes for nothing.
EMULATED_BF16 = {"warmup": 1, "min_runs": 3, "min_seconds": 0.0}


@dataclass
class BenchEntry:
    """One row's measurement with what is needed to compare it: its backend, precision and artifact size.

    `baseline` False: a row that is never another's baseline (a PyTorch variant's eager speed beside its compiled
    one, which is the like-for-like baseline of compiled INT8)."""

    name: str
    backend: str
    precision: str
    result: BenchResult | None = None
    size_mb: float | None = None
    artifact: str | None = None
    error: str | None = None
    baseline: bool = True
    note: str | None = None


def ratio(num: float | None, den: float | None) -> float | None:
    """num / den, or None when either is missing or den is 0."""
    if num is None or den is None or den == 0:
        return None
    return num / den


def compare(entries: Sequence[BenchEntry], *, reference: str | None = None) -> dict[str, dict]:
    """Per row: its timings, speedups vs the FP32/BF16/FP16 row of the same backend (and vs `reference`), and its
    size against the same backend's FP32 artifact. Speedup > 1 means faster than the baseline.

    Throughput speedup = images/s ÷ baseline images/s; latency speedup = baseline p50 ÷ p50.
    """
    by_key = {}
    for e in entries:
        if e.baseline:
            by_key.setdefault((e.backend, e.precision), e)
    ref = next((e for e in entries if e.name == reference), None)
    out: dict[str, dict] = {}
    for e in entries:
        d: dict[str, Any] = {"error": e.error} if e.error else {}
        if e.result is not None:
            d.update(e.result.to_dict())
        d["size_mb"] = e.size_mb
        d["artifact"] = e.artifact
        d["backend"], d["precision"] = e.backend, e.precision
        if e.note:
            d["note"] = e.note
        baselines = {p: by_key.get((e.backend, p)) for p in BASELINE_PRECISIONS}
        if ref is not None:
            baselines["reference"] = ref
        for label, base in baselines.items():
            if base is None or base is e:
                continue
            d[f"baseline_{label}"] = base.name
            if e.result is not None and base.result is not None:
                # Rates at different batch sizes are not comparable: no ratio rather than a misleading one.
                if e.result.throughput.batch == base.result.throughput.batch:
                    d[f"speedup_throughput_vs_{label}"] = ratio(e.result.throughput_ips, base.result.throughput_ips)
                if e.result.latency.batch == base.result.latency.batch:
                    d[f"speedup_latency_vs_{label}"] = ratio(base.result.latency_ms_p50, e.result.latency_ms_p50)
        fp32 = baselines.get("fp32")
        if fp32 is not None and fp32 is not e and e.size_mb is not None and fp32.size_mb:
            d["size_fp32_mb"] = fp32.size_mb
            d["size_ratio_vs_fp32"] = e.size_mb / fp32.size_mb
            d["size_reduction_vs_fp32"] = 1.0 - e.size_mb / fp32.size_mb
        out[e.name] = d
    return out


@dataclass
class BenchRun:
    """Everything `bench_run` measured: per-row dicts (for VariantResult.bench) and the machine section."""

    variants: dict[str, dict]
    machine: dict
    settings: dict
    warnings: list[str] = field(default_factory=list)
    fastest: dict | None = None

    def section(self) -> dict:
        """The report-level `bench` section (the per-variant dicts go into each VariantResult.bench)."""
        return {"machine": self.machine, "settings": self.settings, "warnings": self.warnings, "fastest": self.fastest}

    def to_dict(self) -> dict:
        return {**self.section(), "variants": self.variants}


def bench_run(
    variants: Iterable,
    input_shape: Sequence[int],
    *,
    reference: str | None = None,
    on_progress: Callable[[str], None] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    bf16_hardware: bool | None = None,
    compile_torch: bool = True,
    notes: Mapping[str, str] | None = None,
    rounds: int = 1,
    **bench_kw: Any,
) -> BenchRun:
    """Benchmark every variant as deployed and compare each with its backend's FP32 and BF16/FP16 variants.

    Args:
        variants: built Variants (one that fails to run is recorded with its error; the others go on).
        input_shape: (C, H, W) of one preprocessed image.
        reference: name of the run's reference variant (e.g. "torch-fp32"), for speedups across backends.
        on_progress: called with each row's name before it is timed.
        overrides: per variant name, `benchmark` arguments that replace `bench_kw` for it (e.g. fewer runs for a
            variant that is emulated and very slow); they are recorded in its result.
        bf16_hardware: whether the CPU runs BF16 natively (default: `machine.bf16_hardware()`). Without it a CPU
            BF16 variant is emulated and ~10x slower than FP32, so it is timed at batch 1 only, with a few calls
            (`EMULATED_BF16`), unless `overrides` says otherwise.
        compile_torch: time PyTorch FP32/BF16 variants compiled by inductor (static shapes), as PT2E INT8 is, with
            their eager speed as an extra `<name>-eager` row (`deploy.deployment_forms`).
        notes: per row name, a note kept in its result (e.g. "BF16 baseline, speed only").
        rounds: time every row this many times, in turn (interleaved), pooling each row's calls: ratios between
            rows measured on a shared machine then see the same load.
        **bench_kw: passed to `benchmark` (batch_sizes, warmup, min_runs, min_seconds, threads, images, ...).
    """
    variants = list(variants)
    overrides = dict(overrides or {})
    notes = dict(notes or {})
    machine = machine_mod.machine_info()
    if bf16_hardware is None:
        bf16_hardware = machine_mod.bf16_hardware()
    rows = deploy.deployment_forms(variants, compile_torch=compile_torch)
    if not bf16_hardware:
        smallest = min(bench_kw.get("batch_sizes", BENCH_DEFAULTS["batch_sizes"]))
        for name, v, _ in rows:
            if deploy.precision_of(v) == "bf16" and name not in overrides:
                overrides[name] = {**EMULATED_BF16, "batch_sizes": (smallest,)}
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    entries = []
    for name, v, note in rows:
        artifact = getattr(v, "artifact", None)
        entries.append(BenchEntry(
            name, deploy.backend_of(v), deploy.precision_of(v), size_mb=v.size_mb,
            artifact=None if artifact is None else str(artifact), baseline=note is None, note=note or notes.get(name),
        ))
    # Rows are timed in turn, round after round: on a machine whose load drifts, every row sees the same drift, so
    # the ratios between rows stay fair; each row's calls of all rounds are pooled.
    for _ in range(rounds):
        for (name, v, _note), entry in zip(rows, entries):
            if entry.error:
                continue
            if on_progress:
                on_progress(name)
            try:
                result = benchmark(v, input_shape, **{**bench_kw, **(overrides.get(name) or {})})
            except Exception as e:  # noqa: BLE001 - one variant that cannot run must not stop the others
                entry.error, entry.result = f"{type(e).__name__}: {e}", None
                continue
            result.name = name
            entry.result = result if entry.result is None else entry.result.pooled(result)
    load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    machine["load_avg_1m"] = {"before": load_before, "after": load_after}
    warnings = list(machine["warnings"])
    shared = machine_mod.load_warning(load_before, load_after, machine["cpu"].get("logical_cores"))
    if shared:
        warnings.append(shared)
    kw = {**BENCH_DEFAULTS, **bench_kw}
    settings = {
        "batch_sizes": list(kw["batch_sizes"]),
        "warmup": kw["warmup"],
        "throughput_warmup": bench_kw.get("throughput_warmup", kw["warmup"]),
        "max_seconds": kw["max_seconds"],
        "min_runs": kw["min_runs"],
        "throughput_min_runs": kw["throughput_min_runs"],
        "min_seconds": kw["min_seconds"],
        "threads_requested": kw["threads"],
        "static_shapes": kw["static_shapes"],
        "rounds": rounds,
        "torch_compiled": compile_torch,
        "bf16_hardware": bf16_hardware,
        "input": "given images" if bench_kw.get("images") is not None else "seeded random noise",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    compared = compare(entries, reference=reference)
    for name, o in overrides.items():
        if name in compared:
            compared[name]["settings_override"] = {k: v for k, v in o.items() if k not in ("images", "clock")}
    fastest = fastest_variant([{"name": n, "bench": d} for n, d in compared.items() if not d.get("note")])
    return BenchRun(compared, machine, settings, warnings, fastest)
