"""Per-layer sensitivity: the fake quantizers, the prefix-cached sweep against brute force, ONNX names, the CLI entry."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from int8eval.commands.diagnose import run_diagnose
from int8eval.config import Backend, CalibMethod, Recipe
from int8eval.diagnose import (
    FakeQuantModel,
    FakeQuantSpec,
    activation_qparams,
    diagnose,
    fast_diagnose,
    fast_ranking,
    keep_fp32_check,
    onnx_node_names,
    quantize_weight,
)
from int8eval.errors import ConfigError
from int8eval.models import load_model


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _images(n: int, seed: int, size: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_weight_quantization_per_channel_and_per_tensor():
    w = torch.randn(8, 4, 3, 3) * torch.logspace(-2, 0, 8).view(8, 1, 1, 1)  # channels of very different size
    for per_channel in (True, False):
        q = quantize_weight(w, per_channel)
        amax = w.abs().amax(dim=(1, 2, 3), keepdim=True) if per_channel else w.abs().max()
        scale = amax / 127
        levels = q / scale
        assert torch.allclose(levels, levels.round(), atol=1e-4)  # on the int8 grid
        assert levels.abs().max() <= 127 + 1e-4
        assert ((q - w).abs() <= scale / 2 + 1e-7).all()  # round to nearest, nothing clipped
    # The smallest channel (100x smaller than the largest) loses its resolution under one scale.
    err_pc = (quantize_weight(w, True) - w)[0].pow(2).sum()
    err_pt = (quantize_weight(w, False) - w)[0].pow(2).sum()
    assert err_pc < err_pt / 100


def test_activation_qparams():
    scale, zp, qmin, qmax = activation_qparams(-1.0, 3.0, symmetric=False)
    assert (qmin, qmax) == (0, 255) and scale == pytest.approx(4 / 255) and zp == 64
    assert activation_qparams(0.5, 2.0, symmetric=False)[1] == 0  # the range is widened to include 0
    scale, zp, qmin, qmax = activation_qparams(-1.0, 3.0, symmetric=True)
    assert (zp, qmin, qmax) == (0, -128, 127) and scale == pytest.approx(3 / 127)


def test_fake_quant_model_is_exact_when_nothing_is_quantized():
    loaded = load_model("tiny_test")
    x = _images(8, 1)
    before = {k: v.clone() for k, v in loaded.module.state_dict().items()}
    fq = FakeQuantModel(loaded.module, FakeQuantSpec())
    fq.calibrate([_images(8, 0)])
    assert fq.bn_folded
    assert fq.names == ["features.0", "features.3", "features.6", "fc"]  # execution order, BatchNorm folded away
    with torch.no_grad():
        ref = loaded.module(x)
    assert torch.allclose(fq(x), ref, atol=1e-5)
    fq.configure(weights=fq.names, acts=fq.names)
    assert not torch.allclose(fq(x), ref, atol=1e-6)
    fq.configure()
    assert torch.allclose(fq(x), ref, atol=1e-5)
    assert all(torch.equal(before[k], v) for k, v in loaded.module.state_dict().items())  # the model is untouched
    with pytest.raises(ConfigError, match="nope"):
        fq.configure(weights=["nope"])


def test_percentile_ranges_are_inside_minmax_ranges():
    loaded = load_model("tiny_test")
    calib = [_images(16, 0)]
    ranges = {}
    for spec in (FakeQuantSpec(), FakeQuantSpec(calib="percentile", percentile=99.0)):
        fq = FakeQuantModel(loaded.module, spec)
        fq.calibrate(calib)
        ranges[spec.calib] = {n: (fq.layer(n).lo, fq.layer(n).hi) for n in fq.names}
    for name, (lo, hi) in ranges["percentile"].items():
        mlo, mhi = ranges["minmax"][name]
        assert mlo - 1e-6 <= lo <= hi <= mhi + 1e-6
        assert hi < mhi  # 1% of the values clipped: the top of the range moves in


def _brute_force(model: nn.Module, spec: FakeQuantSpec, calib, x: torch.Tensor) -> dict:
    fq = FakeQuantModel(model, spec)
    fq.calibrate(calib)
    every = set(fq.names)
    fq.configure()
    ref = torch.log_softmax(fq(x).double(), 1)
    out = {}
    for n in fq.names:
        for mode, (w, a) in {"only": ({n}, {n}), "all_but": (every - {n}, every - {n}),
                             "only_weight": ({n}, set()), "only_act": (set(), {n})}.items():
            fq.configure(weights=w, acts=a)
            logits = fq(x)
            logq = torch.log_softmax(logits.double(), 1)
            out[(mode, n)] = (float((ref.exp() * (ref - logq)).sum(1).mean()),
                              float((logits.argmax(1) == ref.argmax(1)).double().mean()))
    return out


def test_sweep_matches_running_every_configuration_from_the_input():
    loaded = load_model("tiny_test")
    calib, x = [_images(16, 0)], _images(20, 1)
    spec = FakeQuantSpec(per_channel=False)
    result = diagnose(loaded.module, spec, calib, x, batch_size=8, onnx_names=False, top_k=2)
    assert result["prefix_cached"] and result["num_images"] == 20 and result["num_layers"] == 4
    expected = _brute_force(loaded.module, spec, calib, x)
    with torch.no_grad():
        z_max = float(loaded.module(x).abs().max())
    for layer in result["layers"]:
        for mode in ("only", "all_but", "only_weight", "only_act"):
            kl, agreement = expected[(mode, layer["module"])]
            # The sweep computes from cached activations in batches of 8, brute force all 20 at once: FP32 kernels
            # may sum in another order (another CPU, another batch size), moving the logits by a few ulps. To first
            # order KL(p||q) then moves by sum((q - p) * dz) <= |p - q|_1 * max|dz| <= sqrt(2 KL) * max|dz|
            # (Pinsker); with max|dz| = 4 ulps of the largest logit that is ~10% of a KL of 1e-10 (an AMX Xeon was
            # 1e-5 off at rel=1e-6), and still far from a wrong configuration's or a flipped sign's difference.
            tolerance = (2 * kl) ** 0.5 * 4 * float(np.finfo(np.float32).eps) * z_max
            assert layer[mode]["kl"] == pytest.approx(kl, rel=1e-6, abs=tolerance + 1e-15)
            assert layer[mode]["agreement"] == pytest.approx(agreement)
    kls = [e["only"]["kl"] for e in sorted(result["layers"], key=lambda e: result["ranking"].index(e["module"]))]
    assert kls == sorted(kls, reverse=True)  # ranked by KL, most sensitive first
    assert result["top_k"] == result["ranking"][:2] == result["keep_fp32"]["layers"]
    assert result["reference"]["agreement"] == 1.0 and result["reference"]["kl"] == 0.0
    for layer in result["layers"]:
        q = layer["sqnr_db"]
        assert q["local"] is not None and q["local"] > 0 and q["accumulated"] is not None
    first = result["layers"][0]["sqnr_db"]
    assert first["accumulated"] == pytest.approx(first["local"])  # nothing quantized before the first layer


def test_keeping_every_layer_in_fp32_gives_full_agreement():
    loaded = load_model("tiny_test")
    calib, x = [_images(16, 0)], _images(16, 1)
    result = diagnose(loaded.module, FakeQuantSpec(), calib, x, top_k=10, onnx_names=False, split_effects=False)
    # The reference runs in chunks of 8 images, the kept model in one batch of 16: FP32 in another summation order
    # may differ by a few ulps (dz), and the KL of log-probabilities that differ by dz is ~ var(dz) / 2 < 1e-12.
    assert result["keep_fp32"]["agreement"] == 1.0 and result["keep_fp32"]["kl"] == pytest.approx(0.0, abs=1e-12)
    assert "only_weight" not in result["layers"][0]
    check = keep_fp32_check(loaded.module, FakeQuantSpec(), calib, x, result["top_k"])
    assert check["keep_fp32"]["agreement"] == 1.0 and check["all_quantized"]["n"] == 16


def _outlier_channel(module: nn.Module) -> nn.Module:
    """tiny_test computing the same function, but with one input channel of the depthwise `features.3` 1000x larger
    (its BatchNorm scaled up, its depthwise weight down: ReLU passes the scale): that layer's per-tensor input range
    then leaves the other channels a few levels, so it is by far the most sensitive layer."""
    model = copy.deepcopy(module)
    with torch.no_grad():
        model.features[1].weight[0] *= 1000
        model.features[1].bias[0] *= 1000
        model.features[3].weight[0] /= 1000
    return model


def test_fast_ranking_ranks_every_layer_once_as_the_full_sweep_does():
    loaded = load_model("tiny_test")
    model = _outlier_channel(loaded.module)
    calib, x = [_images(16, 0)], _images(20, 1)
    with torch.no_grad():
        assert torch.allclose(model(x), loaded.module(x), atol=1e-5)  # the same function
    ranking = fast_ranking(model, FakeQuantSpec(), calib, x, batch_size=8)
    assert sorted(ranking) == sorted(["features.0", "features.3", "features.6", "fc"])  # each layer once
    assert ranking[0] == "features.3"
    full = diagnose(model, FakeQuantSpec(), calib, x, batch_size=8, onnx_names=False, split_effects=False)
    kls = sorted((e["only"]["kl"] for e in full["layers"]), reverse=True)
    assert all(a > 10 * b for a, b in zip(kls, kls[1:]))  # a clear order: each layer 10x the KL of the next
    assert ranking == full["ranking"]
    # A calibrated FakeQuantModel is reused as is, and a Recipe is read as diagnose reads it.
    fq = FakeQuantModel(model, FakeQuantSpec())
    fq.calibrate(calib)
    assert fast_ranking(model, FakeQuantSpec(), [], x, fq=fq) == ranking
    assert fast_ranking(model, Recipe(backend=Backend.onnxruntime), calib, x) == ranking
    assert fast_ranking(model, FakeQuantSpec(), calib, x, layers=["fc", "features.0"]) == ["fc", "features.0"]
    with pytest.raises(ConfigError, match="nope"):
        fast_ranking(model, FakeQuantSpec(), calib, x, layers=["nope"])


def test_fast_diagnose_gives_the_sections_keys_from_only_this_layer_runs():
    loaded = load_model("tiny_test")
    model = _outlier_channel(loaded.module)
    calib, x, labels = [_images(16, 0)], _images(20, 1), np.arange(20) % 10
    result = fast_diagnose(model, FakeQuantSpec(), calib, x, labels=labels, top_k=1, batch_size=8)
    full = diagnose(model, FakeQuantSpec(), calib, x, labels=labels, top_k=1, batch_size=8, onnx_names=False)
    assert result["sweep"] == "fast" and result["ranking"] == full["ranking"] and result["top_k"] == ["features.3"]
    assert result["num_images"] == 20 and result["num_calib"] == 16 and result["num_layers"] == 4
    for mine, theirs in zip(result["layers"], full["layers"]):
        assert set(mine) == {"module", "onnx_node", "type", "params", "act_range", "only"}  # nothing else was run
        assert mine["only"]["agreement"] == theirs["only"]["agreement"] and mine["only"]["top1"] == theirs["only"]["top1"]
        assert mine["only"]["kl"] == pytest.approx(theirs["only"]["kl"], rel=1e-3)  # FP32 reference in other batches
    for key in ("all_quantized", "keep_fp32", "reference"):
        assert result[key]["agreement"] == pytest.approx(full[key]["agreement"])
        assert result[key]["top1"] == pytest.approx(full[key]["top1"])
    assert result["reference"]["kl"] == 0.0 and result["keep_fp32"]["layers"] == ["features.3"]


def test_calibration_measures_ranges_and_bias_shifts_as_separate_fp32_passes_would():
    """Calibration observes the ranges during the bias correction's FP32 pass: the same numbers as a min/max pass (or
    the percentile's histogram pass) and `output_shifts` run one after the other."""
    from int8eval.backends.bias_correction import output_shifts

    loaded = load_model("tiny_test")
    calib = [_images(8, 0), _images(8, 2)]
    for spec in (FakeQuantSpec(), FakeQuantSpec(calib="percentile", percentile=99.0)):
        fq = FakeQuantModel(loaded.module, spec)
        fq.calibrate(calib)
        plain = FakeQuantModel(loaded.module, FakeQuantSpec(bias_correction=False, calib=spec.calib,
                                                            percentile=spec.percentile))
        plain.calibrate(calib)
        errors = {n: plain.layer(n).w_q - plain.layer(n).w_fp for n in plain.names}
        plain.configure()
        shifts = output_shifts(plain.model, errors, calib)
        for n in fq.names:
            assert (fq.layer(n).lo, fq.layer(n).hi) == (plain.layer(n).lo, plain.layer(n).hi)
            expected = plain.layer(n).b_fp - torch.as_tensor(shifts[n], dtype=torch.float32)
            assert torch.equal(fq.layer(n).b_q, expected), n
            assert not torch.equal(fq.layer(n).b_q, fq.layer(n).b_fp)  # corrected


