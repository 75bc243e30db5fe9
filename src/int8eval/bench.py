"""Speed and size: batch-1 latency, large-batch throughput, artifact size, and the machine they were measured on.

Timing is done on inputs prepared beforehand (no decoding), after untimed warm-up calls, with the garbage collector
paused. Each runtime is called through `Variant.predict` unless the variant offers a native timing hook
(`bench_call(images) -> Callable[[], object]`, e.g. an OpenVINO infer request with its input tensor already set),
which then is what gets timed. Every number is stored raw; rounding happens only when rendering.

Example:
    >>> result = benchmark(variant, (3, 224, 224), batch_sizes=(1, 32))
    >>> result.latency_ms_p50, result.throughput_ips
"""

from __future__ import annotations

import gc
import inspect
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from int8eval.environment import cpu_info

Clock = Callable[[], float]

PERCENTILES = (50, 90, 99)
# Without a verdict from the accuracy budget, a variant counts as accurate enough when its top-1 agrees with the
# FP32 reference on at least this fraction of images.
AGREEMENT_BUDGET = 0.99
# Precisions a variant's speed is compared against on its own backend: FP32, and the fast float baseline (BF16 on
# CPUs with AMX/AVX512-BF16, FP16 on GPUs), so INT8 is not credited with what any reduced precision would buy.
BASELINE_PRECISIONS = ("fp32", "bf16", "fp16")
# Timing for a BF16 variant on a CPU without BF16 hardware: emulated, ~10x slower than FP32; a few batch-1 calls
# show that, while batch-32 runs would take minutes for nothing.
EMULATED_BF16 = {"warmup": 1, "min_runs": 3, "min_seconds": 0.0}


# --------------------------------------------------------------------------------------------------------------
# Timing


@dataclass
class BatchTiming:
    """Seconds per call of one batch size, after warm-up."""

    batch: int
    times_s: list[float]

    @property
    def runs(self) -> int:
        return len(self.times_s)

    def percentile_ms(self, q: float) -> float:
        return float(np.percentile(np.asarray(self.times_s), q)) * 1e3

    @property
    def mean_ms(self) -> float:
        return float(np.mean(self.times_s)) * 1e3

    @property
    def images_per_s(self) -> float:
        # Total images over total time: the sustained rate, not the rate of the median call.
        return self.batch * self.runs / float(np.sum(self.times_s))

    def to_dict(self) -> dict:
        return {
            "batch": self.batch,
            "runs": self.runs,
            **{f"latency_ms_p{q}": self.percentile_ms(q) for q in PERCENTILES},
            "latency_ms_mean": self.mean_ms,
            "latency_ms_min": min(self.times_s) * 1e3,
            "images_per_s": self.images_per_s,
            "times_ms": [t * 1e3 for t in self.times_s],
        }


@dataclass
class BenchResult:
    """Latency at the smallest batch size and throughput at the largest, for one variant."""

    name: str
    input_shape: tuple[int, int, int]
    timings: dict[int, BatchTiming]
    threads: int | None  # what the runtime runs with (None: not known)
    warmup: int
    timed_call: str  # "predict" or "native" (the variant's bench_call hook)

    @property
    def latency(self) -> BatchTiming:
        return self.timings[min(self.timings)]

    @property
    def throughput(self) -> BatchTiming:
        return self.timings[max(self.timings)]

    @property
    def latency_ms_p50(self) -> float:
        return self.latency.percentile_ms(50)

    @property
    def latency_ms_p90(self) -> float:
        return self.latency.percentile_ms(90)

    @property
    def throughput_ips(self) -> float:
        return self.throughput.images_per_s

    def to_dict(self) -> dict:
        lat, thr = self.latency, self.throughput
        return {
            "threads": self.threads,
            "input_shape": list(self.input_shape),
            "warmup": self.warmup,
            "timed_call": self.timed_call,
            "latency_batch": lat.batch,
            "latency_runs": lat.runs,
            **{f"latency_ms_p{q}": lat.percentile_ms(q) for q in PERCENTILES},
            "latency_ms_mean": lat.mean_ms,
            "throughput_batch": thr.batch,
            "throughput_runs": thr.runs,
            "throughput_ips": thr.images_per_s,
            "batches": {str(b): t.to_dict() for b, t in sorted(self.timings.items())},
        }


