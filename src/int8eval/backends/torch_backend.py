"""PyTorch: the FP32 reference (eager), BF16 autocast, and INT8.

INT8 is PT2E (torchao's `prepare_pt2e`/`convert_pt2e` with the X86InductorQuantizer) compiled by inductor into
oneDNN INT8 kernels. `recipe.legacy` selects the seed's deprecated `torch.ao.quantization` FX path instead
(`prepare_fx`/`convert_fx`, x86 engine), kept as a labelled baseline: it loses far more accuracy.

What torch.export/PT2E steps the builders share is in `pt2e`; int8eval's own observers in `torch_observers`.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import logging
import os
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from int8eval.backends.base import BuildContext, CalibrationData, Variant, require_calibration
from int8eval.backends.bias_correction import output_shifts, subtract_from_biases
from int8eval.backends.pt2e import calibrate, drop_unused_tensors, export_program, save_program, untie_reused_modules
from int8eval.backends.ranges import HIST_BINS, calibration_phrase as ranges_phrase
from int8eval.backends.torch_observers import (
    OBSERVER_BINS,
    LegacyHistogramRangeObserver,
    pt2e_histogram_observer,
    pt2e_shared_scale_weight_observer,
)
from int8eval.config import CalibMethod, Precision, Recipe
from int8eval.environment import cpu_capabilities
from int8eval.errors import BackendUnavailable, ConfigError, Int8EvalError

# Inductor's oneDNN INT8 lowering warns once per quantized layer about its own tensor copy (torch 2.14); torchao's
# import registers an Enum that torch's pytree now handles natively; a CUDA build compiling CPU kernels says it found
# no CUDA runtime. None of it concerns the user.
warnings.filterwarnings("ignore", message="To copy construct from a tensor", module=r"torch\._inductor\.mkldnn_lowerings")
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)

# Smallest scale an observer may pick, as in torchao's default X86 inductor config.
_EPS = 2**-12


class TorchVariant(Variant):
    def __init__(
        self,
        recipe: Recipe,
        module: nn.Module,
        artifact: Path,
        autocast: torch.dtype | None = None,
        freezing: bool = False,
    ):
        super().__init__(recipe)
        self.module = module
        self.artifact = artifact
        self.autocast = autocast
        # Inductor only folds the INT8 weights into oneDNN kernels with freezing on; it is read when a new batch
        # shape compiles, which can happen in any predict call.
        self.freezing = freezing
        self.details: dict[str, object] = {}  # how it was built, for the report (flow, integer ranges, ...)

    @property
    def static_shapes(self) -> bool:
        """Compiled by inductor with `dynamic=False` (PT2E INT8): each new batch size compiles again, so the pass
        pads its short last batch (`evaluate.predict_batch`)."""
        return is_compiled(self.module)

    def predict(self, images: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
        freezing = _inductor_freezing() if self.freezing else contextlib.nullcontext()
        with torch.inference_mode(), freezing, torch.autocast(
            "cpu", dtype=self.autocast, enabled=self.autocast is not None
        ):
            return self.module(x).float().numpy()


def is_compiled(module) -> bool:
    """Whether `module` is a torch.compile'd module (its graphs are compiled on first call per input shape)."""
    return type(module).__name__ == "OptimizedModule"


def _inductor_freezing():
    import torch._inductor.config as inductor_config

    # torch.compile(options={"freezing": True}) is not enough: the weights must already be treated as constants
    # when the graph is captured, which only the config flag does.
    return inductor_config.patch(freezing=True)


def cxx_compiler() -> str | None:
    candidates = [os.environ.get("CXX"), "g++", "c++", "clang++"]
    return next((c for c in candidates if c and shutil.which(c)), None)


def check_recipe(recipe: Recipe) -> None:
    """Reject recipes this backend cannot run (ConfigError / BackendUnavailable), before any work."""
    if recipe.precision is Precision.fp16:
        raise ConfigError("torch on the CPU has no fast fp16 path; use --precision bf16 (or a GPU backend)")
    if recipe.legacy and recipe.precision is not Precision.int8:
        raise ConfigError(
            f"legacy applies to torch int8 only (the torch.ao.quantization FX path), not {recipe.precision.value}"
        )
    if recipe.precision is Precision.int8 and not recipe.legacy:
        if importlib.util.find_spec("torchao") is None:
            raise BackendUnavailable(
                "torch int8 (PT2E) needs torchao: pip install 'int8eval[pt2e]' (or use the legacy torch.ao FX path)"
            )
        if cxx_compiler() is None:
            raise ConfigError(
                "torch int8 (PT2E) compiles oneDNN kernels with inductor, which needs a C++ compiler (g++ or clang++; "
                "set CXX); install one, or use the legacy torch.ao FX path"
            )
        cpu_capabilities()  # a bad INT8EVAL_CPU fails here, before any work


