"""Empirical bias correction of quantized weights (Nagel et al. 2019, "Data-Free Quantization", section 4.2; NNCF's
FastBiasCorrection does the same for OpenVINO).

Rounding a layer's weights W to Q(W) shifts the mean of each output channel by E[(Q(W) - W) * x]. The shift is
measured here over the calibration images, with the FP32 inputs the model gives the layer, and subtracted from the
layer's bias, so the INT8 layer is right on average. Measured on EfficientNet-Lite0 (per-channel INT8 weights only,
100 calibration images, 300 other images): the mean KL divergence to the FP32 logits fell from 0.0046 to 0.0010.

The correction must use exactly the Q(W) the backend will run, so each backend supplies its own weight errors:
PT2E from its weight observer, the ONNX Q/DQ path from the INT8 weights ONNX Runtime wrote.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from int8eval.backends.base import CalibrationData


def output_shifts(
    module: nn.Module, weight_errors: Mapping[str, torch.Tensor], calib: CalibrationData | Iterable
) -> dict[str, np.ndarray]:
    """Per layer of `weight_errors` (module path -> Q(W) - W, shaped like the layer's weight), the mean over the
    calibration images (CalibrationData, or any iterable of image batches) and output positions of the error that it adds to each output channel: what the layer's
    bias must lose. Layers run on the inputs `module` (FP32) gives them; only Conv2d and Linear are supported."""
    modules = dict(module.named_modules())
    sums: dict[str, torch.Tensor] = {}
    counts = dict.fromkeys(weight_errors, 0)

    def hook(name: str):
        def record(layer, args, _out):
            x, dw = args[0], weight_errors[name].to(args[0].dtype)
            if isinstance(layer, nn.Conv2d):
                err = F.conv2d(x, dw, None, layer.stride, layer.padding, layer.dilation, layer.groups)
            else:
                err = F.linear(x, dw)
            err = err.movedim(1, -1) if isinstance(layer, nn.Conv2d) else err
            err = err.reshape(-1, err.shape[-1])
            sums[name] = sums.get(name, 0) + err.sum(0, dtype=torch.float64)
            counts[name] += err.shape[0]

        return record

    for name in weight_errors:
        if not isinstance(modules.get(name), (nn.Conv2d, nn.Linear)):
            raise ValueError(f"bias correction: {name!r} is not a Conv2d or Linear layer of the model")
    calibration_pass(module, {name: hook(name) for name in weight_errors}, calib)
    return {name: (sums[name] / counts[name]).numpy() for name in sums}


def calibration_pass(module: nn.Module, hooks: Mapping[str, object], calib: CalibrationData | Iterable) -> None:
    """Run the FP32 `module` over the calibration image batches with each forward hook of `hooks` (module path ->
    hook) on its layer, and take the hooks off again whatever happens."""
    modules = dict(module.named_modules())
    handles = [modules[name].register_forward_hook(h) for name, h in hooks.items()]
    try:
        with torch.no_grad():
            for batch in calib:
                module(torch.as_tensor(batch, dtype=torch.float32))
    finally:
        for h in handles:
            h.remove()


def subtract_from_biases(module: nn.Module, shifts: Mapping[str, np.ndarray]) -> None:
    """b <- b - shift for each named Conv2d/Linear of `module` (in place; a layer without a bias gets one)."""
    modules = dict(module.named_modules())
    with torch.no_grad():
        for name, shift in shifts.items():
            layer = modules[name]
            delta = torch.as_tensor(shift, dtype=layer.weight.dtype)
            if layer.bias is None:
                layer.bias = nn.Parameter(-delta, requires_grad=False)
            else:
                layer.bias -= delta
