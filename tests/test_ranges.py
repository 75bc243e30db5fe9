"""Calibration thresholds and ranges (int8eval.backends.ranges) against independent references: numpy's
percentile, the KL and squared-error definitions written out, and small known distributions."""

from __future__ import annotations

import numpy as np
import pytest

from int8eval.backends import ranges
from int8eval.backends.ranges import HIST_BINS, histogram_range


def _hist(values: np.ndarray, bins: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    bound = float(np.abs(values).max())
    return np.histogram(values, bins=bins, range=(-bound, bound))


def _abs_hist(values: np.ndarray, bins: int = HIST_BINS) -> tuple[np.ndarray, float]:
    amax = float(np.abs(values).max())
    return np.histogram(np.abs(values), bins=bins, range=(0.0, amax))[0], amax


@pytest.fixture(scope="module")
def normal_with_outliers() -> np.ndarray:
    rng = np.random.default_rng(0)
    return np.concatenate([rng.standard_normal(200_000), [40.0, -35.0, 60.0]])


# --- thresholds on a histogram of |x| -----------------------------------------------------------------------------


@pytest.mark.parametrize("percentile", [99.0, 99.9, 99.99])
def test_percentile_threshold_is_numpys_percentile_of_abs_rounded_up_to_a_bin_edge(normal_with_outliers, percentile):
    hist, amax = _abs_hist(normal_with_outliers)
    t = ranges.percentile_threshold(hist, amax, percentile)
    reference = float(np.percentile(np.abs(normal_with_outliers), percentile))
    assert reference <= t <= reference + amax / HIST_BINS
    assert np.mean(np.abs(normal_with_outliers) > t) <= 1.0 - percentile / 100.0  # never clips more than asked


def test_percentile_100_keeps_everything(normal_with_outliers):
    hist, amax = _abs_hist(normal_with_outliers)
    assert ranges.percentile_threshold(hist, amax, 100.0) == pytest.approx(amax)


def _entropy_by_definition(hist: np.ndarray, hist_max: float, levels: int) -> float:
    """pytorch-quantization's `_compute_amax_entropy` written out: expand P and Q for every candidate."""
    hist = hist.astype(np.float64)
    hist[0] = hist[1]
    nbins, nq = len(hist), levels + 1
    best_kl, best_i = np.inf, nbins
    for i in range(nq, nbins + 1):
        p = hist[:i].copy()
        p[-1] += hist[i:].sum()
        nonzero = hist[:i] != 0
        group = (np.arange(i) * nq) // i
        sums = np.bincount(group, weights=hist[:i], minlength=nq)
        counts = np.bincount(group, weights=nonzero, minlength=nq)
        q = np.where(nonzero, sums[group] / np.maximum(counts[group], 1), 0.0)
        p, q = p / p.sum(), q / q.sum()
        mask = p > 0
        if np.any(q[mask] == 0):
            continue
        kl = np.sum(p[mask] * np.log(p[mask] / q[mask]))
        if kl <= best_kl + 1e-12:
            best_kl, best_i = kl, i
    return best_i * hist_max / nbins


@pytest.mark.parametrize(("shape", "levels"), [("relu", 255), ("laplace", 127), ("outliers", 127)])
def test_closed_form_entropy_equals_the_definition(shape, levels, normal_with_outliers):
    rng = np.random.default_rng(5)
    values = {
        "relu": lambda: np.maximum(rng.standard_normal(100_000), 0),
        "laplace": lambda: rng.laplace(size=100_000),
        "outliers": lambda: normal_with_outliers,
    }[shape]()
    hist, amax = _abs_hist(values)
    t = ranges.entropy_threshold(hist, amax, levels)
    assert t == pytest.approx(_entropy_by_definition(hist, amax, levels), rel=1e-9)
    if shape == "outliers":
        assert 2.5 < t < 20.0  # clips the outliers, keeps the bulk


def _mse_by_definition(hist: np.ndarray, hist_max: float, levels: int) -> float:
    """The mse model summed bin by bin for every candidate: rounding error (t / levels)^2 / 12 for each value
    inside, (centre - t)^2 for each beyond."""
    width = hist_max / len(hist)
    centres = (np.arange(len(hist)) + 0.5) * width
    errors = []
    for k in range(len(hist)):
        t = (k + 1) * width
        rounding = hist[: k + 1].sum() * (t / levels) ** 2 / 12
        errors.append(rounding + np.sum(hist[k + 1 :] * (centres[k + 1 :] - t) ** 2))
    return (int(np.argmin(errors)) + 1) * width


@pytest.mark.parametrize("levels", [127, 255])
def test_mse_threshold_equals_the_definition(normal_with_outliers, levels):
    hist, amax = _abs_hist(normal_with_outliers)
    t = ranges.mse_threshold(hist, amax, levels)
    assert t == pytest.approx(_mse_by_definition(hist, amax, levels), rel=1e-12)
    assert 3.0 < t < 0.9 * amax  # squared error clips the three far outliers only part way


def test_mse_threshold_nearly_minimises_the_real_quantization_error():
    values = np.random.default_rng(6).laplace(size=200_000)
    levels = 127

    def real_mse(t: float) -> float:
        step = t / levels
        return float(np.mean((np.clip(np.round(values / step), -levels, levels) * step - values) ** 2))

    t = ranges.mse_threshold(*_abs_hist(values), levels)
    best = min(real_mse(c) for c in np.linspace(1.0, float(np.abs(values).max()), 400))
    assert real_mse(t) <= 1.02 * best
    assert real_mse(t) < 0.9 * real_mse(float(np.abs(values).max()))  # and clipping was worth it


def test_mse_leaves_exact_zeros_out():
    rng = np.random.default_rng(7)
    relu = np.maximum(rng.standard_normal(100_000), 0.0)
    hist, amax = _abs_hist(relu)
    nonzero_hist = np.histogram(relu[relu > 0], bins=HIST_BINS, range=(0.0, amax))[0]
    zeros = int(np.sum(relu == 0))
    assert ranges.mse_threshold(hist, amax, 255, zeros) == ranges.mse_threshold(nonzero_hist, amax, 255)
    assert ranges.mse_threshold(hist, amax, 255, zeros) != ranges.mse_threshold(hist, amax, 255)


def test_levels_and_clip_range():
    assert ranges.steps(256, nonnegative=True) == 255 and ranges.steps(256, nonnegative=False) == 127
    assert ranges.steps(128, nonnegative=True) == 127 and ranges.steps(128, nonnegative=False) == 63
    assert ranges.clip_range(3.0, 0.0, 10.0) == (0.0, 3.0)
    assert ranges.clip_range(3.0, -1.0, 10.0) == (-1.0, 3.0)
    assert ranges.clip_range(30.0, -5.0, 10.0) == (-5.0, 10.0)


def test_unknown_method_is_named():
    with pytest.raises(ValueError, match="kl"):
        ranges.threshold("kl", np.ones(4), 1.0)
    with pytest.raises(ValueError, match="kl"):
        histogram_range("kl", np.ones(4), np.linspace(0.0, 1.0, 5))


# --- ranges from a signed histogram (torch observer, OpenVINO) ----------------------------------------------------


def test_signed_histogram_folds_to_the_histogram_of_abs():
    values = np.random.default_rng(8).laplace(size=100_000)
    amax = float(np.abs(values).max())
    counts, edges = np.histogram(values, bins=2 * HIST_BINS, range=(-amax, amax))  # fold bins = pairs of these
    folded = ranges._fold_abs(counts, edges, amax, HIST_BINS)
    direct, _ = _abs_hist(values)
    assert folded.sum() == pytest.approx(values.size)
    assert np.abs(folded - direct).sum() <= 10  # only values on a bin edge may land on the other side


@pytest.mark.parametrize("method", ["percentile", "entropy", "mse"])
@pytest.mark.parametrize("shape", ["relu", "laplace"])
def test_histogram_range_is_the_abs_threshold_with_levels_by_sign(method, shape):
    # A non-negative tensor gets all 255 steps over [0, t], a signed one 127.
    rng = np.random.default_rng(9)
    values = np.maximum(rng.standard_normal(100_000), 0.0) if shape == "relu" else rng.laplace(size=100_000)
    amax = float(np.abs(values).max())
    lo, hi = histogram_range(method, *np.histogram(values, bins=2 * HIST_BINS, range=(-amax, amax)), percentile=99.9)
    hist, _ = _abs_hist(values)
    t = ranges.threshold(method, hist, amax, percentile=99.9, levels=255 if shape == "relu" else 127)
    assert hi == pytest.approx(t, abs=2 * amax / HIST_BINS)
    if shape == "relu":
        assert lo == 0.0
    else:
        assert lo == pytest.approx(-t, abs=2 * amax / HIST_BINS)


def test_percentile_clips_abs_not_each_tail(normal_with_outliers):
    # Every backend clips |x| at the percentile, as ONNX Runtime and TensorRT do: for N(0, 1) the 99.9th
    # percentile of |x| is 3.29 (0.05% beyond each side), not 3.09 (0.1% beyond each side).
    lo, hi = histogram_range("percentile", *_hist(normal_with_outliers), percentile=99.9)
    assert hi == pytest.approx(3.29, abs=0.05) and lo == -hi


def test_percentile_100_keeps_the_whole_signed_range(normal_with_outliers):
    lo, hi = histogram_range("percentile", *_hist(normal_with_outliers), percentile=100.0)
    assert lo == pytest.approx(-35.0, abs=0.1) and hi == pytest.approx(60.0, abs=0.1)


def test_entropy_clips_outliers_but_keeps_the_bulk(normal_with_outliers):
    lo, hi = histogram_range("entropy", *_hist(normal_with_outliers))
    assert -20.0 < lo < -2.5
    assert 2.5 < hi < 20.0


def test_mse_keeps_the_full_range_of_a_uniform_distribution():
    counts, edges = np.histogram(np.linspace(-1.0, 1.0, 10_001), bins=1000, range=(-1.0, 1.0))
    lo, hi = histogram_range("mse", counts, edges)
    assert lo == pytest.approx(-1.0, abs=0.02) and hi == pytest.approx(1.0, abs=0.02)


@pytest.mark.parametrize("method", ["percentile", "entropy", "mse"])
def test_empty_histogram_gives_an_empty_range(method):
    assert histogram_range(method, np.zeros(16), np.linspace(-1.0, 1.0, 17)) == (0.0, 0.0)


def test_entropy_is_not_fooled_by_the_zero_spike_of_relu6():
    # Half the values exactly 0 and a spike at the cap: the KL search once picked its smallest threshold here.
    rng = np.random.default_rng(2)
    relu6 = np.clip(2.0 * rng.standard_normal(200_000), 0.0, 6.0)
    counts, edges = np.histogram(relu6, bins=2048, range=(-8.0, 8.0))
    lo, hi = histogram_range("entropy", counts, edges, num_levels=128)
    assert lo == 0.0
    assert hi > 3.0  # the smallest candidate is 128 of 2048 bins: 0.375
