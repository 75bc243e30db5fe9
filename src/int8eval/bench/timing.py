"""Timing: seconds per call at each batch size, after untimed warm-up calls, with the garbage collector paused.

Inputs are prepared before any timing (no decoding). Each batch size is timed as a deployment runs it (see
`int8eval.bench.deploy`): OpenVINO reshaped to a static [B, C, H, W] and compiled per batch size, ONNX Runtime with
the batch dimension fixed per session, PyTorch compiled by inductor for static shapes. Every number is stored raw;
rounding happens only when rendering.

Example:
    >>> result = benchmark(variant, (3, 224, 224), batch_sizes=(1, 32))
    >>> result.latency_ms_p50, result.throughput_ips
"""

from __future__ import annotations

import gc
import inspect
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from int8eval.bench.deploy import timed_call
from int8eval.environment import torch_threads

Clock = Callable[[], float]

PERCENTILES = (50, 90, 99)


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
    timed_call: str  # "static" (a static-shape form per batch size), "predict", or "native" (bench_call hook)
    execution: str = "as built"  # how the runtime ran it, in words (e.g. "static shape per batch size")

    def pooled(self, other: BenchResult) -> BenchResult:
        """This result with `other`'s calls added at each batch size (the same variant timed again)."""
        timings = {b: BatchTiming(b, t.times_s + other.timings[b].times_s) if b in other.timings else t for b, t in self.timings.items()}
        return BenchResult(self.name, self.input_shape, timings, self.threads, self.warmup, self.timed_call, self.execution)

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
            "execution": self.execution,
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
    static_shapes: bool = True,
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
        static_shapes: time each batch size on a form of the model with that static input shape, as a deployment
            runs it (`deploy.timed_call`); False times the dynamic-batch model the accuracy pass used.
        clock: seconds as a float; injectable for tests.
    """
    sizes = sorted(set(int(b) for b in batch_sizes))
    if not sizes or sizes[0] < 1:
        raise ValueError(f"batch sizes must be >= 1, got {list(batch_sizes)}")
    timings: dict[int, BatchTiming] = {}
    with torch_threads(threads):
        for i, batch in enumerate(sizes):
            x = make_input(input_shape, batch, images=images, seed=seed)  # prepared before any timing
            call = timed_call(variant, x, static=static_shapes)  # compiles or reshapes now, outside any timing
            runs = min_runs if i == 0 else throughput_min_runs
            warm = warmup if i == 0 or throughput_warmup is None else throughput_warmup
            times = time_calls(
                call.fn, warmup=warm, min_runs=runs, min_seconds=min_seconds, max_runs=max(max_runs, runs),
                max_seconds=max_seconds, clock=clock,
            )
            timings[batch] = BatchTiming(batch, times)
            kind, execution, used = call.kind, call.execution, call.threads
            call = None  # free this static form (a compiled model, a session) before building the next
        used = used or runtime_threads(variant)
    name = getattr(variant, "name", type(variant).__name__)
    return BenchResult(name, tuple(input_shape), timings, used, warmup, kind, execution)



# `benchmark`'s keyword defaults, the one source of what a run uses when not told (batch sizes, warm-up, runs, ...).
BENCH_DEFAULTS = {
    name: p.default for name, p in inspect.signature(benchmark).parameters.items() if p.kind is p.KEYWORD_ONLY
}
