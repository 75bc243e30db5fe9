"""NNCF's float algorithms for OpenVINO INT8 recipes: SmoothQuant (`Recipe.smooth_quant`) and channel alignment
(`Recipe.channel_alignment`), the only cross-layer equalization and SmoothQuant among int8eval's backends.

- Channel alignment (NNCF's ChannelAlignment, OpenVINO models only): for each Conv/MatMul -> 1x1 Conv pair with at
  most a bias Add between (no activation, the first output read by nothing else), it centres the first layer's
  outputs on zero and rescales its output channels to similar ranges, compensated in the second layer. Models whose
  convolutions are all followed by an activation (ResNet, the tiny test model) have no such pair: it changes nothing.
  In MobileNetV2/EfficientNet the linear bottleneck's projection -> the next block's expansion is one.
- SmoothQuant (NNCF's SmoothQuant on MatMul inputs): divides each MatMul input channel by a scale and multiplies the
  weights by it (alpha moves quantization difficulty from activations to weights). NNCF runs it only with
  model_type=TRANSFORMER, whose quantization patterns then apply too; it is meant for LayerNorm/attention models.

Other backends offer neither without extra packages: PT2E (torchao) has no equalization step (torchao's SmoothQuant
is a prototype for its own `quantize_` Linear flow), ONNX Runtime has no cross-layer equalization and its
`extra_options["SmoothQuant"]` needs neural-compressor 2.x's ONNX adaptor (3.x, on PyPI now, dropped it).

They run through NNCF's own Pipeline before quantization, as `nncf.quantize` would run them, but apart from it, so
that int8eval's percentile/entropy ranges and bias correction measure the model they changed (`transformed_module`).
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import numpy as np

from int8eval.config import Recipe

if TYPE_CHECKING:
    import openvino as ov
    from torch import nn

SMOOTH_QUANT_SUFFIX = "/nncf_smooth_quant"  # the name NNCF gives each Multiply SmoothQuant inserts
_WEIGHTED = ("Convolution", "GroupConvolution", "MatMul")


def asks_for(recipe: Recipe) -> bool:
    return recipe.channel_alignment or recipe.smooth_quant is not None


def align_and_smooth(ov_model: ov.Model, recipe: Recipe, images: list[np.ndarray]) -> tuple[ov.Model, dict[str, Any]]:
    """NNCF's SmoothQuant then channel alignment as `recipe` asks, on the FP32 `ov_model` (left unchanged) with
    statistics of `images`: the changed FP32 model, and what each algorithm changed (for details["nncf"])."""
    if not asks_for(recipe):
        return ov_model, {}
    import nncf
    from nncf.quantization.algorithms.pipeline import Pipeline
    from nncf.quantization.algorithms.smooth_quant.algorithm import SmoothQuant

    steps: list[list[Any]] = []
    if recipe.smooth_quant is not None:
        steps.append([SmoothQuant(len(images), alpha_map={"convolution": -1, "matmul": recipe.smooth_quant})])
    if recipe.channel_alignment:
        steps.append([_channel_alignment(len(images))])
    before = layer_biases(ov_model)
    changed = Pipeline(steps).run(ov_model.clone(), nncf.Dataset(images))
    summary: dict[str, Any] = {}
    if recipe.smooth_quant is not None:
        n = sum(op.get_friendly_name().endswith(SMOOTH_QUANT_SUFFIX) for op in changed.get_ordered_ops())
        summary["model_type"] = "transformer"
        summary["smooth_quant"] = (f"alpha {recipe.smooth_quant:g}: {n} MatMul input(s) smoothed" if n else
                                   f"alpha {recipe.smooth_quant:g}: no MatMul with weights to smooth, nothing changed")
    if recipe.channel_alignment:
        after = layer_biases(changed)
        moved = [name for name, b in after.items() if name not in before or not np.array_equal(before[name], b)]
        summary["channel_alignment"] = (
            f"{len(moved)} layers changed (biases shifted, weights rescaled)" if moved else
            "no Conv/MatMul -> 1x1 Conv pair without an activation between: nothing changed")
    return changed, summary


def _channel_alignment(subset_size: int):
    """NNCF's ChannelAlignment, handed its statistics as the numpy arrays its `apply` computes with: NNCF 3.4.0
    collects them as nncf Tensors, and `apply` then fails on the first pair (KeyError: <class 'numpy.float32'> in
    `Tensor.astype(np.float32)`), in `nncf.quantize(..., disable_channel_alignment=False)` too."""
    from nncf.common.tensor_statistics.statistics import MinMaxTensorStatistic
    from nncf.quantization.algorithms.channel_alignment.algorithm import ChannelAlignment

    class NumpyStatistics(ChannelAlignment):
        def apply(self, model, graph, statistic_points=None, dataset=None):
            for points in statistic_points.values():
                for collector in (c for p in points for cs in p.algorithm_to_tensor_collectors.values() for c in cs):
                    stat = collector.get_statistics()
                    if isinstance(stat, MinMaxTensorStatistic) and stat.min_values is not None \
                            and stat.max_values is not None and hasattr(stat.min_values, "data"):
                        as_numpy = MinMaxTensorStatistic(np.asarray(stat.min_values.data),
                                                         np.asarray(stat.max_values.data))
                        collector.get_statistics = lambda s=as_numpy: s
            return super().apply(model, graph, statistic_points, dataset)

    return NumpyStatistics(subset_size)


def alignable_pairs(ov_model: ov.Model) -> int:
    """How many layer pairs NNCF's channel alignment would change in the FP32 `ov_model` (as `align_and_smooth` finds
    them; a pair whose statistics turn out empty is still counted)."""
    from nncf.common.factory import build_graph
    from nncf.quantization.algorithms.channel_alignment.algorithm import ChannelAlignment

    points = ChannelAlignment().get_statistic_points(ov_model, build_graph(ov_model))
    return sum(len(v) for v in points.values())


def _bias_constant(op: ov.Node) -> ov.Node | None:
    users = [t.get_node() for t in op.output(0).get_target_inputs()]
    if len(users) == 1 and users[0].get_type_name() == "Add":
        const = users[0].input_value(1).get_node()
        if const.get_type_name() == "Constant":
            return const
    return None


def layer_biases(ov_model: ov.Model) -> dict[str, np.ndarray]:
    """Op name -> the bias (the constant of the one Add after it) of each Convolution/GroupConvolution/MatMul."""
    out = {}
    for op in ov_model.get_ordered_ops():
        if op.get_type_name() in _WEIGHTED and (const := _bias_constant(op)) is not None:
            out[op.get_friendly_name()] = const.get_data().copy()
    return out


def transformed_module(folded: nn.Module, fp32: ov.Model, module_ops: dict[str, list[ov.Node]]) -> nn.Module:
    """A copy of `folded` (the PyTorch module `fp32` was converted from) with the weights and biases of `fp32` after
    `align_and_smooth`, and SmoothQuant's input scales as forward pre-hooks: the FP32 model whose layer inputs
    int8eval's bias correction must measure. `module_ops`: module path -> its ops in `fp32`."""
    import torch
    from torch import nn

    module = copy.deepcopy(folded)
    layers = dict(module.named_modules())
    with torch.no_grad():
        for path, ops in module_ops.items():
            op, layer = ops[0], layers.get(path)
            if not isinstance(layer, (nn.Conv2d, nn.Linear)) or len(ops) != 1:
                continue
            if op.get_type_name() == "MatMul" and not op.get_transpose_b():
                continue  # weights stored [in, out]: not the layer's layout
            weight = op.input_value(1).get_node()
            if weight.get_type_name() == "Constant" and weight.get_data().size == layer.weight.numel():
                layer.weight.copy_(torch.from_numpy(weight.get_data().reshape(layer.weight.shape).copy()))
            bias = _bias_constant(op)
            if bias is not None and bias.get_data().size == layer.weight.shape[0]:
                value = torch.from_numpy(bias.get_data().reshape(-1).copy())
                if layer.bias is None:  # channel alignment gave the layer a bias
                    layer.bias = nn.Parameter(value, requires_grad=False)
                else:
                    layer.bias.copy_(value)
            source = op.input_value(0).get_node()
            if source.get_type_name() == "Multiply" and source.get_friendly_name().endswith(SMOOTH_QUANT_SUFFIX):
                scale = torch.from_numpy(source.input_value(1).get_node().get_data().copy())
                layer.register_forward_pre_hook(lambda _m, args, s=scale: (args[0] * s, *args[1:]))
    return module
