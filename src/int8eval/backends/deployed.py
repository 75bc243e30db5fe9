"""The builder of `recipe.deployed`: a deployment folder's artifact (`int8eval.deploy`), run by its backend's runtime
exactly as the backend's own variants run it, so a deployment evaluated again gives the logits it gave when chosen.

- ONNX Runtime (and TensorRT's ONNX on the CPU): `OrtVariant`, an InferenceSession with the backend's session
  options (exact INT8 kernels where the CPU's saturate).
- OpenVINO: the IR read and compiled with the backend's precision hint (`openvino_backend.compile_ir`).
- PyTorch PT2E: `torch.export.load(...).module()`, compiled by inductor with frozen weights for INT8, as the
  backend compiles its INT8 variants.
- TensorRT on a GPU: the serialized engine (`TensorRTVariant`).

Nothing is calibrated or written: `calib` and `workdir` are accepted as by every builder and not used.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from int8eval.backends.base import BuildContext, CalibrationData, Variant
from int8eval.backends.registry import check_recipe as check_built_recipe
from int8eval.config import Backend, Precision, Recipe
from int8eval.deploy import DeployManifest, load_deployment
from int8eval.errors import ConfigError

# The file each runtime loads, by backend (TensorRT's ONNX on the CPU: .onnx).
_ENTRY_SUFFIX = {
    Backend.torch: ".pt2", Backend.onnxruntime: ".onnx", Backend.openvino: ".xml", Backend.tensorrt: ".engine",
}


def manifest_for(recipe: Recipe) -> DeployManifest:
    """The checked manifest of `recipe.deployed` (`deploy.load_deployment`); ConfigError when the recipe's backend,
    precision or emulation is not the deployment's, or its entry file is not what that runtime loads."""
    if recipe.deployed is None:
        raise ConfigError(f"recipe {recipe.name} names no deployment folder (deployed)")
    manifest = load_deployment(recipe.deployed)
    said = (manifest.backend, manifest.precision, manifest.recipe.emulate)
    if said != (recipe.backend, recipe.precision, recipe.emulate):
        raise ConfigError(
            f"recipe {recipe.name} asks for {recipe.backend.value} {recipe.precision.value}"
            f"{' on the CPU' if recipe.emulate else ''}, but deployment {recipe.deployed} is {manifest.backend.value} "
            f"{manifest.precision.value}{' on the CPU' if manifest.recipe.emulate else ''}: take backend and precision "
            "from its manifest (`deploy.deployment_recipes`)"
        )
    suffix = ".onnx" if recipe.emulate else _ENTRY_SUFFIX[recipe.backend]
    if not manifest.entry.endswith(suffix):
        raise ConfigError(
            f"deployment {recipe.deployed}: its entry {manifest.entry} is not a {suffix} file, which "
            f"{recipe.backend.value} loads"
        )
    return manifest


def check_recipe(recipe: Recipe) -> None:
    """Refuse, before any work, a deployment that is missing, changed or not the recipe's, or whose runtime cannot
    run here (the deployed recipe's own backend check: packages, CPU capabilities, a C++ compiler for PT2E)."""
    manifest = manifest_for(recipe)
    check_built_recipe(manifest.recipe)


def _check_model(manifest: DeployManifest, loaded, folder: Path) -> None:
    """ConfigError when `loaded` is not the model (or preprocessing) the deployment was built from: its FP32 gate and
    reference are built from `loaded`, so they must be the same weights prepared the same way."""
    model = manifest.model
    same_weights = manifest.model.checkpoint is not None or loaded.source == model.source
    if loaded.name != model.name or not same_weights:
        raise ConfigError(
            f"deployment {folder} was built from {model.name} ({model.source}), not {loaded.name} ({loaded.source}): "
            "evaluate it with the model it was built from"
        )
    if loaded.preprocessing != manifest.preprocessing:
        raise ConfigError(
            f"deployment {folder} expects images prepared as {manifest.preprocessing}, the model is prepared as "
            f"{loaded.preprocessing}: use the deployment's preprocessing"
        )


def build(
    loaded,
    recipe: Recipe,
    calib: CalibrationData | None,
    workdir: Path,
    context: BuildContext | None = None,
    *,
    compile: bool = True,
) -> Variant:
    """The deployment `recipe.deployed` as a Variant predicting with its backend's runtime from the copied artifact.

    `loaded` must be the model the deployment was built from, with its preprocessing. `compile=False` leaves a
    PyTorch INT8 program uncompiled (the same numbers as compiled up to kernel rounding, none of the speed; tests).
    """
    manifest = manifest_for(recipe)
    folder = Path(recipe.deployed)
    _check_model(manifest, loaded, folder)
    entry = folder / manifest.entry
    start = time.perf_counter()
    input_dtype = np.float16 if recipe.precision is Precision.fp16 else np.float32
    if recipe.emulate:
        from int8eval.backends.tensorrt_on_cpu import EmulatedVariant

        variant = EmulatedVariant(recipe, entry, input_dtype=input_dtype)
        runtime = {"exact_int8_kernels": variant.session.exact_int8}
    elif recipe.backend is Backend.onnxruntime:
        from int8eval.backends.onnxruntime_backend import OrtVariant

        variant = OrtVariant(recipe, entry, input_dtype=input_dtype)
        runtime = dict(variant.details)
    elif recipe.backend is Backend.openvino:
        from int8eval.backends.openvino_backend import OpenVINOVariant, compile_ir

        variant = OpenVINOVariant(recipe, compile_ir(entry, recipe), entry)
        runtime = {}
    elif recipe.backend is Backend.torch:
        variant, runtime = _torch_variant(recipe, entry, compile=compile)
    else:
        from int8eval.backends.tensorrt_backend import TensorRTVariant

        variant = TensorRTVariant(recipe, entry)
        runtime = {}
    variant.prepare_s = time.perf_counter() - start
    variant.details = {
        **runtime,
        "deployment": str(folder),
        "deployed_variant": manifest.variant,
        "deployed_recipe": manifest.recipe.model_dump(mode="json"),
        "written_by": f"int8eval {manifest.int8eval_version}, {manifest.created}",
        "calibration": (manifest.details or {}).get("calibration"),
    }
    return variant


def _torch_variant(recipe: Recipe, program: Path, *, compile: bool) -> tuple[Variant, dict]:
    import torch

    from int8eval.backends.torch_backend import TorchVariant

    if recipe.precision is Precision.int8:
        import torchao.quantization.pt2e.quantize_pt2e  # noqa: F401 - registers the quantized_decomposed ops

    module = torch.export.load(program).module()
    compiled = compile and recipe.precision is Precision.int8
    if compiled:  # as torch_backend compiles PT2E INT8: static shapes, weights frozen into oneDNN kernels
        module = torch.compile(module, dynamic=False)
    variant = TorchVariant(recipe, module, program, freezing=compiled)
    return variant, {"flow": "torch.export.load", "compiled": compiled}
