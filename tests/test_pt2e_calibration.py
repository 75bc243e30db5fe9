"""PT2E INT8 as built, read from the converted graph: each calibration method reaches the graph (percentile,
entropy and mse clip what minmax spends on outliers), calibration sees every batch, weights are 8-bit on the full
signed range, and BF16 really runs in BF16. Expected values are computed here from the calibration arrays."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from int8eval.config import Recipe
from conftest import require_package, two_batch_outliers

require_package("torchao", extra="pt2e")

from int8eval.backends import torch_backend as tb  # noqa: E402


CALIB = two_batch_outliers()
METHODS = {
    "minmax": {"calib": "minmax"},
    "percentile": {"calib": "percentile", "percentile": 99.99},
    "entropy": {"calib": "entropy"},
    "mse": {"calib": "mse"},
}


def _input_quantizer(variant) -> tuple[float, int, int, int]:
    """(scale, zero point, quant_min, quant_max) of the model input's quantize op: the first in the graph."""
    quant = torch.ops.quantized_decomposed.quantize_per_tensor.default
    node = next(n for n in variant.module.graph.nodes if n.target is quant)
    scale, zero_point, qmin, qmax = node.args[1:5]
    return float(scale), int(zero_point), int(qmin), int(qmax)


@pytest.fixture(scope="module")
def built(tiny, tmp_path_factory) -> dict:
    out = {}
    for name, options in METHODS.items():
        recipe = Recipe(backend="torch", **options)
        out[name] = tb.build(tiny, recipe, CALIB, tmp_path_factory.mktemp(name), compile=False)
    return out


def test_details_name_the_code_that_set_the_ranges(built):
    phrases = {name: v.details["calibration"] for name, v in built.items()}
    assert phrases["minmax"] == "torchao MinMaxObserver"
    assert phrases["mse"].startswith("torchao HistogramObserver")  # torchao's own L2 search, not int8eval's mse
    assert phrases["percentile"].startswith("int8eval ranges.percentile_threshold (99.99%)")
    assert phrases["entropy"].startswith("int8eval ranges.entropy_threshold")
    assert all("8192-bin" in phrases[m] for m in ("percentile", "entropy"))


def test_minmax_range_covers_every_calibration_batch(built):
    scale, zero_point, qmin, qmax = _input_quantizer(built["minmax"])
    x = np.concatenate(CALIB.batches)
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    assert (lo, hi) == (-30.0, 60.0)
    # uint8 affine: the range [lo, hi] spread over the integer range the CPU's kernels take (7 or 8 bits)
    assert qmin == 0 and qmax in (127, 255)
    assert scale == pytest.approx((hi - lo) / (qmax - qmin), rel=1e-5)
    assert zero_point == round(-lo / scale)
    # From one batch only: [min(a), 60] or [-30, max(b)], at most 64 / 90 of the full range.
    for batch in CALIB.batches:
        assert (max(batch.max(), 0) - min(batch.min(), 0)) / (qmax - qmin) < 0.75 * scale


@pytest.mark.parametrize("method", ["percentile", "entropy"])
def test_each_method_clips_the_outliers_minmax_keeps(built, method):
    scale, *_ = _input_quantizer(built[method])
    minmax, *_ = _input_quantizer(built["minmax"])
    # The Gaussian bulk spans about +-4.5: a clipping method needs a quarter of minmax's step or less.
    assert scale < minmax / 4, (method, scale, minmax)
    assert built[method].name == Recipe(backend="torch", **METHODS[method]).name


def test_methods_give_different_ranges(built):
    """mse (torchao's HistogramObserver) keeps these two outliers: its search shrinks the range bin by bin from
    the ends and stops at the first rise in error, which the empty bins next to an isolated outlier give (measured
    0.7083 against minmax's 0.7087). It still searched: a range other than minmax's, and not on minmax's grid."""
    scales = {m: _input_quantizer(v)[0] for m, v in built.items()}
    assert len({round(s, 7) for s in scales.values()}) == len(scales), scales
    assert abs(scales["mse"] - scales["minmax"]) > 1e-5 * scales["minmax"], scales


def test_weights_are_8_bit_on_the_full_signed_range(built):
    gm = built["minmax"].module
    dequant = torch.ops.quantized_decomposed.dequantize_per_channel.default
    seen = 0
    for node in gm.graph.nodes:
        if node.target is dequant:
            weight = getattr(gm, node.args[0].target)
            qmin, qmax, dtype = node.args[4:7]
            assert (qmin, qmax, dtype) == (-128, 127, torch.int8), node.name
            assert weight.dtype == torch.int8
            # Symmetric per-channel min/max: a channel's largest |w| lands on the end of the range, except in channels
            # so small that the observer's smallest scale (2^-12) takes over. 4-bit weights would top out at 8.
            per_channel = weight.reshape(len(weight), -1).abs().amax(dim=1).float()
            assert per_channel.max() >= 127 and per_channel.median() >= 120, (node.name, per_channel)
            seen += 1
    assert seen == 4  # three convolutions and the classifier


def test_bf16_runs_in_bf16(tiny, tmp_path):
    """Autocast BF16 (emulated where the CPU has no BF16 instructions) against FP32: further apart than FP32
    reordering (~1e-6 relative) and within BF16's 8-bit mantissa (2^-8 = 0.4% per rounding; measured 0.4% of the
    largest logit on the tiny model)."""
    from int8eval.config import Precision

    x = np.random.default_rng(3).standard_normal((16, 3, 32, 32)).astype(np.float32)
    fp32 = tb.build(tiny, Recipe(backend="torch", precision=Precision.fp32), None, tmp_path / "fp32").predict(x)
    bf16 = tb.build(tiny, Recipe(backend="torch", precision=Precision.bf16), None, tmp_path / "bf16").predict(x)
    assert bf16.dtype == np.float32
    error = np.abs(bf16 - fp32).max() / np.abs(fp32).max()
    assert 1e-4 < error < 0.05, error

