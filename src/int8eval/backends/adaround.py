"""AdaRound: learned weight rounding (Nagel et al. 2020, "Up or Down? Adaptive Rounding for Post-Training
Quantization").

Round-to-nearest makes each weight as close as it can be, but not each layer's output. AdaRound keeps the backend's
scale s and learns, per weight, whether to round W/s down or up, minimising the layer's output error
E||(W~ - W) x||^2 over the calibration images (x: the FP32 input the model gives the layer) plus a regulariser that
drives each soft choice h(V) in [0, 1] to 0 or 1 (the paper's rectified sigmoid, zeta 1.1 and gamma -0.1, lambda
0.01, beta annealed from 20 to 2 after a warm-up).

That error is, per output channel, dW H dW^T with H = E[p p^T] the Gram matrix of the input patches p the channel
reads. H is collected in one pass over the calibration images with every output position, then factored H = L L^T
(its eigenvectors; numerically zero ones dropped), so each optimisation step costs one [out, K] x [K, rank] product
however many images and positions there are, and is exact, not a mini-batch estimate.

A layer whose learned rounding ends with a larger output error than the backend's keeps the backend's.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from int8eval.backends.base import CalibrationData
from int8eval.backends.bias_correction import calibration_pass

# The rectified sigmoid's stretch (the paper's zeta and gamma): h(V) reaches exactly 0 and 1.
ZETA, GAMMA = 1.1, -0.1
_PATCH_VALUES = 1 << 22  # input patch values unfolded at once while the Gram matrices are collected (16 MB)


@dataclass(frozen=True)
class AdaRoundSpec:
    """How AdaRound optimises each layer (the paper's and AIMET's settings, with fewer iterations and a larger step:
    each step here sees every calibration position, not a mini-batch).

    On EfficientNet-Lite0 (100 calibration images, 2 cores) 300 iterations took ~50 s for its 50 layers and brought
    the mean relative output error from 5.8e-5 to 1.9e-5; 500 iterations (~80 s) only to 1.8e-5."""

    iterations: int = 300
    lr: float = 1e-2  # Adam on V
    reg: float = 0.01  # lambda: weight of the rounding regulariser
    beta: tuple[float, float] = (20.0, 2.0)  # annealed from the first to the second after the warm-up
    warm_up: float = 0.2  # fraction of the iterations without the regulariser

    def __post_init__(self) -> None:
        if self.iterations < 1 or self.lr <= 0 or self.reg < 0 or not 0 <= self.warm_up < 1:
            raise ValueError(f"AdaRoundSpec needs iterations >= 1, lr > 0, reg >= 0 and 0 <= warm_up < 1: {self}")


@dataclass(frozen=True)
class LayerGrid:
    """One layer's quantization grid, as the backend chose it: integers = clip(round(W / scale), qmin, qmax)."""

    weight: torch.Tensor  # FP32 weights the backend quantized (e.g. with BatchNorm folded), shaped like the layer's
    scale: torch.Tensor  # one per output channel, or a single value
    qmin: int
    qmax: int
    nearest: torch.Tensor | None = None  # the backend's own integers; None: round half to even, clipped


@dataclass(frozen=True)
class LayerRounding:
    """What AdaRound chose for one layer: the integers, and the layer's relative output error
    E||dW x||^2 / E||W x||^2 (bias left out) with the backend's rounding and with these integers."""

    integers: torch.Tensor  # int64, shaped like the weight
    changed: int  # weights rounded the other way than the backend's
    error_nearest: float
    error_learned: float
    kept_nearest: bool  # the learned rounding was worse: the backend's is kept


def _rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    return (torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA).clamp(0, 1)


