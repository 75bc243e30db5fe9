"""Activation calibration ranges from a histogram of |x| (numpy only): int8eval's own percentile, entropy and mse.

Each method picks a clipping threshold t on |x| and `clip_range` turns it into the range (max(min, -t), min(max, t)),
so a non-negative tensor keeps 0 as its lower end. percentile: |x| at that percentile (as ONNX Runtime and TensorRT
mean it); entropy: TensorRT's KL-divergence threshold; mse: the threshold minimising expected squared error.

Who uses it, and over which histogram (the variant's `details["calibration"]` says which code set its ranges):
- ONNX Runtime and TensorRT (and its CPU emulation), every method: `onnx_calibration.activation_ranges` on
  HIST_BINS = 2048 bins of |x| collected by int8eval.
- PyTorch percentile and entropy (torchao's PT2E observers and torch.ao's have no such method), PT2E and legacy FX:
  `torch_observers`' observer keeps an 8192-bin signed histogram, which `histogram_range` folds to 2048 bins of |x|.
- OpenVINO percentile and entropy: a 4096-bin signed histogram over NNCF's min/max range, folded the same way.
Not used: minmax anywhere but ONNX (each library's own min/max observer), and mse on PyTorch (torchao's
HistogramObserver, its own L2 search over 2048 bins) and OpenVINO (NNCF's HISTOGRAM range estimator).
"""

from __future__ import annotations

import numpy as np

HIST_BINS = 2048  # bins of |x|, as TensorRT's and pytorch-quantization's histogram calibrators
METHODS = ("percentile", "entropy", "mse")


def widen_histogram(counts: np.ndarray, factor: int, *, centred: bool = False) -> np.ndarray:
    """The histogram of the same values over a range `factor` (a power of two) times as wide, with as many bins:
    each `factor` neighbouring bins summed into one, so old counts stay exactly on bin boundaries (unlike
    re-binning). [0, m] grows to [0, factor * m] (a histogram of |x|); `centred`, [-m, m] to [-factor * m, factor * m].
    """
    bins = len(counts)
    merged = counts.reshape(-1, factor).sum(axis=1) if factor <= bins else counts.sum(keepdims=True)
    out = np.zeros_like(counts)
    start = (bins - len(merged)) // 2 if centred else 0
    out[start : start + len(merged)] = merged
    return out


def calibration_phrase(method: str, *, percentile: float = 99.999, histogram: str = f"{HIST_BINS} bins of |x|") -> str:
    """What `details["calibration"]` says when this module set the ranges, e.g. "int8eval ranges.mse_threshold over
    2048 bins of |x|"; `histogram` names the histogram it was given."""
    _check_method(method)
    which = f"percentile_threshold ({percentile:g}%)" if method == "percentile" else f"{method}_threshold"
    if method == "entropy":
        which += " (TensorRT's KL method)"
    return f"int8eval ranges.{which} over {histogram}"


def steps(num_levels: int, nonnegative: bool) -> int:
    """Quantization steps over [0, t]: all num_levels - 1 for a non-negative tensor on an asymmetric grid, else half."""
    return num_levels - 1 if nonnegative else (num_levels - 1) // 2


def clip_range(t: float, lo: float, hi: float) -> tuple[float, float]:
    """The range a threshold t on |x| gives a tensor whose values span [lo, hi]."""
    return max(lo, -t), min(hi, t)


def percentile_threshold(abs_hist: np.ndarray, hist_max: float, percentile: float) -> float:
    """|x| at `percentile`: the upper edge of the bin where the cumulative count crosses it (never clips more)."""
    cum = np.cumsum(abs_hist, dtype=np.float64)
    idx = int(np.searchsorted(cum, percentile / 100.0 * cum[-1]))
    return (min(idx, len(abs_hist) - 1) + 1) * hist_max / len(abs_hist)


def _xlogx(x: np.ndarray) -> np.ndarray:
    return np.where(x > 0, x * np.log(np.where(x > 0, x, 1.0)), 0.0)