def build(
    loaded,
    recipe: Recipe,
    calib: CalibrationData | None,
    workdir: Path,
    context: BuildContext | None = None,
    *,
    compile: bool = True,
) -> Variant:
    """Build the FP32, BF16 or INT8 variant of `loaded.module`, its artifact under `workdir`.

    INT8 calibrates on every batch of `calib`. `compile=False` skips inductor for INT8 PT2E (the model then
    runs its quantize/dequantize ops in FP32: the same numbers, none of the speed; for tests). `context` is
    accepted as by every builder; PyTorch shares nothing between builds.
    """
    check_recipe(recipe)
    require_calibration(recipe, calib)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if recipe.precision is Precision.int8:
        return _build_legacy(loaded, recipe, calib, workdir) if recipe.legacy else _build_pt2e(
            loaded, recipe, calib, workdir, compile=compile
        )
    start = time.perf_counter()
    artifact = workdir / f"{recipe.name}.pt"
    torch.save(loaded.module.state_dict(), artifact)
    autocast = torch.bfloat16 if recipe.precision is Precision.bf16 else None
    variant = TorchVariant(recipe, loaded.module, artifact, autocast)
    variant.prepare_s = time.perf_counter() - start
    return variant


# --- PT2E (torchao) -------------------------------------------------------------------------------------------


def _example(calib: CalibrationData) -> torch.Tensor:
    """Two calibration images: a batch of 1 would make torch.export specialise the batch dimension to 1."""
    x = torch.from_numpy(np.ascontiguousarray(calib.batches[0][:2], dtype=np.float32))
    return x if len(x) > 1 else torch.cat([x, x])


def int8_ranges() -> tuple[int, int, str]:
    """(activation quant_max, weight quant_max, why) for this CPU's oneDNN INT8 kernels (`cpu_capabilities`).

    Where x86 INT8 dot products saturate (no VNNI/AMX), oneDNN's u8 x s8 kernels add pairs of products in 16 bits
    (vpmaddubsw), which overflows with 8-bit activations and weights (255 * 127 * 2 > 32767): compiled,
    EfficientNet-Lite0 then agrees with FP32 on 85% of images instead of 98.5%. 7-bit activations (x86's
    `reduce_range`) keep the sums exact and cost less accuracy than 7-bit weights (measured on Lite0: 97.5% against
    94%). Elsewhere (VNNI, AMX, Arm) the sums are exact with 8 bits.
    """
    caps = cpu_capabilities()
    if caps.int8_saturates:
        return 127, 127, f"{caps.describe()}: INT8 sums saturate, so 7-bit activations (8-bit into depthwise)"
    return 255, 127, f"{caps.describe()}: exact INT8 dot products, so 8-bit activations"


