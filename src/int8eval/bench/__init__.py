"""Speed and size: batch-1 latency, large-batch throughput, artifact size, and the machine they were measured on.

Split by job: `timing` (seconds per call), `deploy` (each variant as a deployment runs it: static shapes, compiled
PyTorch, the BF16/FP16 baselines), `machine` (CPU, GPU, load), `comparison` (speedups against the same backend's
baselines), `summary` (which variant to deploy) and `command` (`add_bench`, which `run --bench`
and `int8eval bench` call). The Markdown of it all is int8eval.report.bench's.

Example:
    >>> from int8eval.commands.bench import bench
    >>> report = bench("efficientnet_lite0", ["openvino"], ["fp32", "int8"], out=Path("runs/bench"))
"""

from int8eval.bench.command import add_bench, with_float_baselines
from int8eval.bench.comparison import BASELINE_PRECISIONS, EMULATED_BF16, BenchEntry, BenchRun, bench_run, compare, ratio
from int8eval.bench.deploy import compiled_twin, float_baseline_recipes, timed_call
from int8eval.bench.machine import bf16_hardware, load_warning, machine_info
from int8eval.bench.summary import AGREEMENT_BUDGET, accurate_enough, fastest_variant, meets_budget
from int8eval.bench.timing import (
    BENCH_DEFAULTS,
    BatchTiming,
    BenchResult,
    benchmark,
    make_input,
    runtime_threads,
    time_calls,
)
from int8eval.report.bench import bench_markdown, fmt, summary_lines, times

__all__ = [
    "AGREEMENT_BUDGET", "BASELINE_PRECISIONS", "BENCH_DEFAULTS", "EMULATED_BF16", "BatchTiming", "BenchEntry",
    "BenchResult", "BenchRun", "accurate_enough", "add_bench", "bench_markdown", "bench_run",
    "benchmark", "bf16_hardware", "compare", "compiled_twin", "fastest_variant",
    "float_baseline_recipes", "fmt", "load_warning", "machine_info", "make_input", "meets_budget", "ratio",
    "runtime_threads", "summary_lines", "time_calls", "timed_call", "times",
    "with_float_baselines",
]
