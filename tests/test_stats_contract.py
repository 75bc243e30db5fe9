"""What the report's paired statistics promise, each value worked out here by hand or with scipy: the keys and counts
of a paired block, alpha reaching every interval, flips and their ranking, KL/cosine summaries, empty inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import scoreatpercentile

from int8eval import stats
from int8eval.data.synsets import synsets, wnid_to_name

WNIDS = synsets()[0]


def _paired(ref: list[int], var: list[int]):
    r, v = np.array(ref, bool), np.array(var, bool)
    return r, v, r.astype(int), v.astype(int)  # top-1 classes: any stand-in that agrees where correctness agrees


def test_paired_block_counts_and_keys():
    ref = [1, 1, 1, 0, 0, 1, 0, 1]
    var = [1, 0, 1, 1, 0, 0, 0, 1]
    r, v, t_r, t_v = _paired(ref, var)
    out = stats.paired_stats(r, v, t_r, t_v)
    block = out["top1"]
    assert set(block) == {"ref", "var", "diff", "diff_ci95", "both_right", "ref_right_var_wrong",
                          "ref_wrong_var_right", "both_wrong", "mcnemar_p"}
    assert (block["both_right"], block["ref_right_var_wrong"], block["ref_wrong_var_right"], block["both_wrong"]) == (
        3, 2, 1, 2)
    assert block["ref"] == 5 / 8 and block["var"] == 4 / 8 and block["diff"] == pytest.approx(-1 / 8)
    assert out["n"] == 8 and out["ci_method"] == stats.PAIRED_CI_METHOD
    assert out["test"] == "McNemar exact (binomial on the discordant pairs, statsmodels)"
    assert out["agreement_top1"] == 5 / 8 and len(out["agreement_top1_ci95"]) == 2
    assert "top5" not in out and "kl_mean" not in out and "cos_mean" not in out and "flips_by_class" not in out


def test_alpha_reaches_every_interval():
    r, v, t_r, t_v = _paired([1, 1, 1, 0, 0, 1, 0, 1] * 5, [1, 0, 1, 1, 0, 0, 0, 1] * 5)
    wide, narrow = stats.paired_stats(r, v, t_r, t_v, alpha=0.05), stats.paired_stats(r, v, t_r, t_v, alpha=0.5)
    for key in ("diff_ci95",):
        (wl, wh), (nl, nh) = wide["top1"][key], narrow["top1"][key]
        assert wl < nl < nh < wh
    (wl, wh), (nl, nh) = wide["agreement_top1_ci95"], narrow["agreement_top1_ci95"]
    assert wl < nl < nh < wh
    assert narrow["top1"]["diff_ci95"] == list(stats.paired_diff_ci(15, 10, 5, 10, alpha=0.5)[1])


def test_top5_needs_both_arrays():
    r, v, t_r, t_v = _paired([1, 0, 1], [1, 1, 0])
    assert "top5" not in stats.paired_stats(r, v, t_r, t_v, correct5_ref=r)
    assert "top5" not in stats.paired_stats(r, v, t_r, t_v, correct5_var=v)
    both = stats.paired_stats(r, v, t_r, t_v, correct5_ref=r | True, correct5_var=v)
    assert both["top5"]["ref"] == 1.0 and both["top5"]["var"] == 2 / 3


def test_kl_and_cosine_summaries():
    rng = np.random.default_rng(0)
    kl, cos = rng.exponential(0.01, 300), 1 - rng.exponential(0.001, 300)
    r, v, t_r, t_v = _paired([1] * 300, [1] * 300)
    out = stats.paired_stats(r, v, t_r, t_v, kl=kl, cos=cos)
    assert out["kl_mean"] == pytest.approx(sum(kl) / 300)
    assert out["kl_p99"] == pytest.approx(scoreatpercentile(kl, 99)) and out["kl_p99"] < kl.max()
    assert out["cos_mean"] == pytest.approx(sum(cos) / 300) and out["cos_min"] == cos.min()
    empty = stats.paired_stats(r, v, t_r, t_v, kl=np.array([]), cos=np.array([]))
    assert "kl_mean" not in empty and "cos_mean" not in empty


def test_empty_inputs_give_nan_not_errors():
    assert math.isnan(stats.agreement(np.array([]), np.array([])))
    out = stats.paired_stats(np.array([], bool), np.array([], bool), np.array([]), np.array([]))
    assert out["n"] == 0 and math.isnan(out["top1"]["ref"]) and math.isnan(out["top1"]["var"])
    assert math.isnan(out["agreement_top1"])


def _flip_data():
    """Per class (ImageNet index): (lost, gained) flips, plus two images both get right."""
    plan = {30: (3, 0), 10: (4, 2), 20: (2, 0), 40: (1, 1), 50: (0, 2)}  # ranking order differs from wnid order
    labels, ref, var = [], [], []
    for c, (lost, gained) in plan.items():
        labels += [c] * (lost + gained + 2)
        ref += [1] * lost + [0] * gained + [1, 1]
        var += [0] * lost + [1] * gained + [1, 1]
    return plan, np.array(labels, float), np.array(ref), np.array(var)  # float labels, 0/1 int correctness


def test_class_flips_count_both_ways():
    plan, labels, ref, var = _flip_data()
    flips = stats.class_flips(labels, ref, var)
    assert flips == {WNIDS[c]: {"n": lost + gained + 2, "lost": lost, "gained": gained} for c, (lost, gained) in plan.items()}


def test_classes_lost_most_ranked_by_net_loss_then_losses_then_wnid():
    plan, labels, ref, var = _flip_data()
    out = stats.paired_stats(ref.astype(bool), var.astype(bool), ref, var, labels=labels)
    names = wnid_to_name()
    # net 3 (class 30), then net 2 with 4 lost (10) before net 2 with 2 lost (20); 40 (net 0) and 50 (gain) not.
    assert [(e["wnid"], e["net"], e["lost"], e["name"]) for e in out["classes_lost_most"]] == [
        (WNIDS[30], 3, 3, names[WNIDS[30]]), (WNIDS[10], 2, 4, names[WNIDS[10]]), (WNIDS[20], 2, 2, names[WNIDS[20]])]
    assert set(out["flips_by_class"]) == {WNIDS[c] for c in plan}
    tied = stats.paired_stats(np.array([1, 1, 0, 0], bool), np.zeros(4, bool), np.zeros(4), np.ones(4),
                              labels=np.array([7, 3, 7, 3]))  # one loss in class 7, one in class 3
    assert [e["wnid"] for e in tied["classes_lost_most"]] == sorted([WNIDS[3], WNIDS[7]])  # ties: by wnid


def test_at_most_ten_classes_by_default():
    labels = np.arange(12)
    out = stats.paired_stats(np.ones(12, bool), np.zeros(12, bool), np.zeros(12), np.ones(12), labels=labels)
    assert len(out["classes_lost_most"]) == 10
    assert len(stats.paired_stats(np.ones(12, bool), np.zeros(12, bool), np.zeros(12), np.ones(12), labels=labels,
                                  top_classes=3)["classes_lost_most"]) == 3


def test_per_class_accuracy_takes_float_labels():
    out = stats.per_class_accuracy(np.array([2.0, 2.0, 5.0]), np.array([1, 0, 1]))
    assert out == {WNIDS[2]: {"n": 2, "top1": 0.5}, WNIDS[5]: {"n": 1, "top1": 1.0}}


def _wilson(k: int, n: int, alpha: float) -> tuple[float, float]:
    from scipy.stats import norm

    z = norm.ppf(1 - alpha / 2)
    p = k / n
    centre, half = (p + z * z / (2 * n)) / (1 + z * z / n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def _newcombe10(a: int, b: int, c: int, d: int, alpha: float) -> tuple[float, float, float]:
    """Newcombe (1998) method 10, written out from the paper: Wilson limits of both margins, continuity-corrected
    phi (A = ad - bc; A - n/2 when A > n/2, 0 when 0 <= A <= n/2, A when negative; 0 when a margin is empty)."""
    n = a + b + c + d
    p1, p2 = (a + b) / n, (a + c) / n
    l1, u1 = _wilson(a + b, n, alpha)
    l2, u2 = _wilson(a + c, n, alpha)
    big_a = a * d - b * c
    margins = (a + b) * (c + d) * (a + c) * (b + d)
    if margins == 0:
        phi = 0.0
    else:
        corrected = big_a - n / 2 if big_a > n / 2 else (0.0 if big_a >= 0 else big_a)
        phi = corrected / math.sqrt(margins)
    diff = p2 - p1
    lower = diff - math.sqrt(max((p2 - l2) ** 2 - 2 * phi * (p2 - l2) * (u1 - p1) + (u1 - p1) ** 2, 0))
    upper = diff + math.sqrt(max((u2 - p2) ** 2 - 2 * phi * (u2 - p2) * (p1 - l1) + (p1 - l1) ** 2, 0))
    return diff, max(-1.0, lower), min(1.0, upper)


@pytest.mark.parametrize(
    "table",
    [
        (30, 5, 2, 13),  # A = 380 > n/2
        (10, 3, 3, 4),  # A = 31 > n/2 = 10
        (2, 2, 2, 2),  # A = 0: no correlation
        (4, 2, 1, 1),  # A = 2 < n/2 = 4: corrected to 0
        (3, 1, 1, 1),  # A = 2 < n/2 = 3
        (2, 1, 1, 2),  # A = 3 = n/2 exactly: corrected to 0
        (5, 3, 4, 1),  # A = -7: negative correlation kept
        (0, 6, 0, 4),  # a margin is empty
        (0, 9, 0, 0),  # every image lost: the lower limit clamps at -1
        (0, 0, 9, 0),  # every image gained: the upper limit clamps at +1
        (1, 0, 0, 1),  # margins of 1
    ],
)
@pytest.mark.parametrize("alpha", [0.05, 0.5])
def test_paired_difference_interval_is_newcombe_method_10(table, alpha):
    diff, (lo, hi) = stats.paired_diff_ci(*table, alpha=alpha)
    expected = _newcombe10(*table, alpha)
    assert (diff, lo, hi) == pytest.approx(expected, abs=1e-12), table


def test_mcnemar_is_the_exact_binomial_test():
    from scipy.stats import binomtest

    for b, c in ((5, 0), (7, 2), (3, 3), (12, 4)):
        assert stats.mcnemar_exact(b, c) == pytest.approx(binomtest(c, b + c, 0.5).pvalue, rel=1e-9)


def test_paired_table_takes_0_1_integers_and_checks_shapes():
    assert stats.paired_table([1, 0, 1, 0], [0, 0, 1, 1]) == (1, 1, 1, 1)
    assert stats.paired_table(np.array([2, 0]), np.array([1, 0])) == (1, 0, 0, 1)  # any non-zero is right
    with pytest.raises(ValueError, match=r"paired arrays differ in shape: \(3,\) vs \(2,\)"):
        stats.paired_table([1, 0, 1], [1, 0])
