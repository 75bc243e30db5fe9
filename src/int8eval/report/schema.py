"""report.json: the single source of truth of a run. Markdown and HTML are rendered from it.

Accuracies are fractions in [0, 1]; raw values are stored and only rounded when rendered.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from int8eval.config import Preprocessing

SCHEMA_VERSION = "1.0"


class _Section(BaseModel):
    # Sections may carry fields added by later versions; readers ignore what they do not know.
    model_config = ConfigDict(extra="allow")


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
    num_found: int
    num_images: int  # evaluated
    num_skipped: int
    skipped: list[dict] = Field(default_factory=list)
    calibration: CalibrationSection | None = None
    seed: int = 0


class ParityCheck(_Section):
    agreement_top1: float
    threshold: float
    passed: bool


class VariantResult(_Section):
    name: str
    backend: str
    precision: str
    status: str  # "ok" | "error" | "skipped"
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
    details: dict | None = None
    predict_s: float | None = None
    parity: ParityCheck | None = None  # a backend's FP32 of the reference's weights, checked against the reference
    gated_by: str | None = None  # the FP32 variant whose parity check gates this one (int8eval.parity.gate_for)
    per_class_top1: dict[str, dict] | None = None
    # Paired statistics against the reference (stats.paired_stats) and the acceptance verdict (verdict.decide).
    paired: dict | None = None
    verdict: dict | None = None
    # Paired statistics against other variants than the reference, by their name: QAT against its fine-tuned FP32
    # control (what quantization costs after the same training) and against post-training quantization.
    compared_with: dict[str, dict] | None = None
    bench: dict | None = None  # int8eval.bench: latency, throughput, speedups and size vs the backend's FP32/BF16


class Report(_Section):
    schema_version: str = SCHEMA_VERSION
    created: str
    command: list[str] = Field(default_factory=list)
    model: ModelSection
    data: DataSection
    variants: list[VariantResult]
    environment: dict
    timing: dict = Field(default_factory=dict)
    acceptance: dict | None = None  # the declared criterion (verdict.Acceptance) the verdicts answer
    sensitivity: dict | None = None  # per-layer sensitivity (diagnose.diagnose), when asked for
    bench: dict | None = None  # int8eval.bench section: machine (ISA, GPU), settings, warnings, fastest variant

    def variant(self, name: str) -> VariantResult:
        return next(v for v in self.variants if v.name == name)

    @property
    def reference(self) -> VariantResult | None:
        return next((v for v in self.variants if v.reference), None)

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(self.model_dump(mode="json"), indent=2) + "\n")

    @classmethod
    def read(cls, path: Path) -> Report:
        return cls.model_validate_json(Path(path).read_text())
