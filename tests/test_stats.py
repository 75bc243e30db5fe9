"""Statistics against hand-computed small cases, a published example, and scipy."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import binomtest, norm

from int8eval import stats


def _wilson(k: int, n: int, z: float = norm.ppf(0.975)) -> tuple[float, float]:
    # The closed form, written out here so the test does not lean on the code it checks.
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre - half, centre + half


def _newcombe_by_hand(a: int, b: int, c: int, d: int) -> tuple[float, float, float]:
    n = a + b + c + d
    p1, p2 = (a + c) / n, (a + b) / n  # variant, reference
    l1, u1 = _wilson(a + c, n)
    l2, u2 = _wilson(a + b, n)
    det = a * d - b * c
    denom = math.sqrt((a + b) * (c + d) * (a + c) * (b + d))
    phi = 0.0 if denom == 0 or 0 <= det <= n / 2 else ((det - n / 2) if det > n / 2 else det) / denom
    diff = p1 - p2
    lo = diff - math.sqrt((p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2)
    hi = diff + math.sqrt((u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2)
    return diff, lo, hi


def _arrays(a: int, b: int, c: int, d: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-image correctness (reference, variant) for a paired table."""
    ref = np.array([1] * a + [1] * b + [0] * c + [0] * d, bool)
    var = np.array([1] * a + [0] * b + [1] * c + [0] * d, bool)
    return ref, var


def test_paired_table_counts():
    ref, var = _arrays(5, 3, 2, 1)
    assert stats.paired_table(ref, var) == (5, 3, 2, 1)


def test_zero_discordant_pairs():
    ref, var = _arrays(90, 0, 0, 10)
    s = stats.paired_stats(ref, var, np.arange(100), np.arange(100))
    t = s["top1"]
    assert t["diff"] == 0.0
    assert t["mcnemar_p"] == 1.0
    lo, hi = t["diff_ci95"]
    assert lo < 0 < hi and lo == pytest.approx(-hi)  # an interval around 0, not a point
    assert (t["ref_right_var_wrong"], t["ref_wrong_var_right"]) == (0, 0)
    assert s["agreement_top1"] == 1.0
    # With phi from the table (Newcombe's continuity-corrected 0.944), by hand:
    assert (t["diff"], lo, hi) == pytest.approx(_newcombe_by_hand(90, 0, 0, 10))


def test_zero_discordant_pairs_all_right_is_still_an_interval():
    ref, var = _arrays(50, 0, 0, 0)
    diff, (lo, hi) = stats.paired_diff_ci(*stats.paired_table(ref, var))
    assert diff == 0.0
    # phi is 0 when a margin is empty; the width is Wilson's for 50/50, about 7.1 points each side.
    assert hi == pytest.approx(1 - _wilson(50, 50)[0]) and lo == pytest.approx(-hi)


def test_all_images_flipped():
    n = 20
    ref, var = _arrays(0, n, 0, 0)
    s = stats.paired_stats(ref, var, np.zeros(n), np.ones(n))
    t = s["top1"]
    assert t["diff"] == -1.0
    assert t["diff_ci95"][0] == -1.0 and t["diff_ci95"][1] < -0.75
    assert t["diff_ci95"][1] == pytest.approx(_newcombe_by_hand(0, n, 0, 0)[2])
    assert t["mcnemar_p"] == pytest.approx(2 * 0.5**n)
    assert t["ref_right_var_wrong"] == n and t["ref_wrong_var_right"] == 0
    assert s["agreement_top1"] == 0.0
    # ... and the other way round
    t = stats.paired_stats(var, ref, np.zeros(n), np.ones(n))["top1"]
    assert t["diff"] == 1.0 and t["diff_ci95"][1] == 1.0 and t["diff_ci95"][0] > 0.75