def entropy_threshold(abs_hist: np.ndarray, hist_max: float, levels: int) -> float:
    """TensorRT's KL-divergence calibration (as pytorch-quantization's `_compute_amax_entropy`) on |x|.

    Each bin count i from `levels + 1` to len(abs_hist) is a candidate threshold. P is the first i bins with
    everything beyond folded into the last; Q merges those i bins into `levels + 1` quantized bins and spreads each
    one's mass evenly over its non-empty bins. The threshold with the smallest KL(P || Q) wins (ties: the larger one).
    Rather than expanding P and Q for each of ~1900 candidates (~0.4 s per tensor), KL is computed in closed form
    from prefix sums, per quantized bin: the same numbers, for all candidates at once.
    """
    hist = abs_hist.astype(np.float64)
    hist[0] = hist[1]  # the zero spike of ReLU outputs would dominate the divergence; TensorRT ignores it the same way
    nbins, nq = len(hist), levels + 1
    if nbins <= nq:
        return hist_max
    total = hist.sum()
    prefix = np.concatenate([[0.0], np.cumsum(hist)])  # prefix[m] = sum of hist[:m]
    nonzero = np.concatenate([[0], np.cumsum(hist > 0)])
    xlogx = np.concatenate([[0.0], np.cumsum(_xlogx(hist))])
    i = np.arange(nq, nbins + 1)  # candidate bin counts
    tail = total - prefix[i]  # mass beyond the threshold, folded into bin i - 1
    last = hist[i - 1]
    # Quantized bin k covers bins [ceil(k i / nq), ceil((k + 1) i / nq)): group sums and non-empty counts.
    edges = (np.arange(nq + 1)[None, :] * i[:, None] + nq - 1) // nq
    mass = prefix[edges[:, 1:]] - prefix[edges[:, :-1]]
    filled = nonzero[edges[:, 1:]] - nonzero[edges[:, :-1]]
    avg = mass / np.maximum(filled, 1)
    # sum_j P_j log Q_j (unnormalised): each group's mass at its average, plus the tail at the last group's average.
    p_log_q = _xlogx(mass).sum(axis=1) - (mass * np.log(np.maximum(filled, 1))).sum(axis=1)
    p_log_q += tail * np.log(np.where(avg[:, -1] > 0, avg[:, -1], 1.0))
    p_log_p = xlogx[i - 1] + _xlogx(last + tail)
    with np.errstate(divide="ignore"):
        kl = (p_log_p - p_log_q) / total + np.log((total - tail) / total)
    # Infinite divergence: folded mass landing in an empty bin (Q is 0 there), or nothing left inside.
    kl[((last == 0) & (tail > 0)) | (total - tail <= 0)] = np.inf
    if not np.isfinite(kl).any():
        return hist_max
    best = len(kl) - 1 - int(np.argmin(kl[::-1]))
    return float(i[best]) * hist_max / nbins


def mse_threshold(abs_hist: np.ndarray, hist_max: float, levels: int, zeros: float = 0) -> float:
    """The threshold t minimising expected squared error: rounding (step^2/12, step = t / levels) inside, (|x| - t)^2
    beyond. `zeros` exact zeros (ReLU outputs) quantize without error, so they are taken out of the first bin."""
    nbins = len(abs_hist)
    width = hist_max / nbins
    centres = (np.arange(nbins) + 0.5) * width
    counts = abs_hist.astype(np.float64)
    counts[0] = max(counts[0] - zeros, 0.0)
    t = (np.arange(nbins) + 1) * width  # candidate thresholds: every bin's upper edge
    inside = np.cumsum(counts)
    # Tail sums over bins beyond each candidate: sum c, sum c*x, sum c*x^2.
    tail = [
        np.concatenate([np.cumsum(v[::-1])[::-1][1:], [0.0]]) for v in (counts, counts * centres, counts * centres**2)
    ]
    err = inside * (t / levels) ** 2 / 12.0 + tail[2] - 2 * t * tail[1] + t**2 * tail[0]
    return float(t[int(np.argmin(err))])


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown histogram range method {method!r}; choose one of {', '.join(METHODS)}")


def threshold(method: str, abs_hist: np.ndarray, hist_max: float, *, percentile: float = 99.999,
              levels: int = 127, zeros: float = 0) -> float:
    """The threshold on |x| that `method` (percentile, entropy or mse) picks from a histogram of |x| over
    [0, hist_max]; `levels` (steps over [0, t]) for entropy and mse, `zeros` (exact zeros in bin 0) for mse."""
    _check_method(method)
    if method == "percentile":
        return percentile_threshold(abs_hist, hist_max, percentile)
    if method == "entropy":
        return entropy_threshold(abs_hist, hist_max, levels)
    return mse_threshold(abs_hist, hist_max, levels, zeros)


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


def _fold_abs(counts: np.ndarray, edges: np.ndarray, amax: float, bins: int) -> np.ndarray:
    """Histogram of |x| with `bins` bins over [0, amax], resampled from a signed histogram."""
    new_edges = np.linspace(0.0, amax, bins + 1)
    pos = np.diff(_cdf_at(counts, edges, new_edges))
    neg = np.diff(_cdf_at(counts, edges, -new_edges[::-1]))[::-1]
    return np.maximum(pos + neg, 0.0)  # interpolation rounding can leave -1e-12 where a bin is empty


def histogram_range(method: str, counts: np.ndarray, edges: np.ndarray, *, percentile: float = 99.999,
                    num_levels: int = 256) -> tuple[float, float]:
    """The range `method` picks for values with the signed histogram (counts, edges), as `np.histogram` gives it.

    The histogram is folded to HIST_BINS bins of |x|, so every method means what it does on the ONNX path; a
    non-negative tensor gets all `num_levels` levels over [0, t], a signed one half. The caller turns the range
    into scale and zero point with its own library's code.
    """
    _check_method(method)  # up front: a constant tensor returns before `threshold` would check it
    lo, hi = _extent(counts, edges)
    if lo == hi:
        return lo, hi
    amax = max(-lo, hi)
    t = threshold(method, _fold_abs(counts, edges, amax, HIST_BINS), amax, percentile=percentile,
                  levels=steps(num_levels, lo >= 0.0))
    return clip_range(t, lo, hi)
