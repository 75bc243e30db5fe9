"""The mse threshold against a brute-force search written out here, the x log x helper on fractional counts (folded
histograms have them), and the unknown-method message."""

from __future__ import annotations

import math

import numpy as np
import pytest

from int8eval.backends import ranges


def _brute_force_mse(counts: np.ndarray, hist_max: float, levels: int, zeros: float) -> float:
    """Every bin's upper edge t: rounding error (t / levels)^2 / 12 for each value at or below t, (x - t)^2 for
    each value above it (at its bin centre); exact zeros cost nothing. The t with the smallest total."""
    n, width = len(counts), hist_max / len(counts)
    counts = counts.astype(float).copy()
    counts[0] = max(counts[0] - zeros, 0.0)
    best, best_t = math.inf, None
    for k in range(n):
        t = (k + 1) * width
        err = sum(counts[: k + 1]) * (t / levels) ** 2 / 12
        err += sum(c * ((j + 0.5) * width - t) ** 2 for j, c in enumerate(counts[k + 1 :], start=k + 1))
        if err < best:
            best, best_t = err, t
    return best_t


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("zeros", [0.0, 30.0, 1e9])
def test_mse_threshold_is_the_brute_force_minimum(seed, zeros):
    rng = np.random.default_rng(seed)
    x = np.abs(np.concatenate([rng.standard_normal(3000), rng.uniform(3, 6, 5)]))  # a sparse tail: worth clipping
    counts, _ = np.histogram(x, bins=64, range=(0, x.max()))
    counts = counts.astype(float) + 0.25  # fractional counts, as folded histograms have
    for levels in (127, 7):
        expected = _brute_force_mse(counts, float(x.max()), levels, zeros)
        assert ranges.mse_threshold(counts, float(x.max()), levels, zeros) == pytest.approx(expected, rel=1e-12)
    assert ranges.threshold("mse", counts, float(x.max()), zeros=zeros) == pytest.approx(
        _brute_force_mse(counts, float(x.max()), 127, zeros), rel=1e-12)
    coarse = ranges.threshold("mse", counts, float(x.max()), levels=7, zeros=zeros)
    assert coarse == pytest.approx(_brute_force_mse(counts, float(x.max()), 7, zeros), rel=1e-12)
    assert coarse < 0.7 * x.max()  # an inner minimum: clipped, not the last bin


def test_xlogx_of_fractions_and_zero():
    x = np.array([0.0, 0.25, 1.0, 3.0])
    np.testing.assert_allclose(ranges._xlogx(x), [0.0, 0.25 * math.log(0.25), 0.0, 3 * math.log(3)], rtol=1e-15)


def test_unknown_method_names_the_choices():
    with pytest.raises(ValueError, match=r"^unknown histogram range method 'kl'; choose one of percentile, entropy, mse$"):
        ranges.threshold("kl", np.ones(4), 1.0)