def test_summed_errors_measure_the_bias_shifts_of_every_image_up_to_rounding():
    """The fast ranking's calibration (channels-last batches, the weights' output error measured on each batch's
    summed images) gives the ranges and corrected biases of the exact one, up to float rounding."""
    from int8eval.diagnose import fast_fake_quant

    loaded = load_model("tiny_test")
    calib = [_images(8, 0), _images(8, 2)]
    for spec in (FakeQuantSpec(), FakeQuantSpec(calib="percentile", percentile=99.0)):
        exact = FakeQuantModel(loaded.module, spec)
        exact.calibrate(calib)
        fast = fast_fake_quant(loaded.module, spec, calib, batch_size=8)
        assert fast.names == exact.names
        for n in exact.names:
            e, f = exact.layer(n), fast.layer(n)
            assert (f.lo, f.hi) == pytest.approx((e.lo, e.hi), rel=1e-5)
            shift = (e.b_fp - e.b_q).abs().max()
            assert shift > 0 and (f.b_q - e.b_q).abs().max() <= 1e-4 * shift, n


class _Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.conv(x)
        if x.mean() > -100:  # data-dependent control flow: torch.fx cannot trace it
            x = torch.relu(x)
        return self.fc(x.mean(dim=(2, 3)))


def test_untraceable_model_falls_back_to_full_runs():
    model = _Untraceable().eval()
    calib, x = [_images(8, 0, 16)], _images(8, 1, 16)
    result = diagnose(model, FakeQuantSpec(), calib, x, onnx_names=False)
    assert not result["bn_folded"] and not result["prefix_cached"]
    assert "NOT folded" in result["spec_description"]
    assert [layer["module"] for layer in result["layers"]] == ["conv", "fc"]


