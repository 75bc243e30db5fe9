"""OpenVINO on the CPU: FP32 (forced to f32), BF16/FP16 where the CPU has them, and INT8 quantized by NNCF.

Every variant is saved as OpenVINO IR (.xml + .bin) and compiled back from that file, so what is measured is
exactly the artifact whose size is reported.
"""

from __future__ import annotations

import time
import warnings
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from int8eval.backends.base import CalibrationData, Variant
from int8eval.config import CalibMethod, Precision, Recipe
from int8eval.errors import ConfigError

if TYPE_CHECKING:
    import openvino as ov

DEVICE = "CPU"

# NNCF's accurate bias correction instead of the fast one: on EfficientNet-Lite0 it lifts top-1 agreement with
# FP32 from ~97.4% to ~98.4% (FINDINGS.md) for a few seconds more of quantizing.
FAST_BIAS_CORRECTION = False

# OpenVINO CPU plugin capability that each reduced float precision needs, and its inference-precision type name.
_FLOAT_CAPABILITY = {Precision.bf16: "BF16", Precision.fp16: "FP16"}


@lru_cache(maxsize=1)
def cpu_capabilities() -> tuple[str, frozenset[str]]:
    """The CPU's name and OpenVINO's OPTIMIZATION_CAPABILITIES for it (e.g. {'FP32', 'INT8', 'BF16'})."""
    import openvino as ov

    core = ov.Core()
    return str(core.get_property(DEVICE, "FULL_DEVICE_NAME")), frozenset(
        core.get_property(DEVICE, "OPTIMIZATION_CAPABILITIES")
    )


def check_recipe(recipe: Recipe) -> None:
    """Raise ConfigError if OpenVINO on this CPU cannot build `recipe`; cheap, runs before any work."""
    if recipe.legacy:
        raise ConfigError(
            f"recipe {recipe.name}: legacy=True means PyTorch's torch.ao API and only applies to backend torch; "
            "drop --legacy for openvino"
        )
    if recipe.precision in _FLOAT_CAPABILITY:
        needed = _FLOAT_CAPABILITY[recipe.precision]
        cpu, caps = cpu_capabilities()
        if needed not in caps:
            raise ConfigError(
                f"recipe {recipe.name}: OpenVINO's CPU plugin has no {needed} inference on this CPU ({cpu}; it "
                f"offers {', '.join(sorted(caps))}); use precision fp32 or int8"
            )
    if recipe.precision is Precision.int8 and recipe.calib is CalibMethod.entropy:
        raise ConfigError(
            f"recipe {recipe.name}: NNCF has no entropy (KL-divergence) calibration; use calib mse "
            "(NNCF's histogram search that minimises the quantization error), percentile or minmax"
        )