def time_calls(
    fn: Callable[[], object],
    *,
    warmup: int,
    min_runs: int,
    min_seconds: float,
    max_runs: int,
    max_seconds: float | None = None,
    clock: Clock = time.perf_counter,
) -> list[float]:
    """Seconds per call of `fn`: `warmup` untimed calls, then timed calls until at least `min_runs` calls and
    `min_seconds` of timed work are done, but never more than `max_runs` calls, and, when `max_seconds` is set,
    no new call once that much timed work is done (a cap for very slow variants: fewer runs than `min_runs`)."""
    if warmup < 0 or min_runs < 1 or max_runs < min_runs or min_seconds < 0 or (max_seconds is not None and max_seconds <= 0):
        raise ValueError(
            f"bad run counts: warmup={warmup}, min_runs={min_runs}, max_runs={max_runs}, "
            f"min_seconds={min_seconds}, max_seconds={max_seconds}"
        )
    for _ in range(warmup):  # first calls pay for compilation, allocator growth and cold caches
        fn()
    times: list[float] = []
    total = 0.0
    gc_was_enabled = gc.isenabled()
    gc.disable()  # a collection in the middle of a call would land in one sample at random (timeit does the same)
    try:
        while len(times) < max_runs and (len(times) < min_runs or total < min_seconds):
            if max_seconds is not None and times and total >= max_seconds:
                break
            start = clock()
            fn()
            elapsed = clock() - start
            times.append(elapsed)
            total += elapsed
    finally:
        if gc_was_enabled:
            gc.enable()
    return times


def make_input(input_shape: Sequence[int], batch: int, *, images: np.ndarray | None = None, seed: int = 0) -> np.ndarray:
    """A contiguous float32 [batch, C, H, W] input: `images` repeated to fill the batch, else seeded noise."""
    if batch < 1:
        raise ValueError(f"batch size must be >= 1, got {batch}")
    shape = (batch, *input_shape)
    if images is None:
        return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 4 or tuple(images.shape[1:]) != tuple(input_shape):
        raise ValueError(f"images have shape {images.shape}, expected [N, {', '.join(map(str, input_shape))}]")
    return np.ascontiguousarray(images[np.arange(batch) % len(images)])


def _timed_call(variant, x: np.ndarray) -> tuple[Callable[[], object], str]:
    hook = getattr(variant, "bench_call", None)
    if callable(hook):
        return hook(x), "native"
    return (lambda: variant.predict(x)), "predict"


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run PyTorch with `threads` intra-op threads inside the block (no-op when None)."""
    if threads is None:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def runtime_threads(variant) -> int | None:
    """The intra-op thread count the variant's runtime uses, read from the runtime itself where it says."""
    declared = getattr(variant, "threads", None)
    if isinstance(declared, int) and declared > 0:
        return declared
    compiled = getattr(variant, "compiled", None)  # OpenVINO CompiledModel
    if compiled is not None and hasattr(compiled, "get_property"):
        try:
            n = int(compiled.get_property("INFERENCE_NUM_THREADS"))
            if n > 0:
                return n
        except Exception:  # noqa: BLE001 - another runtime's object, or a property this version lacks
            pass
    session = getattr(variant, "session", None)  # ONNX Runtime InferenceSession
    if session is not None and hasattr(session, "get_session_options"):
        n = session.get_session_options().intra_op_num_threads
        # 0 means ORT's default: one thread per physical core.
        return n if n > 0 else _physical_cores()
    if type(variant).__module__.startswith("int8eval.backends.torch") or hasattr(variant, "module"):
        import torch

        return torch.get_num_threads()
    return None


