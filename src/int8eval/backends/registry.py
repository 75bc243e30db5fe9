"""Every way to build a variant is a registered builder, chosen from the recipe (`builder_for`): the four backends,
TensorRT's ONNX run by ONNX Runtime on the CPU (`recipe.emulate`), fine-tuning (`recipe.qat_epochs`: QAT and
its FP32 control), and a deployment written by `int8eval.deploy` (`recipe.deployed`). A builder is a module under
int8eval.backends with

    check_recipe(recipe) -> None                               # ConfigError / BackendUnavailable, before any work
    build(loaded, recipe, calib, workdir, context=None) -> Variant

imported only when a recipe needs it (listing what is installed uses `find_spec`, which imports nothing).
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from int8eval.backends.base import BuildContext, CalibrationData, Variant
from int8eval.config import Backend, CalibMethod, Precision, Recipe
from int8eval.errors import BackendUnavailable, ConfigError


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


@dataclass(frozen=True)
class Builder:
    """One registered way to build a variant: a module under int8eval.backends (see the module docstring)."""

    title: str  # what it is, for the message when a package is missing
    module: str
    requires: tuple[str, ...]  # importable top-level packages it needs
    extra: str  # pip extra that installs them


EMULATE = "tensorrt-on-cpu"  # TensorRT's ONNX (FP32, FP16 or explicit Q/DQ INT8) run by ONNX Runtime on the CPU
FINETUNE = "finetune"  # QAT (PT2E, or the seed's eager torch.ao API) and its FP32 control, in PyTorch
DEPLOYED = "deployed"  # a deployment folder's artifact (`recipe.deployed`), run by its backend's runtime

BUILDERS: dict[str, Builder] = {
    **{b.value: Builder(f"backend {b.value}", i.module, i.requires, i.extra) for b, i in BACKENDS.items()},
    EMULATE: Builder("running TensorRT's ONNX on the CPU", "tensorrt_on_cpu", ("onnx", "onnxruntime"), "onnxruntime"),
    FINETUNE: Builder("fine-tuning (QAT and its FP32 control)", "qat", ("torch",), "pt2e"),
    # What its runtime needs depends on the deployment: `deployed.check_recipe` checks the recipe it was built with.
    DEPLOYED: Builder("evaluating a deployment", "deployed", (), ""),
}


def builder_key(recipe: Recipe) -> str:
    """The key in BUILDERS of the builder that makes `recipe`: a deployment first (`deployed`), then fine-tuning
    (`qat_epochs`), then TensorRT's emulation (`emulate`), else the recipe's backend. Each builder's `check_recipe`
    rejects what it cannot do."""
    if recipe.deployed is not None:
        return DEPLOYED
    if recipe.qat_epochs:
        return FINETUNE
    if recipe.emulate:
        return EMULATE
    return recipe.backend.value


# The builders that take an ONNX file (`LoadedModel.onnx`) as the model: they start from an ONNX model anyway.
TAKES_ONNX = (Backend.onnxruntime.value, Backend.openvino.value, Backend.tensorrt.value, EMULATE)


def takes_onnx(backend: Backend) -> bool:
    return Backend(backend).value in TAKES_ONNX


def check_model(loaded, recipe: Recipe) -> None:
    """Raise ConfigError, in one line, when `recipe` cannot be built for `loaded` because it is an ONNX file: a
    builder that quantizes a PyTorch module, or what measures layer inputs in PyTorch (bias correction, AdaRound)
    or exports from it (fp16)."""
    if getattr(loaded, "onnx", None) is None:
        return
    key = builder_key(recipe)
    if key not in TAKES_ONNX:
        what = BUILDERS[key].title if key != Backend.torch.value else "backend torch (PT2E)"
        raise ConfigError(f"{what} quantizes a PyTorch module and cannot take an ONNX file ({loaded.name}); use "
                          "--backend onnxruntime or --backend openvino")
    needs = [what for what, asked in (("fp16", recipe.precision is Precision.fp16),
                                      ("bias correction", recipe.bias_correction), ("AdaRound", recipe.adaround)) if asked]
    if needs:
        raise ConfigError(f"recipe {recipe.name}: {' and '.join(needs)} need{'s' * (len(needs) == 1)} the PyTorch "
                          f"model, and {loaded.name} is an ONNX file; leave {'them' if len(needs) > 1 else 'it'} out")


def backend_info(backend: Backend) -> BackendInfo:
    return BACKENDS[Backend(backend)]


def default_calib(backend: Backend) -> CalibMethod:
    return backend_info(backend).default_calib


def _require(builder: Builder) -> None:
    missing = [p for p in builder.requires if importlib.util.find_spec(p) is None]
    if missing:
        raise BackendUnavailable(f"{builder.title} needs {', '.join(missing)}: pip install 'int8eval[{builder.extra}]'")


def require(backend: Backend) -> None:
    """Raise BackendUnavailable naming the pip extra if `backend`'s packages are not installed."""
    _require(BUILDERS[Backend(backend).value])


def builder_module(recipe: Recipe):
    """The module that builds `recipe` (its packages checked first, then imported)."""
    builder = BUILDERS[builder_key(recipe)]
    _require(builder)
    return importlib.import_module(f"int8eval.backends.{builder.module}")


def check_recipe(recipe: Recipe) -> None:
    """Fail before any work starts if no installed builder can make this recipe (ConfigError, BackendUnavailable)."""
    builder_module(recipe).check_recipe(recipe)


def build_variant(
    loaded, recipe: Recipe, calib: CalibrationData | None, workdir: Path, context: BuildContext | None = None
) -> Variant:
    """Build the variant `recipe` describes for `loaded` (a LoadedModel), its artifacts under `workdir`.

    `context` holds what the builds of one session share (an FP32 export, a converted model) and what fine-tuning
    recipes train on (`context.train`); None makes a fresh one, so nothing is shared with other builds.

    Example:
        >>> context = BuildContext(workdir=Path("runs/x/artifacts"))
        >>> fp32 = build_variant(loaded, Recipe(backend="onnxruntime", precision="fp32"), None, context.workdir, context)
        >>> int8 = build_variant(loaded, Recipe(backend="onnxruntime"), calib, context.workdir, context)  # same export
    """
    check_model(loaded, recipe)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    context = context if context is not None else BuildContext(workdir=workdir)
    return builder_module(recipe).build(loaded, recipe, calib, workdir, context)
