"""Calibration ranges from histograms (int8eval.backends.ranges) on small, known distributions."""

from __future__ import annotations

import numpy as np
import pytest

from int8eval.backends.ranges import entropy_range, histogram_range, mse_range, percentile_range


def _hist(values: np.ndarray, bins: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    bound = float(np.abs(values).max())
    return np.histogram(values, bins=bins, range=(-bound, bound))


@pytest.fixture(scope="module")
def normal_with_outliers() -> np.ndarray:
    rng = np.random.default_rng(0)
    return np.concatenate([rng.standard_normal(200_000), [40.0, -35.0, 60.0]])


def test_percentile_of_uniform():
    counts, edges = np.histogram(np.linspace(0.0, 1.0, 100_001), bins=1000, range=(0.0, 1.0))
    lo, hi = percentile_range(counts, edges, 99.0)
    assert lo == pytest.approx(0.01, abs=1e-3)
    assert hi == pytest.approx(0.99, abs=1e-3)


def test_percentile_of_normal_clips_each_tail(normal_with_outliers):
    lo, hi = percentile_range(*_hist(normal_with_outliers), 99.9)
    # 0.1% in each tail of N(0, 1) lies beyond 3.09.
    assert lo == pytest.approx(-3.09, abs=0.1)
    assert hi == pytest.approx(3.09, abs=0.1)


def test_percentile_100_keeps_everything(normal_with_outliers):
    lo, hi = percentile_range(*_hist(normal_with_outliers), 100.0)
    assert lo == pytest.approx(-35.0, abs=0.1) and hi == pytest.approx(60.0, abs=0.1)


def test_entropy_clips_outliers_but_keeps_the_bulk(normal_with_outliers):
    lo, hi = entropy_range(*_hist(normal_with_outliers))
    assert -20.0 < lo < -2.5
    assert 2.5 < hi < 20.0


def test_mse_trades_clipping_for_resolution(normal_with_outliers):
    lo, hi = mse_range(*_hist(normal_with_outliers))
    # Squared error weighs the three far outliers heavily, so MSE clips them only part way (unlike entropy).
    assert -35.0 < lo < -3.0
    assert 3.0 < hi < 0.9 * 60.0


@pytest.mark.parametrize("method", [entropy_range, mse_range])
def test_one_sided_distribution_stays_one_sided(method):
    rng = np.random.default_rng(1)
    relu = np.maximum(rng.standard_normal(100_000), 0.0)
    lo, hi = method(*np.histogram(relu, bins=2048, range=(0.0, float(relu.max()))))
    assert lo >= 0.0
    assert 2.0 < hi <= relu.max() + 1e-6


def test_mse_keeps_the_full_range_of_a_uniform_distribution():
    counts, edges = np.histogram(np.linspace(-1.0, 1.0, 10_001), bins=1000, range=(-1.0, 1.0))
    lo, hi = mse_range(counts, edges)
    assert lo == pytest.approx(-1.0, abs=0.02) and hi == pytest.approx(1.0, abs=0.02)


@pytest.mark.parametrize("method", ["percentile", "entropy", "mse"])
def test_empty_histogram_gives_an_empty_range(method):
    assert histogram_range(method, np.zeros(16), np.linspace(-1.0, 1.0, 17)) == (0.0, 0.0)


def test_unknown_method_is_named():
    with pytest.raises(ValueError, match="kl"):
        histogram_range("kl", np.ones(4), np.linspace(0.0, 1.0, 5))


def test_entropy_is_not_fooled_by_the_zero_spike_of_relu6():
    # Half the values exactly 0 and a spike at the cap: the KL search once picked its smallest threshold here.
    rng = np.random.default_rng(2)
    relu6 = np.clip(2.0 * rng.standard_normal(200_000), 0.0, 6.0)
    counts, edges = np.histogram(relu6, bins=2048, range=(-8.0, 8.0))
    lo, hi = entropy_range(counts, edges, num_levels=128)
    assert lo == 0.0
    assert hi > 4.0
