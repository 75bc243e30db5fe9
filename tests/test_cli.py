import json

from click.testing import CliRunner

from int8eval.cli import main
from int8eval.evaluate import Predictions
from int8eval.report import Report

REQUIRED = {
    "schema_version", "model", "data", "variants", "environment",
}


def _run(args):
    return CliRunner().invoke(main, args, catch_exceptions=False)


def test_run_writes_report_and_predictions(image_folder, tmp_path):
    out = tmp_path / "run"
    result = _run(["run", "-m", "tiny_test", "--data", str(image_folder), "--out", str(out), "--fp32-only", "--batch-size", "5", "--workers", "0"])
    assert result.exit_code == 0, result.output
    data = json.loads((out / "report.json").read_text())
    assert REQUIRED <= set(data)
    assert set(data["model"]) >= {"name", "preprocessing"} and data["model"]["preprocessing"]["crop"] == 32
    assert data["data"]["num_images"] == 12 and data["data"]["num_skipped"] == 0 and data["data"]["calibration"] is None
    (ref,) = data["variants"]
    assert ref["precision"] == "fp32" and ref["status"] == "ok" and ref["reference"]
    assert 0.0 <= ref["top1_ci95"][0] <= ref["top1"] <= ref["top1_ci95"][1] <= 1.0
    assert ref["size_mb"] > 0
    assert data["environment"]["cpu"]["model"] and "torch" in data["environment"]["libraries"]
    preds = Predictions.load(out / "predictions.npz")
    assert preds.top5["torch-fp32"].shape == (12, 5)
    assert sorted(preds.labels.tolist()) == [1] * 4 + [905] * 4 + [999] * 4
    assert abs(preds.correct1("torch-fp32").mean() - ref["top1"]) < 1e-12
    md = (out / "report.md").read_text()
    assert "torch-fp32 (reference)" in md and "center-crop 32" in md

    (out / "report.md").unlink()
    assert _run(["report", str(out)]).exit_code == 0
    assert (out / "report.md").read_text() == md
    Report.read(out / "report.json")  # validates against the schema


def test_bad_images_are_counted_and_listed(image_folder, tmp_path):
    (image_folder / "n01443537" / "broken.JPEG").write_bytes(b"nope")
    out = tmp_path / "run"
    result = _run(["run", "-m", "tiny_test", "--data", str(image_folder), "--out", str(out), "--fp32-only", "--workers", "0"])
    assert result.exit_code == 0
    assert "1 images or folders skipped" in result.output
    data = json.loads((out / "report.json").read_text())
    assert data["data"]["num_skipped"] == 1 and data["data"]["skipped"][0]["path"] == "n01443537/broken.JPEG"
    assert "broken.JPEG" in (out / "report.md").read_text()

    result = _run(["run", "-m", "tiny_test", "--data", str(image_folder), "--out", str(out), "--fp32-only", "--workers", "0", "--on-bad-image", "fail"])
    assert result.exit_code == 1 and "broken.JPEG" in result.output and "Traceback" not in result.output


def test_user_mistakes_give_one_line_errors(tmp_path, image_folder):
    cases = [
        (["run", "-m", "tiny_test", "--data", str(tmp_path / "nope"), "--fp32-only"], "does not exist"),
        (["run", "-m", "resnet5", "--data", str(image_folder), "--fp32-only"], "unknown model"),
        (["run", "-m", "tiny_test", "--data", str(image_folder), "--batch-size", "0", "--fp32-only"], "batch_size"),
    ]
    for args, message in cases:
        result = CliRunner().invoke(main, args + ["--out", str(tmp_path / "o")])
        assert result.exit_code != 0 and message in result.output, (args, result.output)
        assert result.exception is None or isinstance(result.exception, SystemExit)


def test_models_and_backends_listings():
    assert "efficientnet_lite0" in _run(["models"]).output
    out = _run(["backends"]).output
    assert "onnxruntime" in out and "int8eval[onnxruntime]" in out