def _physical_cores() -> int | None:
    """Distinct (physical id, core id) pairs in /proc/cpuinfo: ORT's default thread count is one per core."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return os.cpu_count()
    cores, package = set(), None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "physical id":
            package = value.strip()
        elif key.strip() == "core id":
            cores.add((package, value.strip()))
    return len(cores) or os.cpu_count()


def benchmark(
    variant,
    input_shape: Sequence[int],
    *,
    batch_sizes: Sequence[int] = (1, 32),
    warmup: int = 3,
    throughput_warmup: int | None = None,
    min_runs: int = 20,
    throughput_min_runs: int = 3,
    min_seconds: float = 1.0,
    max_runs: int = 10_000,
    max_seconds: float | None = None,
    threads: int | None = None,
    images: np.ndarray | None = None,
    seed: int = 0,
    clock: Clock = time.perf_counter,
) -> BenchResult:
    """Time `variant` at each batch size: latency percentiles at the smallest, throughput at the largest.

    Args:
        variant: a built Variant (anything with `predict(np.float32 [N, C, H, W])` and `name`).
        input_shape: (C, H, W) of one preprocessed image.
        batch_sizes: the smallest gives the latency percentiles, the largest the throughput (images/s).
        warmup: untimed calls at the smallest batch size before timing starts.
        throughput_warmup: untimed calls at each larger batch size (default: `warmup`); keep >= 1 for compiled
            PyTorch, which compiles again for a new batch shape.
        min_runs: at least this many timed calls at the smallest batch size (percentiles need many).
        throughput_min_runs: at least this many timed calls at every larger batch size.
        min_seconds: keep timing each batch size until this much timed work has been done.
        max_runs: never more timed calls than this per batch size.
        max_seconds: stop timing a batch size once this much timed work is done, even below the minimum run
            count (for variants far too slow to matter; the run count is recorded).
        threads: PyTorch intra-op threads while timing (ONNX Runtime and OpenVINO fix theirs when the variant is
            built); the count each runtime really used is read back into `BenchResult.threads`.
        images: real preprocessed images to time on (repeated to fill a batch); default: seeded noise.
        clock: seconds as a float; injectable for tests.
    """
    sizes = sorted(set(int(b) for b in batch_sizes))
    if not sizes or sizes[0] < 1:
        raise ValueError(f"batch sizes must be >= 1, got {list(batch_sizes)}")
    timings: dict[int, BatchTiming] = {}
    kind = "predict"
    with torch_threads(threads):
        for i, batch in enumerate(sizes):
            x = make_input(input_shape, batch, images=images, seed=seed)  # prepared before any timing
            fn, kind = _timed_call(variant, x)
            runs = min_runs if i == 0 else throughput_min_runs
            warm = warmup if i == 0 or throughput_warmup is None else throughput_warmup
            times = time_calls(
                fn, warmup=warm, min_runs=runs, min_seconds=min_seconds, max_runs=max(max_runs, runs),
                max_seconds=max_seconds, clock=clock,
            )
            timings[batch] = BatchTiming(batch, times)
        used = runtime_threads(variant)
    return BenchResult(getattr(variant, "name", type(variant).__name__), tuple(input_shape), timings, used, warmup, kind)


# `benchmark`'s keyword defaults, the one source of what a run uses when not told (batch sizes, warm-up, runs, ...).
BENCH_DEFAULTS = {
    name: p.default for name, p in inspect.signature(benchmark).parameters.items() if p.kind is p.KEYWORD_ONLY
}


# --------------------------------------------------------------------------------------------------------------
# Comparison: speedups and size against the same backend's baselines


@dataclass
class BenchEntry:
    """One variant's measurement with what is needed to compare it: its backend, precision and artifact size."""

    name: str
    backend: str
    precision: str
    result: BenchResult | None = None
    size_mb: float | None = None
    artifact: str | None = None
    error: str | None = None


def _ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den == 0:
        return None
    return num / den