def test_spec_from_recipe():
    assert FakeQuantSpec.from_recipe(Recipe(backend=Backend.onnxruntime, per_channel=False)) == FakeQuantSpec(per_channel=False)
    spec = FakeQuantSpec.from_recipe(Recipe(backend=Backend.tensorrt, calib=CalibMethod.percentile, percentile=99.9))
    assert spec.symmetric_activations and spec.calib == "percentile" and spec.percentile == 99.9
    with pytest.raises(ConfigError, match="minmax or percentile"):
        FakeQuantSpec.from_recipe(Recipe(backend=Backend.torch, calib=CalibMethod.entropy))


def test_onnx_node_names_tiny():
    pytest.importorskip("onnx")
    loaded = load_model("tiny_test")
    names = onnx_node_names(loaded.module, loaded.example_input(1))
    assert names == {
        "features.0": "/features/features.0/Conv",
        "features.3": "/features/features.3/Conv",
        "features.6": "/features/features.6/Conv",
        "fc": "/fc/Gemm",
    }


def _jpeg_folder(root: Path, n_classes: int = 6, per_class: int = 4) -> Path:
    from PIL import Image

    from int8eval.data.synsets import synsets

    rng = np.random.default_rng(0)
    for wnid in synsets()[0][:n_classes]:
        (root / wnid).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (48, 56, 3), dtype=np.uint8)).save(root / wnid / f"{i}.JPEG")
    return root


