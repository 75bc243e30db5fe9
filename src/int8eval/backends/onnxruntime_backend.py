"""ONNX Runtime on the CPU: FP32 and FP16 from the exported model, INT8 as a static QDQ model.

INT8 activations are uint8 (U8S8 kernels) on x86 with VNNI/AMX, int8 (S8S8) elsewhere, unless the recipe says
(`activation_choice`); on x86 CPUs whose INT8 dot products saturate the session uses exact kernels (`OrtVariant`).

INT8 recipes share one ONNX export and one calibration pass per (model, calibration set) within a BuildContext
(`onnx_qdq.fp32_export`, `onnx_qdq.activation_stats`; shared with the TensorRT builders): a histogram of every activation is collected once and each recipe only
derives its ranges from it. `prepare_s` still reports the full cost of building the recipe on its own (export +
calibration + quantization + session creation).

`recipe.adaround`: int8eval's AdaRound (`backends.adaround`, `onnx_qdq.ModuleAdaRound`) replaces the INT8 weights
ONNX Runtime wrote by learned ones, on its scales, before bias correction; details["adaround"] says what it did.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from int8eval.backends.base import BuildContext, CalibrationData, Variant, require_calibration
from int8eval.backends.onnx_calibration import calibration_phrase
from int8eval.backends.onnx_export import (
    INPUT_NAME,
    OUTPUT_NAME,
    QUANTIZED_OP_TYPES,
    activation_matmuls,
    export_onnx_fp16,
    keep_fp32_nodes,
)
from int8eval.backends.onnx_qdq import (
    ModuleAdaRound,
    activation_stats,
    fp32_export,
    module_bias_shifts,
    quantize_qdq,
)
from int8eval.config import ActivationType, Backend, Precision, Recipe
from int8eval.environment import CpuArch, cpu_capabilities
from int8eval.errors import ConfigError


def activation_choice(recipe: Recipe) -> tuple[ActivationType, str]:
    """The INT8 activation type of `recipe`'s QDQ model on this CPU (`cpu_capabilities`), and why."""
    if recipe.activation_type is not None:
        return recipe.activation_type, "asked for (--activation-type)"
    caps = cpu_capabilities()
    if caps.arch is CpuArch.x86 and caps.exact_int8:
        # FINDINGS.md (AMX Xeon, Lite0): U8S8 ran 2.0x S8S8's throughput at batch 32 at the same agreement.
        return ActivationType.uint8, f"{caps.describe()}: U8S8 integer kernels, ~2x S8S8's speed"
    if caps.arch is CpuArch.x86:
        # Saturating x86: the session's exact kernels (OrtVariant) convert the weights to u8 and multiply U8U8, and
        # int8 activations were slower there. Measured on the AVX2-only EPYC (Lite0 QDQ with exact kernels, batch
        # 32, 6-10 interleaved runs, three times, on a loaded machine): median uint8 10.9 / 12.0 / 14.8 images/s,
        # int8 9.5 / 9.5 / 10.8; the same top-1 agreement with FP32 (64 images).
        return ActivationType.uint8, f"{caps.describe()}: exact U8U8 kernels, uint8 measured faster than int8"
    return ActivationType.int8, f"{caps.describe()}: S8S8 integer kernels"


class OrtVariant(Variant):
    """An ONNX Runtime CPU session on an .onnx file (the artifact)."""

    def __init__(self, recipe: Recipe, model: Path, *, input_dtype: type = np.float32) -> None:
        super().__init__(recipe)
        self.artifact = model
        self.input_dtype = input_dtype
        self.exact_int8 = recipe.precision is Precision.int8 and cpu_capabilities().int8_saturates
        # The evaluation pass runs other runtimes between this session's calls: ORT's threads spinning after each
        # call would take the cores from them (measured, Lite0's six-variant pass on 2 cores: ~10% more images/s
        # without). The bench times the session as deployed, spinning (`session_options(spinning=True)`).
        self.session = ort.InferenceSession(str(model), self.session_options(spinning=False),
                                            providers=["CPUExecutionProvider"])
        self.details = {"exact_int8_kernels": self.exact_int8}

    def session_options(self, *, spinning: bool = True) -> ort.SessionOptions:
        """ORT's defaults (all graph optimisations: QDQ -> integer kernels; its own thread count), with exact INT8
        kernels where the CPU needs them; `spinning` False stops idle threads spinning between calls."""
        opts = ort.SessionOptions()
        if self.exact_int8:
            # Without VNNI, ORT's x86 U8S8 kernels add pairs of products in saturating int16 (vpmaddubsw):
            # measured on an AVX2 EPYC, Lite0's top-1 agreement with FP32 fell from 98% to 89%. This option makes
            # ORT convert the weights to u8 and use exact U8U8 kernels (slower); the model file is unchanged.
            opts.add_session_config_entry("session.x64quantprecision", "1")
        if not spinning:
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return opts

    def predict(self, images: np.ndarray) -> np.ndarray:
        feed = {INPUT_NAME: np.ascontiguousarray(images, dtype=self.input_dtype)}
        return self.session.run([OUTPUT_NAME], feed)[0].astype(np.float32, copy=False)