def compare(entries: Sequence[BenchEntry], *, reference: str | None = None) -> dict[str, dict]:
    """Per variant: its timings, speedups vs the FP32/BF16/FP16 variant of the same backend (and vs `reference`),
    and its size against the same backend's FP32 artifact. Speedup > 1 means faster than the baseline.

    Throughput speedup = images/s ÷ baseline images/s; latency speedup = baseline p50 ÷ p50.
    """
    by_key = {}
    for e in entries:
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
                    d[f"speedup_throughput_vs_{label}"] = _ratio(e.result.throughput_ips, base.result.throughput_ips)
                if e.result.latency.batch == base.result.latency.batch:
                    d[f"speedup_latency_vs_{label}"] = _ratio(base.result.latency_ms_p50, e.result.latency_ms_p50)
        fp32 = baselines.get("fp32")
        if fp32 is not None and fp32 is not e and e.size_mb is not None and fp32.size_mb:
            d["size_fp32_mb"] = fp32.size_mb
            d["size_ratio_vs_fp32"] = e.size_mb / fp32.size_mb
            d["size_reduction_vs_fp32"] = 1.0 - e.size_mb / fp32.size_mb
        out[e.name] = d
    return out


# --------------------------------------------------------------------------------------------------------------
# The machine


def machine_info(cpuinfo: str | None = None, *, gpu: str | None | bool = True) -> dict:
    """CPU model and instruction sets, GPU model, load, and warnings about what the hardware cannot accelerate.

    Args:
        cpuinfo: /proc/cpuinfo text (default: read it).
        gpu: a GPU name, None for none, or True to ask PyTorch.
    """
    cpu = cpu_info(cpuinfo)
    if gpu is True:
        gpu = _gpu_name()
    isa = cpu["isa"]
    warnings = []
    if not cpu["int8_acceleration"]:
        have = "AVX512" if isa.get("avx512f") else "AVX2" if isa.get("avx2") else "no AVX2"
        warnings.append(
            f"this CPU ({cpu['model']}) has no INT8 dot-product instructions (no AVX512-VNNI, AVX-VNNI or AMX-INT8; "
            f"it has {have}): INT8 kernels fall back to {have} and are not expected to be much faster than FP32 here; "
            "the speedups below say nothing about a CPU with VNNI/AMX"
        )
    if not cpu["bf16_acceleration"]:
        warnings.append(
            "no BF16 hardware (AVX512-BF16 or AMX-BF16): a BF16 variant is emulated in software and is expected to be "
            "slower than FP32, so it is no fair baseline on this machine"
        )
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "cpu": cpu,
        "gpu": gpu,
        "platform": sys.platform,
        "load_avg_1m": load[0] if load else None,
        "warnings": warnings,
    }


def _gpu_name() -> str | None:
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:  # noqa: BLE001 - a broken CUDA setup must not stop a CPU benchmark
        return None


def load_warning(load_before: float | None, load_after: float | None, cores: int | None) -> str | None:
    """A warning when other processes kept the CPU busy while timing (1-minute load average above the cores)."""
    loads = [x for x in (load_before, load_after) if x is not None]
    if not loads or not cores:
        return None
    # Our own benchmark keeps up to `cores` threads busy; more than that means someone else competed for the CPU.
    if max(loads) > cores + 0.5:
        return (
            f"the CPU was shared while timing (1-minute load average up to {max(loads):.1f} on {cores} cores): "
            "numbers are noisy and likely pessimistic; rerun on an idle machine"
        )
    return None


# --------------------------------------------------------------------------------------------------------------
# A run over many variants


@dataclass
class BenchRun:
    """Everything `bench_run` measured: per-variant dicts (for VariantResult.bench) and the machine section."""

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


def _precision_of(variant) -> str:
    p = getattr(getattr(variant, "recipe", None), "precision", None)
    return getattr(p, "value", p) or "unknown"


def _backend_of(variant) -> str:
    b = getattr(getattr(variant, "recipe", None), "backend", None)
    return getattr(b, "value", b) or "unknown"