def _folder_state(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def _rerenders(out: Path) -> None:
    """`int8eval report OUT` re-renders the folder: its checksums verify, its report.json renders."""
    from click.testing import CliRunner

    from int8eval.cli import main

    result = CliRunner().invoke(main, ["report", str(out)])
    assert result.exit_code == 0, result.output
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no staging folder, no temporary file


def _fp32_run(data: Path, out: Path, model: str = "tiny_test"):
    from int8eval.commands.run import run
    from int8eval.config import RunConfig

    return run(RunConfig(model=model, data=data, out=out))  # FP32 only: a run folder to attach to


def test_diagnose_into_a_run_of_the_same_model_adds_its_section(tmp_path):
    from int8eval.report import Report

    data = _jpeg_folder(tmp_path / "data")
    out = tmp_path / "run"
    before = _fp32_run(data, out)
    predictions = (out / "predictions.npz").read_bytes()
    result = run_diagnose("tiny_test", data, out, calib_size=8, max_images=12, confirm_images=4, top_k=2)
    saved = json.loads((out / "sensitivity.json").read_text())
    assert saved["num_calib"] == 8 and saved["num_images"] == 12 and len(saved["image_ids"]) == 12
    assert not set(saved["calib_image_ids"]) & set(saved["image_ids"])  # calibration images are not evaluated
    assert saved["confirm"]["keep_fp32"]["n"] == 4
    assert saved["layers"][-1]["onnx_node"] == "/fc/Gemm"
    assert result["top_k"] == saved["top_k"]
    report = Report.read(out / "report.json")
    # The run is the same run: its id, its checksums, its predictions and variants; only the section was added.
    assert report.run_id == before.run_id and report.files == before.files
    assert (out / "predictions.npz").read_bytes() == predictions
    assert [v.name for v in report.variants] == [v.name for v in before.variants]
    assert report.sensitivity.top_k == saved["top_k"] and report.sensitivity.ranking == saved["ranking"]
    assert report.sensitivity.confirm.keep_fp32.n == 4
    assert "Per-layer sensitivity" in (out / "report.html").read_text()
    assert "## Per-layer sensitivity" in (out / "report.md").read_text()
    _rerenders(out)


def test_diagnose_waits_for_no_one_holding_the_run_folder(tmp_path):
    """The section is written under the folder's lock: a run or report writing OUT now makes it a message."""
    from int8eval.commands.diagnose import add_to_run
    from int8eval.errors import RunFolderError
    from int8eval.report import folder

    data = _jpeg_folder(tmp_path / "data")
    out = tmp_path / "run"
    _fp32_run(data, out)
    result = run_diagnose("tiny_test", data, tmp_path / "elsewhere", calib_size=8, max_images=8, top_k=1)
    state = _folder_state(out)
    with folder.locked(out), pytest.raises(RunFolderError, match="another int8eval command"):
        add_to_run(out, result)
    assert _folder_state(out) == state
    add_to_run(out, result)
    assert json.loads((out / "report.json").read_text())["sensitivity"]["top_k"] == result["top_k"]
    _rerenders(out)


def test_diagnose_into_an_empty_folder_writes_a_run_folder(tmp_path):
    from int8eval.data.layouts import discover, split, subsample
    from int8eval.report import Report
    from int8eval.session import resolve_keep

    data = _jpeg_folder(tmp_path / "data")
    out = tmp_path / "new" / "run"  # does not exist yet
    run_diagnose("tiny_test", data, out, calib_size=8, max_images=12, top_k=2, seed=3)
    saved = json.loads((out / "sensitivity.json").read_text())
    # The images of the seeded split diagnose always used: calibration first, then max_images of the rest.
    calib, rest = split(discover(data).samples, 8, 3)
    assert saved["calib_image_ids"] == [s.id for s in calib]
    assert saved["image_ids"] == [s.id for s in subsample(rest, 12, 3)]

    report = Report.read(out / "report.json")
    assert report.variants == [] and report.run_id and report.files == {}
    assert report.model.name == "tiny_test" and report.data.num_images == 12
    assert report.data.calibration.image_ids == saved["calib_image_ids"]
    assert report.sensitivity.ranking == saved["ranking"] and report.sensitivity.num_calib == 8
    assert report.config["top_k"] == 2 and report.config["seed"] == 3 and report.config["spec"]["calib"] == "minmax"
    md = (out / "report.md").read_text()
    assert "## Per-layer sensitivity" in md and "## Variants" not in md
    assert "Per-layer sensitivity" in (out / "report.html").read_text()
    _rerenders(out)
    # `int8eval run --keep-fp32 top2 --out OUT` reads the ranking from there.
    assert resolve_keep(("top2",), None, out) == (tuple(saved["ranking"][:2]),)


def test_diagnose_fast_via_the_cli_writes_the_ranking_and_says_which_ran(tmp_path):
    from click.testing import CliRunner

    from int8eval.cli import main
    from int8eval.report import Report

    data = _jpeg_folder(tmp_path / "data")
    out = tmp_path / "run"
    args = ["diagnose", "-m", "tiny_test", "--data", str(data), "--calib-size", "8", "--top-k", "2"]
    result = CliRunner().invoke(main, [*args, "--out", str(out), "--fast", "--max-images", "12"])
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "sensitivity.json").read_text())
    assert saved["sweep"] == "fast" and saved["num_images"] == 12 and len(saved["image_ids"]) == 12
    assert sorted(saved["ranking"]) == sorted(["features.0", "features.3", "features.6", "fc"])
    assert saved["top_k"] == saved["ranking"][:2] == saved["keep_fp32"]["layers"]
    assert "sqnr_db" not in saved["layers"][0] and "all_but" not in saved["layers"][0]
    report = Report.read(out / "report.json")
    assert report.sensitivity.ranking == saved["ranking"] and "fast ranking" in report.sensitivity.rank_by
    assert report.config["fast"] is True
    assert "fast ranking" in (out / "report.md").read_text()
    _rerenders(out)

    # Without --max-images the fast ranking takes FAST_IMAGES (here: every one of the 16 left), the full sweep 64.
    result = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "default"), "--fast"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "default" / "sensitivity.json").read_text())["num_images"] == 16
    result = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "full"), "--no-split-effects"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "full" / "sensitivity.json").read_text())["sweep"] == "full"
    # Flags the fast ranking would ignore are refused, naming both.
    result = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "x"), "--fast", "--rank-by", "agreement"])
    assert result.exit_code != 0 and "--rank-by" in result.output and "--fast" in result.output
    assert not (tmp_path / "x").exists()


