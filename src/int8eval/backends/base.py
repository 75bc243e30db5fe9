"""What every backend builds: a Variant that predicts logits for preprocessed NCHW float32 batches."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

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
