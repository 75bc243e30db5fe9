"""Backends turn (model, recipe, calibration data) into a Variant. Each is imported only when used."""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from int8eval.backends.base import CalibrationData, Variant
from int8eval.config import Backend, CalibMethod, Recipe
from int8eval.errors import BackendUnavailable

__all__ = ["BACKENDS", "BackendInfo", "CalibrationData", "Variant", "backend_info", "build_variant", "default_calib"]


@dataclass(frozen=True)
class BackendInfo:
    backend: Backend
    module: str  # our module under int8eval.backends
    requires: tuple[str, ...]  # importable top-level packages it needs
    extra: str  # pip extra that installs them
    # The recipe used when --calib is not given: the lowest mean KL to the FP32 logits measured on Lite0 (700 images,
    # calibration seeds 0-2, bias-corrected), a steadier guide than top-1 agreement, which moves by single images.
    # PyTorch: mse (torchao's own default HistogramObserver) beats minmax with its 7-bit activations on AVX2 CPUs
    # (0.0056 against 0.0072); OpenVINO: percentile 99.999 was at or below minmax on every seed (0.0111 against
    # 0.0116 on average); ONNX Runtime: percentile 99.999 and minmax tie (0.0030).
    default_calib: CalibMethod
    default: bool = True  # part of a run with no --backend, when installed

    @property
    def installed(self) -> bool:
        # find_spec does not import the package, so listing backends stays cheap.
        return all(importlib.util.find_spec(p) is not None for p in self.requires)


BACKENDS: dict[Backend, BackendInfo] = {
    Backend.torch: BackendInfo(Backend.torch, "torch_backend", ("torch",), "pt2e", CalibMethod.mse),
    Backend.onnxruntime: BackendInfo(
        Backend.onnxruntime, "onnxruntime_backend", ("onnx", "onnxruntime"), "onnxruntime", CalibMethod.percentile
    ),
    Backend.openvino: BackendInfo(
        Backend.openvino, "openvino_backend", ("openvino", "nncf"), "openvino", CalibMethod.percentile
    ),
    # TensorRT needs an NVIDIA GPU: only run when asked for.
    Backend.tensorrt: BackendInfo(
        Backend.tensorrt, "tensorrt_backend", ("tensorrt", "onnx", "onnxruntime"), "tensorrt", CalibMethod.entropy, default=False
    ),
}


def backend_info(backend: Backend) -> BackendInfo:
    return BACKENDS[Backend(backend)]


def default_calib(backend: Backend) -> CalibMethod:
    return backend_info(backend).default_calib


def require(backend: Backend) -> None:
    info = backend_info(backend)
    if not info.installed:
        missing = [p for p in info.requires if importlib.util.find_spec(p) is None]
        raise BackendUnavailable(
            f"backend {info.backend.value} needs {', '.join(missing)}: pip install 'int8eval[{info.extra}]'"
        )


def _module(backend: Backend):
    require(backend)
    return importlib.import_module(f"int8eval.backends.{backend_info(backend).module}")


def _emulated():
    # TensorRT's ONNX run by ONNX Runtime on the CPU (`recipe.emulate`) needs no TensorRT: no `require`.
    return importlib.import_module("int8eval.backends.tensorrt_backend")


def check_recipe(recipe: Recipe) -> None:
    """Fail before any work starts if the backend cannot do this recipe (raises ConfigError)."""
    if recipe.emulate:
        _emulated().check_emulated_recipe(recipe)
        return
    _module(recipe.backend).check_recipe(recipe)


def build_variant(loaded, recipe: Recipe, calib: CalibrationData | None, workdir: Path) -> Variant:
    """Build the variant `recipe` describes for `loaded` (a LoadedModel), writing artifacts under `workdir`.
    An `emulate` recipe gets TensorRT's ONNX run by ONNX Runtime on the CPU."""
    workdir.mkdir(parents=True, exist_ok=True)
    if recipe.emulate:
        return _emulated().build_qdq_onnx_variant(loaded, recipe, calib, workdir)
    return _module(recipe.backend).build(loaded, recipe, calib, workdir)