def test_diagnose_refuses_a_run_of_another_model_before_any_work(tmp_path, monkeypatch):
    import int8eval.commands.diagnose as command
    from int8eval.errors import RunFolderError
    from int8eval.report import Report

    data = _jpeg_folder(tmp_path / "data")
    out = tmp_path / "run"
    _fp32_run(data, out)
    report = Report.read(out / "report.json")  # the same folder, as a run of another model would leave it
    report.model.name = "resnet18"
    report.write(out / "report.json")
    state = _folder_state(out)

    def no_work(*args, **kwargs):
        raise AssertionError("the session was opened")

    monkeypatch.setattr(command, "open_session", no_work)
    with pytest.raises(RunFolderError, match=r"holds a run of resnet18, not of tiny_test.*pick another --out"):
        run_diagnose("tiny_test", data, out, calib_size=8, max_images=8, top_k=1)
    assert _folder_state(out) == state  # nothing written


@pytest.mark.slow
def test_lite0_names_and_a_few_layers(shared_sample):
    pytest.importorskip("efficientnet_lite_pytorch")
    from int8eval.data.decode import batches
    from int8eval.data.layouts import discover, subsample

    loaded = load_model("efficientnet_lite0")
    samples = subsample(discover(shared_sample).samples, 16, 0)
    images = np.concatenate([b.images for b in batches(samples, loaded.preprocessing, batch_size=16, workers=0)])
    chosen = ["stem.0.1", "blocks.1.depthwise.0.1", "classifier"]
    result = diagnose(loaded.module, FakeQuantSpec(), [images[:8]], images[8:], layers=chosen, split_effects=False,
                      top_k=1, example_input=loaded.example_input(1))
    nodes = {e["module"]: e["onnx_node"] for e in result["layers"]}
    assert nodes == {
        "stem.0.1": "/stem/stem.0/stem.0.1/Conv",
        "blocks.1.depthwise.0.1": "/blocks/blocks.1/depthwise/depthwise.0/depthwise.0.1/Conv",
        "classifier": "/classifier/Gemm",
    }
    assert result["num_layers"] == 50 and result["bn_folded"] and result["prefix_cached"]
    assert result["all_quantized"]["agreement"] >= 0.75


