"""The typed sections of report.json: a variant's status, its paired statistics against the reference, its verdict,
its speed, the run's benchmark section and the per-layer sensitivity. Their fields are the keys int8eval writes.

Each section refuses a key it does not know (a typo or an edited report.json is named, not ignored) and writes
back exactly the keys it was given: a field never set is left out rather than written as null, so a report.json
reads back and is written again unchanged.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_serializer

from int8eval.config import DropKind


class Status(StrEnum):
    """What became of a variant: measured, failed (`error` says why), or measured but its backend's FP32 does not
    match the reference, so its INT8 numbers cannot be attributed to INT8 (`error` says by how much).

    A StrEnum: a member formats as its word ("ok") in every report and compares equal to it."""

    ok = "ok"
    error = "error"
    parity_failed = "parity_failed"


class Verdict(StrEnum):
    passed = "pass"
    failed = "fail"
    inconclusive = "inconclusive"


class Section(BaseModel):
    # Assignments are checked like the values read. NaN and infinity are written as null, as JSON has neither (what
    # report.json held when the sections were dicts).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, ser_json_inf_nan="null")

    @model_serializer(mode="wrap")
    def _as_written(self, handler) -> dict:
        # Only the keys that were set: the writer decides which keys a section has (e.g. `top5` only when measured).
        data = handler(self)
        return {k: v for k, v in data.items() if k in self.model_fields_set}


# --- paired statistics (stats.paired_stats) and the verdict (verdict.decide) ------------------------------------


class PairedBlock(Section):
    """One measure (top-1 or top-5) of a variant against another on the same images: both accuracies, the
    difference var - ref with its 95% CI, the paired 2x2 table and McNemar's exact p-value."""

    ref: float
    var: float
    diff: float
    diff_ci95: tuple[float, float]
    both_right: int
    ref_right_var_wrong: int
    ref_wrong_var_right: int
    both_wrong: int
    mcnemar_p: float | None = None


class ClassFlips(Section):
    n: int
    lost: int
    gained: int


class ClassLoss(Section):
    wnid: str
    name: str
    n: int
    lost: int
    gained: int
    net: int


class PairedSection(Section):
    """`VariantResult.paired` (against the reference) and each of `VariantResult.compared_with`."""

    n: int
    ci_method: str
    test: str
    top1: PairedBlock
    agreement_top1: float
    agreement_top1_ci95: tuple[float, float]
    top5: PairedBlock | None = None
    kl_mean: float | None = None
    kl_mean_ci95: tuple[float, float] | None = None  # stats.mean_ci
    kl_p99: float | None = None
    cos_mean: float | None = None
    cos_mean_ci95: tuple[float, float] | None = None
    cos_min: float | None = None
    flips_by_class: dict[str, ClassFlips] = Field(default_factory=dict)
    classes_lost_most: list[ClassLoss] = Field(default_factory=list)


class VerdictSection(Section):
    """`VariantResult.verdict`: the verdict on the declared budget; drops are fractions (reference - variant)."""

    verdict: Verdict
    reason: str
    budget: float
    drop: float
    drop_ci95: tuple[float, float]
    criterion: str


class AcceptanceRecord(Section):
    """`Report.acceptance`: the declared criterion (config.Acceptance) and its description."""

    max_drop: float
    drop: DropKind = DropKind.absolute
    label: str | None = None
    description: str


# --- speed (int8eval.bench) -------------------------------------------------------------------------------------


class BatchTimingSection(Section):
    """The calls at one batch size (bench.timing.BatchTiming.to_dict)."""

    batch: int
    runs: int
    latency_ms_p50: float
    latency_ms_p90: float
    latency_ms_p99: float
    latency_ms_mean: float
    latency_ms_min: float
    images_per_s: float
    times_ms: list[float]


