"""Backend-independent fake quantization in torch ops: the quantizers, and a folded copy of a model whose Conv/Linear
layers can each be switched between FP32 and fake INT8 (weights and input activation separately).

Quantization model (what the common CPU/GPU INT8 backends do, simplified): BatchNorm is folded into the preceding
convolution first; every Conv/Linear gets symmetric int8 weights ([-127, 127], per output channel or per tensor)
and a per-tensor quantized input activation (asymmetric uint8 as ONNX Runtime's and PT2E's CPU defaults, or
symmetric int8 as TensorRT wants), with ranges from calibration images (global min/max, or a percentile of a
histogram). Keeping a layer "in FP32" removes both its weight and its input quantizer, like removing its Q/DQ pair.
Biases and the adds of residual connections stay in float: the numbers are the quantization error of the
convolutions and matmuls, which is where backends lose accuracy. They approximate, not reproduce, a backend.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from int8eval.backends.bias_correction import output_shifts
from int8eval.config import CalibMethod, Recipe
from int8eval.errors import ConfigError
from int8eval.models import QUANT_TYPES, fold_batchnorm

HIST_BINS = 4096


@dataclass(frozen=True)
class FakeQuantSpec:
    """The fake-quantization recipe: weight granularity, activation ranges and activation type."""

    per_channel: bool = True
    calib: Literal["minmax", "percentile"] = "minmax"
    percentile: float = 99.999
    symmetric_activations: bool = False
    bias_correction: bool = True  # as the backends' INT8 recipes (`backends.bias_correction`)

    @classmethod
    def from_recipe(cls, recipe: Recipe, *, symmetric_activations: bool | None = None) -> FakeQuantSpec:
        """The fake-quant counterpart of an int8eval Recipe (its backend only decides the activation type)."""
        if recipe.calib not in (CalibMethod.minmax, CalibMethod.percentile):
            raise ConfigError(
                f"diagnose fakes INT8 with minmax or percentile ranges, not {recipe.calib.value}; "
                "use --calib minmax or --calib percentile"
            )
        if symmetric_activations is None:
            symmetric_activations = recipe.backend.value == "tensorrt"
        return cls(recipe.per_channel, recipe.calib.value, recipe.percentile, symmetric_activations, recipe.bias_correction)

    def describe(self) -> str:
        act = "symmetric int8" if self.symmetric_activations else "asymmetric uint8"
        rng = "min/max" if self.calib == "minmax" else f"{self.percentile:g}th-percentile"
        w = "per-channel" if self.per_channel else "per-tensor"
        bc = ", biases corrected for the weights' mean error" if self.bias_correction else ""
        return f"{w} symmetric int8 weights, per-tensor {act} activations with {rng} ranges, BatchNorm folded{bc}"


def quantize_weight(w: torch.Tensor, per_channel: bool) -> torch.Tensor:
    """Symmetric int8 fake quantization of a weight: scale = max|w| / 127 per output channel (dim 0) or tensor."""
    amax = w.abs().amax(dim=tuple(range(1, w.dim())), keepdim=True) if per_channel else w.abs().max()
    scale = torch.clamp(amax / 127.0, min=1e-12)  # an all-zero channel stays zero
    return torch.clamp(torch.round(w / scale), -127, 127) * scale


def activation_qparams(lo: float, hi: float, symmetric: bool) -> tuple[float, int, int, int]:
    """(scale, zero_point, qmin, qmax) of a per-tensor activation quantizer for the range [lo, hi]."""
    if symmetric:
        amax = max(abs(lo), abs(hi), 1e-12)
        return amax / 127.0, 0, -128, 127
    lo, hi = min(lo, 0.0), max(hi, 0.0)  # zero must be exact (padding, ReLU)
    scale = max((hi - lo) / 255.0, 1e-12)
    return scale, int(min(max(round(-lo / scale), 0), 255)), 0, 255


@dataclass
class FakeQuantLayer:
    """One Conv/Linear of a FakeQuantModel: its FP32 and fake-INT8 weights and biases, its input range."""

    name: str
    module: nn.Module
    w_fp: torch.Tensor
    w_q: torch.Tensor
    b_fp: torch.Tensor
    b_q: torch.Tensor  # the bias to use with w_q (bias-corrected once calibrated, if the spec says so)
    lo: float = math.inf
    hi: float = -math.inf
    hist: torch.Tensor | None = None
    hist_range: tuple[float, float] = (0.0, 0.0)
    qparams: tuple[float, int, int, int] | None = None

    def fake_quant_input(self, x: torch.Tensor) -> torch.Tensor:
        scale, zp, qmin, qmax = self.qparams
        return torch.fake_quantize_per_tensor_affine(x, scale, zp, qmin, qmax)

    def forward_with(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """The layer with weights `w` (w_q or w_fp) and the bias that goes with them."""
        m, b = self.module, self.b_q if w is self.w_q else self.b_fp
        if isinstance(m, nn.Linear):
            return F.linear(x, w, b)
        return m._conv_forward(x, w, b)


_INPLACE = {operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
            operator.itruediv: operator.truediv}


def _remove_inplace_ops(gm: torch.fx.GraphModule) -> None:
    """Turn every in-place op of `gm` (ReLU(inplace=True), +=, x.add_(...)) into its out-of-place twin: the sweep
    reuses cached prefix values in several runs, so nothing may write into them."""
    for m in gm.modules():
        if getattr(m, "inplace", False) is True:
            m.inplace = False
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in _INPLACE:
            node.target = _INPLACE[node.target]
        elif node.op == "call_method" and node.target.endswith("_") and not node.target.endswith("__"):
            if hasattr(torch.Tensor, node.target[:-1]):
                node.target = node.target[:-1]
    gm.recompile()


class FakeQuantModel:
    """A folded copy of a PyTorch model whose Conv/Linear layers can each be switched between FP32 and fake INT8
    (weights and input activation separately).

    Example:
        >>> fq = FakeQuantModel(loaded.module, FakeQuantSpec())
        >>> fq.calibrate(calib_batches)
        >>> fq.configure(weights=fq.names, acts=fq.names)   # everything INT8
        >>> logits = fq(images)
    """

    def __init__(self, module: nn.Module, spec: FakeQuantSpec) -> None:
        self.spec = spec
        self.model, self.bn_folded = fold_batchnorm(module)
        if self.bn_folded:  # a traced GraphModule: the sweep runs its prefixes from cached values
            _remove_inplace_ops(self.model)
        self._layers: dict[str, FakeQuantLayer] = {}
        with torch.no_grad():
            for name, m in self.model.named_modules():
                if isinstance(m, QUANT_TYPES):
                    w = m.weight.detach().clone()
                    if m.bias is None:  # bias correction needs one
                        m.bias = nn.Parameter(torch.zeros(len(w)), requires_grad=False)
                    b = m.bias.detach().clone()
                    self._layers[name] = FakeQuantLayer(name, m, w, quantize_weight(w, spec.per_channel), b, b)
        if not self._layers:
            raise ConfigError("the model has no Conv or Linear layer to quantize")
        self._acts: set[str] = set()
        self._observe: str | None = None  # "minmax" | "hist" during calibration
        self._error_sums: dict[str, list] | None = None  # per layer [sum of Q(W)-W's output error, count], if summed
        self._order: list[str] = []
        self._hooks = [m.register_forward_pre_hook(self._pre_hook(name)) for name, m in self._named()]

    def _named(self) -> Iterator[tuple[str, nn.Module]]:
        return ((n, layer.module) for n, layer in self._layers.items())

    @property
    def names(self) -> list[str]:
        """Layer names (PyTorch module paths) in execution order once calibrated, else in module order."""
        return list(self._order) if self._order else list(self._layers)

    def layer(self, name: str) -> FakeQuantLayer:
        return self._layers[name]

    def _pre_hook(self, name: str):
        def hook(module, args):
            x = args[0]
            if name not in self._layers:  # not called during calibration: left in FP32
                return None
            if self._observe is not None:
                self._record(name, x)
            elif name in self._acts:
                return (self._layers[name].fake_quant_input(x), *args[1:])
            return None

        return hook

    def _record(self, name: str, x: torch.Tensor) -> None:
        layer = self._layers[name]
        if name not in self._order:
            self._order.append(name)
        x = x.detach().float()
        if self._error_sums is not None:
            self._add_error(name, layer, x)
        if self._observe == "minmax":
            # One pass over the values, not two; over a channels-last tensor as the contiguous view it is (reducing
            # it as NCHW copies it first).
            dense = x.permute(0, 2, 3, 1) if x.dim() == 4 and not x.is_contiguous() else x
            lo, hi = torch.aminmax(dense)
            layer.lo, layer.hi = min(layer.lo, float(lo)), max(layer.hi, float(hi))
        else:
            lo, hi = layer.hist_range
            h = torch.histc(x, bins=HIST_BINS, min=lo, max=hi)
            layer.hist = h if layer.hist is None else layer.hist + h

    def configure(self, *, weights: Iterable[str] = (), acts: Iterable[str] = ()) -> None:
        """Quantize exactly these layers' weights and these layers' input activations; the rest run in FP32."""
        weights, acts = set(weights), set(acts)
        unknown = (weights | acts) - set(self._layers)
        if unknown:
            raise ConfigError(f"no Conv/Linear layer named {sorted(unknown)[0]!r}; layers: {', '.join(self.names[:5])}, ...")
        with torch.no_grad():
            for name, layer in self._layers.items():
                layer.module.weight.data = layer.w_q if name in weights else layer.w_fp
                layer.module.bias.data = layer.b_q if name in weights else layer.b_fp
        self._acts = acts

    def _add_error(self, name: str, layer: FakeQuantLayer, x: torch.Tensor) -> None:
        # Q(W)-W's output error summed over the batch's images and output positions, from the batch's summed input:
        # convolutions and matmuls are linear, so this is `output_shifts`' sum up to float rounding, for the cost of
        # one image instead of the batch.
        dw = layer.w_q - layer.w_fp
        if isinstance(layer.module, nn.Linear):
            rows = x.reshape(-1, x.shape[-1])
            err, count = F.linear(rows.sum(0, keepdim=True), dw), len(rows)
        else:
            err = layer.module._conv_forward(x.sum(0, keepdim=True), dw, None)
            count = len(x) * math.prod(err.shape[2:])
        total = err.sum(dim=[d for d in range(err.dim()) if d != 1], dtype=torch.float64)
        sums = self._error_sums.setdefault(name, [0.0, 0])
        sums[0], sums[1] = sums[0] + total, sums[1] + count

    def calibrate(self, batches: Iterable[torch.Tensor], *, summed_errors: bool = False) -> None:
        """Collect each layer's input range over the calibration batches (two passes for percentile ranges) and, with
        bias correction, the biases that go with the INT8 weights. `summed_errors`: measure the weights' mean output
        error (what the biases lose) on each batch's sum of images instead of image by image, equal up to float
        rounding and several times cheaper (what the fast ranking does; the full sweep measures as the backends do)."""
        batches = list(batches)
        if not batches:
            raise ConfigError("diagnose needs calibration images; none were given")
        self.configure()
        self._order = []
        shifts = None
        try:
            self._observe = "minmax"
            last = self.spec.calib == "minmax"
            shifts = self._observing_pass(batches, bias_correction=last, summed=summed_errors)
            if not last:
                for layer in self._layers.values():
                    layer.hist_range = (min(layer.lo, 0.0), max(layer.hi, 0.0) or 1e-12)
                self._observe = "hist"
                shifts = self._observing_pass(batches, bias_correction=True, summed=summed_errors)
                for name in self._order:  # a layer never called has no histogram
                    layer = self._layers[name]
                    layer.lo, layer.hi = self._percentile_range(layer)
        finally:
            self._observe = None
        for name, layer in self._layers.items():
            if name in self._order:
                layer.qparams = activation_qparams(layer.lo, layer.hi, self.spec.symmetric_activations)
        # Layers never called (dead modules) are not part of the model's computation.
        self._layers = {n: self._layers[n] for n in self._order}
        for n, shift in (shifts or {}).items():
            self._layers[n].b_q = self._layers[n].b_fp - torch.as_tensor(shift, dtype=self._layers[n].b_fp.dtype)

    def _observing_pass(self, batches: list[torch.Tensor], *, bias_correction: bool,
                        summed: bool) -> dict[str, np.ndarray] | None:
        """One FP32 pass over `batches` that observes each layer's input; with `bias_correction` (and the spec's) it is
        also the pass that measures the INT8 weights' mean output error (`output_shifts`, the bias to subtract): the
        same FP32 inputs reach every layer either way, so calibration costs one pass less."""
        if not (bias_correction and self.spec.bias_correction):
            self._run(batches)
            return None
        if summed:
            self._error_sums = {}
            try:
                self._run(batches)
                return {n: (total / count).numpy() for n, (total, count) in self._error_sums.items()}
            finally:
                self._error_sums = None
        errors = {n: layer.w_q - layer.w_fp for n, layer in self._layers.items()}
        return output_shifts(self.model, errors, batches)  # a layer never called gets no shift

    def _percentile_range(self, layer: FakeQuantLayer) -> tuple[float, float]:
        # The backends' own percentile (|x| clipped at that percentile), so the diagnosis ranks what they run.
        from int8eval.backends.ranges import histogram_range

        edges = np.linspace(*layer.hist_range, HIST_BINS + 1)
        lo, hi = histogram_range("percentile", layer.hist.double().numpy(), edges, percentile=self.spec.percentile)
        return max(lo, layer.lo), min(hi, layer.hi)  # bin edges can lie beyond the values seen

    def _run(self, batches: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for x in batches:
                self.model(x)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.model(x)


