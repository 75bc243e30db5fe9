"""report.json: the single source of truth of a run. Markdown and HTML are rendered from it.

Accuracies are fractions in [0, 1]; raw values are stored and only rounded when rendered.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from int8eval.config import Backend, Precision, Preprocessing
from int8eval.errors import RunFolderError
from int8eval.report.folder import write_atomic
from int8eval.report.sections import (
    AcceptanceRecord,
    BenchSection,
    PairedSection,
    PreprocessingCheck,
    Section,
    Sensitivity,
    Status,
    TuneSection,
    VariantBench,
    VerdictSection,
)

# 1.1: run_id and files (sha256 of predictions.npz and the artifacts). 1.2: the paired, verdict, bench, acceptance
# and sensitivity sections are typed (report.sections): the same keys as before, now checked, an unknown one refused.
# 1.3: the tune section (int8eval tune). Files of 1.0 to 1.2 still read.
SCHEMA_VERSION = "1.3"


class _Section(BaseModel):
    # Sections may carry fields added by later versions; readers ignore what they do not know. Enums are checked
    # when read and kept as their plain string values, so report.json reads back exactly as it was written.
    model_config = ConfigDict(extra="allow", use_enum_values=True)


def _errors(e: ValidationError, limit: int = 3) -> str:
    """A pydantic error as `field.path: what is wrong (got 'value')`, the bad value shown quoted and cut short."""
    parts = []
    for err in e.errors()[:limit]:
        where = ".".join(map(str, err["loc"])) or "top level"
        got = repr(err.get("input"))
        parts.append(f"{where}: {err['msg']} (got {got[:60] + '...' if len(got) > 60 else got})")
    more = len(e.errors()) - limit
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


def _checked(model: type[BaseModel]):
    """A validator checking a section kept as a dict (other code reads it as one) against `model`."""

    def check(value):
        if value is not None:
            try:
                model.model_validate(value)
            except ValidationError as e:
                raise ValueError(_errors(e)) from None
        return value

    return check


# Shapes of the sections kept as dicts, checked when report.json is read: what the renderers read of them.
class SkippedEntry(_Section):
    path: str
    reason: str


class TimingSection(_Section):
    """Where a command's time went, in seconds (absent where a command does not have that part)."""

    total_s: float | None = None
    images_per_s: float | None = None  # of the evaluation pass
    open_s: float | None = None  # the model loaded, the images listed, the calibration images decoded
    build_s: float | None = None  # every variant built (each one's own time is its prepare_s)
    eval_s: float | None = None  # the evaluation pass (each variant's own time is its predict_s)
    eval_wait_s: float | None = None  # of eval_s, waiting for decoded images
    stats_s: float | None = None  # paired statistics and verdicts


class ModelSection(_Section):
    name: str
    source: str
    num_params: int
    preprocessing: Preprocessing


class CalibrationSection(_Section):
    source: str  # "split of --data" or the --calib-data folder
    num_images: int
    seed: int
    image_ids: list[str]


class DataSection(_Section):
    root: str
    layout: str
    # No labels (or labels ignored): no accuracy, only agreement, flips, KL and cosine to the reference.
    labels_free: bool = False
    # A label space of its own (--class-names, an image,class CSV): class i's name; None: ImageNet-1k's synsets.
    class_names: list[str] | None = None
    num_found: int
    num_images: int  # evaluated
    num_skipped: int
    skipped: list[dict] = Field(default_factory=list)
    calibration: CalibrationSection | None = None
    seed: int = 0

    @field_validator("skipped")
    @classmethod
    def _skipped(cls, value):
        return [_checked(SkippedEntry)(entry) for entry in value]


class ParityCheck(_Section):
    agreement_top1: float
    threshold: float
    passed: bool


class VariantResult(_Section):
    # Assigned values are checked too: a writer that assigns a section as a dict gets it checked and typed.
    model_config = ConfigDict(validate_assignment=True)

    name: str
    backend: Backend
    precision: Precision
    status: Status
    error: str | None = None
    recipe: dict = Field(default_factory=dict)
    reference: bool = False
    top1: float | None = None
    top5: float | None = None
    top1_ci95: tuple[float, float] | None = None
    top5_ci95: tuple[float, float] | None = None
    agreement_top1: float | None = None
    delta_top1: float | None = None
    size_mb: float | None = None
    artifact: str | None = None
    prepare_s: float | None = None
    details: dict | None = None  # backend provenance: free-form by design, each backend says what it chose and why
    predict_s: float | None = None
    parity: ParityCheck | None = None  # a backend's FP32 of the reference's weights, checked against the reference
    gated_by: str | None = None  # the FP32 variant whose parity check gates this one (int8eval.parity.gate_for)
    per_class_top1: dict[str, dict] | None = None
    # Paired statistics against the reference (stats.paired_stats) and the acceptance verdict (verdict.decide).
    paired: PairedSection | None = None
    verdict: VerdictSection | None = None
    # Paired statistics against other variants than the reference, by their name: QAT against its fine-tuned FP32
    # control (what quantization costs after the same training) and against post-training quantization.
    compared_with: dict[str, PairedSection] | None = None
    bench: VariantBench | None = None  # int8eval.bench: latency, throughput, speedups and size vs the backend's FP32/BF16

    @field_validator("status")
    @classmethod
    def _status_member(cls, value: str) -> Status:
        # The Status member itself, not the plain string the other enums of a section are kept as: a StrEnum, so it
        # is written, formatted and compared as its word all the same.
        return Status(value)


