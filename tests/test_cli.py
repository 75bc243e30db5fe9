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
