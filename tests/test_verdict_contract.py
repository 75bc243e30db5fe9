"""The verdict's exact contract: the section `decide` returns (as report.json holds it), its boundaries (a CI limit exactly at the budget, within
the 1e-9 tolerance), the criterion texts, the flag checks and the images-to-settle estimate, worked out by hand."""

from __future__ import annotations

import math

import pytest

from int8eval.errors import ConfigError
from int8eval.config import Acceptance, DropKind
from int8eval.report.sections import VerdictSection
from int8eval.verdict import acceptance_from_flags, decide, images_to_settle

TOL = 1e-9  # verdict's tolerance on the budget


def _pct(x: float) -> str:
    return f"{100 * x:.2f}"


def _shown(drop: float, lo: float, hi: float) -> str:
    return f"drop {_pct(drop)} pts (95% CI {_pct(lo)} to {_pct(hi)})"


ONE_POINT = Acceptance(max_drop=1.0)


def test_pass_returns_every_field():
    out = decide(ONE_POINT, 0.8, -0.004, (-0.009, 0.001), n=500)
    assert out.model_dump(mode="json") == {
        "verdict": "pass",
        "reason": f"{_shown(0.004, -0.001, 0.009)} is within the 1.00-pt budget",
        "budget": 0.01,
        "drop": 0.004,
        "drop_ci95": [-0.001, 0.009],
        "criterion": "top-1 drop of at most 1 point",
    }


def test_fail_and_the_relative_budget_text():
    acceptance = Acceptance(max_drop=2.0, drop=DropKind.relative)
    out = decide(acceptance, 0.5, -0.05, (-0.07, -0.03))
    budget = 0.5 * 2.0 / 100
    assert out.verdict == "fail" and out.budget == pytest.approx(budget)
    assert out.reason == (f"{_shown(0.05, 0.03, 0.07)} exceeds the {_pct(budget)}-pt budget (2% of FP32's 50.00%)")
    assert out.criterion == "top-1 drop of at most 2% of FP32's top-1"


@pytest.mark.parametrize(
    "ci, verdict",
    [
        ((-(0.01 + TOL), 0.0), "pass"),  # the upper drop limit exactly at budget + tolerance: still within
        ((-0.05, -(0.01 + TOL)), "inconclusive"),  # the lower limit exactly there: not beyond yet
        ((-0.05, -(0.01 + 2 * TOL)), "fail"),
    ],
)
def test_limits_at_the_budget(ci, verdict):
    assert decide(ONE_POINT, 0.8, (ci[0] + ci[1]) / 2, ci).verdict == verdict


def test_an_estimate_exactly_at_the_budget_counts_as_within():
    for drop in (0.01, 0.01 + TOL):
        out = decide(ONE_POINT, 0.8, -drop, (-(drop + 0.01), -(drop - 0.01)))
        assert out.verdict == "inconclusive" and "the estimate is within" in out.reason, drop
    out = decide(ONE_POINT, 0.8, -(0.01 + 2 * TOL), (-0.03, 0.0))
    assert "the estimate exceeds" in out.reason


def test_inconclusive_says_how_many_images_would_settle_it():
    n = 400
    within = decide(ONE_POINT, 0.8, -0.005, (-0.02, 0.01), n=n)  # drop 0.005, CI [-0.01, 0.02]
    needed = math.ceil(n * ((0.02 - 0.005) / (0.01 - 0.005)) ** 2)
    assert within.reason == (f"{_shown(0.005, -0.01, 0.02)}: the estimate is within the 1.00-pt budget but the CI "
                                f"reaches beyond it; roughly {needed:,} images (now {n:,}) would settle it")
    beyond = decide(ONE_POINT, 0.8, -0.03, (-0.05, -0.005), n=n)  # drop 0.03, CI [0.005, 0.05]
    needed = math.ceil(n * ((0.03 - 0.005) / (0.03 - 0.01)) ** 2)
    assert beyond.reason.endswith(f"reaches back within it; roughly {needed:,} images (now {n:,}) would settle it")
    assert images_to_settle(beyond, n) == needed and images_to_settle(within, n) == math.ceil(n * 9)
    assert not decide(ONE_POINT, 0.8, -0.03, (-0.05, -0.005)).reason.endswith("settle it")  # no n: no estimate


def test_images_to_settle_only_where_it_can_tell():
    verdict = {"verdict": "inconclusive", "drop": 0.005, "drop_ci95": [-0.01, 0.005], "budget": 0.01, "reason": "",
               "criterion": ""}

    def settle(n, **changed):
        return images_to_settle(VerdictSection.model_validate({**verdict, **changed}), n)

    assert settle(100) is None  # a zero half-width says nothing
    assert settle(100, drop_ci95=[-0.01, 0.02], drop=0.01) is None  # at the budget
    assert settle(100, verdict="pass") is None
    assert settle(None, drop_ci95=[-0.01, 0.02]) is None


def test_criterion_texts():
    assert Acceptance.mlperf().describe() == "MLPerf: top-1 at least 99% of FP32's (a 1% relative drop)"
    assert Acceptance(max_drop=1.0, drop=DropKind.relative).describe() == "top-1 drop of at most 1% of FP32's top-1"
    assert Acceptance(max_drop=2.5).describe() == "top-1 drop of at most 2.5 points"
    assert Acceptance(max_drop=0.0).describe() == "top-1 drop of at most 0 points"


