"""AdaRound (`backends.adaround`) for OpenVINO INT8 recipes: the INT8 weights NNCF wrote are replaced by learned ones
on NNCF's own scales, before int8eval's bias correction measures them (`Recipe.adaround`).

NNCF stores each quantized weight as Constant(int8) -> Convert -> [Subtract zero point] -> Multiply(scale), the
scale per output channel (or one per tensor). For each such Convolution/GroupConvolution/MatMul whose PyTorch layer
is a Conv2d/Linear of the module the model was converted from (BatchNorm folded; `transformed_module` after channel
alignment or SmoothQuant), AdaRound chooses floor or ceil of W / scale to minimise the layer's output error over the
calibration images, and the int8 Constant is replaced by one of the same shape holding those integers; the scale
constants are left as they are. Layers it cannot handle (a zero point, other layouts, shapes that differ) keep NNCF's.

NNCF's integer range, per layer: without the overflow fix, symmetric narrow range, every channel's largest |W| maps to
127 and the integers are [-127, 127]. With the overflow fix (`openvino_backend.overflow_choice`) NNCF quantizes the
dense layers' weights "half range": 7-bit statistics, exported as 255 levels on twice the range, so the scale is
max|W| / 63.5 and its rounding (half up) leaves the integers in [-63, 64] (NNCF 3.4, read from the stored constants:
every layer's max|W| / scale is 63.5 and the ints span -63..64). There AdaRound's floor/ceil stays in [-64, 64]: what
the INT8 kernels of a CPU without VNNI add in pairs without saturating (2 x 255 x 64 = 32640 <= 32767 in int16).
NNCF leaves depthwise convolutions 8-bit even then. Each layer's range is read from its stored integers: those of a
half-range layer never exceed 64 in magnitude, those of an 8-bit one reach 127 (minmax weights: each channel's
largest weight is on the range's end).

Measured on EfficientNet-Lite0 (NNCF mse ranges, 100 calibration images, 700 evaluated, real kernels on an AVX2-only
EPYC, so 33 layers 7-bit, 16 depthwise 8-bit, the first convolution FP32): the mean relative layer output error fell
from 1.5e-4 to 6.5e-5; with bias correction the mean KL to the FP32 logits fell from 6.27e-3 to 5.30e-3 (seed 0) and
5.94e-3 to 5.03e-3 (seed 1), but top-1 agreement with FP32 did not rise (98.71% -> 98.43%, 98.14% -> 98.00%); without
bias correction (seed 0) agreement rose from 96.57% to 97.43% and KL fell from 2.05e-2 to 7.92e-3.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from int8eval.backends.base import CalibrationData

if TYPE_CHECKING:
    import openvino as ov
    from torch import nn

HALF_RANGE = (-64, 64)  # NNCF's overflow fix ("7-bit" weights): see above
FULL_RANGE = (-127, 127)  # NNCF's symmetric narrow-range INT8 weights


@dataclass
class Int8Weight:
    """NNCF's decompression subgraph of one layer's weights: the int8 Constant, the Convert reading it, and the
    scale (per output channel, or one) that the Multiply applies."""

    constant: ov.Node
    convert: ov.Node
    scale: np.ndarray

    @property
    def integers(self) -> np.ndarray:
        return self.constant.get_data()


def int8_weight(node: ov.Node) -> Int8Weight | None:
    """`node` (a layer's weight input) as NNCF's Multiply(Convert(Constant int8)[ - zero point], scale), or None when
    it is not that, or its zero point is not 0 (symmetric weights have none)."""
    import openvino as ov

    if node.get_type_name() != "Multiply":
        return None
    values, scale = (node.input_value(i).get_node() for i in (0, 1))
    if scale.get_type_name() != "Constant":
        return None
    if values.get_type_name() == "Subtract":
        zp = values.input_value(1).get_node()
        zp = zp.input_value(0).get_node() if zp.get_type_name() == "Convert" else zp
        if zp.get_type_name() != "Constant" or np.any(zp.get_data() != 0):
            return None
        values = values.input_value(0).get_node()
    if values.get_type_name() != "Convert":
        return None
    constant = values.input_value(0).get_node()
    if constant.get_type_name() != "Constant" or constant.get_element_type() != ov.Type.i8:
        return None
    return Int8Weight(constant, values, scale.get_data().astype(np.float32))


def integer_range(integers: np.ndarray) -> tuple[int, int]:
    """NNCF's integer range for a layer whose stored weights are `integers` (see the module's docstring)."""
    return HALF_RANGE if int(np.abs(integers.astype(np.int32)).max(initial=0)) <= HALF_RANGE[1] else FULL_RANGE


def learned_rounding(
    quantized: ov.Model,
    folded: nn.Module,
    calib: CalibrationData,
    module_ops: dict[str, list[ov.Node]],
    spec=None,
    memo: dict | None = None,
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """AdaRound every INT8 layer of the NNCF-quantized `quantized`, in place: `folded` is the FP32 module it was
    converted from (whose layer inputs are measured over `calib`), `module_ops` its module path -> ops in `quantized`
    (as `openvino_backend` finds them). Returns what it did (`adaround.summary`, plus the layers per integer range) for
    details["adaround"], and per layer path its weights changed, errors and range for details["adaround_layers"]."""
    import openvino as ov
    import torch

    from int8eval.backends.adaround import AdaRoundSpec, LayerGrid, round_layers, summary, supported

    spec = spec if spec is not None else AdaRoundSpec()
    start = time.perf_counter()
    modules = dict(folded.named_modules())
    grids: dict[str, LayerGrid] = {}
    weights: dict[str, Int8Weight] = {}
    for path, ops in module_ops.items():
        op, layer = ops[0], modules.get(path)
        if len(ops) != 1 or layer is None or not supported(layer):
            continue  # a module called more than once has no single input
        if op.get_type_name() == "MatMul" and not op.get_transpose_b():
            continue  # weights stored [in, out]: not the layer's layout
        weight = int8_weight(op.input_value(1).get_node())
        if weight is None or weight.integers.size != layer.weight.numel():
            continue
        if weight.scale.size not in (1, layer.weight.shape[0]):
            continue
        w = layer.weight.detach().float()
        nearest = torch.from_numpy(weight.integers.astype(np.int64).reshape(w.shape))
        qmin, qmax = integer_range(weight.integers)
        grids[path] = LayerGrid(w, torch.from_numpy(weight.scale.reshape(-1).copy()), qmin, qmax, nearest)
        weights[path] = weight
    # `memo` (a BuildContext's, only for the one converted module: its layers' FP32 inputs are the same for every
    # recipe) keeps each layer's rounding by its grid: the recipes of a tune ladder that differ in other layers
    # (FP32 layers kept, ...) reuse it instead of learning it again.
    keys = {p: (p, g.weight.numpy().tobytes(), g.scale.numpy().tobytes(), g.qmin, g.qmax, g.nearest.numpy().tobytes(),
                id(calib), spec) for p, g in grids.items()} if memo is not None else {}
    known = {p: memo[k] for p, k in keys.items() if k in memo}
    todo = {p: g for p, g in grids.items() if p not in known}
    learned = round_layers(folded, todo, calib, spec) if todo else {}
    roundings = {p: r for p in grids if (r := known.get(p) or learned.get(p)) is not None}
    if memo is not None:
        memo.update({keys[p]: r for p, r in roundings.items()})
    for path, rounding in roundings.items():
        old = weights[path]
        integers = rounding.integers.numpy().reshape(old.integers.shape)
        qmin, qmax = grids[path].qmin, grids[path].qmax
        if integers.min() < qmin or integers.max() > qmax:
            raise ValueError(f"AdaRound: {path!r} left NNCF's integer range [{qmin}, {qmax}]")
        new = ov.op.Constant(integers.astype(np.int8))
        new.set_friendly_name(old.constant.get_friendly_name())
        old.convert.input(0).replace_source_output(new.output(0))
    details = summary(roundings, spec, time.perf_counter() - start)
    ranges = [(grids[p].qmin, grids[p].qmax) for p in roundings]
    details["integer_ranges"] = {f"[{lo}, {hi}]": ranges.count((lo, hi)) for lo, hi in sorted(set(ranges))}
    layers = {
        path: {"weights_changed": r.changed, "relative_output_mse_nearest": r.error_nearest,
               "relative_output_mse_adaround": r.error_learned, "integer_range": [grids[path].qmin, grids[path].qmax]}
        for path, r in roundings.items()
    }
    return details, layers