def bench_run(
    variants: Iterable,
    input_shape: Sequence[int],
    *,
    reference: str | None = None,
    on_progress: Callable[[str], None] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    bf16_hardware: bool | None = None,
    **bench_kw: Any,
) -> BenchRun:
    """Benchmark every variant of a run and compare each with its backend's FP32 and BF16/FP16 variants.

    Args:
        variants: built Variants (one that fails to run is recorded with its error; the others go on).
        input_shape: (C, H, W) of one preprocessed image.
        reference: name of the run's reference variant (e.g. "torch-fp32"), for speedups across backends.
        on_progress: called with each variant's name before it is timed.
        overrides: per variant name, `benchmark` arguments that replace `bench_kw` for it (e.g. fewer runs for a
            variant that is emulated and very slow); they are recorded in its result.
        bf16_hardware: whether the CPU runs BF16 natively (default: read from /proc/cpuinfo). Without it a CPU
            BF16 variant is emulated and ~10x slower than FP32, so it is timed at batch 1 only, with a few calls
            (`EMULATED_BF16`), unless `overrides` says otherwise.
        **bench_kw: passed to `benchmark` (batch_sizes, warmup, min_runs, min_seconds, threads, images, ...).

    Example:
        >>> run = bench_run(variants, loaded.input_shape, reference="torch-fp32")
        >>> run.variants["openvino-int8-minmax"]["speedup_throughput_vs_fp32"]
    """
    variants = list(variants)
    overrides = dict(overrides or {})
    machine = machine_info()  # reads /proc/cpuinfo once, for the BF16 check and the report
    if bf16_hardware is None:
        bf16_hardware = machine["cpu"]["bf16_acceleration"]
    if not bf16_hardware:
        smallest = min(bench_kw.get("batch_sizes", BENCH_DEFAULTS["batch_sizes"]))
        for v in variants:
            if _precision_of(v) == "bf16" and v.name not in overrides:
                overrides[v.name] = {**EMULATED_BF16, "batch_sizes": (smallest,)}
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    entries = []
    for v in variants:
        if on_progress:
            on_progress(v.name)
        entry = BenchEntry(v.name, _backend_of(v), _precision_of(v), size_mb=v.size_mb, artifact=_str(getattr(v, "artifact", None)))
        try:
            entry.result = benchmark(v, input_shape, **{**bench_kw, **(overrides.get(v.name) or {})})
        except Exception as e:  # noqa: BLE001 - one variant that cannot run must not stop the others
            entry.error = f"{type(e).__name__}: {e}"
        entries.append(entry)
    load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    machine["load_avg_1m"] = {"before": load_before, "after": load_after}
    warnings = list(machine["warnings"])
    shared = load_warning(load_before, load_after, machine["cpu"].get("logical_cores"))
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
        "input": "given images" if bench_kw.get("images") is not None else "seeded random noise",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    compared = compare(entries, reference=reference)
    for name, o in overrides.items():
        if name in compared:
            compared[name]["settings_override"] = {k: v for k, v in o.items() if k not in ("images", "clock")}
    return BenchRun(compared, machine, settings, warnings, fastest_variant([{"name": n, "bench": d} for n, d in compared.items()]))


def _str(x) -> str | None:
    return None if x is None else str(x)


# --------------------------------------------------------------------------------------------------------------
# Which variant to use


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


def _field(v: Any, key: str) -> Any:
    return v.get(key) if isinstance(v, Mapping) else getattr(v, key, None)


def accurate_enough(v: Any, *, budget: float = AGREEMENT_BUDGET) -> bool | None:
    """Whether a report variant meets the accuracy budget: its `verdict` where it has one, else top-1 agreement
    with the FP32 reference >= `budget`; the reference itself always does. None when nothing was measured."""
    if _field(v, "reference"):
        return True
    verdict = meets_budget(_field(v, "verdict"))
    if verdict is not None:
        return verdict
    agreement = _field(v, "agreement_top1")
    return None if agreement is None else agreement >= budget


