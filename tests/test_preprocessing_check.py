"""The preprocessing check: a labelled FP32 run far below the weights' published top-1 warns (report.json, report.md,
report.html, console). No model here publishes its accuracy and can be downloaded, so a run injects one."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from int8eval import preprocessing_check
from int8eval.cli import main
from int8eval.models import tiny
from int8eval.preprocessing_check import MARGIN_POINTS, check
from int8eval.stats import accuracy_ci


def hits(k: int, n: int) -> np.ndarray:
    return np.arange(n) < k


def test_far_below_the_published_top1_warns_naming_the_culprits():
    result = check(hits(30, 100), 0.761, source="torchvision X")
    assert result.suspect and result.num_images == 100 and result.measured_top1 == 0.30
    for culprit in ("mean/std", "channel order", "interpolation", "resize/crop", "76.10%", "torchvision X"):
        assert culprit in result.warning


def test_a_measurement_consistent_with_the_published_top1_is_quiet():
    assert not check(hits(750, 1000), 0.761, source="x").suspect  # 1 point under on 1,000 images
    assert not check(hits(9, 12), 0.761, source="x").suspect  # 75% of 12 images
    assert check(hits(0, 50), 0.70, source="x").suspect  # 0 of 50: the upper end is 11.7%, far below


@pytest.mark.parametrize("k", range(620, 700, 5))
def test_the_rule_is_the_upper_end_of_the_99_percent_interval_against_the_margin(k):
    n, published = 1000, 0.761
    _, (_, hi) = accuracy_ci(hits(k, n), alpha=0.01)
    assert check(hits(k, n), published, source="x").suspect == ((published - hi) * 100 > MARGIN_POINTS)


def test_no_check_without_a_published_number_or_labels(tiny):
    assert preprocessing_check.for_reference(tiny, hits(3, 12)) is None  # tiny_test publishes nothing
    with pytest.raises(ValueError, match="not a fraction"):
        check(hits(3, 12), 76.1, source="x")  # percent passed where a fraction is wanted


def _publishing(monkeypatch, top1: float) -> None:
    """tiny_test as if its weights' publisher reported `top1` (%)."""
    load = tiny.load

    def with_published(name, **kw):
        loaded = load(name, **kw)
        loaded.published_top1, loaded.published_source = top1, "injected for the test"
        return loaded

    monkeypatch.setattr(tiny, "load", with_published)


def _run(folder, out):
    return CliRunner().invoke(main, ["run", "-m", "tiny_test", "--data", str(folder), "--out", str(out),
                                     "--fp32-only", "--batch-size", "6"], catch_exceptions=False)


def test_a_run_far_below_the_published_top1_warns_everywhere(monkeypatch, image_folder, tmp_path):
    _publishing(monkeypatch, 76.1)  # the random tiny model gets about nothing right
    result = _run(image_folder, tmp_path / "run")
    assert result.exit_code == 0, result.output
    assert "preprocessing is probably wrong" in " ".join(result.output.split())  # the console, however wrapped
    section = json.loads((tmp_path / "run" / "report.json").read_text())["preprocessing_check"]
    assert section["suspect"] and section["published_top1"] == pytest.approx(0.761) and section["num_images"] == 12
    for name in ("report.md", "report.html"):
        text = (tmp_path / "run" / name).read_text()
        assert "WARNING" in text and "channel order" in text, name


def test_a_run_consistent_with_the_published_top1_says_so(monkeypatch, image_folder, tmp_path):
    _publishing(monkeypatch, 30.0)  # 12 images: the upper end of 0 of 12 right is about 36%
    result = _run(image_folder, tmp_path / "run")
    assert result.exit_code == 0, result.output
    assert "probably wrong" not in result.output
    section = json.loads((tmp_path / "run" / "report.json").read_text())["preprocessing_check"]
    assert not section["suspect"] and section["warning"] is None
    assert "no sign of a preprocessing mismatch" in (tmp_path / "run" / "report.md").read_text()