def test_keep_fp32_variants_from_a_diagnosis(image_folder, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "sensitivity.json").write_text(json.dumps({"ranking": ["features.3", "fc", "features.0", "features.6"]}))
    base = ["run", "-m", "tiny_test", "--data", str(image_folder), "--out", str(out), "--backend", "onnxruntime",
            "--calib-size", "4"]
    result = _run(base + ["--keep-fp32", "none", "--keep-fp32", "top2", "--keep-fp32", "features.6"])
    assert result.exit_code == 0, result.output
    variants = {v["name"]: v for v in json.loads((out / "report.json").read_text())["variants"]}
    assert variants["onnxruntime-int8-percentile99.999"]["recipe"]["keep_fp32"] == []
    assert variants["onnxruntime-int8-percentile99.999-keep2"]["recipe"]["keep_fp32"] == ["features.3", "fc"]
    assert variants["onnxruntime-int8-percentile99.999-keep1"]["recipe"]["keep_fp32"] == ["features.6"]
    assert all(v["status"] == "ok" for v in variants.values())

    for keep, message in [("features.9", "features.9: not a Conv/Linear layer of tiny_test"),
                          ("top9", "ranks 4 layers"), ("features.1", "Its layers: features.0, features.3")]:
        result = CliRunner().invoke(main, base + ["--keep-fp32", keep])
        # usage errors: exit 2
        assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output, result.output
    result = CliRunner().invoke(main, base[:-4] + ["--out", str(tmp_path / "fresh"), "--keep-fp32", "top3"])
    assert result.exit_code == 2 and "int8eval diagnose" in result.output


def test_bench_with_kept_layers_threads_and_batch(image_folder, tmp_path):
    out = tmp_path / "bench"
    result = _run(["bench", "-m", "tiny_test", "--backend", "onnxruntime", "--data", str(image_folder), "--out", str(out),
                   "--keep-fp32", "none", "--keep-fp32", "fc", "--threads", "1", "--batch-size", "4"])
    assert result.exit_code == 0, result.output
    data = json.loads((out / "report.json").read_text())
    rows = {v["name"]: v for v in data["variants"]}
    assert {"onnxruntime-fp32", "onnxruntime-int8-percentile99.999", "onnxruntime-int8-percentile99.999-keep1"} <= set(rows)
    assert rows["onnxruntime-int8-percentile99.999-keep1"]["bench"]["throughput_batch"] == 4
    result = CliRunner().invoke(main, ["bench", "-m", "tiny_test", "--backend", "onnxruntime", "--out", str(out),
                                       "--keep-fp32", "features.9"])
    assert result.exit_code == 2 and "features.9" in result.output


def test_run_top1_and_top5_match_an_independent_computation(image_folder, tmp_path):
    """The reported top-1 and the saved top-5 against logits computed here: the images decoded with torchvision's
    v2 transforms, the model run directly, labels read from the folder names (ImageNet indices 1, 905, 999). The
    classifier's bias for class 905 is raised so that top-1 is exactly the share of that folder's images."""
    import numpy as np
    import torch
    from PIL import Image
    from torchvision.transforms import v2 as T

    from int8eval.models import load_model

    loaded = load_model("tiny_test")
    state = loaded.module.state_dict()
    state["fc.bias"][905] += 50.0
    torch.save(state, tmp_path / "ckpt.pt")
    loaded.module.load_state_dict(state)
    out = tmp_path / "run"
    result = _run(["run", "-m", "tiny_test", "--checkpoint", str(tmp_path / "ckpt.pt"), "--data", str(image_folder),
                   "--out", str(out), "--fp32-only", "--batch-size", "5", "--workers", "0"])
    assert result.exit_code == 0, result.output

    pre = loaded.preprocessing
    tf = T.Compose([T.Resize(pre.resize, interpolation=T.InterpolationMode.BILINEAR), T.CenterCrop(pre.crop),
                    T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(pre.mean, pre.std)])
    label_of = {"n01443537": 1, "n04590129": 905, "n15075141": 999}
    preds = Predictions.load(out / "predictions.npz")
    for image_id, label, top5 in zip(preds.image_ids, preds.labels, preds.top5["torch-fp32"]):
        assert label == label_of[image_id.split("/")[0]]
        with Image.open(image_folder / image_id) as im, torch.no_grad():
            logits = loaded.module(tf(im.convert("RGB"))[None]).numpy()[0]
        order = np.argsort(-logits)[:6]
        assert order[0] == 905 and top5[0] == 905
        gaps = -np.diff(logits[order])
        if gaps.min() > 1e-4:  # no near-tie that another decoder's rounding could flip
            assert top5.tolist() == order[:5].tolist(), image_id
    (ref,) = json.loads((out / "report.json").read_text())["variants"]
    assert ref["top1"] == 4 / 12  # the four window-shade images
    assert ref["top5"] == 4 / 12