def fastest_variant(variants: Iterable[Any], *, budget: float = AGREEMENT_BUDGET) -> dict | None:
    """The fastest accurate-enough variant: highest large-batch throughput, and lowest batch-1 p50 latency.

    Accurate enough is `accurate_enough`; when no variant has any accuracy (a speed-only run) all of them qualify
    and the criterion says so.

    Args:
        variants: VariantResult objects or dicts with `name`, `bench` and optionally `status`, `verdict`,
            `agreement_top1`, `reference`.
    """
    timed = [v for v in variants if _field(v, "status") in (None, "ok") and (_field(v, "bench") or {}).get("throughput_ips") is not None]
    if not timed:
        return None
    measured = any(_field(v, "agreement_top1") is not None or _field(v, "verdict") is not None for v in timed)
    if not measured:
        criterion, ok = "speed only (accuracy not measured)", timed
    else:
        has_verdict = any(_field(v, "verdict") is not None for v in timed)
        criterion = ("accuracy verdict within budget, else " if has_verdict else "") + (
            f"top-1 agreement with the FP32 reference >= {100 * budget:g}%"
        )
        ok = [v for v in timed if accurate_enough(v, budget=budget)]
    if not ok:
        return {"criterion": criterion, "throughput": None, "latency": None}
    best_thr = max(ok, key=lambda v: _field(v, "bench")["throughput_ips"])
    best_lat = min(ok, key=lambda v: _field(v, "bench")["latency_ms_p50"])
    return {
        "criterion": criterion,
        "throughput": _field(best_thr, "name"),
        "throughput_ips": _field(best_thr, "bench")["throughput_ips"],
        "latency": _field(best_lat, "name"),
        "latency_ms_p50": _field(best_lat, "bench")["latency_ms_p50"],
    }


# --------------------------------------------------------------------------------------------------------------
# Pipeline hook


def add_bench(results, variants: Iterable, loaded, *, reference: str | None = None, **bench_kw: Any) -> dict:
    """Benchmark the run's variants and fill `VariantResult.bench` for each; returns the report's `bench` section.

    Call it after accuracy, parity and verdicts are filled, so the fastest accurate-enough variant can be named.

    Args:
        results: VariantResults, as a dict by name or a list.
        variants: the built Variants (those that failed to build have no entry and are skipped).
        loaded: the LoadedModel (for the input shape).
        reference: the reference variant's name.
        **bench_kw: passed to `benchmark`.
    """
    by_name = results if isinstance(results, Mapping) else {r.name: r for r in results}
    # A variant whose backend failed the FP32 parity gate still has a speed worth knowing; only broken ones are left out.
    live = [v for v in variants if v.name in by_name and by_name[v.name].status not in ("error", "skipped")]
    run = bench_run(live, loaded.input_shape, reference=reference, **bench_kw)
    for name, d in run.variants.items():
        by_name[name].bench = d
    run.fastest = fastest_variant(by_name.values())
    return run.section()


# --------------------------------------------------------------------------------------------------------------
# Rendering


def _f(x: float | None, fmt: str = ".1f") -> str:
    return "—" if x is None else format(x, fmt)


def _x(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}×"


