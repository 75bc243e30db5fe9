"""The acceptance criterion and its verdicts, at their edges; filling a report from per-image predictions."""

from __future__ import annotations

import numpy as np
import pytest

from int8eval.errors import ConfigError, RunFolderError
from int8eval.evaluate import Predictions
from int8eval.report.schema import DataSection, ModelSection, ParityCheck, Report, VariantResult
from int8eval.config import Acceptance, DropKind, Preprocessing
from int8eval.report.sections import VerdictSection
from int8eval.verdict import acceptance_from_flags, add_paired_stats, apply_to_run_dir, decide

ABS1 = Acceptance(max_drop=1.0)
REL1 = Acceptance(max_drop=1.0, drop=DropKind.relative)


def _decide(acc: Acceptance, drop: float, lo: float, hi: float, ref: float = 0.8, n: int | None = 800) -> VerdictSection:
    """decide() in terms of the drop (ref - variant) and its CI, which is how people think about it."""
    return decide(acc, ref, -drop, (-hi, -lo), n)


def test_budgets():
    assert ABS1.budget(0.5) == pytest.approx(0.01)
    assert REL1.budget(0.8) == pytest.approx(0.008)
    assert Acceptance.mlperf().budget(0.76456) == pytest.approx(0.0076456)  # INT8 >= 99% of FP32
    assert Acceptance.mlperf() == Acceptance(max_drop=1.0, drop="relative", label="mlperf")


def test_clear_pass_and_clear_fail():
    assert _decide(ABS1, 0.002, -0.003, 0.007).verdict == "pass"
    assert _decide(ABS1, 0.05, 0.03, 0.07).verdict == "fail"
    assert _decide(ABS1, -0.01, -0.02, 0.0).verdict == "pass"  # the variant is better


def test_upper_limit_touching_the_budget_passes():
    v = _decide(ABS1, 0.004, -0.002, 0.01)
    assert v.verdict == "pass"
    assert "within" in v.reason


def test_lower_limit_touching_the_budget_is_inconclusive_not_fail():
    # The drop may be exactly the budget, which is allowed: not proven beyond it.
    assert _decide(ABS1, 0.02, 0.01, 0.03).verdict == "inconclusive"
    assert _decide(ABS1, 0.02, 0.0100001, 0.03).verdict == "fail"


def test_estimate_exactly_at_the_budget_is_inconclusive():
    v = _decide(ABS1, 0.01, 0.004, 0.016)
    assert v.verdict == "inconclusive"
    assert "images" not in v.reason  # no sample size can separate an estimate sitting on the budget


def test_zero_width_interval_at_the_budget_passes():
    assert _decide(ABS1, 0.01, 0.01, 0.01).verdict == "pass"


def test_straddling_says_how_many_images_would_settle_it():
    v = _decide(ABS1, 0.005, -0.002, 0.012, n=800)
    assert v.verdict == "inconclusive"
    # half-width above the estimate 0.007, gap to the budget 0.005: 800 * (0.007 / 0.005)^2 = 1568
    assert "1,568 images" in v.reason and "within" in v.reason
    v = _decide(ABS1, 0.015, 0.008, 0.022, n=800)
    assert v.verdict == "inconclusive" and "exceeds" in v.reason


def test_relative_budget_is_stricter_below_100_percent_top1():
    # FP32 top-1 50%: 1 point absolute is 0.01, 1% relative is 0.005.
    drop, lo, hi = 0.007, 0.0055, 0.0085
    assert _decide(ABS1, drop, lo, hi, ref=0.5).verdict == "pass"
    assert _decide(REL1, drop, lo, hi, ref=0.5).verdict == "fail"
    assert "1% of FP32's 50.00%" in _decide(REL1, drop, lo, hi, ref=0.5).reason


def test_relative_budget_edge_survives_floating_point():
    # 0.88 * 1.0 / 100 is 0.0088000000000000005 in binary; a CI touching 0.0088 must still pass.
    assert _decide(REL1, 0.004, 0.0, 0.0088, ref=0.88).verdict == "pass"


def test_acceptance_from_flags():
    assert acceptance_from_flags(None, None, False) is None
    assert acceptance_from_flags(1.0, None, False) == ABS1
    assert acceptance_from_flags(0.5, "relative", False) == Acceptance(max_drop=0.5, drop="relative")
    assert acceptance_from_flags(None, None, True) == Acceptance.mlperf()
    with pytest.raises(ConfigError, match="--mlperf"):
        acceptance_from_flags(1.0, None, True)
    with pytest.raises(ConfigError, match="--max-drop"):
        acceptance_from_flags(None, "relative", False)
    with pytest.raises(ConfigError, match="out of range"):
        acceptance_from_flags(-1.0, None, False)


