"""Accuracy with confidence intervals and agreement, from per-image predictions (scipy/statsmodels do the maths)."""

from __future__ import annotations

import numpy as np
from statsmodels.stats.proportion import proportion_confint

from int8eval.data.synsets import synsets


def accuracy_ci(correct: np.ndarray, alpha: float = 0.05) -> tuple[float, tuple[float, float]]:
    """Fraction correct and its Wilson score interval (good near 0 and 1, unlike the normal approximation)."""
    n, k = len(correct), int(np.sum(correct))
    if n == 0:
        return float("nan"), (float("nan"), float("nan"))
    lo, hi = proportion_confint(k, n, alpha=alpha, method="wilson")
    return k / n, (float(lo), float(hi))


def agreement(top1_a: np.ndarray, top1_b: np.ndarray) -> float:
    """Fraction of images whose top-1 class is the same under both."""
    return float(np.mean(top1_a == top1_b)) if len(top1_a) else float("nan")


def per_class_accuracy(labels: np.ndarray, correct: np.ndarray) -> dict[str, dict]:
    """Top-1 per class present, keyed by wnid: {"n": images, "top1": fraction}."""
    wnids = synsets()[0]
    out = {}
    for c in np.unique(labels):
        mask = labels == c
        out[wnids[int(c)]] = {"n": int(mask.sum()), "top1": float(correct[mask].mean())}
    return out
