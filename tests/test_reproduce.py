"""The seed's recipe: its YAML, what it needs offline, and a full run of the machinery on a tiny stand-in: the
session stages `run` uses (the same split), a run folder with report.json and the seed table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import WNIDS, write_image

from int8eval.cli import main
from int8eval.commands.reproduce import reproduce
from int8eval.config import Backend, Precision, Recipe, RunConfig
from int8eval.errors import ConfigError, DatasetError, ModelLoadError
from int8eval.recipes.reproduce import ReproRecipe, known_recipes, load_recipe, requirements, variant_recipes
from int8eval.recipes.table import anchor_rows, render_table
from int8eval.report import Report
from int8eval.report.schema import ReproductionSection


def test_the_seed_recipe_says_what_the_seed_did():
    r = load_recipe("seed")
    assert "seed" in known_recipes()
    assert (r.model, r.weights) == ("resnet50", "IMAGENET1K_V1")
    p = r.preprocessing
    assert (p.resize, p.crop, p.interpolation.value) == (256, 224, "bilinear")
    assert p.mean == (0.485, 0.456, 0.406) and p.std == (0.229, 0.224, 0.225)
    assert r.finetune.epochs == 2 and r.finetune.legacy and r.finetune.pt2e and r.finetune.control
    assert r.finetune.engine == "fbgemm"
    names = [x.name for x in r.gpu_recipes]
    assert "tensorrt-int8-legacy-entropy" in names and "tensorrt-int8-entropy" in names and "tensorrt-fp16" in names
    assert all(x.backend is not Backend.tensorrt for x in r.cpu_recipes)
    assert r.tensorrt_on_cpu.backend is Backend.tensorrt and r.tensorrt_on_cpu.precision is Precision.int8
    tv, seed = r.anchors["torchvision"], r.anchors["seed"]
    assert (tv.fp32_top1, tv.int8_top1, tv.fp32_size_mb, tv.int8_size_mb) == (76.130, 75.920, 97.79, 24.95)
    assert (seed.fp32_top1, seed.int8_top1, seed.speedup, seed.size_reduction) == (76.4, 75.8, 3.0, 0.75)


def test_the_seed_recipes_tensorrt_variants_are_valid_tensorrt_recipes():
    pytest.importorskip("onnx")
    from int8eval.backends.tensorrt_backend import check_recipe_options

    r = load_recipe("seed")
    for recipe in [*r.gpu_recipes, r.tensorrt_on_cpu]:
        check_recipe_options(recipe)
    cpu = variant_recipes(r, on_gpu=False, finetune=True)
    assert Recipe(backend=Backend.tensorrt, calib="entropy", emulate=True) in cpu  # through the backend registry
    assert {x.name for x in cpu} >= {"torch-int8-qat", "torch-int8-qat-legacy", "torch-fp32-finetuned"}
    assert all(x.qat_epochs == 2 and x.lr == 1e-4 for x in cpu if x.qat_epochs)
    assert not any(x.qat_epochs for x in variant_recipes(r, on_gpu=False, finetune=False))


def test_the_table_puts_the_published_numbers_first():
    r = load_recipe("seed")
    text = render_table(ReproductionSection(recipe=r.model_dump(mode="json"), rows=anchor_rows(r)), num_images=800,
                        data="sample")
    assert "| torchvision (published) | 76.13 | 75.92 | +0.21 |" in text
    assert "| seed (published) | 76.40 | 75.80 | +0.60 | 3.00x | 75.0% |" in text
    assert "50,000" in text  # a subset is flagged as not comparable in absolute terms


def test_unknown_recipes_and_misspelt_keys_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="known: .*seed"):
        load_recipe("sede")
    bad = tmp_path / "bad.yaml"
    bad.write_text(Path(load_recipe.__globals__["RECIPES_DIR"] / "seed.yaml").read_text().replace("calib_size:", "calib_sise:"))
    with pytest.raises(ConfigError, match="calib_sise"):
        load_recipe(bad)


def test_offline_it_says_which_weights_and_data_it_needs_and_where(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    r = load_recipe("seed")
    needs = {n.what.split(" (")[0]: n for n in requirements(r, data=None, train_data=None)}
    weights = needs["resnet50 IMAGENET1K_V1 weights"]
    assert not weights.present and str(tmp_path / "torch" / "hub" / "checkpoints" / "resnet50-0676ba61.pth") in weights.where
    assert "resnet50-0676ba61.pth" in weights.what
    assert not any(n.present for n in needs.values() if "ImageNet" in n.what)
    with pytest.raises(DatasetError) as e:
        reproduce(r, data=tmp_path / "nowhere", out=tmp_path / "out")
    message = str(e.value)
    assert "resnet50-0676ba61.pth" in message and "--data" in message and "--train-data" in message


def test_missing_weights_name_the_file_and_everything_else(tmp_path, monkeypatch, image_folder):
    import int8eval.session

    def offline(*args, **kwargs):
        raise ModelLoadError("could not download resnet50-0676ba61.pth")

    monkeypatch.setattr(int8eval.session, "load_model", offline)
    with pytest.raises(ModelLoadError, match="needs: .*weights.*--train-data"):
        reproduce(load_recipe("seed"), data=image_folder, out=tmp_path / "out")


def _tiny(**changes) -> ReproRecipe:
    """The seed's recipe on tiny_test: PTQ on ONNX Runtime, TensorRT's Q/DQ ONNX under ONNX Runtime, PT2E QAT and
    its FP32 control (no legacy QAT: the slowest part)."""
    return ReproRecipe.model_validate(
        load_recipe("seed").model_dump()
        | {
            "model": "tiny_test",
            "weights": None,
            "preprocessing": {"resize": 40, "crop": 32},
            "calib_size": 4,
            "batch_size": 4,
            "finetune": {"epochs": 1, "lr": 1e-6, "batch_size": 4, "train_size": 4, "legacy": False},
            "cpu_recipes": [{"backend": "onnxruntime", "precision": "int8", "calib": "percentile"}],
        }
        | changes
    )


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory):
    """(images, run folder, Report) of one reproduction of the tiny stand-in, trained on a seeded split of --data."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("torchao")
    data = tmp_path_factory.mktemp("data")
    for c, wnid in enumerate(WNIDS):
        for i in range(4):
            write_image(data / wnid / f"{wnid}_{i}.JPEG", seed=10 * c + i)
    out = tmp_path_factory.mktemp("seed")
    report = reproduce(_tiny(), data=data, train_data=data, out=out, gpu=False, compile=False, workers=0)
    return data, out, report


