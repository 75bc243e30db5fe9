"""int8eval tune: the stop rule, the split discipline (nothing is chosen on confirmation images), each ladder step on
the tiny model per backend, and the run folder it writes."""

from __future__ import annotations

import numpy as np
import pytest

import int8eval.commands.tune as tune_module
from int8eval import stats
from int8eval.config import Acceptance, Backend, Objective, TuneConfig
from int8eval.data.layouts import split_tuning
from int8eval.errors import DatasetError
from int8eval.report import Report
from int8eval.report.sections import PairedSection, Verdict
from int8eval.tune.rule import Judgement, judge

from conftest import WNIDS, write_image

FAST = dict(batch_sizes=(1, 2), warmup=0, min_runs=1, throughput_warmup=0, throughput_min_runs=1, min_seconds=0,
            max_seconds=0.05, compile_torch=False)


def _paired(n: int, lost: int, gained: int = 0) -> PairedSection:
    """`n` images: the variant answers wrong on the first `lost` (where the reference is right), the reference on
    the next `gained` (where the variant is right); they agree everywhere else."""
    labels = np.arange(n) % 10
    wrong = (labels + 5) % 10
    ref, var = labels.copy(), labels.copy()
    var[:lost] = wrong[:lost]
    ref[lost:lost + gained] = wrong[lost:lost + gained]
    return PairedSection.model_validate(stats.paired_stats(ref == labels, var == labels, ref, var, labels=labels))


def test_the_rule_accepts_a_settled_pass_or_agreement_within_budget_and_nothing_else():
    one_point = Acceptance(max_drop=1.0)
    settled = judge(_paired(4000, 4), one_point)  # a 0.1-pt drop with a tight CI
    assert settled.accepted and settled.by == "verdict" and settled.verdict.verdict is Verdict.passed
    proxy = judge(_paired(300, 3), one_point)  # 1 pt on 300 images: inconclusive, but 99% agree
    assert proxy.verdict.verdict is Verdict.inconclusive and proxy.accepted and proxy.by == "agreement"
    assert not judge(_paired(300, 4), one_point).accepted  # 98.7% agree: the drop may exceed the budget
    changed_not_lost = judge(_paired(300, 3, 3), one_point)  # answers changed, accuracy kept: 98% agreement
    assert not changed_not_lost.accepted and changed_not_lost.verdict.verdict is not Verdict.failed
    # --min-agreement is a floor on top of the rule: the settled pass above agrees on 99.9% of images.
    assert judge(_paired(4000, 4), one_point, min_agreement=0.999).accepted
    assert not judge(_paired(4000, 4), one_point, min_agreement=0.9995).accepted


def test_tuning_and_confirmation_sets_are_disjoint_seeded_and_sized(tmp_path):
    from int8eval.data.layouts import Sample

    samples = [Sample(tmp_path / f"{i}.JPEG", i % 3, f"{i}.JPEG") for i in range(50)]
    tuning, confirmation = split_tuning(samples, 20, 25, seed=3)
    assert len(tuning) == 20 and len(confirmation) == 25
    assert not {s.id for s in tuning} & {s.id for s in confirmation}
    assert split_tuning(samples, 20, 25, seed=3) == (tuning, confirmation)
    assert split_tuning(samples, 20, 25, seed=4) != (tuning, confirmation)
    with pytest.raises(DatasetError, match="--tune-size 30 and --confirm-size 25 need 55 images, but 50"):
        split_tuning(samples, 30, 25, seed=0)


@pytest.fixture
def eighteen_images(tmp_path):
    root = tmp_path / "data"
    for c, wnid in enumerate(WNIDS):
        for i in range(6):
            write_image(root / wnid / f"{wnid}_{i}.JPEG", seed=10 * c + i)
    return root


def _config(tmp_path, data, backends, **kw) -> TuneConfig:
    options = dict(model="tiny_test", data=data, out=tmp_path / "tune", backends=backends, calib_size=4,
                   tune_size=5, confirm_size=7, acceptance=Acceptance(max_drop=1.0), batch_size=4)
    return TuneConfig(**{**options, **kw})


