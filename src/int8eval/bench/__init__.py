"""Speed and size: batch-1 latency, large-batch throughput, artifact size, and the machine they were measured on.

Split by job: `timing` (seconds per call), `deploy` (each variant as a deployment runs it: static shapes, compiled
PyTorch, the BF16/FP16 baselines), `machine` (CPU, GPU, load), `comparison` (speedups against the same backend's
baselines), `summary` (which variant to deploy), `render` (Markdown) and `command` (`run --bench`, `int8eval bench`).

Example:
    >>> from int8eval.bench import bench_command
    >>> run = bench_command("efficientnet_lite0", ["openvino"], ["fp32", "int8"])
"""

from int8eval.bench.command import add_bench, add_build_outcome, bench_command, build_bench_variants, with_float_baselines
from int8eval.bench.comparison import BASELINE_PRECISIONS, EMULATED_BF16, BenchEntry, BenchRun, bench_run, compare, ratio
from int8eval.bench.deploy import compiled_twin, float_baseline_recipes, timed_call
from int8eval.bench.machine import bf16_hardware, load_warning, machine_info
from int8eval.bench.render import fmt, render_markdown, times
from int8eval.bench.summary import AGREEMENT_BUDGET, accurate_enough, fastest_variant, meets_budget, summary_lines
from int8eval.bench.timing import (
    BENCH_DEFAULTS,
    BatchTiming,
    BenchResult,
    benchmark,
    make_input,
    runtime_threads,
    time_calls,
    torch_threads,
)

__all__ = [
    "AGREEMENT_BUDGET", "BASELINE_PRECISIONS", "BENCH_DEFAULTS", "EMULATED_BF16", "BatchTiming", "BenchEntry",
    "BenchResult", "BenchRun", "accurate_enough", "add_bench", "add_build_outcome", "bench_command", "bench_run",
    "benchmark", "bf16_hardware", "build_bench_variants", "compare", "compiled_twin", "fastest_variant",
    "float_baseline_recipes", "fmt", "load_warning", "machine_info", "make_input", "meets_budget", "ratio",
    "render_markdown", "runtime_threads", "summary_lines", "time_calls", "timed_call", "times", "torch_threads",
    "with_float_baselines",
]