def test_a_tiny_stand_in_runs_every_step_on_the_cpu(stand_in):
    """The seed's machinery with tiny_test, one pass, one run folder: report.json with the table as its
    `reproduction` section, and seed_table.md/.json made from it."""
    _, out, report = stand_in
    rows = {row.name: row for row in report.reproduction.rows}
    assert report.data.num_images == 12 - 4 - 4  # calibration and training images are never evaluated
    for name in (
        "onnxruntime-int8-percentile99.999",
        "tensorrt-int8-entropy@onnxruntime",
        "torch-int8-qat",
        "torch-fp32-finetuned",
        "tensorrt-int8-entropy@onnxruntime+qat-weights",
    ):
        assert name in rows, (name, report.reproduction.notes)
        assert report.variant(name).status == "ok"
    assert rows["torch-int8-qat"].size_reduction > 0 and rows["torch-int8-qat"].speedup > 0  # tiny: file overhead dominates
    assert rows["torch-fp32-finetuned"].int8_top1 is None
    qat_weights = report.variant("tensorrt-int8-entropy@onnxruntime+qat-weights")
    assert qat_weights.details["weights"] == "QAT-trained (torch-int8-qat)"
    assert qat_weights.gated_by == "tensorrt-fp32@onnxruntime"  # every INT8 row passed its backend's FP32 parity check
    for row in rows.values():
        if row.kind == "measured" and row.int8_top1 is not None:
            assert row.loss_points == pytest.approx(row.fp32_top1 - row.int8_top1)
            assert row.int8_top1 == pytest.approx(100 * report.variant(row.name).top1)
    text = (out / "seed_table.md").read_text()
    assert "torchvision (published)" in text and "| torch-int8-qat |" in text
    table = json.loads((out / "seed_table.json").read_text())
    assert [r["name"] for r in table["rows"]] == list(rows) and table["train_images"] == 4
    assert table["calib_image_ids"] == report.data.calibration.image_ids
    for name in ("report.json", "report.md", "report.html", "predictions.npz"):
        assert (out / name).is_file(), name


