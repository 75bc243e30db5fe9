"""OpenVINO on the CPU: FP32 (forced to f32), BF16/FP16 where the CPU has them, and INT8 quantized by NNCF.

Every variant is saved as OpenVINO IR (.xml + .bin, weights never FP16-compressed) and compiled back from that
file, so what is measured is exactly the artifact whose size is reported.

INT8 (NNCF, symmetric "performance" preset, then int8eval's bias correction), by calibration method:
- minmax: NNCF's MINMAX range estimator (global min/max over the calibration images).
- mse: NNCF's HISTOGRAM range estimator (the range minimising the L2 quantization error of a histogram of all
  calibration values; a port of PyTorch's HistogramObserver).
- percentile, entropy: NNCF has no global-percentile or KL-divergence estimator (its QUANTILE statistic is taken
  per image and then averaged, which clips residual activations to ~half their range and loses ~30 points of
  top-1 agreement on EfficientNet-Lite0). So NNCF quantizes with minmax ranges, then each per-tensor activation
  quantizer is narrowed to the range `int8eval.backends.ranges` computes from a histogram of all calibration
  values, as the other backends do (`openvino_ranges`).

NNCF's float algorithms, when the recipe asks (`align_and_smooth`): SmoothQuant (`smooth_quant`) and channel
alignment (`channel_alignment`) run through NNCF's own Pipeline before quantization, as `nncf.quantize` would run them,
but apart from it, so that int8eval's percentile/entropy ranges and bias correction see the model they changed.

`recipe.adaround`: int8eval's AdaRound (`openvino_adaround`) replaces the INT8 weights NNCF wrote by learned ones, on
NNCF's scales and integer range, before bias correction; details["adaround"] says what it did.
"""

from __future__ import annotations

import itertools
import logging
import tempfile
import time
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from int8eval.backends.base import BuildContext, CalibrationData, Variant, require_calibration
from int8eval.backends.openvino_nncf import align_and_smooth, asks_for, transformed_module
from int8eval.backends.openvino_ranges import HISTOGRAM_METHODS, calibration_phrase, narrow_activation_ranges
from int8eval.config import CalibMethod, Precision, Recipe
from int8eval.environment import cpu_capabilities
from int8eval.errors import ConfigError
from int8eval.models import fold_batchnorm

if TYPE_CHECKING:
    import openvino as ov
    from torch import nn

log = logging.getLogger(__name__)

DEVICE = "CPU"

# Bias correction is int8eval's (`correct_biases`), not NNCF's: on EfficientNet-Lite0 (700 images, calibration
# seeds 0 and 1) NNCF's accurate bias correction left a mean KL to the FP32 logits of 0.0143 and 0.0179, int8eval's
# 0.0122 and 0.0109 (NNCF's fast one was weaker still in FINDINGS.md).

_LAYER_OPS = ("Convolution", "GroupConvolution", "MatMul")  # what NNCF quantizes in a CNN

# OpenVINO CPU plugin capability that each reduced float precision needs.
_FLOAT_CAPABILITY = {Precision.bf16: "BF16", Precision.fp16: "FP16"}


@lru_cache(maxsize=1)
def plugin_capabilities() -> tuple[str, frozenset[str]]:
    """The CPU's name and OpenVINO's OPTIMIZATION_CAPABILITIES for it (e.g. {'FP32', 'INT8', 'BF16'})."""
    import openvino as ov

    core = ov.Core()
    return str(core.get_property(DEVICE, "FULL_DEVICE_NAME")), frozenset(
        core.get_property(DEVICE, "OPTIMIZATION_CAPABILITIES")
    )


