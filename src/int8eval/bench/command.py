"""Benchmarking the variants a command built: `add_bench` times them (after the accuracy pass in `run --bench`;
alone in `int8eval bench`, int8eval.commands.bench) and fills the report's bench sections.

Both add the fast float baselines the CPU (or GPU) has without being asked (`deploy.build_float_baselines`):
BF16 on torch and OpenVINO where the CPU has BF16 hardware, FP16 for TensorRT on a GPU.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from int8eval.bench import deploy, machine
from int8eval.bench.comparison import bench_run
from int8eval.bench.summary import fastest_variant
from int8eval.report.sections import BenchSection, Status, VariantBench

BASELINE_NOTE = "{precision} baseline, timed without being asked because this {device} has {precision} hardware; not evaluated"


def with_float_baselines(loaded, variants: Sequence, workdir: Path | None) -> tuple[list, dict[str, str], dict[str, str]]:
    """`variants` plus the BF16/FP16 baselines this machine has (`deploy.build_float_baselines`).

    Returns (variants to time, {baseline name: note}, {baseline name: why it was not built})."""
    bf16, gpu = machine.bf16_hardware(), machine.gpu_name() is not None
    if not (bf16 or gpu):
        return list(variants), {}, {}
    workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="int8eval-bench-"))
    built, failed = deploy.build_float_baselines(loaded, variants, workdir, bf16=bf16, gpu=gpu)
    notes = {}
    for v in built:
        precision = deploy.precision_of(v).upper()
        notes[v.name] = BASELINE_NOTE.format(precision=precision, device="GPU" if precision == "FP16" else "CPU")
    return [*variants, *built], notes, failed


def add_bench(
    results, variants: Iterable, loaded, *, reference: str | None = None, workdir: Path | None = None, **bench_kw: Any
) -> BenchSection:
    """Benchmark the run's variants and fill `VariantResult.bench` for each; returns the report's `bench` section.

    Call it after accuracy, parity and verdicts are filled, so the fastest variant that passes can be named.
    Rows that are no report variant (a PyTorch variant's eager speed, BF16/FP16 baselines timed unasked) go to the
    section's `speed_only`.

    Args:
        results: VariantResults, as a dict by name or a list.
        variants: the built Variants (those that failed to build have no entry and are skipped).
        loaded: the LoadedModel (for the input shape, and to build the float baselines).
        reference: the reference variant's name.
        workdir: where float baselines write their artifacts (default: a temporary folder).
        **bench_kw: passed to `bench_run` and `benchmark`.
    """
    by_name = results if isinstance(results, Mapping) else {r.name: r for r in results}
    # A variant whose backend failed the FP32 parity gate still has a speed worth knowing; only broken ones are left out.
    live = [v for v in variants if v.name in by_name and by_name[v.name].status != Status.error]
    timed, notes, failed = with_float_baselines(loaded, live, workdir)
    run = bench_run(timed, loaded.input_shape, reference=reference, notes=notes, **bench_kw)
    speed_only = {}
    for name, d in run.variants.items():
        if name in by_name:
            by_name[name].bench = VariantBench.model_validate(d)
        else:
            speed_only[name] = d
    for name, message in failed.items():
        speed_only[name] = {"error": message, "note": "baseline not built"}
    run.fastest = fastest_variant(by_name.values())
    return BenchSection.model_validate({**run.section(), "speed_only": speed_only})