def render_markdown(variants: Iterable[Any], section: Mapping | None) -> list[str]:
    """Markdown lines of the speed-and-size section, from report variants (objects or dicts) and the bench section."""
    rows = [(v, _field(v, "bench")) for v in variants]
    rows = [(v, b) for v, b in rows if b]
    if not rows:
        return []
    lines = [
        "## Speed and size",
        "",
        "| variant | top-1 agreement % | threads | batch-1 p50 / p90 / p99 ms | images/s (batch) | × FP32 thr | × FP32 lat | "
        "× BF16 thr | size MB | size vs FP32 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for v, b in rows:
        agreement = _field(v, "agreement_top1")
        agr = "ref." if _field(v, "reference") else _f(None if agreement is None else 100 * agreement, ".1f")
        if b.get("throughput_ips") is None:
            lines.append(f"| {_field(v, 'name')} | {agr} | — | {b.get('error', 'not measured')} | | | | | {_f(b.get('size_mb'), '.1f')} | |")
            continue
        red = b.get("size_reduction_vs_fp32")
        half = b.get("speedup_throughput_vs_bf16", b.get("speedup_throughput_vs_fp16"))
        lines.append(
            f"| {_field(v, 'name')} | {agr} | {b.get('threads') or '?'} | {b['latency_ms_p50']:.2f} / {b['latency_ms_p90']:.2f} / "
            f"{b['latency_ms_p99']:.2f} | {b['throughput_ips']:.1f} ({b['throughput_batch']}) | "
            f"{_x(b.get('speedup_throughput_vs_fp32'))} | {_x(b.get('speedup_latency_vs_fp32'))} | {_x(half)} | "
            f"{_f(b.get('size_mb'), '.1f')} | {'—' if red is None else f'-{100 * red:.0f}%'} |"
        )
    section = section or {}
    settings = section.get("settings") or {}
    sizes = settings.get("batch_sizes", BENCH_DEFAULTS["batch_sizes"])
    if settings:
        lines += [
            "",
            f"Latency over ≥{settings.get('min_runs')} calls at batch {min(sizes)}, throughput "
            f"over ≥{settings.get('throughput_min_runs')} calls at batch {max(sizes)}, "
            f"after {settings.get('warmup')} and {settings.get('throughput_warmup')} warm-up calls, on "
            f"{settings.get('input')}; data loading excluded. Speedups (×) compare with the same backend's FP32 and "
            "BF16 variants: above 1 is faster.",
        ]
    fastest = section.get("fastest")
    if fastest and fastest.get("throughput"):
        lines += [
            "",
            f"**Fastest variant** ({fastest['criterion']}): {fastest['throughput']} at batch "
            f"{max(sizes)} ({fastest['throughput_ips']:.1f} images/s); "
            f"{fastest['latency']} at batch 1 ({fastest['latency_ms_p50']:.2f} ms p50).",
        ]
    machine = section.get("machine") or {}
    cpu = machine.get("cpu") or {}
    if cpu:
        isa = ", ".join(k for k, on in cpu.get("isa", {}).items() if on) or "none of note"
        lines += ["", f"Machine: {cpu.get('model')} ({cpu.get('logical_cores')} logical cores; {isa}); GPU: {machine.get('gpu') or 'none'}."]
    for w in section.get("warnings") or []:
        lines.append(f"\n> **Warning:** {w}")
    return lines


# --------------------------------------------------------------------------------------------------------------
# Standalone `int8eval bench`


def build_bench_variants(
    model: str,
    backends: Sequence[str] = (),
    precisions: Sequence[str] = ("fp32", "int8"),
    *,
    workdir: Path,
    data: Path | None = None,
    calib_size: int = 32,
    seed: int = 0,
    checkpoint: Path | None = None,
    weights: str | None = None,
    keeps: Sequence[tuple[str, ...]] = ((),),
    on_progress: Callable[[str], None] | None = None,
):
    """Load `model` and build it on each backend in each precision (FP32 always, for the speedups); INT8 once per
    set of layers in `keeps` left in FP32 (() for none).

    Returns (loaded, variants, not_built, warnings): `not_built` maps a variant name to why it was skipped (a
    precision the backend or CPU lacks) or failed to build; the others are still built.
    """
    from int8eval import backends as registry
    from int8eval.config import Backend, Precision, Recipe
    from int8eval.errors import ConfigError
    from int8eval.models import load_model

    chosen = [Backend(b) for b in backends] or [b for b, info in registry.BACKENDS.items() if info.installed and info.default]
    wanted = [Precision(p) for p in precisions]
    if Precision.fp32 not in wanted:  # speedups need the same backend's FP32
        wanted.insert(0, Precision.fp32)
    recipes, not_built = [], {}
    for backend in chosen:
        for p in wanted:
            for keep in keeps if p is Precision.int8 else ((),):
                r = Recipe(backend=backend, precision=p, calib=registry.default_calib(backend), keep_fp32=keep)
                try:
                    registry.check_recipe(r)
                    recipes.append(r)
                except ConfigError as e:
                    if p is Precision.fp32:
                        raise
                    not_built[r.name] = f"skipped: {e}"  # e.g. BF16 on a CPU without it: reported, not fatal
    loaded = load_model(model, checkpoint=checkpoint, weights=weights)
    for keep in keeps:
        loaded.check_layers(keep)
    warnings, calib = [], None
    if any(r.precision is Precision.int8 for r in recipes):
        calib, note = _bench_calibration(loaded, data, calib_size, seed)
        if note:
            warnings.append(note)
    variants = []
    for r in recipes:
        if on_progress:
            on_progress(f"building {r.name}")
        try:
            variants.append(registry.build_variant(loaded, r, calib, Path(workdir)))
        except Exception as e:  # noqa: BLE001 - one backend failing must not stop the others
            not_built[r.name] = f"{type(e).__name__}: {e}"
    return loaded, variants, not_built, warnings


def add_build_outcome(run: BenchRun, not_built: Mapping[str, str], warnings: Iterable[str]) -> None:
    """Record in `run` what `build_bench_variants` reported: each variant not built, with why, and its warnings."""
    for name, message in not_built.items():
        run.variants[name] = {"error": message}
    run.warnings += warnings


def bench_command(
    model: str,
    backends: Sequence[str] = (),
    precisions: Sequence[str] = ("fp32", "int8"),
    *,
    out: Path | None = None,
    data: Path | None = None,
    calib_size: int = 32,
    seed: int = 0,
    checkpoint: Path | None = None,
    weights: str | None = None,
    keeps: Sequence[tuple[str, ...]] = ((),),
    on_progress: Callable[[str], None] | None = None,
    **bench_kw: Any,
) -> BenchRun:
    """Build `model` on each backend in each precision and benchmark them (no accuracy evaluation).

    INT8 variants are calibrated on `calib_size` images from `data` (default: $INT8EVAL_DATA or the cached
    sample); without images they are calibrated on seeded noise, which is fine for speed and says so.
    Writes `out/bench.json` and `out/bench.md` when `out` is given. `**bench_kw` goes to `benchmark`.

    Example:
        >>> bench_command("efficientnet_lite0", ["onnxruntime", "openvino"], ["fp32", "int8"], out=Path("runs/bench"))
    """
    import json
    import tempfile

    workdir = Path(out) / "artifacts" if out else Path(tempfile.mkdtemp(prefix="int8eval-bench-"))
    loaded, variants, not_built, warnings = build_bench_variants(
        model, backends, precisions, workdir=workdir, data=data, calib_size=calib_size, seed=seed,
        checkpoint=checkpoint, weights=weights, keeps=keeps, on_progress=on_progress,
    )
    run = bench_run(variants, loaded.input_shape, on_progress=on_progress, **bench_kw)
    add_build_outcome(run, not_built, warnings)
    run.settings["model"] = loaded.name
    if out:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench.json").write_text(json.dumps(run.to_dict(), indent=2) + "\n")
        rows = [{"name": n, "bench": d} for n, d in run.variants.items()]
        (out / "bench.md").write_text("\n".join([f"# int8eval bench: {loaded.name}", "", *render_markdown(rows, run.section())]) + "\n")
    return run


def _bench_calibration(loaded, data: Path | None, calib_size: int, seed: int):
    """Calibration images for a speed-only run: real ones when available, else seeded noise (with a note)."""
    from int8eval.backends import CalibrationData
    from int8eval.errors import DatasetError

    try:
        from int8eval.data.decode import decode_samples
        from int8eval.data.fetch import default_data_root
        from int8eval.data.layouts import discover, subsample

        found = discover(data or default_data_root())
        samples = subsample(found.samples, calib_size, seed)
        images, _, ids = decode_samples(samples, loaded.preprocessing, batch_size=32, workers=0)
        calib = CalibrationData(batches=images, image_ids=ids)
        if calib.num_images:
            return calib, None
    except DatasetError:
        if data is not None:
            raise
    noise = make_input(loaded.input_shape, calib_size, seed=seed)
    return CalibrationData(batches=[noise], image_ids=[]), (
        "INT8 variants were calibrated on random noise (no images found): their speed is representative, their accuracy is not"
    )