def test_weight_only_sensitivity_matches_an_independent_computation():
    """The sweep's "only_weight" KL of each layer against one computed without diagnose's code: BatchNorm folded by
    torch's own `fuse_conv_bn_eval`, the layer's weight rounded by `torch.fake_quantize_per_channel_affine` (symmetric
    int8, max|w| / 127 per output channel), KL(FP32 || quantized) by scipy, averaged over the images."""
    import copy

    from scipy.special import log_softmax, rel_entr, softmax
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    loaded = load_model("tiny_test")
    calib, x = [_images(16, 0)], _images(20, 1)
    result = diagnose(loaded.module, FakeQuantSpec(bias_correction=False), calib, x, onnx_names=False, top_k=1)

    folded = copy.deepcopy(loaded.module).eval()
    for conv, bn in (("0", "1"), ("3", "4"), ("6", "7")):
        folded.features[int(conv)] = fuse_conv_bn_eval(folded.features[int(conv)], folded.features[int(bn)])
        folded.features[int(bn)] = nn.Identity()
    with torch.no_grad():
        ref = folded(x).double().numpy()
    p = softmax(ref, axis=1)
    assert np.allclose(log_softmax(ref, axis=1), np.log(p))
    checked = 0
    for layer in result["layers"]:
        model = copy.deepcopy(folded)
        module = model.get_submodule(layer["module"])
        w = module.weight.detach()
        scale = w.abs().reshape(len(w), -1).amax(dim=1) / 127
        with torch.no_grad():
            module.weight.copy_(torch.fake_quantize_per_channel_affine(w, scale, torch.zeros(len(w), dtype=torch.int32), 0, -127, 127))
            q = softmax(model(x).double().numpy(), axis=1)
        expected = float(rel_entr(p, q).sum(axis=1).mean())
        assert expected > 0
        assert layer["only_weight"]["kl"] == pytest.approx(expected, rel=1e-3), layer["module"]
        checked += 1
    assert checked == 4
