"""Accuracy with confidence intervals and agreement, from per-image predictions (scipy/statsmodels do the maths)."""

from __future__ import annotations

import numpy as np
from statsmodels.stats.proportion import proportion_confint

from int8eval.data.synsets import synsets, wnid_to_name


def accuracy_ci(correct: np.ndarray, alpha: float = 0.05) -> tuple[float, tuple[float, float]]:
    """Fraction correct and its Wilson score interval (good near 0 and 1, unlike the normal approximation)."""
    n, k = len(correct), int(np.sum(correct))
    if n == 0:
        return float("nan"), (float("nan"), float("nan"))
    lo, hi = proportion_confint(k, n, alpha=alpha, method="wilson")
    return k / n, (float(lo), float(hi))


def mean_ci(values: np.ndarray, alpha: float = 0.05) -> tuple[float, tuple[float, float]]:
    """Mean and its normal-approximation CI (mean +- z standard errors; MEAN_CI_METHOD): per-image KL and cosine
    are means of hundreds of images or more, where the central limit theorem holds well enough."""
    from scipy.stats import norm

    x = np.asarray(values, dtype=np.float64)
    if len(x) == 0:
        return float("nan"), (float("nan"), float("nan"))
    mean = float(x.mean())
    half = float(norm.ppf(1 - alpha / 2) * x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else 0.0
    return mean, (mean - half, mean + half)


MEAN_CI_METHOD = "normal approximation: mean +- 1.96 standard errors"


def agreement(top1_a: np.ndarray, top1_b: np.ndarray) -> float:
    """Fraction of images whose top-1 class is the same under both."""
    return float(np.mean(top1_a == top1_b)) if len(top1_a) else float("nan")


def class_keys(class_names: list[str] | None = None) -> tuple[list[str], dict[str, str]]:
    """(the key of each class index, key -> display name): ImageNet's wnids and names, or a label space's own names
    (`class_names`; a class beyond them is keyed by its index)."""
    if class_names is None:
        return synsets()[0], wnid_to_name()
    return list(class_names), {n: n for n in class_names}


def _key(keys: list[str], c: int) -> str:
    return keys[c] if c < len(keys) else str(c)


def per_class_accuracy(labels: np.ndarray, correct: np.ndarray, class_names: list[str] | None = None) -> dict[str, dict]:
    """Top-1 per class present, keyed by wnid (or by name in `class_names`): {"n": images, "top1": fraction}."""
    wnids = class_keys(class_names)[0]
    labels = np.asarray(labels, dtype=np.int64)
    n = np.bincount(labels)
    right = np.bincount(labels, weights=correct, minlength=len(n))  # float64 sums, exact for 0/1
    return {_key(wnids, c): {"n": int(n[c]), "top1": float(right[c] / n[c])} for c in np.flatnonzero(n)}


# --- Paired FP32-vs-INT8 statistics -------------------------------------------------------------------------------

PAIRED_CI_METHOD = "Newcombe square-and-add (method 10: Wilson limits, continuity-corrected phi)"


def paired_table(correct_ref: np.ndarray, correct_var: np.ndarray) -> tuple[int, int, int, int]:
    """The paired 2x2 table as (both right, ref right & var wrong, ref wrong & var right, both wrong)."""
    r, v = np.asarray(correct_ref, bool), np.asarray(correct_var, bool)
    if r.shape != v.shape:
        raise ValueError(f"paired arrays differ in shape: {r.shape} vs {v.shape}")
    return int(np.sum(r & v)), int(np.sum(r & ~v)), int(np.sum(~r & v)), int(np.sum(~r & ~v))


def paired_diff_ci(a: int, b: int, c: int, d: int, alpha: float = 0.05) -> tuple[float, tuple[float, float]]:
    """Difference var - ref of two paired proportions and its Newcombe (1998, method 10) confidence interval.

    The table is (a both right, b ref right & var wrong, c ref wrong & var right, d both wrong), so the
    difference is (c - b) / n. Newcombe's square-and-add interval combines the Wilson intervals of both
    proportions with their estimated correlation; Fagerland, Lydersen & Laake (2014) recommend it for paired
    binomial differences. It needs no resampling, so it is deterministic and cheap.
    """
    n = a + b + c + d
    if n == 0:
        return float("nan"), (float("nan"), float("nan"))
    p_ref, p_var = (a + b) / n, (a + c) / n
    lo_ref, hi_ref = (float(x) for x in proportion_confint(a + b, n, alpha=alpha, method="wilson"))
    lo_var, hi_var = (float(x) for x in proportion_confint(a + c, n, alpha=alpha, method="wilson"))
    # phi: the correlation of the two proportions, with Newcombe's continuity correction towards 0.
    margins = (a + b) * (c + d) * (a + c) * (b + d)
    det = a * d - b * c
    if margins == 0 or 0 <= det <= n / 2:
        phi = 0.0
    else:
        phi = ((det - n / 2) if det > n / 2 else det) / np.sqrt(float(margins))
    diff = p_var - p_ref
    # Lower limit: var could be lower (towards lo_var) while ref is higher (towards hi_ref); and vice versa.
    dl = np.sqrt(max((p_var - lo_var) ** 2 - 2 * phi * (p_var - lo_var) * (hi_ref - p_ref) + (hi_ref - p_ref) ** 2, 0.0))
    du = np.sqrt(max((hi_var - p_var) ** 2 - 2 * phi * (hi_var - p_var) * (p_ref - lo_ref) + (p_ref - lo_ref) ** 2, 0.0))
    return diff, (max(-1.0, diff - float(dl)), min(1.0, diff + float(du)))


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided p-value of McNemar's exact test on the discordant counts b and c (statsmodels)."""
    from statsmodels.stats.contingency_tables import mcnemar

    return float(mcnemar([[0, b], [c, 0]], exact=True).pvalue)


def _paired_block(correct_ref: np.ndarray, correct_var: np.ndarray, alpha: float) -> dict:
    a, b, c, d = paired_table(correct_ref, correct_var)
    n = a + b + c + d
    diff, ci = paired_diff_ci(a, b, c, d, alpha)
    return {
        "ref": (a + b) / n if n else float("nan"),
        "var": (a + c) / n if n else float("nan"),
        "diff": diff,  # var - ref, a fraction; negative = the variant lost accuracy
        "diff_ci95": list(ci),
        "both_right": a,
        "ref_right_var_wrong": b,
        "ref_wrong_var_right": c,
        "both_wrong": d,
        "mcnemar_p": mcnemar_exact(b, c),
    }


def class_flips(labels: np.ndarray, correct_ref: np.ndarray, correct_var: np.ndarray,
                class_names: list[str] | None = None) -> dict[str, dict]:
    """Per class with at least one flip, keyed by wnid (or name): images, lost (ref right -> var wrong), gained."""
    wnids = class_keys(class_names)[0]
    r, v = np.asarray(correct_ref, bool), np.asarray(correct_var, bool)
    lost, gained = r & ~v, ~r & v
    labels = np.asarray(labels, dtype=np.int64)
    n = np.bincount(labels)
    n_lost, n_gained = np.bincount(labels[lost], minlength=len(n)), np.bincount(labels[gained], minlength=len(n))
    return {
        _key(wnids, c): {"n": int(n[c]), "lost": int(n_lost[c]), "gained": int(n_gained[c])}
        for c in np.flatnonzero(n_lost + n_gained)
    }


def paired_stats(
    correct_ref: np.ndarray,
    correct_var: np.ndarray,
    top1_ref: np.ndarray,
    top1_var: np.ndarray,
    *,
    labels: np.ndarray | None = None,
    correct5_ref: np.ndarray | None = None,
    correct5_var: np.ndarray | None = None,
    kl: np.ndarray | None = None,
    cos: np.ndarray | None = None,
    alpha: float = 0.05,
    top_classes: int = 10,
    class_names: list[str] | None = None,
) -> dict:
    """Paired statistics of a variant against the reference, from per-image predictions of the same images.

    Returns a JSON-ready dict: `n`; `top1` (and `top5` when given) with both accuracies, the difference var - ref
    and its 95% CI (Newcombe, see `paired_diff_ci`), the paired table (flips both ways) and McNemar's exact
    p-value; `agreement_top1` with its Wilson CI; `kl_mean`/`cos_mean` with their CIs (`mean_ci`) when given; and, when `labels` are given,
    `flips_by_class` (classes with any flip) and `classes_lost_most` (net loss, at most `top_classes`), keyed by
    ImageNet wnid or by the label space's `class_names`.

    Example:
        >>> s = paired_stats(p.correct1("torch-fp32"), p.correct1(v), p.top1("torch-fp32"), p.top1(v), labels=p.labels)
        >>> s["top1"]["diff"], s["top1"]["diff_ci95"], s["top1"]["mcnemar_p"]
    """
    n = len(correct_ref)
    agree = np.asarray(top1_ref) == np.asarray(top1_var)
    agreement_top1, agreement_ci = accuracy_ci(agree, alpha)
    out: dict = {
        "n": n,
        "ci_method": PAIRED_CI_METHOD,
        "test": "McNemar exact (binomial on the discordant pairs, statsmodels)",
        "top1": _paired_block(correct_ref, correct_var, alpha),
        "agreement_top1": agreement_top1,
        "agreement_top1_ci95": list(agreement_ci),
    }
    if correct5_ref is not None and correct5_var is not None:
        out["top5"] = _paired_block(correct5_ref, correct5_var, alpha)
    if kl is not None and len(kl):
        out["kl_mean"], kl_ci = mean_ci(kl, alpha)
        out["kl_mean_ci95"] = list(kl_ci)
        out["kl_p99"] = float(np.percentile(kl, 99))
    if cos is not None and len(cos):
        out["cos_mean"], cos_ci = mean_ci(cos, alpha)
        out["cos_mean_ci95"] = [max(-1.0, cos_ci[0]), min(1.0, cos_ci[1])]  # a cosine is within [-1, 1]
        out["cos_min"] = float(np.min(cos))
    if labels is not None:
        flips = class_flips(np.asarray(labels), correct_ref, correct_var, class_names)
        names = class_keys(class_names)[1]
        ranked = sorted(flips.items(), key=lambda kv: (-(kv[1]["lost"] - kv[1]["gained"]), -kv[1]["lost"], kv[0]))
        out["flips_by_class"] = flips
        out["classes_lost_most"] = [
            {"wnid": w, "name": names.get(w, w), **f, "net": f["lost"] - f["gained"]}
            for w, f in ranked[:top_classes]
            if f["lost"] > f["gained"]
        ]
    return out