class ReproductionRow(Section):
    """One row of a reproduction's table (`int8eval reproduce`): published numbers or measured ones. Top-1 in
    percent and size reduction as a fraction, as the published tables give them."""

    name: str
    kind: Literal["published", "measured"]
    fp32_top1: float | None = None
    int8_top1: float | None = None
    loss_points: float | None = None  # fp32_top1 - int8_top1
    speedup: float | None = None
    size_reduction: float | None = None
    note: str = ""


class ReproductionSection(Section):
    """What `int8eval reproduce` compared: the recipe as run (int8eval.recipes), its published numbers and the
    measured ones (int8eval.recipes.table renders them as seed_table.md)."""

    recipe: dict
    rows: list[ReproductionRow]
    notes: list[str] = Field(default_factory=list)
    requirements: list[dict] = Field(default_factory=list)  # what the recipe needs and whether it was here
    on_gpu: bool = False  # TensorRT on a GPU, else the CPU recipes


class Report(_Section):
    model_config = ConfigDict(validate_assignment=True)

    schema_version: str = SCHEMA_VERSION
    created: str
    command: list[str] = Field(default_factory=list)
    model: ModelSection
    data: DataSection
    variants: list[VariantResult]
    environment: dict
    timing: dict = Field(default_factory=dict)
    acceptance: AcceptanceRecord | None = None  # the declared criterion (config.Acceptance) the verdicts answer
    sensitivity: Sensitivity | None = None  # per-layer sensitivity (int8eval diagnose), when asked for
    tune: TuneSection | None = None  # int8eval tune: the ladder per backend, the chosen models, the one to ship
    bench: BenchSection | None = None  # int8eval.bench section: machine (ISA, GPU), settings, warnings, fastest variant
    reproduction: ReproductionSection | None = None  # int8eval reproduce: the published numbers beside ours
    # The FP32 reference against its weights' published top-1 (labelled runs of weights that publish one).
    preprocessing_check: PreprocessingCheck | None = None
    # Ties the run folder's other files to this report.json (report.folder.verify): the run's id, and the sha256 of
    # predictions.npz and of every artifact by their path in the run folder. None in reports written before 1.1.
    run_id: str | None = Field(default=None, pattern=r"^[A-Za-z0-9._-]+$")
    files: dict[str, str] | None = None

    _timing = field_validator("timing")(_checked(TimingSection))

    @field_validator("files")
    @classmethod
    def _files(cls, value):
        for rel, digest in (value or {}).items():
            parts = rel.split("/")
            if rel.startswith("/") or "\\" in rel or any(p in ("", ".", "..") for p in parts):
                raise ValueError(f"{rel!r} is not a path inside the run folder")
            if not re.fullmatch(r"[0-9a-f]{64}", digest):
                raise ValueError(f"the sha256 of {rel!r} is not 64 hex digits")
        return value

    def variant(self, name: str) -> VariantResult:
        return next(v for v in self.variants if v.name == name)

    @property
    def reference(self) -> VariantResult | None:
        return next((v for v in self.variants if v.reference), None)

    def write(self, path: Path) -> None:
        """Write report.json atomically (a temporary file renamed into place): never a truncated one. It is written in
        this version's schema (every section was checked against it), also when it was read from an older file."""
        data = {**self.model_dump(mode="json"), "schema_version": SCHEMA_VERSION}
        write_atomic(Path(path), json.dumps(data, indent=2) + "\n")

    @classmethod
    def read(cls, path: Path) -> Report:
        """Read and validate report.json; a RunFolderError naming the file and the bad field otherwise."""
        path = Path(path)
        if not path.is_file():
            raise RunFolderError(f"{path} does not exist: {path.parent} holds no complete run "
                                 f"(`int8eval run --out {path.parent}` writes one)")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as e:
            raise RunFolderError(f"cannot read {path}: {e}") from e
        except json.JSONDecodeError as e:
            raise RunFolderError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}): it is "
                                 "truncated or not a report") from e
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise RunFolderError(f"{path} is not a report int8eval wrote, so it is not used: {_errors(e)}") from e
