"""PyTorch: the FP32 reference (eager), BF16 autocast, and INT8 (PT2E from torchao; legacy torch.ao FX)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from int8eval.backends.base import CalibrationData, Variant
from int8eval.config import Precision, Recipe
from int8eval.errors import ConfigError


class TorchVariant(Variant):
    def __init__(self, recipe: Recipe, module: torch.nn.Module, artifact: Path, autocast: torch.dtype | None = None):
        super().__init__(recipe)
        self.module = module
        self.artifact = artifact
        self.autocast = autocast

    def predict(self, images: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(images)
        with torch.inference_mode(), torch.autocast("cpu", dtype=self.autocast, enabled=self.autocast is not None):
            return self.module(x).float().numpy()


def check_recipe(recipe: Recipe) -> None:
    if recipe.precision is Precision.fp16:
        raise ConfigError("torch on the CPU has no fast fp16 path; use --precision bf16 (or a GPU backend)")
    if recipe.precision is Precision.int8:
        raise ConfigError("torch INT8 is not available yet in this build of int8eval")


def build(loaded, recipe: Recipe, calib: CalibrationData | None, workdir: Path) -> Variant:
    check_recipe(recipe)
    start = time.perf_counter()
    artifact = workdir / f"{recipe.name}.pt"
    torch.save(loaded.module.state_dict(), artifact)
    autocast = torch.bfloat16 if recipe.precision is Precision.bf16 else None
    variant = TorchVariant(recipe, loaded.module, artifact, autocast)
    variant.prepare_s = time.perf_counter() - start
    return variant
