"""Deployments (int8eval.deploy, backends.deployed, `run --deployed`): an INT8 variant written to a folder with its
manifest and loaded back predicts exactly what it predicted when built; a changed artifact or manifest is refused
naming the file; a deployment is evaluated only with the model and preprocessing it was built from."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import require_package, varied_images
from pydantic import ValidationError

from int8eval import backends
from int8eval.backends import build_variant, check_recipe
from int8eval.cli import main
from int8eval.config import Backend, CalibMethod, Precision, Preprocessing, Recipe
from int8eval.deploy import MANIFEST, deployment_recipes, load_deployment, write_deployment
from int8eval.errors import ConfigError, ModelLoadError
from int8eval.models import load_model
from int8eval.parity import gate_for
from int8eval.report import Report

MEASURED = {"agreement_top1": 0.995, "agreement_top1_ci95": [0.98, 0.999], "throughput": {"batch32": 812.5}}


def deploy(tmp_path: Path, loaded, calib, backend: Backend, **build_kw):
    """An INT8 variant of `backend` and its deployment at tmp_path/run1/deploy/<backend> (as tune lays it out)."""
    recipe = Recipe(backend=backend)
    if build_kw:  # torch: uncompiled, so the test stays fast (the same Q/DQ numbers)
        from int8eval.backends import torch_backend

        variant = torch_backend.build(loaded, recipe, calib, tmp_path / "build", **build_kw)
    else:
        variant = build_variant(loaded, recipe, calib, tmp_path / "build")
    dest = tmp_path / "run1" / "deploy" / backend.value
    manifest_path = write_deployment(dest, variant, loaded, measured=MEASURED)
    assert manifest_path == dest / MANIFEST
    return variant, dest


def check_round_trip(variant, dest: Path, loaded, tmp_path: Path, exact: bool = True, **build_kw) -> None:
    manifest = load_deployment(dest)
    assert manifest.recipe == variant.recipe and manifest.variant == variant.name
    assert manifest.backend is variant.recipe.backend and manifest.precision is Precision.int8
    assert manifest.preprocessing == loaded.preprocessing and manifest.model.name == loaded.name
    assert manifest.measured == MEASURED and manifest.details
    assert manifest.entry == Path(variant.artifact).name and (dest / manifest.entry).is_file()
    assert {f.name for f in manifest.files} == {p.name for p in dest.iterdir()} - {MANIFEST}

    recipe = Recipe(backend=variant.recipe.backend, deployed=dest)
    assert recipe.name == f"{variant.recipe.backend.value}-deployed-run1"
    assert gate_for(recipe) == Recipe(backend=variant.recipe.backend, precision=Precision.fp32)
    check_recipe(recipe)
    if build_kw:
        from int8eval.backends import deployed as deployed_builder

        again = deployed_builder.build(loaded, recipe, None, tmp_path / "eval", **build_kw)
    else:
        again = build_variant(loaded, recipe, None, tmp_path / "eval")
    assert again.name == recipe.name and Path(again.artifact).parent == dest
    assert again.details["deployed_variant"] == variant.name
    x = varied_images(6, 3)
    want, got = variant.predict(x), again.predict(x)
    if exact:
        np.testing.assert_array_equal(got, want)
    else:
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    assert not np.array_equal(got, variant.predict(varied_images(6, 4)))  # the comparison can fail


@pytest.fixture(scope="module")
def ort_deployment(tiny, varied_calib, tmp_path_factory):
    require_package("onnx", "onnxruntime", extra="onnxruntime")
    return deploy(tmp_path_factory.mktemp("ort"), tiny, varied_calib, Backend.onnxruntime)


def test_onnxruntime_round_trip_is_bit_identical(tiny, ort_deployment, tmp_path):
    variant, dest = ort_deployment
    check_round_trip(variant, dest, tiny, tmp_path)


def test_openvino_round_trip_is_bit_identical(tiny, varied_calib, tmp_path):
    require_package("openvino", "nncf", extra="openvino")
    variant, dest = deploy(tmp_path, tiny, varied_calib, Backend.openvino)
    assert sorted(p.suffix for p in dest.iterdir()) == [".bin", ".json", ".xml"]
    check_round_trip(variant, dest, tiny, tmp_path)


def test_tensorrt_onnx_on_the_cpu_round_trip_is_bit_identical(tiny, varied_calib, tmp_path):
    require_package("onnx", "onnxruntime", extra="onnxruntime")
    recipe = Recipe(backend=Backend.tensorrt, emulate=True)
    variant = build_variant(tiny, recipe, varied_calib, tmp_path / "build")
    dest = write_deployment(tmp_path / "emulated", variant, tiny, measured={}).parent
    deployed = Recipe(backend=Backend.tensorrt, emulate=True, deployed=dest)
    assert gate_for(deployed) == Recipe(backend=Backend.tensorrt, precision=Precision.fp32, emulate=True)
    again = build_variant(tiny, deployed, None, tmp_path / "eval")
    assert again.name == "tensorrt-deployed-emulated@onnxruntime" and load_deployment(dest).variant == variant.name
    x = varied_images(6, 3)
    np.testing.assert_array_equal(again.predict(x), variant.predict(x))


def test_torch_pt2e_round_trip(tiny, varied_calib, tmp_path):
    require_package("torchao", extra="pt2e")
    variant, dest = deploy(tmp_path, tiny, varied_calib, Backend.torch, compile=False)
    assert [p.suffix for p in dest.iterdir() if p.name != MANIFEST] == [".pt2"]
    # The saved program against the in-memory converted graph: the same Q/DQ ops, up to float rounding.
    check_round_trip(variant, dest, tiny, tmp_path, exact=False, compile=False)


def test_a_changed_artifact_or_manifest_is_refused_naming_the_file(tiny, ort_deployment, tmp_path):
    import shutil

    _, original = ort_deployment
    dest = tmp_path / "copy"
    shutil.copytree(original, dest)
    manifest = load_deployment(dest)
    artifact = dest / manifest.entry
    data = bytearray(artifact.read_bytes())
    data[len(data) // 2] ^= 0xFF
    artifact.write_bytes(bytes(data))
    recipe = Recipe(backend=Backend.onnxruntime, deployed=dest)
    for attempt in (lambda: load_deployment(dest), lambda: check_recipe(recipe),
                    lambda: build_variant(tiny, recipe, None, tmp_path / "w")):
        with pytest.raises(ModelLoadError, match=rf"{artifact}.*sha256 differs"):
            attempt()
    assert load_deployment(dest, verify=False).entry == manifest.entry

    artifact.unlink()
    with pytest.raises(ModelLoadError, match=rf"{artifact} is missing"):
        load_deployment(dest)

    raw = json.loads((dest / MANIFEST).read_text())
    raw["precision"] = "int9"
    (dest / MANIFEST).write_text(json.dumps(raw))
    with pytest.raises(ModelLoadError, match=rf"{dest / MANIFEST}.*precision"):
        load_deployment(dest)
    raw["precision"], raw["surprise"] = "int8", 1
    (dest / MANIFEST).write_text(json.dumps(raw))
    with pytest.raises(ModelLoadError, match="surprise"):
        load_deployment(dest)
    with pytest.raises(ConfigError, match="holds no manifest.json"):
        load_deployment(tmp_path / "w")


def test_a_deployment_needs_its_model_and_preprocessing(tiny, ort_deployment, tmp_path):
    _, dest = ort_deployment
    recipes, pre = deployment_recipes([dest], "tiny_test")
    assert pre == tiny.preprocessing and recipes == (Recipe(backend=Backend.onnxruntime, deployed=dest),)
    with pytest.raises(ConfigError, match=r"built from tiny_test, not resnet18"):
        deployment_recipes([dest], "resnet18")
    checkpoint = tmp_path / "ck.pt"
    torch.save(tiny.module.state_dict(), checkpoint)
    with pytest.raises(ConfigError, match=rf"built from tiny_test, not tiny_test with --weights-file {checkpoint}"):
        deployment_recipes([dest], "tiny_test", checkpoint)

    other = load_model("tiny_test", preprocessing=Preprocessing(resize=36, crop=32))
    with pytest.raises(ConfigError, match="expects images prepared as"):
        build_variant(other, Recipe(backend=Backend.onnxruntime, deployed=dest), None, tmp_path / "w")
    with pytest.raises(ConfigError, match="asks for openvino int8, but deployment .* is onnxruntime int8"):
        backends.check_recipe(Recipe(backend=Backend.openvino, deployed=dest))


def test_deployed_recipes_leave_the_build_options_to_the_manifest(tmp_path):
    recipe = Recipe(backend=Backend.openvino, deployed=tmp_path / "mine")
    assert recipe.name == "openvino-deployed-mine" and recipe.bias_correction is False
    emulated = Recipe(backend=Backend.tensorrt, emulate=True, deployed=tmp_path / "t")
    assert emulated.name == "tensorrt-deployed-t@onnxruntime"
    for changed in ({"calib": CalibMethod.mse}, {"keep_fp32": ("conv1",)}, {"bias_correction": True}):
        with pytest.raises(ValidationError, match=f"{next(iter(changed))} cannot change it"):
            Recipe(backend=Backend.openvino, deployed=tmp_path / "mine", **changed)
    assert Recipe(backend=Backend.openvino).name == "openvino-int8-minmax"  # names without `deployed` unchanged


def test_only_deployable_artifacts_are_written_and_rewriting_replaces(tiny, ort_deployment, tmp_path):
    variant, _ = ort_deployment
    fp32 = build_variant(tiny, Recipe(backend=Backend.torch, precision=Precision.fp32), None, tmp_path / "b")
    with pytest.raises(ConfigError, match="state_dict"):
        write_deployment(tmp_path / "d1", fp32, tiny, measured={})
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="holds something other than a deployment"):
        write_deployment(busy, variant, tiny, measured={})
    assert (busy / "notes.txt").read_text() == "mine"

    dest = tmp_path / "d2"
    write_deployment(dest, variant, tiny, measured={"n": 1})
    (dest / "stale.onnx").write_bytes(b"old")
    write_deployment(dest, variant, tiny, measured={"n": 2, "top1": np.float32(0.5), "ci": np.array([0.25, 0.75])})
    assert load_deployment(dest).measured == {"n": 2, "top1": 0.5, "ci": [0.25, 0.75]}
    assert not (dest / "stale.onnx").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left behind


def test_run_deployed_evaluates_it_beside_the_reference(ort_deployment, image_folder, tmp_path):
    _, dest = ort_deployment
    out = tmp_path / "run"
    args = ["run", "-m", "tiny_test", "--data", str(image_folder), "--out", str(out), "--batch-size", "5",
            "--deployed", str(dest), "--max-drop", "5"]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = Report.read(out / "report.json")
    names = [v.name for v in report.variants]
    assert names == ["torch-fp32", "onnxruntime-fp32", "onnxruntime-deployed-run1"]
    v = report.variants[2]
    assert v.status == "ok" and v.gated_by == "onnxruntime-fp32" and v.artifact.startswith(str(dest))
    assert v.paired is not None and v.verdict is not None and v.agreement_top1 is not None
    assert report.data.calibration is None and report.data.num_images == 12  # nothing calibrated, every image evaluated

    bad = CliRunner().invoke(main, [*args, "--calib", "mse"])
    assert bad.exit_code == 2 and "--calib has no effect with --deployed without --backend" in bad.output
    checkpoint = tmp_path / "ck.pt"
    torch.save(load_model("tiny_test").module.state_dict(), checkpoint)
    bad = CliRunner().invoke(main, [*args, "--checkpoint", str(checkpoint)])
    assert bad.exit_code == 2 and "built from tiny_test, not tiny_test with --weights-file" in bad.output
