"""Activation and weight observers int8eval adds to PyTorch's: percentile and entropy ranges from
`ranges.histogram_range` (torchao's PT2E observers and torch.ao's have no such method), for PT2E and for the legacy
torch.ao FX flow, and a per-channel weight observer with one shared scale (per-tensor weights for inductor).

Histograms here have 8192 signed bins (folded to `ranges.HIST_BINS` = 2048 bins of |x| by `histogram_range`); the
ONNX path collects 2048 bins of |x| directly and OpenVINO 4096 signed bins over NNCF's range. Each path keeps its
own count because changing one changes its ranges.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
from torch.ao.quantization.observer import UniformQuantizationObserverBase

from int8eval.backends import ranges
from int8eval.backends.ranges import histogram_range

OBSERVER_BINS = 8192  # signed bins of the percentile/entropy observers' histograms


class _HistogramRangeMixin:
    """Collects a histogram of everything it sees and takes the range from `ranges.histogram_range`.

    The histogram spans [-bound, bound] with bound a power of two, doubled as larger values arrive by merging
    neighbouring bins (exact, unlike re-binning); max|x| > bound / 2, so at least bins / 4 bins cover [0, max|x|].
    """

    def __init__(self, method: str = "percentile", percentile: float = 99.999, bins: int = OBSERVER_BINS,
                 dtype: torch.dtype = torch.quint8, qscheme=torch.per_tensor_affine, **kwargs) -> None:
        super().__init__(dtype=dtype, qscheme=qscheme, **kwargs)
        self.method = method
        self.percentile = percentile
        self.bins = bins
        self.register_buffer("histogram", torch.zeros(bins, dtype=torch.float64))
        self.register_buffer("bound", torch.tensor(0.0))
        self.register_buffer("min_val", torch.tensor(float("inf")))
        self.register_buffer("max_val", torch.tensor(float("-inf")))

    def forward(self, x_orig: torch.Tensor) -> torch.Tensor:
        x = x_orig.detach().float()
        if x.numel() == 0:
            return x_orig
        lo, hi = (float(v) for v in torch.aminmax(x))
        if not (math.isfinite(lo) and math.isfinite(hi)):  # checked on the extremes: a full pass costs 1/3 more
            x = x[torch.isfinite(x)]
            if x.numel() == 0:
                return x_orig
            lo, hi = (float(v) for v in torch.aminmax(x))
        self.min_val.fill_(min(lo, float(self.min_val)))
        self.max_val.fill_(max(hi, float(self.max_val)))
        amax, bound = max(-lo, hi), float(self.bound)
        if bound == 0.0:
            bound = 2.0 ** math.ceil(math.log2(max(amax, 2**-24)))
        while amax > bound:
            # Twice the range, same bin count: pairs of old bins become the middle half of the new histogram.
            self.histogram.copy_(torch.from_numpy(ranges.widen_histogram(self.histogram.numpy(), 2, centred=True)))
            bound *= 2.0
        self.bound.fill_(bound)
        self.histogram += torch.histc(x, self.bins, -bound, bound).double()
        return x_orig

    def calculate_qparams(self):
        if float(self.bound) == 0.0:  # never saw a value
            return torch.tensor([1.0]), torch.tensor([0])
        bound = float(self.bound)
        lo, hi = histogram_range(
            self.method,
            self.histogram.numpy(),
            np.linspace(-bound, bound, self.bins + 1),
            percentile=self.percentile,
            num_levels=self.quant_max - self.quant_min + 1,
        )
        lo, hi = max(lo, float(self.min_val)), min(hi, float(self.max_val))
        return self._calculate_qparams(torch.tensor(lo), torch.tensor(hi))

    def extra_repr(self) -> str:
        return f"method={self.method}, min_val={float(self.min_val):g}, max_val={float(self.max_val):g}"


class LegacyHistogramRangeObserver(_HistogramRangeMixin, UniformQuantizationObserverBase):
    """Percentile / entropy / mse activation observer for the legacy torch.ao FX flow."""


@functools.cache
def pt2e_histogram_observer() -> type:
    """The same observer for torchao's PT2E flow, which only accepts subclasses of its own base class
    (defined on first use so that the FP32 path never imports torchao)."""
    from torchao.quantization.pt2e import UniformQuantizationObserverBase as TorchaoBase

    class HistogramRangeObserver(_HistogramRangeMixin, TorchaoBase):
        """Percentile / entropy / mse activation observer for PT2E."""

    return HistogramRangeObserver


@functools.cache
def pt2e_shared_scale_weight_observer() -> type:
    """A per-channel weight observer whose channels all get the per-tensor scale (min/max of the whole weight)."""
    from torchao.quantization.pt2e import PerChannelMinMaxObserver

    # torchao's prepare only passes ch_axis to observers with "PerChannel" in their class name.
    class PerChannelSharedScaleObserver(PerChannelMinMaxObserver):
        def calculate_qparams(self):
            lo = torch.full_like(self.min_val, float(self.min_val.min()))
            hi = torch.full_like(self.max_val, float(self.max_val.max()))
            return self._calculate_qparams(lo, hi)

    return PerChannelSharedScaleObserver
