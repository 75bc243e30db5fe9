"""The seed's recipe: its YAML, what it needs offline, and a full run of the machinery on a tiny stand-in."""

from __future__ import annotations

from pathlib import Path

import pytest

from int8eval.config import Backend, Precision
from int8eval.errors import ConfigError, DatasetError, ModelLoadError
from int8eval.recipes.reproduce import (
    ReproRecipe,
    SeedResult,
    anchor_rows,
    known_recipes,
    load_recipe,
    render_table,
    reproduce,
    requirements,
)


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
    from int8eval.backends.tensorrt_backend import _check_recipe_options

    r = load_recipe("seed")
    for recipe in [*r.gpu_recipes, r.tensorrt_on_cpu]:
        _check_recipe_options(recipe)


def test_the_table_puts_the_published_numbers_first():
    r = load_recipe("seed")
    text = render_table(SeedResult(r, anchor_rows(r), 800, "sample"))
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
    import int8eval.models

    def offline(*args, **kwargs):
        raise ModelLoadError("could not download resnet50-0676ba61.pth")

    monkeypatch.setattr(int8eval.models, "load_model", offline)
    with pytest.raises(ModelLoadError, match="needs: .*weights.*--train-data"):
        reproduce(load_recipe("seed"), data=image_folder, out=tmp_path / "out")


def test_a_tiny_stand_in_runs_every_step_on_the_cpu(image_folder, tmp_path):
    """The seed's machinery with tiny_test: PTQ on ONNX Runtime, TensorRT's Q/DQ ONNX under ONNX Runtime, PT2E QAT,
    its FP32 control and the QAT weights through the TensorRT-bound Q/DQ ONNX, one pass, one table."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("torchao")
    seed = load_recipe("seed")
    tiny = ReproRecipe.model_validate(
        seed.model_dump()
        | {
            "model": "tiny_test",
            "weights": None,
            "preprocessing": {"resize": 40, "crop": 32},
            "calib_size": 4,
            "batch_size": 4,
            "finetune": {"epochs": 1, "lr": 1e-6, "batch_size": 4, "train_size": 4, "legacy": False},
            "cpu_recipes": [{"backend": "onnxruntime", "precision": "int8", "calib": "percentile"}],
        }
    )
    result = reproduce(tiny, data=image_folder, train_data=image_folder, out=tmp_path, gpu=False, compile=False, workers=0)
    rows = {row.name: row for row in result.rows}
    assert result.num_images == 12 - 4 - 4  # calibration and training images are never evaluated
    for name in (
        "onnxruntime-int8-percentile99.999",
        "tensorrt-int8-entropy@onnxruntime",
        "torch-int8-qat",
        "torch-fp32-finetuned",
        "tensorrt-int8-entropy@onnxruntime+qat-weights",
    ):
        assert name in rows, (name, result.notes)
    assert rows["torch-int8-qat"].size_reduction > 0 and rows["torch-int8-qat"].speedup > 0  # tiny: file overhead dominates
    assert rows["torch-fp32-finetuned"].int8_top1 is None
    text = (tmp_path / "seed_table.md").read_text()
    assert "torchvision (published)" in text and "torch-int8-qat" in text
    assert (tmp_path / "seed_table.json").exists() and (tmp_path / "predictions.npz").exists()


def test_without_training_images_the_qat_rows_say_why(image_folder, tmp_path):
    pytest.importorskip("onnxruntime")
    tiny = ReproRecipe.model_validate(
        load_recipe("seed").model_dump()
        | {"model": "tiny_test", "weights": None, "preprocessing": {"resize": 40, "crop": 32}, "calib_size": 4,
           "cpu_recipes": [], "tensorrt_on_cpu": None}
    )
    result = reproduce(tiny, data=image_folder, out=tmp_path, gpu=False, workers=0)
    assert any("--train-data" in n for n in result.notes)
    assert [r.kind for r in result.rows] == ["published", "published"]