class _Spy:
    """Records every evaluation the tuner runs (the image ids and the variants), and judges by `accept(name, on)`,
    where `on` is "tuning" or "confirmation"."""

    def __init__(self, monkeypatch, tuning_n: int, accept) -> None:
        self.calls, self.accepted_on_tuning = [], set()
        real = tune_module.evaluate

        def evaluate(samples, *args, **kw):
            self.calls.append(([s.id for s in samples], [v.name for v in args[1]]))
            return real(samples, *args, **kw)

        def fake_judge(paired, acceptance, min_agreement=None):
            on = "tuning" if paired.n == tuning_n else "confirmation"
            real_verdict = judge(paired, acceptance).verdict
            ok = accept(self.current, on)
            return Judgement(real_verdict, ok, "verdict" if ok else None)

        real_paired = tune_module.paired_for

        def paired_for(preds, name, reference, **kw):
            self.current = name
            return real_paired(preds, name, reference, **kw)

        monkeypatch.setattr(tune_module, "evaluate", evaluate)
        monkeypatch.setattr(tune_module, "judge", fake_judge)
        monkeypatch.setattr(tune_module, "paired_for", paired_for)
        monkeypatch.setattr(tune_module, "TIMING", FAST)


def test_a_candidate_that_fails_confirmation_is_not_chosen_and_confirmation_images_choose_nothing(
        tmp_path, eighteen_images, monkeypatch):
    # Accepted on tuning: every FP32-layers candidate; confirmed: none. The smallest (objective size) is confirmed
    # first, fails, and the ladder runs out: nothing is chosen.
    spy = _Spy(monkeypatch, 5, lambda name, on: on == "tuning" and "-keep" in name)
    config = _config(tmp_path, eighteen_images, (Backend.onnxruntime,), objective=Objective.size, max_fp32_layers=2)
    report = tune_module.tune(config)
    t = report.tune
    assert t.choice is None and t.backends[0].chosen is None and "ladder ran out" in t.backends[0].stopped
    keeps = [c for c in t.candidates if c.step == "FP32 layers"]
    assert [c.accepted for c in keeps] == [True, True]
    tried = [c for c in keeps if c.confirmed is not None]
    assert len(tried) == 1 and tried[0].confirmed is False and tried[0].size_mb == min(c.size_mb for c in keeps)

    tuning, confirmation = set(t.sets.tuning_ids), set(t.sets.confirmation_ids)
    calib = set(report.data.calibration.image_ids)
    assert len(tuning) == 5 and len(confirmation) == 7 and not (tuning & confirmation) and not (calib & (tuning | confirmation))
    for ids, names in spy.calls:
        if set(ids) == confirmation:  # a confirmation: the reference and one candidate accepted on tuning before
            assert len(names) == 2 and names[1] in {c.name for c in t.candidates if c.accepted}
        else:
            assert set(ids) == tuning
    assert sum(set(ids) == confirmation for ids, _ in spy.calls) == 1


def test_a_confirmed_candidate_stops_the_ladder_and_is_the_choice(tmp_path, eighteen_images, monkeypatch):
    _Spy(monkeypatch, 5, lambda name, on: name.endswith("-minmax"))
    report = tune_module.tune(_config(tmp_path, eighteen_images, (Backend.onnxruntime,)))
    t = report.tune
    assert t.choice == "onnxruntime-int8-minmax" and t.backends[0].chosen == t.choice
    assert {c.step for c in t.candidates} == {"default", "calibration"}  # nothing after the step that confirmed
    chosen = next(c for c in t.candidates if c.name == t.choice)
    assert chosen.confirmed and chosen.confirmation.n == 7 and chosen.throughput_ips > 0
    assert [v.name for v in report.variants] == ["torch-fp32", "onnxruntime-fp32", "onnxruntime-int8-minmax"]
    assert report.variant(t.choice).paired.n == 7  # the final verdicts are on the confirmation images
    again = Report.read(tmp_path / "tune" / "report.json")
    assert again.tune.choice == t.choice and (tmp_path / "tune" / "report.md").is_file()
    assert again.tune.backends[0].deploy == str(tmp_path / "tune" / "deploy" / "onnxruntime")


