"""What every backend builds: a Variant that predicts logits for preprocessed NCHW float32 batches."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from int8eval.config import Precision, Recipe
from int8eval.errors import ConfigError


@dataclass
class CalibrationData:
    """Preprocessed calibration images, decoded once and shared by every recipe."""

    batches: list[np.ndarray]  # each float32 [N, 3, H, W]
    image_ids: list[str] = field(default_factory=list)

    def __iter__(self):
        return iter(self.batches)

    @property
    def num_images(self) -> int:
        return sum(len(b) for b in self.batches)


@dataclass
class BuildContext:
    """What the builds of one session share, and what fine-tuning recipes need.

    Backends memoise here what several recipes of one model reuse (the FP32 ONNX export and its activation
    statistics, OpenVINO's converted model), each memo recording the module it was made from: a context is per
    session, never module-global, so two contexts share nothing. `backends.build_variant` without a context
    makes a fresh one, so a build on its own shares nothing either.
    """

    workdir: Path  # where shared artifacts (the FP32 ONNX export and its pre-processed copy) are written
    train: list = field(default_factory=list)  # training Samples (data.layouts.Sample) for QAT and its FP32 control
    train_batch_size: int = 32  # fine-tuning: images per step
    seed: int = 0  # fine-tuning: data order and augmentation
    workers: int = 0  # fine-tuning: decoding processes for the training images
    freeze_bn: bool = True  # fine-tuning: fold BatchNorm and train in eval mode (qat.FinetuneSpec.freeze_bn)
    legacy_engine: str = "x86"  # fine-tuning: the quantized engine of the legacy eager QAT (the seed used "fbgemm")
    compile_qat: bool = True  # PT2E QAT: compile the INT8 model (False: the same numbers, none of the speed)
    # Memos, filled by the backends that use them:
    onnx: Any = None  # onnx_qdq.PreparedOnnx: the FP32 export and its activation statistics per calibration set
    openvino: Any = None  # openvino_backend.Conversion: the converted FP32 model and the module it came from
    adaround: dict = field(default_factory=dict)  # openvino_adaround: each layer's learned rounding, by its grid


def require_calibration(recipe: Recipe, calib: CalibrationData | None) -> None:
    """Raise ConfigError if `recipe` is INT8 and `calib` holds no images (call before any export or conversion)."""
    if recipe.precision is Precision.int8 and (calib is None or calib.num_images == 0):
        raise ConfigError(f"recipe {recipe.name} is INT8 and needs calibration images; none were given")


class Variant(ABC):
    """One model as a backend runs it (FP32 reference, BF16, or an INT8 recipe)."""

    recipe: Recipe
    artifact: Path | None = None  # the file a user would deploy; its size is reported
    prepare_s: float = 0.0  # seconds spent converting, calibrating and quantizing
    details: dict | None = None  # backend-specific provenance for the report (options, per-step timings)
    # Compiled for fixed input shapes: the evaluation pass pads a short batch to its batch size rather than have it
    # compile again (evaluate.predict_batch). TorchVariant says so for its inductor-compiled INT8.
    static_shapes: bool = False

    def __init__(self, recipe: Recipe) -> None:
        self.recipe = recipe

    @property
    def name(self) -> str:
        return self.recipe.name

    @abstractmethod
    def predict(self, images: np.ndarray) -> np.ndarray:
        """Logits (float32 [N, classes]) for a preprocessed float32 [N, 3, H, W] batch."""

    @property
    def size_mb(self) -> float | None:
        if self.artifact is None or not self.artifact.exists():
            return None
        files = [self.artifact] if self.artifact.is_file() else [p for p in self.artifact.rglob("*") if p.is_file()]
        # OpenVINO's IR is an .xml plus a .bin beside it: count both.
        if self.artifact.suffix == ".xml":
            files.append(self.artifact.with_suffix(".bin"))
        return sum(p.stat().st_size for p in files if p.exists()) / 1e6