def overflow_choice() -> tuple[bool, str]:
    """Whether NNCF's overflow fix (7-bit weights) and an FP32 first convolution are needed on this CPU
    (`environment.cpu_capabilities`), and why.

    Where x86 INT8 dot products saturate, oneDNN's u8 x s8 int16 pair sums overflow: measured on an AVX2-only EPYC,
    EfficientNet-Lite0 INT8 agreed with FP32 on 93% of images as executed against 98% as simulated; 7-bit weights
    remove the saturation. Where they do not (VNNI, AMX, Arm), 7-bit weights only cost precision: on an AMX Xeon
    (FINDINGS.md) NNCF's default FIRST_LAYER fix gave Lite0 97.43% agreement and KL 0.0094, no fix 98.29% and 0.0049.
    Why no layer of a CNN escapes the fix there (one-layer models on that EPYC, OpenVINO 2026.4): the int16 pairs are input
    channels (2k, 2k+1) of Conv and MatMul alike, and signed activations are shifted by +128 to u8, so every dense
    layer of Lite0 holds same-sign 8-bit weight pairs that can saturate (14 to 5,624 per layer); 8-bit weights on the
    unsigned-input layers alone gave 94.3% agreement (300 images), and a FakeQuantize of 128 levels (7-bit
    activations instead) makes the plugin run the layer in FP32.
    """
    caps = cpu_capabilities()
    if caps.int8_saturates:
        return True, f"{caps.describe()}: INT8 sums saturate, so 7-bit weights and the first convolution in FP32"
    return False, f"{caps.describe()}: exact INT8 dot products, so 8-bit weights everywhere (no overflow fix)"


def check_recipe(recipe: Recipe) -> None:
    """Raise ConfigError if OpenVINO on this CPU cannot build `recipe`; cheap, runs before any work."""
    if recipe.legacy:
        raise ConfigError(
            f"recipe {recipe.name}: legacy=True means PyTorch's torch.ao API and only applies to backend torch; "
            "drop --legacy for openvino"
        )
    if recipe.precision in _FLOAT_CAPABILITY:
        needed = _FLOAT_CAPABILITY[recipe.precision]
        cpu, caps = plugin_capabilities()
        if needed not in caps:
            raise ConfigError(
                f"recipe {recipe.name}: OpenVINO's CPU plugin has no {needed} inference on this CPU ({cpu}; it "
                f"offers {', '.join(sorted(caps))}); use precision fp32 or int8"
            )
    if recipe.precision is Precision.int8:
        cpu_capabilities()  # a bad INT8EVAL_CPU fails here, before any work


