"""TensorRT's ONNX run by ONNX Runtime on the CPU: the builder of `recipe.emulate` (`--tensorrt-on-cpu`).

The ONNX is exactly what `tensorrt_backend.build` hands TensorRT (`tensorrt_backend.recipe_onnx`): for INT8 the
explicit-quantization Q/DQ model (symmetric INT8 activations, per-channel weights, float biases), so its accuracy
is what a TensorRT INT8 engine should reach, up to TensorRT's own kernel numerics. Needs ONNX and ONNX Runtime, not
TensorRT or a GPU.
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import numpy as np

from int8eval.backends.base import BuildContext, CalibrationData, Variant, require_calibration
from int8eval.backends.onnxruntime_backend import OrtVariant
from int8eval.backends.tensorrt_backend import TRT_ACTIVATIONS, calibration_phrase, check_recipe_options, recipe_onnx
from int8eval.config import Precision, Recipe
from int8eval.environment import cpu_capabilities
from int8eval.errors import BackendUnavailable, ConfigError


def emulated_name(recipe: Recipe) -> str:
    """The report name of a TensorRT recipe's ONNX run with ONNX Runtime on the CPU."""
    return recipe.name if recipe.emulate else f"{recipe.name}@onnxruntime"


def check_recipe(recipe: Recipe) -> None:
    """`tensorrt_backend.check_recipe` for the CPU: needs ONNX and ONNX Runtime, not TensorRT or a GPU."""
    check_recipe_options(recipe)
    if recipe.legacy:
        raise ConfigError("the legacy implicit calibrator exists only inside TensorRT; it cannot run on ONNX Runtime")
    missing = [p for p in ("onnx", "onnxruntime") if importlib.util.find_spec(p) is None]
    if missing:
        raise BackendUnavailable(f"running TensorRT's ONNX on the CPU needs {', '.join(missing)}: pip install 'int8eval[onnxruntime]'")
    if recipe.precision is Precision.int8:
        cpu_capabilities()  # the CPU session's kernels follow it: a bad INT8EVAL_CPU fails here, before any work


def build(
    loaded, recipe: Recipe, calib: CalibrationData | None, workdir: Path, context: BuildContext | None = None
) -> Variant:
    """The ONNX that `tensorrt_backend.build` would hand TensorRT for `recipe`, run by ONNX Runtime on the CPU.

    The variant's name is `emulated_name(recipe)`, e.g. "tensorrt-int8-entropy@onnxruntime" (a recipe without
    `emulate`, as reproduce builds, gets the suffix added). The FP32 export and the activation statistics are
    shared through `context` (None: a fresh one).
    """
    check_recipe(recipe)
    require_calibration(recipe, calib)
    workdir = Path(workdir)
    context = context if context is not None else BuildContext(workdir=workdir)
    path, onnx_s = recipe_onnx(loaded, recipe, calib, workdir, context)
    start = time.perf_counter()
    input_dtype = np.float16 if recipe.precision is Precision.fp16 else np.float32
    variant = EmulatedVariant(recipe, path, input_dtype=input_dtype)
    variant.prepare_s = onnx_s + (time.perf_counter() - start)
    variant.details = {"runs_on": "onnxruntime CPUExecutionProvider, not TensorRT", "onnx": str(path)}
    if recipe.precision is Precision.int8:
        variant.details.update(
            activation_type="int8", why=TRT_ACTIVATIONS, exact_int8_kernels=variant.session.exact_int8,
            calibration=calibration_phrase(recipe),
        )
    return variant


class EmulatedVariant(Variant):
    """A TensorRT recipe's ONNX model run by ONNX Runtime's CPU session (reported as `emulated_name(recipe)`)."""

    def __init__(self, recipe: Recipe, model: Path, *, input_dtype: type = np.float32) -> None:
        super().__init__(recipe)
        self.session = OrtVariant(recipe, model, input_dtype=input_dtype)
        self.artifact = Path(model)

    @property
    def name(self) -> str:
        return emulated_name(self.recipe)

    def predict(self, images: np.ndarray) -> np.ndarray:
        return self.session.predict(images)