# --- Filling a report ---------------------------------------------------------------------------------------------


def _run(tmp_path, n: int = 600):
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 1000, n)
    ref = np.where(rng.random(n) < 0.9, labels, (labels + 1) % 1000)

    def top5(t1):
        return np.stack([t1] + [(t1 + k) % 1000 for k in range(2, 6)], axis=1).astype(np.int16)

    good = ref.copy()
    bad = np.where(rng.random(n) < 0.2, (ref + 3) % 1000, ref)
    preds = Predictions([f"i{i}" for i in range(n)], labels, {
        "torch-fp32": top5(ref), "openvino-fp32": top5(ref), "openvino-int8-minmax": top5(good),
        "onnxruntime-int8-minmax": top5(bad), "onnxruntime-fp32": top5(bad),
    })
    variants = [
        VariantResult(name="torch-fp32", backend="torch", precision="fp32", status="ok", reference=True),
        VariantResult(name="openvino-fp32", backend="openvino", precision="fp32", status="ok",
                      parity=ParityCheck(agreement_top1=1.0, threshold=0.999, passed=True)),
        VariantResult(name="openvino-int8-minmax", backend="openvino", precision="int8", status="ok"),
        VariantResult(name="onnxruntime-fp32", backend="onnxruntime", precision="fp32", status="ok",
                      parity=ParityCheck(agreement_top1=0.8, threshold=0.999, passed=False)),
        VariantResult(name="onnxruntime-int8-minmax", backend="onnxruntime", precision="int8", status="parity_failed",
                      error="onnxruntime FP32 agrees with the PyTorch reference on only 80.00% of images"),
        VariantResult(name="openvino-int8-percentile", backend="openvino", precision="int8", status="error",
                      error="boom"),
    ]
    report = Report(
        created="2025-01-01T00:00:00+00:00",
        model=ModelSection(name="tiny_test", source="random", num_params=1,
                           preprocessing=Preprocessing(resize=40, crop=32)),
        data=DataSection(root=str(tmp_path), layout="folder-per-synset", num_found=n, num_images=n, num_skipped=0),
        variants=variants, environment={},
    )
    return report, preds


def test_add_paired_stats_fills_the_right_variants(tmp_path):
    report, preds = _run(tmp_path)
    add_paired_stats(report, preds, ABS1)
    v = {x.name: x for x in report.variants}
    assert v["torch-fp32"].paired is None and v["torch-fp32"].verdict is None
    assert v["openvino-fp32"].paired is not None and v["openvino-fp32"].verdict is None  # parity check, not judged
    assert v["openvino-int8-minmax"].verdict.verdict == "pass"  # identical predictions: CI of the drop ~[-0.6, 0.6]
    assert v["openvino-int8-minmax"].paired.top1.diff == 0
    bad = v["onnxruntime-int8-minmax"]
    assert bad.paired.top1.ref_right_var_wrong > 50
    assert bad.verdict.verdict == "inconclusive" and "80.00%" in bad.verdict.reason  # parity failed
    assert v["openvino-int8-percentile"].paired is None  # errored: nothing measured
    assert report.acceptance.max_drop == 1.0 and "at most 1 point" in report.acceptance.description


def test_no_acceptance_means_stats_but_no_verdicts(tmp_path):
    report, preds = _run(tmp_path)
    add_paired_stats(report, preds, None)
    assert report.acceptance is None
    assert all(x.verdict is None for x in report.variants)
    assert report.variant("openvino-int8-minmax").paired.n == 600


def test_apply_to_run_dir_rejudges_without_rerunning(tmp_path):
    report, preds = _run(tmp_path)
    report.write(tmp_path / "report.json")
    preds.save(tmp_path / "predictions.npz")
    out = apply_to_run_dir(tmp_path, Acceptance(max_drop=0.0))
    assert out.variant("openvino-int8-minmax").verdict.verdict == "inconclusive"  # a 0 budget can only be touched
    again = Report.read(tmp_path / "report.json")
    assert again.variant("openvino-int8-minmax").verdict == out.variant("openvino-int8-minmax").verdict
    assert "INCONCLUSIVE" in (tmp_path / "report.md").read_text()
    assert (tmp_path / "report.html").is_file()
    with pytest.raises(RunFolderError, match="nowhere is not a run folder"):
        apply_to_run_dir(tmp_path / "nowhere", ABS1)