class OpenVINOVariant(Variant):
    """A compiled OpenVINO model with one reusable infer request; accepts any batch size."""

    def __init__(self, recipe: Recipe, compiled: ov.CompiledModel, artifact: Path) -> None:
        super().__init__(recipe)
        self.compiled = compiled
        self.artifact = artifact
        self.timings: dict[str, float] = {}  # convert_s / quantize_s / save_s / compile_s, for the report
        self._request = compiled.create_infer_request()

    def predict(self, images: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(images, dtype=np.float32)
        # share_inputs avoids a copy of the batch; the output buffer is reused by the next call, hence the copy.
        out = self._request.infer({0: x}, share_inputs=True)
        return np.array(out[0], dtype=np.float32, copy=True)


def convert(loaded, *, batch: int = 2) -> ov.Model:
    """Convert `loaded.module` (a LoadedModel's FP32 module) to an OpenVINO model with a dynamic batch dimension."""
    import openvino as ov

    c, h, w = loaded.input_shape
    with warnings.catch_warnings():
        # OpenVINO traces nn.Modules with torch.jit.trace, which torch marks deprecated; the trace is still exact.
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit\.trace")
        # A batch-2 example keeps the tracer from specialising on batch 1; `input` makes the batch dynamic.
        return ov.convert_model(loaded.module, example_input=loaded.example_input(batch), input=[-1, c, h, w])


def nncf_options(recipe: Recipe) -> dict[str, Any]:
    """Keyword arguments for `nncf.quantize` that express `recipe` (calibration method, weight granularity)."""
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, QuantizationParameters
    from nncf.quantization.range_estimator import (
        AggregatorType,
        RangeEstimatorParameters,
        RangeEstimatorParametersSet,
        StatisticsCollectorParameters,
        StatisticsType,
    )

    if recipe.calib is CalibMethod.minmax:
        # The global min and max over all calibration images (NNCF's own default averages per-image extremes).
        activations = RangeEstimatorParametersSet.MINMAX
    elif recipe.calib is CalibMethod.percentile:
        outlier = 1.0 - recipe.percentile / 100.0
        activations = RangeEstimatorParameters(
            min=StatisticsCollectorParameters(StatisticsType.QUANTILE, AggregatorType.MEAN, quantile_outlier_prob=outlier),
            # Symmetric activation quantizers take their range from the upper statistic alone, so it must be a
            # quantile of |x| (as the default ABS_MAX is), or negative outliers would be clipped unseen.
            max=StatisticsCollectorParameters(
                StatisticsType.ABS_QUANTILE, AggregatorType.MEAN, quantile_outlier_prob=outlier
            ),
        )
    elif recipe.calib is CalibMethod.mse:
        # A histogram of each activation over all calibration images, then the range that minimises the L2
        # quantization error (NNCF's port of PyTorch's HistogramObserver).
        activations = RangeEstimatorParametersSet.HISTOGRAM
    else:
        raise ConfigError(f"recipe {recipe.name}: calib {recipe.calib.value} is not supported by openvino")

    advanced = AdvancedQuantizationParameters(
        activations_range_estimator_params=activations,
        weights_quantization_params=QuantizationParameters(per_channel=recipe.per_channel),
    )
    return {
        "preset": nncf.QuantizationPreset.PERFORMANCE,
        "target_device": nncf.TargetDevice.CPU,
        "fast_bias_correction": FAST_BIAS_CORRECTION,
        "advanced_parameters": advanced,
    }


def quantize(ov_model: ov.Model, recipe: Recipe, calib: CalibrationData) -> ov.Model:
    """INT8-quantize `ov_model` with NNCF, one calibration image per dataset item so subset_size counts images."""
    import nncf

    images = [b[i : i + 1] for b in calib.batches for i in range(len(b))]
    return nncf.quantize(ov_model, nncf.Dataset(images), subset_size=len(images), **nncf_options(recipe))


def _compile(artifact: Path, recipe: Recipe) -> ov.CompiledModel:
    import openvino as ov
    import openvino.properties.hint as hints

    # Without an explicit f32 hint the CPU plugin runs "FP32" models in BF16 on CPUs that have it (FINDINGS.md);
    # INT8 models keep f32 for the layers NNCF leaves unquantized, so only quantization changes their numbers.
    precision = {Precision.bf16: ov.Type.bf16, Precision.fp16: ov.Type.f16}.get(recipe.precision, ov.Type.f32)
    return ov.Core().compile_model(str(artifact), DEVICE, {hints.inference_precision: precision})


def build(loaded, recipe: Recipe, calib: CalibrationData | None, workdir: Path) -> Variant:
    """Convert `loaded` to OpenVINO, quantize it with NNCF for INT8 recipes, save the IR and compile it on the CPU.

    Example:
        >>> v = build(load_model("tiny_test"), Recipe(backend="openvino", precision="fp32"), None, Path("/tmp/w"))
        >>> v.predict(np.zeros((4, 3, 32, 32), np.float32)).shape
        (4, 1000)
    """
    import openvino as ov

    check_recipe(recipe)
    if recipe.precision is Precision.int8 and (calib is None or calib.num_images == 0):
        raise ConfigError(f"recipe {recipe.name} needs calibration images; none were given")
    timings: dict[str, float] = {}
    start = time.perf_counter()
    model = convert(loaded)
    timings["convert_s"] = time.perf_counter() - start
    if recipe.precision is Precision.int8:
        t = time.perf_counter()
        model = quantize(model, recipe, calib)
        timings["quantize_s"] = time.perf_counter() - t
    t = time.perf_counter()
    artifact = workdir / f"{recipe.name}.xml"
    # save_model compresses float weights to FP16 unless told not to; the FP32 artifact must stay FP32.
    ov.save_model(model, str(artifact), compress_to_fp16=False)
    timings["save_s"] = time.perf_counter() - t
    t = time.perf_counter()
    variant = OpenVINOVariant(recipe, _compile(artifact, recipe), artifact)
    timings["compile_s"] = time.perf_counter() - t
    variant.timings = timings
    variant.prepare_s = time.perf_counter() - start
    return variant