def test_flags():
    assert acceptance_from_flags(0.0, None, False) == Acceptance(max_drop=0.0)
    assert acceptance_from_flags(100.0, "relative", False) == Acceptance(max_drop=100.0, drop=DropKind.relative)
    for bad in (-0.5, 100.5):
        with pytest.raises(ConfigError, match=rf"^--max-drop {bad} is out of range"):
            acceptance_from_flags(bad, None, False)
    with pytest.raises(ConfigError, match=r"^--mlperf already means --max-drop 1 --drop relative; give either --mlperf or --max-drop$"):
        acceptance_from_flags(1.0, None, True)
    assert acceptance_from_flags(None, "relative", True) == Acceptance.mlperf()


def _qat_run(tmp_path):
    """A reference, a QAT INT8 variant with its FP32 control, PTQ INT8 of the same and of another backend, a control
    of another learning rate, and a failed variant whose predictions exist: known top-1s and labels."""
    import numpy as np

    from int8eval.config import Preprocessing
    from int8eval.evaluate import Predictions
    from int8eval.report.schema import DataSection, ModelSection, Report, VariantResult

    n, rng = 300, np.random.default_rng(4)
    labels = rng.integers(0, 20, n)

    def top1(p_right):
        return np.where(rng.random(n) < p_right, labels, (labels + 1) % 1000)

    def top5(t1):
        return np.stack([t1] + [(t1 + k) % 1000 for k in range(2, 6)], axis=1).astype(np.int16)

    t = {"ref": top1(0.8), "qat": top1(0.7), "control": top1(0.75), "ptq": top1(0.6), "ort": top1(0.5),
         "lr": top1(0.4), "broken": top1(0.3)}
    qat = {"qat_epochs": 1, "lr": 0.5}
    rows = [
        ("ref", "torch", "fp32", "ok", {}), ("qat", "torch", "int8", "ok", qat), ("control", "torch", "fp32", "ok", qat),
        ("ptq", "torch", "int8", "ok", {}), ("ort", "onnxruntime", "int8", "ok", {}),
        ("lr", "torch", "fp32", "ok", {"qat_epochs": 1, "lr": 0.1}), ("broken", "torch", "int8", "error", {}),
    ]
    variants = [VariantResult(name=name, backend=b, precision=p, status=s, recipe=r, reference=name == "ref",
                              error="boom" if s == "error" else None) for name, b, p, s, r in rows]
    preds = Predictions([f"i{i}" for i in range(n)], labels, {k: top5(v) for k, v in t.items()},
                        {"qat": rng.exponential(0.01, n).astype(np.float32)},
                        {"qat": (1 - rng.exponential(0.01, n)).astype(np.float32)})
    report = Report(
        created="2025-01-01T00:00:00+00:00",
        model=ModelSection(name="tiny_test", source="random", num_params=1, preprocessing=Preprocessing(resize=40, crop=32)),
        data=DataSection(root=str(tmp_path), layout="folder-per-synset", num_found=n, num_images=n, num_skipped=0),
        variants=variants, environment={},
    )
    return report, preds


def test_qat_is_compared_with_its_control_and_ptq_of_its_backend(tmp_path):
    from int8eval import stats
    from int8eval.verdict import add_paired_stats

    report, preds = _qat_run(tmp_path)
    acceptance = Acceptance(max_drop=1.0, drop=DropKind.relative)
    add_paired_stats(report, preds, acceptance)
    v = {x.name: x for x in report.variants}
    qat = v["qat"]
    assert list(qat.compared_with) == ["control", "ptq"]  # not the other learning rate, backend or a failed variant
    for other, got in qat.compared_with.items():
        assert got.model_dump(mode="json") == stats.paired_stats(
            preds.correct1(other), preds.correct1("qat"), preds.top1(other), preds.top1("qat"),
            correct5_ref=preds.correct5(other), correct5_var=preds.correct5("qat"))
        assert got.kl_mean is None and got.top1.ref == preds.correct1(other).mean()
    assert qat.paired.model_dump(mode="json") == stats.paired_stats(
        preds.correct1("ref"), preds.correct1("qat"), preds.top1("ref"), preds.top1("qat"), labels=preds.labels,
        correct5_ref=preds.correct5("ref"), correct5_var=preds.correct5("qat"), kl=preds.kl_to_ref["qat"],
        cos=preds.cos_to_ref["qat"])
    ref_top1 = preds.correct1("ref").mean()
    assert qat.verdict.budget == pytest.approx(ref_top1 / 100) and qat.verdict.criterion == acceptance.describe()
    assert v["ptq"].compared_with is None and v["ptq"].verdict is not None
    assert v["control"].verdict is None and v["control"].paired is not None  # FP32: measured, not judged
    assert v["broken"].paired is None and v["broken"].verdict is None
    assert v["ref"].paired is None
    assert report.acceptance.model_dump(mode="json") == {"max_drop": 1.0, "drop": "relative", "label": None,
                                                         "description": acceptance.describe()}
    assert report.acceptance.drop is DropKind.relative


def test_nothing_is_judged_without_the_reference_predictions(tmp_path):
    from int8eval.verdict import add_paired_stats

    report, preds = _qat_run(tmp_path)
    del preds.top5["ref"]
    add_paired_stats(report, preds, ONE_POINT)
    assert report.acceptance is None and all(x.paired is None for x in report.variants)