class VariantBench(Section):
    """`VariantResult.bench` and each row of `BenchSection.speed_only` (bench.comparison.compare): the timings, the
    speedups against the same backend's FP32/BF16/FP16 variants and the reference, and the size. A row that could not
    be timed has only `error` (and sizes); the others have the rest."""

    error: str | None = None
    threads: int | None = None
    input_shape: list[int] | None = None
    warmup: int | None = None
    timed_call: str | None = None
    execution: str | None = None
    latency_batch: int | None = None
    latency_runs: int | None = None
    latency_ms_p50: float | None = None
    latency_ms_p90: float | None = None
    latency_ms_p99: float | None = None
    latency_ms_mean: float | None = None
    throughput_batch: int | None = None
    throughput_runs: int | None = None
    throughput_ips: float | None = None
    batches: dict[str, BatchTimingSection] | None = None
    size_mb: float | None = None
    artifact: str | None = None
    backend: str | None = None
    precision: str | None = None
    note: str | None = None
    baseline_fp32: str | None = None
    speedup_throughput_vs_fp32: float | None = None
    speedup_latency_vs_fp32: float | None = None
    baseline_bf16: str | None = None
    speedup_throughput_vs_bf16: float | None = None
    speedup_latency_vs_bf16: float | None = None
    baseline_fp16: str | None = None
    speedup_throughput_vs_fp16: float | None = None
    speedup_latency_vs_fp16: float | None = None
    baseline_reference: str | None = None
    speedup_throughput_vs_reference: float | None = None
    speedup_latency_vs_reference: float | None = None
    size_fp32_mb: float | None = None
    size_ratio_vs_fp32: float | None = None
    size_reduction_vs_fp32: float | None = None
    # `benchmark` keyword arguments that replaced the run's for this row (e.g. fewer calls for emulated BF16): the
    # arguments of bench.timing.benchmark, so free-form here.
    settings_override: dict[str, Any] | None = None


class BenchSettings(Section):
    """How every row was timed (bench.comparison.bench_run); `model` only in `int8eval bench`'s bench.json."""

    batch_sizes: list[int]
    warmup: int | None = None
    throughput_warmup: int | None = None
    max_seconds: float | None = None
    min_runs: int | None = None
    throughput_min_runs: int | None = None
    min_seconds: float | None = None
    threads_requested: int | None = None
    static_shapes: bool | None = None
    rounds: int | None = None
    torch_compiled: bool | None = None
    bf16_hardware: bool | None = None
    input: str | None = None
    created: str | None = None
    model: str | None = None


class FasterInconclusive(Section):
    name: str
    throughput_ips: float
    times_faster: float | None = None
    than: str | None = None
    images_to_settle: int | None = None
    images_now: int | None = None
    estimate_within_budget: bool


class FastestSection(Section):
    """Which variant to deploy (bench.summary.fastest_variant): the fastest that passes, and faster unsettled ones."""

    criterion: str
    throughput: str | None = None
    latency: str | None = None
    faster_inconclusive: list[FasterInconclusive] = Field(default_factory=list)
    fp32: str | None = None
    fp32_ips: float | None = None
    throughput_ips: float | None = None
    throughput_batch: int | None = None
    latency_ms_p50: float | None = None
    speedup_vs_fp32: float | None = None


class BenchSection(Section):
    """`Report.bench` (bench.command.add_bench): the machine, the settings, warnings, the fastest variant, and the
    rows timed that are no report variant (a PyTorch variant's eager speed, BF16/FP16 baselines timed unasked)."""

    # The CPU (environment.cpu_info), GPU, platform and load while timing: a machine description as free-form as
    # Report.environment, which it mirrors.
    machine: dict[str, Any] | None = None
    settings: BenchSettings | None = None
    warnings: list[str] = Field(default_factory=list)
    fastest: FastestSection | None = None
    speed_only: dict[str, VariantBench] = Field(default_factory=dict)


# --- per-layer sensitivity (int8eval diagnose) ------------------------------------------------------------------


class Tally(Section):
    """Agreement with FP32 (and mean KL to its logits) of one fake-quantized configuration; `top1` when the images
    have labels, `n` in the confirmation."""

    agreement: float
    kl: float
    top1: float | None = None
    n: int | None = None


class KeptFp32(Section):
    layers: list[str]
    agreement: float
    kl: float
    top1: float | None = None


class SqnrDb(Section):
    """A layer's output SQNR in dB: local (its own error with FP32 inputs: w+a, weights only, input only) and
    accumulated in the all-INT8 model. None where there is no noise."""

    local: float | None = None
    local_weight: float | None = None
    local_act: float | None = None
    accumulated: float | None = None


class LayerSensitivity(Section):
    module: str
    onnx_node: str | None = None
    type: str
    params: int | None = None
    act_range: tuple[float | None, float | None] | None = None  # null where a range was never observed (infinite)
    sqnr_db: SqnrDb | None = None
    only: Tally
    all_but: Tally | None = None
    only_weight: Tally | None = None  # with split effects only
    only_act: Tally | None = None


class Confirmation(Section):
    """The top-k kept in FP32, checked again on other images (diagnose.keep_fp32_check)."""

    reference: Tally
    all_quantized: Tally
    keep_fp32: Tally
    layers: list[str]


class SensitivitySpec(Section):
    """The fake-quantization recipe (diagnose.FakeQuantSpec)."""

    per_channel: bool
    calib: str
    percentile: float
    symmetric_activations: bool
    bias_correction: bool