def test_the_deployed_choice_evaluates_again_as_it_was_chosen(tmp_path, eighteen_images, monkeypatch):
    """The manifest round trip: RUN_DIR/deploy/<backend> run again by `int8eval run --deployed` predicts exactly
    what the same recipe built afresh predicts, on the same images."""
    from int8eval.commands.run import run
    from int8eval.config import CalibMethod, Recipe, RunConfig
    from int8eval.deploy import deployment_recipes, load_deployment
    from int8eval.evaluate import Predictions

    _Spy(monkeypatch, 5, lambda name, on: name.endswith("-minmax"))
    tune_module.tune(_config(tmp_path, eighteen_images, (Backend.onnxruntime,)))
    folder = tmp_path / "tune" / "deploy" / "onnxruntime"
    manifest = load_deployment(folder)
    assert manifest.recipe.name == "onnxruntime-int8-minmax" and manifest.measured["confirmation"]["n"] == 7
    deployed, pre = deployment_recipes([folder], "tiny_test")
    afresh = Recipe(backend=Backend.onnxruntime, calib=CalibMethod.minmax)
    report = run(RunConfig(model="tiny_test", data=eighteen_images, out=tmp_path / "again", calib_size=4,
                           recipes=(afresh, *deployed), preprocessing=pre))
    preds = Predictions.load(tmp_path / "again" / "predictions.npz")
    assert report.variant(deployed[0].name).status == "ok"
    assert np.array_equal(preds.top5[deployed[0].name], preds.top5[afresh.name])
    assert np.array_equal(preds.kl_to_ref[deployed[0].name], preds.kl_to_ref[afresh.name])


STEPS = {
    Backend.torch: ["default", "calibration", "bias correction off", "FP32 layers"],
    Backend.onnxruntime: ["default", "calibration", "activation type", "bias correction off", "AdaRound", "FP32 layers"],
    Backend.openvino: ["default", "calibration", "bias correction off", "AdaRound", "FP32 layers"],
}


@pytest.mark.parametrize("backend", list(STEPS))
def test_every_ladder_step_runs_on_the_tiny_model(tmp_path, eighteen_images, monkeypatch, backend):
    from conftest import require_package

    packages, extra = {Backend.torch: (("torch",), "pt2e"), Backend.onnxruntime: (("onnx", "onnxruntime"), "onnxruntime"),
                       Backend.openvino: (("openvino", "nncf"), "openvino")}[backend]
    require_package(*packages, extra=extra)
    _Spy(monkeypatch, 5, lambda name, on: False)  # nothing is accepted: the whole ladder is climbed
    if backend is Backend.torch:  # inductor compiles each PT2E model for minutes here; the ladder is what is tested
        import functools

        from int8eval.backends import torch_backend

        monkeypatch.setattr(torch_backend, "build", functools.partial(torch_backend.build, compile=False))
    report = tune_module.tune(_config(tmp_path, eighteen_images, (backend,), max_fp32_layers=2))
    t = report.tune
    assert list(dict.fromkeys(c.step for c in t.candidates)) == STEPS[backend]
    built = [c for c in t.candidates if c.status == "ok"]
    assert len(built) >= len(STEPS[backend]), [(c.name, c.error) for c in t.candidates]
    for c in built:
        assert c.tuning.n == 5 and c.throughput_ips > 0 and c.size_mb > 0 and c.time_s > 0
    assert [len(c.recipe["keep_fp32"]) for c in t.candidates if c.step == "FP32 layers"] == [1, 2]
    # The kept layers are the fast ranking's first ones, recorded with what it ranked on.
    assert t.ranking.images == 5 and len(t.ranking.layers) >= 2
    assert [c.recipe["keep_fp32"] for c in t.candidates if c.step == "FP32 layers"][-1] == t.ranking.layers[:2]
    assert t.choice is None and set(t.backends[0].pareto) <= {c.name for c in built}


def test_the_cli_needs_a_budget_and_refuses_qat_without_torch(tmp_path, eighteen_images):
    from click.testing import CliRunner

    from int8eval.cli import main

    base = ["tune", "-m", "tiny_test", "--data", str(eighteen_images), "--out", str(tmp_path / "t")]
    result = CliRunner().invoke(main, base)
    assert result.exit_code == 2 and "tune needs a budget: --max-drop" in result.output
    result = CliRunner().invoke(main, base + ["--max-drop", "1", "--backend", "onnxruntime", "--qat-epochs", "1"])
    assert result.exit_code == 2 and "--qat-epochs is a step of the torch ladder" in result.output
    assert not (tmp_path / "t" / "report.json").exists()