def check_recipe(recipe: Recipe) -> None:
    """Reject what ONNX Runtime's CPU execution provider cannot do, before any work starts."""
    if recipe.backend is not Backend.onnxruntime:
        raise ConfigError(f"recipe {recipe.name} is for backend {recipe.backend.value}, not onnxruntime")
    if recipe.legacy:
        raise ConfigError(
            f"recipe {recipe.name}: legacy is the PyTorch torch.ao API and means nothing for onnxruntime; drop --legacy"
        )
    if recipe.precision is Precision.bf16:
        raise ConfigError(
            "onnxruntime's CPU execution provider has no bfloat16 Conv/Gemm kernels (the session fails to load); "
            "use --backend torch or openvino for bf16, or onnxruntime with fp32, fp16 or int8"
        )
    if recipe.precision is Precision.int8:
        cpu_capabilities()  # a bad INT8EVAL_CPU fails here, before any work


def build(
    loaded, recipe: Recipe, calib: CalibrationData | None, workdir: Path, context: BuildContext | None = None
) -> Variant:
    """Build the ONNX Runtime variant `recipe` describes; artifacts are written under `workdir`, the FP32 export
    and its activation statistics shared through `context` (None: a fresh one)."""
    check_recipe(recipe)
    require_calibration(recipe, calib)
    workdir = Path(workdir)
    context = context if context is not None else BuildContext(workdir=workdir)
    if recipe.precision is Precision.fp16:
        start = time.perf_counter()
        # Export the half-precision module: ORT then runs its fp16 kernels (slower than fp32 on x86 CPUs).
        path = export_onnx_fp16(loaded, workdir / f"{recipe.name}.onnx")
        variant = OrtVariant(recipe, path, input_dtype=np.float16)
        variant.prepare_s = time.perf_counter() - start
        return variant

    prepared = fp32_export(loaded, context)
    if recipe.precision is Precision.fp32:
        session_start = time.perf_counter()
        variant = OrtVariant(recipe, prepared.fp32)
        variant.prepare_s = prepared.export_s + (time.perf_counter() - session_start)
        return variant

    stats = activation_stats(prepared, calib, context)
    quant_start = time.perf_counter()
    activation_type, why = activation_choice(recipe)
    rounding = ModuleAdaRound(loaded.module, stats.model, calib) if recipe.adaround else None
    exclude = keep_fp32_nodes(stats.model, loaded.module, recipe.keep_fp32)
    op_types = None
    if loaded.is_transformer:
        # ONNX Runtime's transformer recipe: only Conv/Gemm/MatMul (per-channel weights) in INT8. Left to itself
        # quantize_static would also put LayerNormalization, Softmax, Add, Mul... behind Q/DQ, and ORT's QDQ
        # fusions would then run Softmax in INT8 (QLinearSoftmax); attention's activation x activation MatMuls stay
        # in float too, so Softmax's input and output are never quantized.
        op_types = QUANTIZED_OP_TYPES
        exclude = [*exclude, *(n for n in activation_matmuls(stats.model) if n not in exclude)]
    path = quantize_qdq(
        prepared.fp32,
        stats,
        workdir / f"{recipe.name}.onnx",
        method=recipe.calib,
        percentile=recipe.percentile,
        per_channel=recipe.per_channel,
        activation_type=activation_type.value,
        nodes_to_exclude=exclude,
        op_types=op_types,
        bias_shifts=module_bias_shifts(loaded.module, stats.model, calib) if recipe.bias_correction else None,
        weight_rounding=rounding,
    )
    variant = OrtVariant(recipe, path)
    variant.details.update(activation_type=activation_type.value, why=why)
    variant.details["calibration"] = calibration_phrase(recipe.calib, recipe.percentile)
    if loaded.is_transformer:
        variant.details["transformer"] = ("Conv/Gemm/MatMul with weights in INT8 (per-channel weights); LayerNorm, "
                                          "Softmax and attention's activation MatMuls in float")
    variant.details["bias_correction"] = "int8eval" if recipe.bias_correction else None
    if rounding is not None:  # int8eval's AdaRound wrote the INT8 weights (before the bias correction)
        variant.details.update(adaround=rounding.details, adaround_layers=rounding.layers)
    variant.prepare_s = prepared.export_s + stats.collect_s + (time.perf_counter() - quant_start)
    return variant