class Sensitivity(Section):
    """`Report.sensitivity` (diagnose.run_diagnose): per-layer sensitivity, the ranking, and what keeping the top-k in
    FP32 gives. sensitivity.json holds the same plus the image ids."""

    spec: SensitivitySpec | None = None
    spec_description: str
    bn_folded: bool | None = None
    prefix_cached: bool | None = None
    num_calib: int
    num_images: int
    num_layers: int | None = None
    reference: Tally | None = None
    all_quantized: Tally
    weights_only: Tally | None = None
    activations_only: Tally | None = None
    rank_by: str
    ranking: list[str]
    top_k: list[str]
    keep_fp32: KeptFp32 | None = None
    layers: list[LayerSensitivity]
    seconds: float | None = None
    confirm: Confirmation | None = None
    model: str | None = None
    data: str | None = None
    seed: int | None = None


# --- the tuner (int8eval tune) ----------------------------------------------------------------------------------


class TuneSets(Section):
    """The three disjoint image sets of a tune: calibration (ranges), tuning (candidates ranked and chosen) and
    confirmation (only the final paired verdict of the chosen models; nothing is chosen on it)."""

    calibration: int
    tuning: int
    confirmation: int
    confirmation_source: str  # "seeded split of DIR" or the --confirm-data folder
    tuning_ids: list[str] = Field(default_factory=list)
    confirmation_ids: list[str] = Field(default_factory=list)


class TuneCandidate(Section):
    """One rung of a backend's ladder: the recipe, what it cost to build, how it did on the tuning set (paired
    against the PyTorch FP32 reference), its measured speed and size, and, if it was tried, the confirmation."""

    backend: str
    step: str  # the ladder step, e.g. "default", "calibration", "activation type", "FP32 layers", "QAT"
    name: str  # the variant name
    recipe: dict[str, Any]
    status: Status
    error: str | None = None
    tuning: PairedSection | None = None
    tuning_verdict: VerdictSection | None = None
    accepted: bool = False  # on the tuning set, by `accepted_by`
    accepted_by: str | None = None  # "verdict" (paired CI within budget) or "agreement" (the stated proxy)
    confirmation: PairedSection | None = None
    confirmation_verdict: VerdictSection | None = None
    confirmed: bool | None = None  # None: not tried on the confirmation set
    latency_ms: float | None = None  # batch 1, p50
    throughput_ips: float | None = None
    speedup_vs_fp32: float | None = None  # throughput against the same backend's FP32
    size_mb: float | None = None
    size_vs_fp32: float | None = None  # fraction of the same backend's FP32 artifact
    build_s: float | None = None
    time_s: float | None = None  # build + evaluation + timing: what the step cost
    reused: bool = False  # taken from the run a kill cut short (OUT/.tune-cache), not measured again by this run


class TuneBackend(Section):
    """A backend's outcome: its FP32 baseline, the chosen model (or none), why the ladder stopped, its Pareto front
    (accuracy x speed x size on the tuning set) and where the chosen artifact was written."""

    backend: str
    fp32: str
    fp32_throughput_ips: float | None = None
    fp32_size_mb: float | None = None
    chosen: str | None = None
    stopped: str
    pareto: list[str] = Field(default_factory=list)
    deploy: str | None = None  # RUN_DIR/deploy/<backend>
    node: str | None = None  # the Ray worker its ladder climbed on (tune --ray); None: the machine that wrote the report


class TuneRanking(Section):
    """The sensitivity ranking the FP32-layers step kept layers by (absent when no ladder reached that step)."""

    method: str
    images: int  # tuning images it ranked on
    seconds: float
    layers: list[str]  # most sensitive first


class TuneSection(Section):
    """`Report.tune` (int8eval.commands.tune): the sets, the stop rule in words, every candidate, each backend's
    outcome and the one model to ship for the objective."""

    objective: str  # throughput | latency | size
    budget: AcceptanceRecord
    rule: str
    sets: TuneSets
    candidates: list[TuneCandidate] = Field(default_factory=list)
    backends: list[TuneBackend] = Field(default_factory=list)
    choice: str | None = None
    choice_reason: str
    ranking: TuneRanking | None = None


class PreprocessingCheck(Section):
    """The FP32 reference's top-1 against the top-1 its weights' publisher reports (int8eval.preprocessing_check):
    `suspect` when even the upper end of its Wilson interval at `confidence` is more than `margin_points` below."""

    published_top1: float  # fractions, as every accuracy in report.json
    published_source: str
    measured_top1: float
    measured_ci: tuple[float, float]
    confidence: float
    margin_points: float
    num_images: int
    suspect: bool
    warning: str | None = None
