"""int8eval sweep: models x backends from one YAML file, a run folder per cell, one comparison report; a failing cell
does not stop the others; spec errors name the bad key before anything runs; a rerun reuses finished cells."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from int8eval.cli import main

from conftest import require_package


@pytest.fixture
def second_model(tmp_path) -> Path:
    """A state dict of tiny_test with other weights: a second model for the sweep."""
    import torch

    from int8eval.models.tiny import TinyNet, seed_batchnorm

    torch.manual_seed(1)
    module = TinyNet()
    seed_batchnorm(module, seed=2)
    path = tmp_path / "tiny_b.pt"
    torch.save(module.state_dict(), path)
    return path


def _spec(tmp_path: Path, **spec) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _sweep(spec: Path, out: Path, *more: str):
    return CliRunner().invoke(main, ["sweep", str(spec), "--out", str(out), *more])


SESSION = dict(calib_size=4, batch_size=4)


def test_two_models_by_two_backends_write_one_report_and_a_rerun_reuses_every_cell(image_folder, second_model, tmp_path):
    require_package("onnxruntime", extra="onnxruntime")
    spec = _spec(tmp_path, models=["tiny_test", {"name": "tiny_test", "checkpoint": second_model.name, "label": "tiny-b"}],
                 backends=["torch", "onnxruntime"], data="data", acceptance={"max_drop": 50}, **SESSION)
    out = tmp_path / "sweep"
    result = _sweep(spec, out)
    assert result.exit_code == 0, result.output

    sweep = json.loads((out / "sweep.json").read_text())
    cells = {c["folder"]: c for c in sweep["cells"]}
    assert list(cells) == ["tiny_test/torch", "tiny_test/onnxruntime", "tiny-b/torch", "tiny-b/onnxruntime"]
    for folder, cell in cells.items():
        assert cell["status"] == "ok" and not cell["reused"] and cell["error"] is None
        assert (out / folder / "report.json").is_file()  # a normal run folder
        names = [r["variant"] for r in cell["rows"]]
        int8 = [r for r in cell["rows"] if r["precision"] == "int8"]
        assert names[0] == "torch-fp32" and cell["rows"][0]["reference"]
        assert len(int8) == 1 and int8[0]["backend"] == cell["backend"]
        assert int8[0]["delta_ci95"] is not None and int8[0]["agreement_top1"] is not None and int8[0]["kl_mean"] is not None
        assert int8[0]["verdict"] in ("pass", "fail", "inconclusive") and int8[0]["size_mb"] > 0
    assert "onnxruntime-fp32" in [r["variant"] for r in cells["tiny_test/onnxruntime"]["rows"]]  # its parity gate
    # the two models are different models: the second one's reference is its own
    assert cells["tiny-b/torch"]["rows"][0]["top1"] is not None

    md = (out / "sweep.md").read_text()
    assert "## tiny_test" in md and "## tiny-b (tiny_test)" in md and "onnxruntime-int8" in md
    assert md.count("torch-fp32 (reference)") == 2  # once per model, not once per cell
    html = (out / "sweep.html").read_text()
    assert "data:image/png;base64," in html and "Accuracy drop vs size" in html

    again = _sweep(spec, out)
    assert again.exit_code == 0, again.output
    rerun = json.loads((out / "sweep.json").read_text())
    assert all(c["reused"] and c["status"] == "ok" for c in rerun["cells"])
    assert [c["run_id"] for c in rerun["cells"]] == [c["run_id"] for c in sweep["cells"]]
    assert "(reused)" in (out / "sweep.md").read_text()

    # A timed cell (spec `bench: true`) puts speed in its rows, and the plot is then drop vs speed.
    from int8eval.report import Report
    from int8eval.report.sections import VariantBench
    from int8eval.report.sweep import SweepReport, render_sweep_html, rows_from_report

    report = Report.read(out / "tiny_test/onnxruntime/report.json")
    for v in report.variants:
        v.bench = VariantBench(throughput_ips=100.0, latency_ms_p50=2.0, speedup_throughput_vs_fp32=1.5)
    rows = rows_from_report(report)
    assert {(r.throughput_ips, r.latency_ms_p50, r.speedup_vs_fp32) for r in rows} == {(100.0, 2.0, 1.5)}
    timed = SweepReport.read(out / "sweep.json")
    timed.cells[1].rows = rows
    assert "Accuracy drop vs speed" in render_sweep_html(timed)


def test_a_failing_cell_is_recorded_and_the_others_go_on(image_folder, tmp_path, monkeypatch):
    require_package("onnxruntime", extra="onnxruntime")
    import int8eval.commands.run as run_module
    from int8eval.errors import BackendUnavailable

    def check_recipes(recipes):  # OpenVINO missing, whether it is installed here or not
        if any(r.backend.value == "openvino" for r in recipes):
            raise BackendUnavailable("backend openvino needs openvino: pip install 'int8eval[openvino]'")

    monkeypatch.setattr(run_module, "check_recipes", check_recipes)
    spec = _spec(tmp_path, models=["no_such_model_x", "tiny_test"], backends=["onnxruntime", "openvino"],
                 data=str(image_folder), **SESSION)
    out = tmp_path / "sweep"
    result = _sweep(spec, out)
    assert result.exit_code == 1, result.output
    cells = json.loads((out / "sweep.json").read_text())["cells"]
    assert [c["folder"] for c in cells] == ["no_such_model_x/onnxruntime", "no_such_model_x/openvino",
                                            "tiny_test/onnxruntime", "tiny_test/openvino"]
    assert all(c["status"] == "failed" and c["rows"] == [] for c in cells[:2])
    assert "ModelLoadError" in cells[0]["error"] and "no_such_model_x" in cells[0]["error"]
    assert cells[3]["status"] == "failed" and cells[3]["error"].startswith("BackendUnavailable: backend openvino")
    good = cells[2]
    assert good["status"] == "ok" and (out / "tiny_test/onnxruntime/report.json").is_file()
    assert "**failed** no_such_model_x/onnxruntime" in (out / "sweep.md").read_text()

    # A rerun tries the failed cell again and reuses the finished one.
    again = _sweep(spec, out)
    assert again.exit_code == 1
    bad, _, good, _ = json.loads((out / "sweep.json").read_text())["cells"]
    assert bad["status"] == "failed" and not bad["reused"]
    assert good["reused"] and good["run_id"] == cells[2]["run_id"]


def test_a_cell_is_reused_only_for_the_same_arguments(image_folder, tmp_path):
    require_package("onnxruntime", extra="onnxruntime")
    from int8eval.commands.sweep import finished, load_spec, plan_cells

    fp32 = dict(models=["tiny_test"], backends=["onnxruntime"], data="data", recipes=[{"precision": "fp32"}], **SESSION)
    out = tmp_path / "sweep"
    (cell,) = plan_cells(load_spec(_spec(tmp_path, **fp32)), out=out)
    assert cell.config.data == image_folder  # relative to the spec file
    assert finished(cell) is None  # nothing there yet
    assert _sweep(_spec(tmp_path, **fp32), out, "--no-cache").exit_code == 0
    assert finished(cell).run_id  # the same arguments, wherever decoded images are cached
    (resumed,) = plan_cells(load_spec(_spec(tmp_path, **fp32)), out=out, resume=True)
    assert resumed.config.resume and finished(resumed) is not None
    (changed,) = plan_cells(load_spec(_spec(tmp_path, **{**fp32, "seed": 1})), out=out)
    assert finished(changed) is None
    (other,) = plan_cells(load_spec(_spec(tmp_path, **{**fp32, "recipes": [{"calib": "minmax"}]})), out=out)
    assert finished(other) is None and [r.name for r in other.config.recipes] == ["onnxruntime-int8-minmax"]
    (report,) = [p for p in (out / "tiny_test" / "onnxruntime").iterdir() if p.name == "report.json"]
    report.write_text("{")  # a broken run folder is run again, not reused
    assert finished(cell) is None


@pytest.mark.parametrize("spec, expected", [
    ({"models": [{"name": "tiny_test", "nmae": "x"}]}, ["models.0.nmae: unknown key", "are: name, label, checkpoint"]),
    ({"modles": ["tiny_test"]}, ["modles: unknown key", "the keys are: models, backends", "models: Field required"]),
    ({"models": ["tiny_test"], "backends": ["onnxruntime"], "recipes": [{"calbi": "minmax"}]},
     ["recipes[0] on onnxruntime: calbi: unknown key", "the keys are: precision, calib,"]),
    ({"models": ["tiny_test"], "backends": ["onnxruntime"], "recipes": [{}, {"calib": "percentile"}]},
     ["recipes[1] on onnxruntime is onnxruntime-int8-percentile99.999, as an earlier recipe is"]),
    ({"models": ["tiny_test"], "backends": ["torchh"]}, ["backends.0", "'torchh'"]),
    ({"models": ["tiny_test"], "backends": ["onnxruntime"], "recipes": [{"calib": "minmaxx"}]},
     ["recipes[0] on onnxruntime: calib", "'minmaxx'"]),
    ({"models": ["tiny_test"], "backends": ["torch", "onnxruntime"], "recipes": [{"adaround": True}]},
     ["recipes[0] on torch", "adaround applies to onnxruntime and openvino", "backends: [...]"]),
    ({"models": ["tiny_test"], "backends": ["onnxruntime"], "recipes": [{"backends": ["openvino"]}]},
     ["recipes[0].backends: ['openvino'] must list backends of the sweep"]),
    ({"models": ["tiny_test"], "backends": ["onnxruntime"], "batch_size": 0}, ["model tiny_test: batch_size", "greater than 0", "(got 0)"]),
    ({"models": ["tiny_test"], "batch_size": "big"}, ["batch_size", "'big'"]),
    ({"models": ["tiny_test", {"name": "tiny_test"}]}, ["two models are filed under tiny_test", "label"]),
    ({"models": ["tiny_test"], "tune": {}}, ["tune needs a budget"]),
    ({"models": [{"name": "tiny_test", "label": ".."}]}, ["models.0.label", "'..'"]),
    ({"models": ["tiny_test"], "backends": ["onnxruntime", "onnxruntime"]}, ["backends: onnxruntime listed twice"]),
    ({"models": ["tiny_test"], "tune": {"objective": "speed"}, "acceptance": "mlperf"}, ["tune.objective", "'speed'"]),
    ({"models": ["tiny_test"], "data": "nowhere"}, ["data:", "nowhere does not exist"]),
    ({"models": ["tiny_test"], "recipes": []}, ["no cell"]),
])
def test_spec_errors_name_the_bad_key_and_value_before_anything_runs(image_folder, tmp_path, spec, expected):
    spec = {"data": "data", **spec}
    out = tmp_path / "sweep"
    result = _sweep(_spec(tmp_path, **spec), out)
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    for part in expected:
        assert part in text, text
    assert not out.exists()  # refused before any cell ran


def test_a_spec_that_is_not_a_mapping_is_a_usage_error(tmp_path):
    path = tmp_path / "sweep.yaml"
    for text in ("- just\n- a list\n", "models: [unclosed\n"):
        path.write_text(text)
        result = _sweep(path, tmp_path / "o")
        assert result.exit_code == 2 and "sweep spec" in result.output


def test_tune_cells_take_the_budget_and_the_sweeps_backends(image_folder, tmp_path):
    from int8eval.commands.sweep import load_spec, plan_cells

    spec = load_spec(_spec(tmp_path, models=["tiny_test"], backends=["onnxruntime"], data="data", recipes=[],
                           acceptance={"max_drop": 2}, tune={"time_budget_min": 1, "tune_size": 5}, **SESSION))
    (cell,) = plan_cells(spec, out=tmp_path / "o")
    assert cell.kind == "tune" and cell.folder == "tiny_test/tune"
    assert cell.config.acceptance.max_drop == 2 and [b.value for b in cell.config.backends] == ["onnxruntime"]
    assert cell.config.time_budget_s == 60 and cell.config.tune_size == 5 and cell.config.calib_size == 4
    assert cell.config.ray is None
    (spread,) = plan_cells(spec, out=tmp_path / "o", ray="auto", ray_workers=2)  # sweep --ray: ladders on the cluster
    assert spread.config.ray == "auto" and spread.config.ray_workers == 2


def test_a_tune_cell_is_a_tune_run_folder_with_its_choice_in_the_report(tmp_path, monkeypatch):
    require_package("onnxruntime", extra="onnxruntime")
    import int8eval.commands.tune as tune_module
    from conftest import WNIDS, write_image

    monkeypatch.setattr(tune_module, "TIMING", dict(batch_sizes=(1, 2), warmup=0, min_runs=1, throughput_warmup=0,
                                                    throughput_min_runs=1, min_seconds=0, max_seconds=0.05,
                                                    compile_torch=False))
    for c, wnid in enumerate(WNIDS):
        for i in range(6):
            write_image(tmp_path / "data" / wnid / f"{wnid}_{i}.JPEG", seed=10 * c + i)
    spec = _spec(tmp_path, models=["tiny_test"], backends=["onnxruntime"], data="data", recipes=[],
                 acceptance={"max_drop": 100}, tune={"tune_size": 5, "confirm_size": 7}, **SESSION)
    out = tmp_path / "sweep"
    result = _sweep(spec, out)
    assert result.exit_code == 0, result.output
    (cell,) = json.loads((out / "sweep.json").read_text())["cells"]
    assert cell["kind"] == "tune" and cell["status"] == "ok" and cell["tune_choice"]
    assert (out / "tiny_test/tune/deploy/onnxruntime").is_dir() and cell["num_images"] == 7
    chosen = next(r for r in cell["rows"] if r["variant"] == cell["tune_choice"])
    assert chosen["throughput_ips"] > 0 and chosen["delta_ci95"] is not None  # speed from the tuner's timing
    again = _sweep(spec, out)
    assert again.exit_code == 0 and json.loads((out / "sweep.json").read_text())["cells"][0]["reused"]


def test_the_example_spec_is_valid(image_folder, tmp_path):
    from conftest import REPO
    from int8eval.commands.sweep import load_spec, plan_cells

    spec = load_spec(REPO / "examples" / "sweep.yaml").model_copy(update={"data": image_folder})
    cells = plan_cells(spec, out=tmp_path / "o")
    assert [c.folder for c in cells] == [f"{m}/{b}" for m in ("efficientnet_lite0", "resnet50")
                                         for b in ("torch", "onnxruntime", "openvino")]
    assert [r.name for r in cells[1].config.recipes] == [
        "onnxruntime-int8-percentile99.999", "onnxruntime-int8-percentile99.99", "onnxruntime-int8-percentile99.999-adaround"]
    assert cells[0].config.acceptance.max_drop == 1 and cells[3].config.weights == "IMAGENET1K_V1"


def test_an_onnx_file_is_swept_on_the_backends_that_read_one_with_its_preprocessing(image_folder, tmp_path):
    """Without `backends:`, an ONNX model's cells are those of the backends that take an ONNX file (torch would only
    refuse it), its recipes without bias correction (as `run` builds them), its preprocessing from `preset:` and
    `preprocessing:`; a PyTorch model beside it keeps every backend."""
    require_package("onnx", extra="onnxruntime")
    from test_onnx_model import channel_means_model

    from int8eval import backends
    from int8eval.commands.sweep import load_spec, plan_cells

    channel_means_model(tmp_path / "m.onnx")
    spec = load_spec(_spec(tmp_path, models=["tiny_test", {"name": "m.onnx", "preset": "caffe-bgr",
                                                             "preprocessing": {"crop": 8, "resize": 10}}],
                           data="data", **SESSION))
    cells = plan_cells(spec, out=tmp_path / "o")
    installed = [b for b, info in backends.BACKENDS.items() if info.installed and info.default]
    assert [c.backend for c in cells if c.model.name == "tiny_test"] == installed
    onnx_cells = [c for c in cells if c.model.name == "m.onnx"]
    assert [c.backend for c in onnx_cells] == [b for b in installed if backends.takes_onnx(b)] and onnx_cells
    for cell in onnx_cells:
        assert all(not r.bias_correction for r in cell.config.recipes)
        pre = cell.config.preprocessing
        assert (pre.crop, pre.resize, pre.channel_order.value) == (8, 10, "bgr")
    assert all(r.bias_correction for c in cells if c.model.name == "tiny_test" and c.backend.value != "torch"
               for r in c.config.recipes if r.precision.value == "int8")
