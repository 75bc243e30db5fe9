"""Calibration ranges from an activation histogram (numpy only, so any backend can use them).

Each helper takes (counts, edges) as `np.histogram` returns them and gives the float range `(lo, hi)` to
quantize to; the caller turns that into scale and zero point with its own library's code. torchao's PT2E
observers have no percentile or KL-divergence ("entropy") method, so the torch backend's histogram observer
asks these helpers for the range.
"""

from __future__ import annotations

import math

import numpy as np

ENTROPY_BINS = 2048  # TensorRT's histogram size for the KL search
MAX_CANDIDATES = 512  # thresholds tried by the entropy and mse searches


def _cdf_at(counts: np.ndarray, edges: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Number of values below x, assuming values spread uniformly inside each bin."""
    cum = np.concatenate([[0.0], np.cumsum(counts, dtype=np.float64)])
    return np.interp(x, edges, cum)


def _extent(counts: np.ndarray, edges: np.ndarray) -> tuple[float, float]:
    """The span of the non-empty bins."""
    nz = np.flatnonzero(counts)
    if nz.size == 0:
        return 0.0, 0.0
    return float(edges[nz[0]]), float(edges[nz[-1] + 1])


def _fold_abs(counts: np.ndarray, edges: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Histogram of |x| with `bins` bins over [0, max|x|], resampled from a signed histogram."""
    lo, hi = _extent(counts, edges)
    amax = max(-lo, hi)
    new_edges = np.linspace(0.0, amax, bins + 1)
    if amax == 0.0:
        return np.zeros(bins), new_edges
    pos = np.diff(_cdf_at(counts, edges, new_edges))
    neg = np.diff(_cdf_at(counts, edges, -new_edges[::-1]))[::-1]
    return pos + neg, new_edges


def _quantile(counts: np.ndarray, edges: np.ndarray, q: float) -> float:
    """The value below which a fraction q of the histogram lies (values uniform inside each bin)."""
    cum = np.cumsum(counts, dtype=np.float64)
    target = q * cum[-1]
    if target <= 0.0:
        return float(edges[np.flatnonzero(counts)[0]])
    i = min(int(np.searchsorted(cum, target, side="left")), len(counts) - 1)
    # cum[i - 1] < target <= cum[i], so bin i is not empty.
    frac = (target - (cum[i] - counts[i])) / counts[i]
    return float(edges[i] + min(frac, 1.0) * (edges[i + 1] - edges[i]))


def percentile_range(counts: np.ndarray, edges: np.ndarray, percentile: float) -> tuple[float, float]:
    """Clip (100 - percentile)% of the values at each end: the [100 - p, p] percentiles of the histogram."""
    if np.sum(counts) == 0:
        return 0.0, 0.0
    q = percentile / 100.0
    return _quantile(counts, edges, 1.0 - q), _quantile(counts, edges, q)


def entropy_range(counts: np.ndarray, edges: np.ndarray, num_levels: int = 256) -> tuple[float, float]:
    """The threshold T that minimises KL(P || Q) between the clipped and the quantized |x| histogram
    (TensorRT's entropy calibration, on 2048 bins); the range is [-T, T] cut to the values seen.

    A one-sided (non-negative) distribution gets all `num_levels` levels over [0, T], a signed one half per side.
    """
    lo, hi = _extent(counts, edges)
    if lo == hi:
        return lo, hi
    hist, abs_edges = _fold_abs(counts, edges, ENTROPY_BINS)
    # Exact zeros (half of every ReLU output) would dominate the divergence and push the threshold to its
    # minimum; like NVIDIA's pytorch-quantization, give the zero bin its neighbour's count.
    hist[0] = hist[1]
    levels = num_levels if lo >= 0.0 else num_levels // 2
    if ENTROPY_BINS <= levels:
        return lo, hi
    count = min(MAX_CANDIDATES, ENTROPY_BINS - levels + 1)
    candidates = np.unique(np.linspace(levels, ENTROPY_BINS, count).astype(int))
    divergence = [_kl_after_quantizing(hist, int(i), levels) for i in candidates]
    threshold = float(abs_edges[candidates[int(np.argmin(divergence))]])
    return max(lo, -threshold), min(hi, threshold)


def _kl_after_quantizing(hist: np.ndarray, i: int, levels: int) -> float:
    """KL divergence between the first i bins with the tail folded into the last one (P) and the same bins
    merged into `levels` groups and spread back over their non-empty bins (Q)."""
    sliced = hist[:i]
    p = sliced.astype(np.float64).copy()
    p[-1] += hist[i:].sum()
    nonzero = sliced > 0
    group = (np.arange(i) * levels) // i
    group_sum = np.bincount(group, weights=sliced, minlength=levels)
    group_nz = np.bincount(group, weights=nonzero, minlength=levels)
    q = np.where(nonzero, group_sum[group] / np.maximum(group_nz[group], 1), 0.0)
    p_sum, q_sum = p.sum(), q.sum()
    if p_sum == 0.0 or q_sum == 0.0:
        return math.inf
    p, q = p / p_sum, q / q_sum
    mask = p > 0
    # Where P has mass that Q lost (the folded tail landing in an empty bin), smooth Q instead of dividing by 0.
    q = np.where(mask & (q == 0), 1e-12, q)
    return float(np.sum(p[mask] * np.log(p[mask] / q[mask])))


def mse_range(counts: np.ndarray, edges: np.ndarray, num_levels: int = 256) -> tuple[float, float]:
    """The range [a*lo, a*hi] (a in (0, 1], lo <= 0 <= hi the values seen) that minimises the expected squared
    error of uniform `num_levels`-level quantization: clipping error outside, step^2 / 12 rounding error inside."""
    lo, hi = _extent(counts, edges)
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if lo == hi:
        return lo, hi
    centers = (edges[:-1] + edges[1:]) / 2
    weights = counts.astype(np.float64)
    a = np.linspace(1.0 / MAX_CANDIDATES, 1.0, MAX_CANDIDATES)[:, None]
    c_lo, c_hi = a * lo, a * hi
    step = (c_hi - c_lo) / (num_levels - 1)
    clipped = np.clip(centers[None, :], c_lo, c_hi)
    err = (centers[None, :] - clipped) ** 2 + np.where(clipped == centers[None, :], step**2 / 12, 0.0)
    best = int(np.argmin(err @ weights))
    return float(c_lo[best, 0]), float(c_hi[best, 0])


RANGE_METHODS = {"percentile": percentile_range, "entropy": entropy_range, "mse": mse_range}


def histogram_range(method: str, counts: np.ndarray, edges: np.ndarray, *, percentile: float = 99.999,
                    num_levels: int = 256) -> tuple[float, float]:
    """Dispatch to `<method>_range`; `percentile` applies to the percentile method only."""
    if method == "percentile":
        return percentile_range(counts, edges, percentile)
    if method in RANGE_METHODS:
        return RANGE_METHODS[method](counts, edges, num_levels)
    raise ValueError(f"unknown histogram range method {method!r}; choose one of {', '.join(RANGE_METHODS)}")