def _patches(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The inputs each output value of `layer` reads, [images, groups, K, positions], K ordered as the weight's
    flattened in-channels x kernel (so a group's output is its weights [out/groups, K] times a patch)."""
    if isinstance(layer, nn.Linear):
        return x.reshape(-1, 1, x.shape[-1], 1)
    (kh, kw), (sh, sw) = layer.kernel_size, layer.stride
    if layer.dilation != (1, 1):
        cols = F.unfold(x, layer.kernel_size, layer.dilation, layer.padding, layer.stride)
    else:  # a strided view of the padded input, copied once (F.unfold is slower on the CPU)
        ph, pw = layer.padding
        view = F.pad(x, (pw, pw, ph, ph)) if (ph, pw) != (0, 0) else x
        view = view.unfold(2, kh, sh).unfold(3, kw, sw)  # [images, C, out H, out W, kh, kw]
        cols = view.permute(0, 1, 4, 5, 2, 3).reshape(x.shape[0], x.shape[1] * kh * kw, -1)
    return cols.reshape(x.shape[0], layer.groups, -1, cols.shape[-1])


def _gram_sum(p: torch.Tensor) -> torch.Tensor:
    """Sum over images and positions of p p^T, float64 [groups, K, K], for patches p [images, groups, K, positions]."""
    images, groups, k, positions = p.shape
    if k <= positions:  # e.g. depthwise: one small product per image and group, no copy of the patches
        flat = p.reshape(images * groups, k, positions)
        return torch.bmm(flat, flat.transpose(1, 2)).view(images, groups, k, k).sum(0).double()
    flat = p.permute(1, 2, 0, 3).reshape(groups, k, images * positions)  # e.g. Linear: one product over images
    return torch.bmm(flat, flat.transpose(1, 2)).double()


def supported(layer: nn.Module) -> bool:
    """Whether `layer` can be rounded here: Linear, or Conv2d with numeric zero padding."""
    if isinstance(layer, nn.Linear):
        return True
    return isinstance(layer, nn.Conv2d) and layer.padding_mode == "zeros" and not isinstance(layer.padding, str)


def input_grams(module: nn.Module, layers: Iterable[str], calib: CalibrationData | Iterable) -> dict[str, torch.Tensor]:
    """Per Conv2d/Linear layer path of `module`, the Gram matrix E[p p^T] (float64 [groups, K, K]) of its input
    patches over the calibration images (CalibrationData, or any iterable of image batches) and every output
    position, the inputs being those the FP32 `module` gives the layer."""
    modules = dict(module.named_modules())
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name: str):
        def record(layer, args, _out):
            x = args[0].detach().float()
            per_image = max(1, x[:1].numel() * math.prod(getattr(layer, "kernel_size", (1,))))
            for chunk in x.split(max(1, _PATCH_VALUES // per_image)):
                p = _patches(layer, chunk)
                gram = _gram_sum(p)
                sums[name] = sums[name] + gram if name in sums else gram
                counts[name] = counts.get(name, 0) + p.shape[0] * p.shape[3]

        return record

    layers = list(layers)
    for name in layers:
        if not supported(modules.get(name)):
            raise ValueError(f"AdaRound: {name!r} is not a Linear or zero-padded Conv2d layer of the model")
    calibration_pass(module, {name: hook(name) for name in layers}, calib)
    return {name: sums[name] / counts[name] for name in sums}


def gram_factor(gram: torch.Tensor, rtol: float = 1e-6) -> torch.Tensor:
    """L (float32 [groups, K, rank]) with L L^T = `gram` ([groups, K, K]), dropping eigenvalues below `rtol` times
    the largest (float32 noise: the rank is at most the number of positions the Gram matrix was collected over)."""
    eigenvalues, vectors = torch.linalg.eigh(gram)
    eigenvalues = eigenvalues.clamp(min=0)
    top = eigenvalues.amax(dim=1, keepdim=True)
    rank = max(1, int((eigenvalues > rtol * top).sum(dim=1).max()))
    # eigh sorts ascending: the last `rank` columns hold the kept directions.
    return (vectors[..., -rank:] * eigenvalues[:, None, -rank:].sqrt()).float()


def round_layer(grid: LayerGrid, factor: torch.Tensor, spec: AdaRoundSpec = AdaRoundSpec()) -> LayerRounding:
    """AdaRound one layer: `grid` the backend's weights and scale, `factor` from `gram_factor` (its groups split the
    output channels in order, as a grouped convolution does).

    Example:
        >>> grams = input_grams(model, ["conv"], calib)
        >>> rounding = round_layer(LayerGrid(w, scale, -127, 127), gram_factor(grams["conv"]))
    """
    groups, k = factor.shape[0], factor.shape[1]
    shape = grid.weight.shape
    w = grid.weight.detach().float().reshape(groups, -1, k)
    if w.shape[1] * groups != shape[0]:
        raise ValueError(f"AdaRound: weights {tuple(shape)} do not match {groups} group(s) of {k} inputs")
    scale = grid.scale.detach().float().reshape(-1)
    scale = (scale if scale.numel() > 1 else scale.expand(shape[0])).reshape(groups, -1, 1)
    ws = w / scale
    floor = ws.floor()
    if grid.nearest is None:
        nearest = ws.round().clamp(grid.qmin, grid.qmax)
    else:
        nearest = grid.nearest.detach().float().reshape(w.shape)

    def error(q: torch.Tensor) -> torch.Tensor:  # E||dW x||^2 summed over output channels
        return ((q - ws) * scale @ factor).square().sum()

    with torch.no_grad():
        reference = (w @ factor).square().sum().clamp(min=1e-30)
    # V starts where h(V) is the fractional part: the soft weights start at W.
    p = ((ws - floor - GAMMA) / (ZETA - GAMMA)).clamp(1e-4, 1 - 1e-4)
    v = torch.logit(p).requires_grad_()
    optimizer = torch.optim.Adam([v], lr=spec.lr)
    warm = int(spec.warm_up * spec.iterations)
    for step in range(spec.iterations):
        h = _rectified_sigmoid(v)
        loss = error((floor + h).clamp(grid.qmin, grid.qmax))
        if step >= warm:
            progress = (step - warm) / max(1, spec.iterations - warm)
            beta = spec.beta[1] + (spec.beta[0] - spec.beta[1]) * (1 - progress)
            loss = loss + spec.reg * (1 - (2 * h - 1).abs().pow(beta)).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        learned = (floor + (_rectified_sigmoid(v) >= 0.5)).clamp(grid.qmin, grid.qmax)
        before, after = float(error(nearest) / reference), float(error(learned) / reference)
    keep = after > before
    chosen = nearest if keep else learned
    return LayerRounding(
        integers=chosen.round().long().reshape(shape),
        changed=int((chosen != nearest).sum()),
        error_nearest=before,
        error_learned=min(before, after),
        kept_nearest=keep,
    )


def round_layers(
    module: nn.Module,
    grids: Mapping[str, LayerGrid],
    calib: CalibrationData | Iterable,
    spec: AdaRoundSpec = AdaRoundSpec(),
) -> dict[str, LayerRounding]:
    """AdaRound each layer of `grids` (module path of a Conv2d/Linear of `module` -> the backend's weights and
    scale), on the inputs the FP32 `module` gives it over the calibration images."""
    modules = dict(module.named_modules())
    for name, grid in grids.items():
        layer = modules.get(name)
        if not isinstance(layer, (nn.Conv2d, nn.Linear)) or tuple(layer.weight.shape) != tuple(grid.weight.shape):
            shape = tuple(grid.weight.shape)
            raise ValueError(f"AdaRound: {name!r} is not a Conv2d/Linear of the model with weights {shape}")
    grams = input_grams(module, grids, calib)
    return {name: round_layer(grids[name], gram_factor(grams.pop(name)), spec) for name in list(grams)}


def summary(roundings: Mapping[str, LayerRounding], spec: AdaRoundSpec, seconds: float) -> dict:
    """What AdaRound did, for a variant's details: layers, weights changed, and the mean relative output error."""
    total = sum(r.integers.numel() for r in roundings.values())
    changed = sum(r.changed for r in roundings.values())

    def mean(values) -> float:
        values = list(values)
        return float(np.mean(values)) if values else 0.0

    return {
        "layers": len(roundings),
        "layers_changed": sum(r.changed > 0 for r in roundings.values()),
        "layers_kept_nearest": sum(r.kept_nearest for r in roundings.values()),
        "weights_changed": changed,
        "weights_changed_fraction": changed / total if total else 0.0,
        "iterations": spec.iterations,
        # E||dW x||^2 / E||W x||^2 per layer (bias left out), averaged over the layers
        "mean_relative_output_mse_nearest": mean(r.error_nearest for r in roundings.values()),
        "mean_relative_output_mse_adaround": mean(r.error_learned for r in roundings.values()),
        "seconds": seconds,
    }