class _DepthwiseFullRange:
    """Wraps an X86InductorQuantizer whose activations are 7-bit (`int8_ranges`) and gives the inputs of depthwise
    convolutions 8 bits again: oneDNN's INT8 depthwise kernel widens every product to 32 bits (measured exact
    against the reference with 8-bit inputs on an AVX2-only CPU, where dense convolutions saturate), and these
    inputs are the widest activations of a MobileNet-style block."""

    def __init__(self, quantizer, spec):
        self.quantizer, self.spec = quantizer, spec

    def annotate(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
        model = self.quantizer.annotate(model)
        for node in model.graph.nodes:
            annotation = node.meta.get("quantization_annotation")
            if annotation is None or node.target is not torch.ops.aten.conv2d.default:
                continue
            groups = node.args[6] if len(node.args) > 6 else 1
            activation = node.args[0]
            if groups > 1 and activation.meta["val"].shape[1] == groups and activation in annotation.input_qspec_map:
                annotation.input_qspec_map[activation] = self.spec
        return model

    def __getattr__(self, name):  # transform_for_annotation, validate, ...: the wrapped quantizer's
        return getattr(self.quantizer, name)


def quantization_config(recipe: Recipe, *, ranges: tuple[int, int] | None = None):
    """The X86InductorQuantizer config for `recipe`: uint8 affine activations observed with `recipe.calib`,
    int8 symmetric weights (min/max, per output channel unless `per_channel` is off); integer ranges from
    `ranges` (activation and weight quant_max), by default `int8_ranges()` for this CPU."""
    from torchao.quantization.pt2e import HistogramObserver, MinMaxObserver, PerChannelMinMaxObserver
    from torchao.quantization.pt2e.quantizer import QuantizationConfig, QuantizationSpec

    observer = {
        CalibMethod.minmax: MinMaxObserver.with_args(eps=_EPS),
        # HistogramObserver searches the range that minimises the L2 quantization error (torchao's default).
        CalibMethod.mse: HistogramObserver.with_args(eps=_EPS),
        CalibMethod.percentile: pt2e_histogram_observer().with_args(
            method="percentile", percentile=recipe.percentile, eps=_EPS
        ),
        CalibMethod.entropy: pt2e_histogram_observer().with_args(method="entropy", eps=_EPS),
    }[recipe.calib]
    act_qmax, weight_qmax = ranges or int8_ranges()[:2]
    activation = QuantizationSpec(
        dtype=torch.uint8,
        quant_min=0,
        quant_max=act_qmax,
        qscheme=torch.per_tensor_affine,
        is_dynamic=False,
        observer_or_fake_quant_ctr=observer,
    )
    # Inductor's x86 lowering only matches per-channel weights (per-tensor ones would stay FP32 convolutions),
    # so per-tensor weights are one shared scale written per channel: per-tensor numbers, INT8 kernels.
    weight_observer = PerChannelMinMaxObserver if recipe.per_channel else pt2e_shared_scale_weight_observer()
    weight = QuantizationSpec(
        dtype=torch.int8,
        quant_min=-weight_qmax - 1,
        quant_max=weight_qmax,
        qscheme=torch.per_channel_symmetric,
        ch_axis=0,  # output channels of conv (O, I, kH, kW) and linear (O, I) weights
        is_dynamic=False,
        observer_or_fake_quant_ctr=weight_observer.with_args(eps=_EPS),
    )
    return QuantizationConfig(activation, activation, weight, None, is_qat=False)


def _build_pt2e(loaded, recipe: Recipe, calib: CalibrationData, workdir: Path, *, compile: bool) -> Variant:
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import X86InductorQuantizer

    start = time.perf_counter()
    example = _example(calib)
    *ranges, why = int8_ranges()
    config = quantization_config(recipe, ranges=tuple(ranges))
    module = _bias_corrected(loaded.module, config.weight, recipe, calib) if recipe.bias_correction else loaded.module
    try:
        exported = export_program(untie_reused_modules(module), example)
    except Exception as e:  # noqa: BLE001 - export raises many types
        raise Int8EvalError(
            f"torch.export failed for {loaded.name} ({type(e).__name__}: {str(e).splitlines()[0]}); "
            "PT2E needs an exportable model with a dynamic batch dimension. Try the legacy FX path."
        ) from e
    quantizer = X86InductorQuantizer().set_global(config)
    for name in recipe.keep_fp32:
        quantizer.set_module_name_qconfig(name, None)
    if ranges[0] < 255:
        full_range = quantization_config(recipe, ranges=(255, ranges[1])).input_activation
        quantizer = _DepthwiseFullRange(quantizer, full_range)
    try:
        prepared = prepare_pt2e(exported.module(), quantizer)
    except ValueError as e:
        if "more than one output node" not in str(e):
            raise
        raise Int8EvalError(
            f"PT2E cannot quantize {loaded.name}: a module is called at several places and torch.fx could not "
            "trace the model to give each call its own copy. Give each use its own module in the model code."
        ) from e
    calibrate(prepared, calib)
    converted = convert_pt2e(prepared)
    drop_unused_tensors(converted)
    artifact = save_program(converted, example, workdir / f"{recipe.name}.pt2")
    module = torch.compile(converted, dynamic=False) if compile else converted
    variant = TorchVariant(recipe, module, artifact, freezing=compile)
    variant.details = {
        "flow": "pt2e-x86-inductor",
        "compiled": compile,
        "act_qmax": ranges[0],
        "weight_qmax": ranges[1],
        "bias_correction": "int8eval" if recipe.bias_correction else None,
        "depthwise_act_qmax": 255 if isinstance(quantizer, _DepthwiseFullRange) else ranges[0],
        "why": why,
        "calibration": calibration_phrase(recipe),
    }
    if loaded.is_transformer:
        # Checked on torchao 0.18 (tests/test_vit.py): the X86InductorQuantizer annotates Conv and Linear only, so
        # this already is its transformer recipe; it has no transformer option of its own.
        variant.details["transformer"] = ("Conv/Linear in INT8 (per-channel weights); LayerNorm and attention "
                                          "(scaled_dot_product_attention, its Softmax) in float")
    if compile:  # compile now (lazy otherwise) so that prepare_s counts it
        variant.predict(calib.batches[0])
    variant.prepare_s = time.perf_counter() - start
    return variant


def _bias_corrected(module: nn.Module, weight_spec, recipe: Recipe, calib: CalibrationData) -> nn.Module:
    """A BatchNorm-folded copy of `module` whose Conv/Linear biases absorb the mean output shift of their INT8
    weights (`bias_correction`); Q(W) comes from `weight_spec`'s own observer, as `convert_pt2e` will compute it."""
    # prepare_pt2e's own way from a spec to an observer (dtype, range, scheme, axis filled in from the spec)
    from torchao.quantization.pt2e.prepare import _create_obs_or_fq_from_qspec

    from int8eval.models import fold_batchnorm

    folded, _ = fold_batchnorm(module)  # PT2E would fold it anyway; the correction must see the folded weights
    errors = {}
    for name, layer in folded.named_modules():
        if isinstance(layer, (nn.Conv2d, nn.Linear)) and name not in recipe.keep_fp32:
            observer = _create_obs_or_fq_from_qspec(weight_spec, {}, False)
            w = layer.weight.detach()
            observer(w)
            scale, zero_point = observer.calculate_qparams()
            q = torch.fake_quantize_per_channel_affine(
                w, scale.float(), zero_point.int(), 0, weight_spec.quant_min, weight_spec.quant_max
            )
            errors[name] = q - w
    subtract_from_biases(folded, output_shifts(folded, errors, calib))
    return folded


def calibration_phrase(recipe: Recipe) -> str:
    """What set an INT8 recipe's activation ranges (`details["calibration"]`): PyTorch's own observers for minmax and
    mse, int8eval's `ranges` for percentile and entropy (`torch_observers`)."""
    library = "torch.ao" if recipe.legacy else "torchao"
    if recipe.calib is CalibMethod.minmax:
        return f"{library} MinMaxObserver"
    if recipe.calib is CalibMethod.mse:
        return f"{library} HistogramObserver (L2 error search over 2048 bins)"
    histogram = f"an {OBSERVER_BINS}-bin signed histogram folded to {HIST_BINS} bins of |x|"
    return ranges_phrase(recipe.calib.value, percentile=recipe.percentile, histogram=histogram)


# --- legacy torch.ao.quantization FX ----------------------------------------------------------------------------


def legacy_qconfig_mapping(recipe: Recipe):
    """The seed's x86 QConfigMapping with the global activation observer swapped for `recipe.calib`.

    Activations keep x86's 7-bit range (0..127, `reduce_range` in the default qconfig): the x86/fbgemm kernels
    can saturate their 16-bit intermediate sums with full-range activations.
    """
    from torch.ao.quantization import QConfig, get_default_qconfig, get_default_qconfig_mapping
    from torch.ao.quantization import observer as ao

    seven_bits = {"quant_min": 0, "quant_max": 127}
    activation = {
        CalibMethod.minmax: ao.MinMaxObserver.with_args(**seven_bits),
        CalibMethod.mse: get_default_qconfig("x86").activation,  # HistogramObserver: the seed's default qconfig
        CalibMethod.percentile: LegacyHistogramRangeObserver.with_args(
            method="percentile", percentile=recipe.percentile, **seven_bits
        ),
        CalibMethod.entropy: LegacyHistogramRangeObserver.with_args(method="entropy", **seven_bits),
    }[recipe.calib]
    weight = ao.default_per_channel_weight_observer if recipe.per_channel else ao.default_weight_observer
    mapping = get_default_qconfig_mapping("x86").set_global(QConfig(activation=activation, weight=weight))
    for name in recipe.keep_fp32:
        mapping.set_module_name(name, None)
    return mapping


def _build_legacy(loaded, recipe: Recipe, calib: CalibrationData, workdir: Path) -> Variant:
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    start = time.perf_counter()
    torch.backends.quantized.engine = "x86"  # the seed's engine (the default on x86 CPUs)
    model = copy.deepcopy(loaded.module).eval()  # prepare_fx fuses modules in place
    try:
        prepared = prepare_fx(model, legacy_qconfig_mapping(recipe), (_example(calib),))
    except Exception as e:  # noqa: BLE001 - torch.fx raises many types for untraceable Python
        raise Int8EvalError(
            f"torch.ao FX could not trace {loaded.name} ({type(e).__name__}: {str(e).splitlines()[0]}); "
            "use PT2E (legacy off)"
        ) from e
    calibrate(prepared, calib)
    quantized = convert_fx(prepared)
    artifact = workdir / f"{recipe.name}.pt"
    torch.save(quantized.state_dict(), artifact)  # packed INT8 weights
    variant = TorchVariant(recipe, quantized, artifact)
    variant.details = {
        "flow": "torch.ao-fx",
        "legacy": "PyTorch's torch.ao.quantization FX post-training quantization (prepare_fx/convert_fx)",
        "engine": "x86",
        "act_qmax": 127,
        "weight_qmax": 127,
        "calibration": calibration_phrase(recipe),
    }
    variant.prepare_s = time.perf_counter() - start
    return variant