def test_published_example_cavo_2012():
    # Fagerland, Lydersen & Laake, "Statistical Analysis of Contingency Tables" (2017), chapter 8: table
    # [[59, 6], [16, 80]]; Newcombe square-and-add: estimate -0.0621, 95% CI -0.1186 to -0.0046.
    diff, (lo, hi) = stats.paired_diff_ci(59, 16, 6, 80)
    assert (round(diff, 4), round(lo, 4), round(hi, 4)) == (-0.0621, -0.1186, -0.0046)


@pytest.mark.parametrize("table", [(5, 3, 1, 1), (40, 5, 2, 13), (10, 1, 6, 3), (3, 0, 4, 0), (700, 9, 4, 87)])
def test_newcombe_matches_hand_computation(table):
    diff, (lo, hi) = stats.paired_diff_ci(*table)
    assert (diff, lo, hi) == pytest.approx(_newcombe_by_hand(*table), abs=1e-12)


@pytest.mark.parametrize("b,c", [(0, 0), (1, 0), (3, 3), (16, 6), (2, 11), (0, 25), (40, 31)])
def test_mcnemar_exact_matches_scipy_binomtest(b, c):
    expected = 1.0 if b + c == 0 else binomtest(b, b + c, 0.5).pvalue
    assert stats.mcnemar_exact(b, c) == pytest.approx(expected, rel=1e-12)


def test_paired_stats_small_table_by_hand():
    # 10 images: 6 both right, 2 lost, 1 gained, 1 both wrong.
    ref, var = _arrays(6, 2, 1, 1)
    labels = np.array([0, 0, 1, 1, 2, 2, 3, 3, 4, 5])
    top1_ref = np.where(ref, labels, 999)
    top1_var = np.where(var, labels, 999)
    top1_var[9] = 998  # both wrong, and they disagree: agreement counts classes, not correctness
    kl = np.full(10, 0.02)
    cos = np.linspace(0.9, 1.0, 10)
    s = stats.paired_stats(ref, var, top1_ref, top1_var, labels=labels, kl=kl, cos=cos,
                           correct5_ref=np.ones(10, bool), correct5_var=np.ones(10, bool))
    t = s["top1"]
    assert s["n"] == 10
    assert (t["ref"], t["var"], t["diff"]) == pytest.approx((0.8, 0.7, -0.1))
    assert t["mcnemar_p"] == pytest.approx(1.0)  # b=2, c=1: P(X<=1 | 3, 1/2) * 2 = 1
    assert s["agreement_top1"] == pytest.approx(0.6)  # images 6, 7, 8 flip; image 9 differs
    assert s["kl_mean"] == pytest.approx(0.02) and s["cos_min"] == pytest.approx(0.9)
    assert s["top5"]["diff"] == 0 and s["top5"]["mcnemar_p"] == 1.0
    # the images lost are 6 and 7 (labels 3, 3); the one gained is 8 (label 4)
    wnids = stats.synsets()[0]
    assert s["flips_by_class"] == {wnids[3]: {"n": 2, "lost": 2, "gained": 0}, wnids[4]: {"n": 1, "lost": 0, "gained": 1}}
    worst = s["classes_lost_most"]
    assert len(worst) == 1 and worst[0]["wnid"] == stats.synsets()[0][3] and worst[0]["net"] == 2
    assert worst[0]["name"] == stats.synsets()[1][3]


def test_existing_functions_unchanged():
    acc, (lo, hi) = stats.accuracy_ci(np.array([1, 1, 1, 0], bool))
    assert acc == 0.75 and lo == pytest.approx(_wilson(3, 4)[0]) and hi == pytest.approx(_wilson(3, 4)[1])
    assert math.isnan(stats.accuracy_ci(np.array([], bool))[0])
    assert stats.agreement(np.array([1, 2, 3]), np.array([1, 2, 4])) == pytest.approx(2 / 3)
    per = stats.per_class_accuracy(np.array([0, 0, 1]), np.array([True, False, True]))
    assert per[stats.synsets()[0][0]] == {"n": 2, "top1": 0.5}