def test_the_reproduction_reads_back_and_int8eval_report_re_renders_it(stand_in):
    _, out, report = stand_in
    read = Report.read(out / "report.json")
    assert read.reproduction == report.reproduction and read.run_id == report.run_id
    (out / "report.md").unlink()
    result = CliRunner().invoke(main, ["report", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "report.md").is_file()
    assert Report.read(out / "report.json").reproduction == report.reproduction


def test_the_split_is_runs_training_then_calibration(stand_in, tmp_path):
    """The same seed, calibration size and training size pick the same training and calibration images in
    `reproduce` as in `int8eval run` with QAT (reproduce used to draw calibration images first)."""
    from int8eval.commands.run import run

    data, _, report = stand_in
    # QAT's FP32 control is enough to make `run` draw training images (and builds in seconds: no PT2E compile).
    control = Recipe(backend=Backend.torch, precision=Precision.fp32, qat_epochs=1)
    run(RunConfig(model="tiny_test", data=data, out=tmp_path / "run", calib_size=4, train_size=4, seed=0,
                  train_batch_size=4, recipes=(Recipe(backend=Backend.onnxruntime, calib="minmax"), control)))
    run = Report.read(tmp_path / "run" / "report.json")
    assert run.data.calibration.image_ids == report.data.calibration.image_ids
    assert run.data.training["image_ids"] == report.data.training["image_ids"]
    assert not set(report.data.calibration.image_ids) & set(report.data.training["image_ids"])


def test_without_training_images_the_qat_rows_say_why(image_folder, tmp_path):
    pytest.importorskip("onnxruntime")
    tiny = _tiny(cpu_recipes=[], tensorrt_on_cpu=None)
    report = reproduce(tiny, data=image_folder, out=tmp_path, gpu=False, workers=0)
    assert any("--train-data" in n for n in report.reproduction.notes)
    assert [r.kind for r in report.reproduction.rows] == ["published", "published"]
    assert [v.name for v in report.variants] == ["torch-fp32"] and report.data.calibration is None


def test_the_recipes_fine_tuning_options_reach_the_qat_builder(tmp_path):
    """freeze_bn and the legacy engine (the seed used fbgemm) go through the session's BuildContext, the one path
    every fine-tuning recipe is built by; left out, they are what `run` uses."""
    from int8eval.backends import BuildContext
    from int8eval.backends.qat import finetune_spec

    recipe = Recipe(backend=Backend.torch, qat_epochs=2, lr=1e-4, legacy=True)
    spec = finetune_spec(recipe, BuildContext(workdir=tmp_path, freeze_bn=False, legacy_engine="fbgemm", train_batch_size=8))
    assert (spec.epochs, spec.lr, spec.batch_size, spec.freeze_bn, spec.engine) == (2, 1e-4, 8, False, "fbgemm")
    default = finetune_spec(recipe, BuildContext(workdir=tmp_path))
    assert (default.freeze_bn, default.engine) == (True, "x86")
