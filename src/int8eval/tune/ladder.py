"""The ladder of candidate recipes for one backend, cheapest steps first. Each step is made from the best recipe
found so far (lowest mean KL to the FP32 logits on the tuning images), so later steps build on what earlier ones
learnt: calibration methods first, then the activation type and bias correction, then the backend's own
cross-layer equalization and SmoothQuant, then AdaRound's learned weight rounding (ONNX Runtime and OpenVINO), then
layers kept in FP32 from a sensitivity ranking (fewest first), then QAT when training images are given.

Channel alignment and SmoothQuant are NNCF's, so OpenVINO's steps only (`backends.openvino_nncf` says why the other
backends have none): channel alignment where the converted model has a pair it changes, SmoothQuant where the model
has a LayerNorm or attention (a CNN's MatMul inputs are not what it is for)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

from int8eval.config import ActivationType, Backend, CalibMethod, Recipe

# Percentiles tried beside the backend's default: a tighter clip helps models with rare large activations.
PERCENTILES = (99.99, 99.999)
KEEP_COUNTS = (1, 2, 4, 8)
# SmoothQuant's alpha: the paper's default and NNCF's (for MatMul).
SMOOTH_QUANT_ALPHAS = (0.5, 0.95)


@dataclass(frozen=True)
class Step:
    """One rung: its name and how it turns the best recipe so far into candidates (none: the step does not apply)."""

    name: str
    candidates: Callable[[Recipe], list[Recipe]]


def _with(recipe: Recipe, **changes) -> Recipe:
    return Recipe(**{**recipe.model_dump(), **changes})  # validated, unlike model_copy


def _calibrations(base: Recipe) -> list[Recipe]:
    out = []
    for method in CalibMethod:
        for p in PERCENTILES if method is CalibMethod.percentile else (base.percentile,):
            r = _with(base, calib=method, percentile=p)
            if r.name != base.name:
                out.append(r)
    return out


def _activation_type(base: Recipe) -> list[Recipe]:
    if base.backend is not Backend.onnxruntime:
        return []
    from int8eval.backends.onnxruntime_backend import activation_choice  # onnxruntime is installed: it is tuned

    # The CPU's choice is what `None` built in the default step: the other type is the candidate.
    chosen, _ = activation_choice(base)
    return [_with(base, activation_type=a) for a in ActivationType if a is not chosen]


def _no_bias_correction(base: Recipe) -> list[Recipe]:
    return [_with(base, bias_correction=False)] if base.bias_correction else []


def _channel_alignment(pairs: Callable[[], int]) -> Callable[[Recipe], list[Recipe]]:
    return lambda base: [_with(base, channel_alignment=True)] if not base.channel_alignment and pairs() else []


def _smooth_quant(base: Recipe) -> list[Recipe]:
    return [_with(base, smooth_quant=a) for a in SMOOTH_QUANT_ALPHAS] if base.smooth_quant is None else []


def _adaround(base: Recipe) -> list[Recipe]:
    return [_with(base, adaround=True)] if not base.adaround else []


def transformer_like(module) -> bool:
    """Whether the PyTorch `module` has a LayerNorm or attention: what SmoothQuant is meant for."""
    from torch import nn

    return any(isinstance(m, (nn.LayerNorm, nn.MultiheadAttention)) for m in module.modules())


def _fp32_layers(ranking: Sequence[str], most: int) -> Callable[[Recipe], list[Recipe]]:
    counts = [k for k in KEEP_COUNTS if k <= min(most, len(ranking))]
    return lambda base: [_with(base, keep_fp32=tuple(ranking[:k])) for k in counts] if not base.keep_fp32 else []


def ladder(
    backend: Backend,
    *,
    ranking: Callable[[], Sequence[str]] | None = None,
    max_fp32_layers: int = 8,
    qat: Callable[[Recipe], list[Recipe]] | None = None,
    loaded: Any = None,
    context: Any = None,
) -> list[Step]:
    """The steps for `backend` after its default recipe. `ranking` gives the layers by sensitivity (most first),
    called only when the FP32-layers step is reached; `qat` gives the QAT candidates (torch, with training images);
    `loaded` (a LoadedModel) and its build `context` decide OpenVINO's channel-alignment and SmoothQuant steps."""
    steps = [Step("calibration", _calibrations), Step("activation type", _activation_type),
             Step("bias correction off", _no_bias_correction)]
    if backend is Backend.openvino and loaded is not None:
        from int8eval.backends.openvino_backend import alignable_pairs  # openvino is installed: it is tuned

        steps.append(Step("channel alignment", _channel_alignment(cache(lambda: alignable_pairs(loaded, context)))))
        if loaded.module is not None and transformer_like(loaded.module):
            steps.append(Step("SmoothQuant", _smooth_quant))
    onnx_file = loaded is not None and loaded.module is None  # AdaRound measures layer inputs in the PyTorch module
    if backend in (Backend.onnxruntime, Backend.openvino) and not onnx_file:  # int8eval's AdaRound writes their INT8 weights
        steps.append(Step("AdaRound", _adaround))
    if ranking is not None and max_fp32_layers > 0:
        steps.append(Step("FP32 layers", lambda base: _fp32_layers(ranking(), max_fp32_layers)(base)))
    if qat is not None and backend is Backend.torch:
        steps.append(Step("QAT", qat))
    return steps