class OpenVINOVariant(Variant):
    """A compiled OpenVINO model with one reusable infer request; accepts any batch size."""

    def __init__(self, recipe: Recipe, compiled: ov.CompiledModel, artifact: Path) -> None:
        super().__init__(recipe)
        self.compiled = compiled
        self.artifact = artifact
        # How it was built (timings in seconds, NNCF options): JSON-ready, for the report's provenance.
        self.details: dict[str, Any] = {}
        self._request = compiled.create_infer_request()

    def predict(self, images: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(images, dtype=np.float32)
        # share_inputs avoids copying the batch; the output buffer is reused by the next call, hence the copy.
        out = self._request.infer({0: x}, share_inputs=True)
        return np.array(out[0], dtype=np.float32, copy=True)


@dataclass
class Conversion:
    """The converted FP32 model of one module (weights as `fingerprint` says), memoised in a BuildContext: converting
    takes seconds to tens of seconds (a torch.jit trace), and a sweep builds several variants of one model."""

    module: nn.Module | Any  # the LoadedModel's module it was converted from (or its models.onnx_file.OnnxFile)
    fingerprint: tuple
    model: ov.Model
    folded: nn.Module | None  # the BatchNorm-folded copy actually converted (same module paths); None: an ONNX file


def _fingerprint(loaded) -> tuple:
    if loaded.onnx is not None:  # an ONNX file's weights do not change
        return (loaded.input_shape, id(loaded.onnx))
    # Data pointers and in-place version counters change whenever the weights are replaced or updated.
    tensors = itertools.chain(loaded.module.parameters(), loaded.module.buffers())
    return (loaded.input_shape, loaded.module.training, tuple((t.data_ptr(), t._version) for t in tensors))


def convert(loaded, context: BuildContext | None = None) -> ov.Model:
    """Convert `loaded.module` (a LoadedModel's FP32 module) to an OpenVINO model with a dynamic batch dimension.

    Converted once per context, module and weights; each call returns a fresh copy that callers may change.
    """
    return conversion(loaded, context).model.clone()


def conversion(loaded, context: BuildContext | None = None) -> Conversion:
    """`loaded`'s Conversion, made once per `context` while the module and its weights stay the same."""
    import openvino as ov

    key = _fingerprint(loaded)
    cached = context.openvino if context is not None else None
    if loaded.onnx is not None and (cached is None or cached.fingerprint != key):
        # An ONNX file is read as it is (its normalised copy, with a symbolic batch): nothing to trace or fold.
        folder = Path(context.workdir) if context is not None else Path(tempfile.mkdtemp(prefix="int8eval-ov-"))
        model = ov.Core().read_model(str(loaded.onnx.save(folder)))
        cached = Conversion(loaded.onnx, key, model, None)
        if context is not None:
            context.openvino = cached
    if cached is None or cached.module is not (loaded.module or loaded.onnx) or cached.fingerprint != key:
        c, h, w = loaded.input_shape
        # BatchNorm folded first: OpenVINO would fold it too, but then names each convolution after the BatchNorm's
        # Multiply; folded here, convolutions keep their module paths, which `keep_fp32` needs to find them.
        module, _ = fold_batchnorm(loaded.module)
        with warnings.catch_warnings():
            # OpenVINO traces nn.Modules with torch.jit.trace, which torch marks deprecated; the trace is exact.
            warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit\.trace")
            # A batch-2 example keeps the tracer from specialising on batch 1; `input` makes the batch dynamic.
            model = ov.convert_model(module, example_input=loaded.example_input(2), input=[-1, c, h, w])
        cached = Conversion(loaded.module, key, model, module)
        if context is not None:
            context.openvino = cached
    return cached


def alignable_pairs(loaded, context: BuildContext | None = None) -> int:
    """How many layer pairs NNCF's channel alignment would change in `loaded` as converted (`openvino_nncf`): where
    there are none, a channel-alignment recipe builds the plain one again."""
    from int8eval.backends.openvino_nncf import alignable_pairs as pairs

    return pairs(conversion(loaded, context).model)


def nncf_options(recipe: Recipe, *, transformer: bool = False) -> dict[str, Any]:
    """Keyword arguments for `nncf.quantize` that express `recipe` (range estimator, weight granularity); for a
    `transformer` (LoadedModel.is_transformer), NNCF's transformer model type."""
    import nncf
    from nncf.quantization.advanced_parameters import (
        AdvancedQuantizationParameters,
        AdvancedSmoothQuantParameters,
        OverflowFix,
        QuantizationParameters,
    )
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    # percentile and entropy start from minmax ranges and narrow them afterwards (narrow_activation_ranges).
    estimator = RangeEstimatorParametersSet.MINMAX
    if recipe.calib is CalibMethod.mse:
        estimator = RangeEstimatorParametersSet.HISTOGRAM
    advanced = AdvancedQuantizationParameters(
        activations_range_estimator_params=estimator,
        weights_quantization_params=QuantizationParameters(per_channel=recipe.per_channel),
        overflow_fix=OverflowFix.ENABLE if overflow_choice()[0] else OverflowFix.DISABLE,
        disable_bias_correction=True,  # int8eval corrects the biases after quantization (see above)
        # `align_and_smooth` has run them already, when the recipe asks: not again inside nncf.quantize.
        disable_channel_alignment=True,
        smooth_quant_alphas=AdvancedSmoothQuantParameters(convolution=-1, matmul=-1),
    )
    options = {
        "preset": nncf.QuantizationPreset.PERFORMANCE,
        "target_device": nncf.TargetDevice.CPU,
        "advanced_parameters": advanced,
    }
    # NNCF's transformer patterns leave LayerNorm, Softmax and the attention's other float ops unquantized; NNCF runs
    # SmoothQuant only for transformers, quantized as such, so --smooth-quant asks for them on any model.
    if transformer or recipe.smooth_quant is not None:
        options["model_type"] = nncf.ModelType.TRANSFORMER
    return options


def _images(calib: CalibrationData) -> list[np.ndarray]:
    # One image per item: NNCF's subset_size then counts images, and statistics are per image as NNCF intends.
    return [np.ascontiguousarray(b[i : i + 1], dtype=np.float32) for b in calib.batches for i in range(len(b))]


def _module_ops(ov_model: ov.Model) -> dict[str, list[ov.Node]]:
    """PyTorch module path -> its Convolution/GroupConvolution/MatMul ops in a model from `convert`, which names
    them `__module.<path>/aten::<op>/<Type>`."""
    ops: dict[str, list[ov.Node]] = {}
    for op in ov_model.get_ordered_ops():
        name = op.get_friendly_name()
        if op.get_type_name() in _LAYER_OPS and name.startswith("__module.") and "/aten::" in name:
            ops.setdefault(name.removeprefix("__module.").split("/aten::")[0], []).append(op)
    return ops


def layer_ops(ov_model: ov.Model, layers: tuple[str, ...] | list[str]) -> list[str]:
    """Names of the Convolution/GroupConvolution/MatMul ops of `layers` (PyTorch module paths) in a model from
    `convert`; every layer must be found."""
    ops = _module_ops(ov_model)
    missing = [layer for layer in layers if layer not in ops]
    if missing:
        raise ConfigError(
            f"keep_fp32: no OpenVINO op found for {', '.join(missing)} (the model's BatchNorm could not be folded "
            "before conversion, so OpenVINO renamed its convolutions)"
        )
    return [op.get_friendly_name() for layer in layers for op in ops[layer]]


def _per_channel_rollback(record: logging.LogRecord) -> bool:
    # With the HISTOGRAM estimator (mse) NNCF warns once per calibration image and per-channel activation quantizer
    # (depthwise inputs) that it uses minmax there: hundreds of identical lines about what the recipe already says.
    return not record.getMessage().startswith("Rollback to RangeEstimatorParametersSet.MINMAX")


def quantize(
    ov_model: ov.Model,
    recipe: Recipe,
    calib: CalibrationData,
    *,
    options: dict[str, Any] | None = None,
    fp32_ops: list[str] | tuple[str, ...] = (),
) -> ov.Model:
    """INT8-quantize `ov_model` (FP32, left unchanged) with NNCF as `recipe` says; returns the quantized model.
    `options`: `nncf_options(recipe)` if the caller already has it (not changed here). `fp32_ops`: more op names
    to leave in FP32 besides `recipe.keep_fp32`'s (`build` passes `first_layer_fp32`)."""
    import nncf

    images = _images(calib)
    options = dict(nncf_options(recipe) if options is None else options)
    ignored = layer_ops(ov_model, recipe.keep_fp32) if recipe.keep_fp32 else []
    ignored += [name for name in fp32_ops if name not in ignored]
    if ignored:
        options["ignored_scope"] = nncf.IgnoredScope(names=ignored)
    from nncf.common.logging import nncf_logger

    level = nncf_logger.level
    nncf_logger.setLevel(logging.WARNING)  # else one INFO line per quantizer an ignored layer leaves out
    nncf_logger.addFilter(_per_channel_rollback)
    try:
        quantized = nncf.quantize(ov_model, nncf.Dataset(images), subset_size=len(images), **options)
    finally:
        nncf_logger.setLevel(level)
        nncf_logger.removeFilter(_per_channel_rollback)
    if recipe.calib in HISTOGRAM_METHODS:
        changed = narrow_activation_ranges(quantized, ov_model, calib, recipe, device=DEVICE)
        log.info("%s: %d activation ranges narrowed from minmax", recipe.name, changed)
    return quantized


def first_layer_fp32(ov_model: ov.Model) -> list[str]:
    """The convolutions that read the model's input directly, which int8eval leaves in FP32 where the CPU's INT8
    kernels would saturate (`overflow_choice`); elsewhere none.

    There every INT8 weight must fit 7 bits (NNCF's overflow fix), and the first convolution loses the most by it:
    it sees the image itself through only 3 channels. Measured on EfficientNet-Lite0 (700 images, calibration seeds
    0-2, real kernels on an AVX2-only EPYC): mean KL to the FP32 logits 0.0111 -> 0.0067 and top-1 agreement with
    FP32 97.71% -> 98.24% on average, for 864 weights kept in FP32.
    """
    if not overflow_choice()[0]:
        return []
    found, seen = [], set()
    frontier = [t.get_node() for p in ov_model.get_parameters() for t in p.output(0).get_target_inputs()]
    while frontier:
        node = frontier.pop()
        if node.get_friendly_name() in seen:
            continue
        seen.add(node.get_friendly_name())
        if node.get_type_name() in ("Convolution", "GroupConvolution"):
            found.append(node.get_friendly_name())
        elif node.get_type_name() not in _LAYER_OPS:  # through reshapes, converts, ...: not through a MatMul
            frontier += [t.get_node() for out in node.outputs() for t in out.get_target_inputs()]
    return found


def correct_biases(quantized: ov.Model, folded: nn.Module, calib: CalibrationData) -> int:
    """int8eval's bias correction (`backends.bias_correction`) of an NNCF-quantized model, in place: each
    Convolution/GroupConvolution/MatMul whose weights NNCF stored as INT8 (Constant -> Convert -> Multiply by the
    scale) gets its mean output shift, measured with the FP32 inputs of `folded` (the module `quantized` was
    converted from: `conversion(...).folded`), taken off its bias (the constant of the Add after it; one is added
    where the conversion dropped a zero bias). Returns how many were corrected."""
    import openvino as ov
    import openvino.opset13 as ops
    import torch

    from int8eval.backends.bias_correction import output_shifts

    modules = dict(folded.named_modules())
    errors, outputs = {}, {}
    for path, module_ops in _module_ops(quantized).items():
        op, layer = module_ops[0], modules.get(path)
        dq = _dequantized_weight(op.input_value(1).get_node())
        if layer is None or dq is None or dq.size != layer.weight.numel():
            continue
        if op.get_type_name() == "MatMul" and not op.get_transpose_b():
            continue
        w = layer.weight.detach()
        errors[path] = torch.from_numpy(dq.reshape(w.shape)) - w
        outputs[path] = op
    for path, shift in output_shifts(folded, errors, calib).items():
        op = outputs[path]
        users = [t.get_node() for t in op.output(0).get_target_inputs()]
        bias = users[0].input_value(1).get_node() if len(users) == 1 and users[0].get_type_name() == "Add" else None
        if bias is not None and bias.get_type_name() == "Constant" and bias.get_data().size == shift.size:
            old = bias.get_data()
            corrected = ov.op.Constant((old - shift.reshape(old.shape)).astype(old.dtype))
            users[0].input(1).replace_source_output(corrected.output(0))
            continue
        # No bias: add one, shaped to broadcast over the channel axis (1 for convolutions, last for MatMul).
        shape = [-1]
        if op.get_type_name() != "MatMul":
            shape = [1, -1] + [1] * (op.get_output_partial_shape(0).rank.get_length() - 2)
        targets = list(op.output(0).get_target_inputs())
        add = ops.add(op.output(0), ops.constant((-shift).astype(np.float32).reshape(shape)))
        for target in targets:
            target.replace_source_output(add.output(0))
    return len(errors)


def _dequantized_weight(node: ov.Node) -> np.ndarray | None:
    """The float weights of NNCF's decompression subgraph Multiply(Convert(Constant int8)[ - zero point], scale)."""
    if node.get_type_name() != "Multiply":
        return None
    values, scale = (node.input_value(i).get_node() for i in (0, 1))
    if scale.get_type_name() != "Constant":
        return None
    zero = 0.0
    if values.get_type_name() == "Subtract":
        zp = values.input_value(1).get_node()
        zp = zp.input_value(0).get_node() if zp.get_type_name() == "Convert" else zp
        if zp.get_type_name() != "Constant":
            return None
        zero, values = zp.get_data().astype(np.float32), values.input_value(0).get_node()
    if values.get_type_name() != "Convert" or values.input_value(0).get_node().get_type_name() != "Constant":
        return None
    q = values.input_value(0).get_node().get_data().astype(np.float32)
    return ((q - zero) * scale.get_data().astype(np.float32)).astype(np.float32)


def compile_ir(artifact: Path, recipe: Recipe) -> ov.CompiledModel:
    """The saved IR `artifact` compiled on the CPU with the precision hint of `recipe` (also for deployments)."""
    import openvino as ov
    import openvino.properties.hint as hints

    # Without an explicit f32 hint the CPU plugin runs "FP32" models in BF16 on CPUs that have it (FINDINGS.md);
    # INT8 models keep f32 for the layers NNCF leaves unquantized, so only quantization changes their numbers.
    precision = {Precision.bf16: ov.Type.bf16, Precision.fp16: ov.Type.f16}.get(recipe.precision, ov.Type.f32)
    return ov.Core().compile_model(str(artifact), DEVICE, {hints.inference_precision: precision})


def build(
    loaded, recipe: Recipe, calib: CalibrationData | None, workdir: Path, context: BuildContext | None = None
) -> Variant:
    """Convert `loaded` to OpenVINO (once per `context`: None, a fresh one), quantize it with NNCF for INT8 recipes,
    save the IR and compile it on the CPU.

    Example:
        >>> v = build(load_model("tiny_test"), Recipe(backend="openvino", precision="fp32"), None, Path("/tmp/w"))
        >>> v.predict(np.zeros((4, 3, 32, 32), np.float32)).shape
        (4, 1000)
    """
    import openvino as ov

    check_recipe(recipe)
    require_calibration(recipe, calib)
    workdir = Path(workdir)
    context = context if context is not None else BuildContext(workdir=workdir)
    details: dict[str, Any] = {}
    start = time.perf_counter()
    converted = conversion(loaded, context)
    model = converted.model.clone()
    details["convert_s"] = time.perf_counter() - start
    if recipe.precision is Precision.int8:
        t = time.perf_counter()
        opts = nncf_options(recipe, transformer=loaded.is_transformer)
        # SmoothQuant / channel alignment first, so that ranges and bias correction measure the model they changed.
        fp32, changes = align_and_smooth(model, recipe, _images(calib))
        first = first_layer_fp32(fp32)
        details["first_layer_fp32"] = first or None
        model = quantize(fp32, recipe, calib, options=opts, fp32_ops=first)
        # The FP32 module whose layer inputs AdaRound and bias correction measure: the one NNCF's algorithms changed.
        folded = converted.folded
        if asks_for(recipe) and (recipe.adaround or recipe.bias_correction):
            folded = transformed_module(converted.folded, fp32, _module_ops(fp32))
        if recipe.adaround:  # learned INT8 weights on NNCF's scales, before bias correction measures them
            from int8eval.backends.openvino_adaround import learned_rounding

            memo = context.adaround if folded is converted.folded else None  # see learned_rounding
            details["adaround"], details["adaround_layers"] = learned_rounding(model, folded, calib, _module_ops(model),
                                                                               memo=memo)
        details["bias_correction"] = None
        if recipe.bias_correction:
            details["bias_correction"] = "int8eval"
            details["bias_corrected_layers"] = correct_biases(model, folded, calib)
        details["quantize_s"] = time.perf_counter() - t
        details["nncf"] = {
            "preset": opts["preset"].value,
            "model_type": opts["model_type"].value if "model_type" in opts else None,
            "overflow_fix": opts["advanced_parameters"].overflow_fix.value,
            "calibration_images": calib.num_images,
            **changes,
        }
        if loaded.is_transformer:
            details["transformer"] = ("NNCF model_type=transformer: MatMul/Conv weights in INT8 (per-channel), "
                                      "LayerNorm computed in float, attention's Q and K quantized, V and softmax in "
                                      "float; SmoothQuant with --smooth-quant ALPHA (and in tune's ladder)")
        details["why"] = overflow_choice()[1]
        details["calibration"] = calibration_phrase(recipe)
    t = time.perf_counter()
    artifact = workdir / f"{recipe.name}.xml"
    # save_model compresses float weights to FP16 unless told not to; the FP32 artifact must stay FP32.
    ov.save_model(model, str(artifact), compress_to_fp16=False)
    details["save_s"] = time.perf_counter() - t
    t = time.perf_counter()
    variant = OpenVINOVariant(recipe, compile_ir(artifact, recipe), artifact)
    details["compile_s"] = time.perf_counter() - t
    variant.details = details
    variant.prepare_s = time.perf_counter() - start
    return variant
