"""Bias correction: the shift it measures, the recipe switch, and that each backend applies it to its own Q(W)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from torch import nn

from int8eval.backends import CalibrationData
from int8eval.backends.bias_correction import output_shifts, subtract_from_biases
from int8eval.config import Precision, Recipe


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False),
        nn.Flatten(), nn.Linear(4 * 8 * 8, 5),
    ).eval()


@pytest.fixture
def small_calib() -> CalibrationData:
    rng = np.random.default_rng(0)
    return CalibrationData([rng.standard_normal((4, 3, 8, 8)).astype(np.float32) + 0.5 for _ in range(2)])


def test_corrected_layers_are_right_on_average(small_calib):
    # A layer with weights W + E and bias b - shift has, over the calibration images, the mean output of W, b.
    model = _model()
    torch.manual_seed(1)
    errors = {name: 0.05 * torch.randn_like(model.get_submodule(name).weight) for name in ("0", "2", "4")}
    shifts = output_shifts(model, errors, small_calib)
    assert {k: v.shape for k, v in shifts.items()} == {"0": (4,), "2": (4,), "4": (5,)}

    x = torch.from_numpy(np.concatenate(small_calib.batches))
    for name in errors:
        layer = model.get_submodule(name)
        inputs = []
        handle = layer.register_forward_hook(lambda _m, args, _o: inputs.append(args[0]))
        with torch.no_grad():
            model(x)
        handle.remove()
        perturbed = _model().get_submodule(name)
        with torch.no_grad():
            perturbed.weight += errors[name]
        subtract_from_biases(nn.Sequential(perturbed), {"0": shifts[name]})
        with torch.no_grad():
            ref, out = layer(inputs[0]), perturbed(inputs[0])
        dims = [0, 2, 3] if ref.dim() == 4 else [0]
        np.testing.assert_allclose(out.mean(dims), ref.mean(dims), atol=1e-5)
        assert not torch.allclose(out, ref, atol=1e-3)  # only the mean is corrected


def test_a_layer_that_is_not_conv_or_linear_is_refused(small_calib):
    with pytest.raises(ValueError, match="'1' is not a Conv2d or Linear"):
        output_shifts(_model(), {"1": torch.zeros(1)}, small_calib)


def test_recipe_turns_it_on_where_it_applies():
    assert Recipe(backend="torch").bias_correction
    assert Recipe(backend="openvino", bias_correction=None).bias_correction
    assert not Recipe(backend="torch", legacy=True).bias_correction
    assert not Recipe(backend="torch", qat_epochs=1).bias_correction
    assert not Recipe(backend="torch", precision=Precision.fp32).bias_correction
    assert Recipe(backend="onnxruntime", bias_correction=False).name == "onnxruntime-int8-minmax-nobc"
    assert Recipe(backend="torch", legacy=True, bias_correction=False).name == "torch-int8-legacy-minmax"
    with pytest.raises(ValidationError, match="bias_correction applies to INT8 post-training quantization"):
        Recipe(backend="torch", legacy=True, bias_correction=True)


# --- backends ------------------------------------------------------------------------------------------------------


def test_onnx_qdq_corrects_the_biases_it_quantizes(tiny, calib, tmp_path):
    pytest.importorskip("onnxruntime")
    import onnx
    from onnx import numpy_helper

    from int8eval.backends.onnx_export import export_onnx
    from int8eval.backends.onnx_calibration import collect_activation_stats
    from int8eval.backends.onnx_qdq import quantize_qdq, weight_errors

    fp32 = export_onnx(tiny.module, tiny.example_input(1), tmp_path / "tiny.onnx")
    stats = collect_activation_stats(fp32, calib)
    seen = {}

    def shifts(errors):
        seen.update(errors)
        return {node: np.full(len(e), 0.25, np.float32) for node, e in errors.items()}

    plain = onnx.load(str(quantize_qdq(fp32, stats, tmp_path / "plain.onnx")))
    corrected = onnx.load(str(quantize_qdq(fp32, stats, tmp_path / "bc.onnx", bias_shifts=shifts)))
    fp32_model = onnx.load(str(stats.model))
    assert seen and seen.keys() == weight_errors(fp32_model, plain).keys()

    inits = {i.name: numpy_helper.to_array(i) for i in fp32_model.graph.initializer}
    for node in fp32_model.graph.node:
        if node.name not in seen:
            continue
        w = inits[node.input[1]]
        err = seen[node.name]
        assert err.shape == w.shape
        # ONNX Runtime's symmetric per-channel INT8: errors up to half a step, scale max|w| / 127 per channel.
        step = np.abs(w).reshape(len(w), -1).max(1) / 127
        assert np.all(np.abs(err).reshape(len(w), -1).max(1) <= step / 2 * 1.001)
        assert np.abs(err).max() > 0

    def dequantized_biases(model):
        q_inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
        producer = {o: n for n in model.graph.node for o in n.output}
        out = {}
        for node in model.graph.node:
            if node.name in seen and len(node.input) > 2 and node.input[2]:
                dq = producer[node.input[2]]
                out[node.name] = q_inits[dq.input[0]].astype(np.float64) * q_inits[dq.input[1]]
        return out

    before, after = dequantized_biases(plain), dequantized_biases(corrected)
    assert before
    for node, b in before.items():
        np.testing.assert_allclose(after[node], b - 0.25, atol=1e-3)


def test_onnxruntime_variant_reports_it(tiny, calib, tmp_path):
    pytest.importorskip("onnxruntime")
    from int8eval.backends import build_variant

    on = build_variant(tiny, Recipe(backend="onnxruntime"), calib, tmp_path)
    off = build_variant(tiny, Recipe(backend="onnxruntime", bias_correction=False), calib, tmp_path)
    assert on.details["bias_correction"] == "int8eval" and off.details["bias_correction"] is None


@pytest.mark.parametrize("backend", ["torch", "onnxruntime", "openvino"])
def test_each_backend_removes_the_mean_error_of_its_weights(backend, small_calib, tmp_path):
    """A weight error of known mean: in the second convolution, channels 0-6 hold weights of 0.2-0.45 of a
    per-tensor INT8 step (one weight of 1 in channel 7 sets the step), so INT8 rounds every one of them to zero on
    any CPU path (7-bit weights only widen the step). Those channels then lose exactly their FP32 contribution,
    computed here independently of the backends; corrected, it must be (nearly) all back."""
    from int8eval.backends import build_variant
    from int8eval.config import Preprocessing
    from int8eval.models import LoadedModel

    pytest.importorskip({"torch": "torch", "onnxruntime": "onnxruntime", "openvino": "nncf"}[backend])
    torch.manual_seed(0)
    # The first convolution copies the image's channels into 32 (it is there because OpenVINO keeps a model's
    # first convolution in FP32 where INT8 saturates); per-tensor weights, so that one weight sets every step.
    conv = nn.Sequential(nn.Conv2d(3, 32, 1), nn.Conv2d(32, 8, 3, padding=1)).eval()
    with torch.no_grad():
        conv[0].weight.zero_()
        conv[0].weight[torch.arange(32), torch.arange(32) % 3] = 1.0
        conv[0].bias.zero_()
        conv[1].weight.zero_()
        conv[1].weight[7, 0, 1, 1] = 1.0  # the step: 1 / 127
        conv[1].weight[:7].uniform_(0.2 / 127, 0.45 / 127)
    loaded = LoadedModel("conv", conv, Preprocessing(resize=8, crop=8), "test")
    x = np.concatenate(small_calib.batches)
    with torch.no_grad():
        ref = conv(torch.from_numpy(x)).numpy()
        # What rounding those weights to zero takes off each of channels 0-6, on average over the images.
        hidden = conv[0](torch.from_numpy(x))
        lost = torch.nn.functional.conv2d(hidden, conv[1].weight[:7], padding=1).mean((0, 2, 3)).numpy()
    assert lost.min() > 0.2  # 288 weights of ~0.0026 times inputs of mean 0.5 (less the zero padding)

    def mean_error(bias_correction: bool) -> np.ndarray:
        recipe = Recipe(backend=backend, per_channel=False, bias_correction=bias_correction)
        variant = build_variant(loaded, recipe, small_calib, tmp_path / str(bias_correction))
        assert variant.details["bias_correction"] == ("int8eval" if bias_correction else None)
        return (variant.predict(x) - ref).mean((0, 2, 3))[:7]

    # Besides the weights INT8 rounds activations: the input (zero-mean errors over 512 positions, through weights
    # of ~0.003: ~1e-4 on average, 7-bit or 8-bit) and, in ONNX Runtime, the output, per tensor over channel 7's
    # range of ~7 (near-constant channels may keep up to half a step, 0.014, of ~6% of the loss). 10% bounds both.
    np.testing.assert_allclose(mean_error(False), -lost, atol=0.1 * lost.min())
    assert np.abs(mean_error(True)).max() < 0.1 * lost.min()


@pytest.mark.parametrize("bias_correction", [True, False])
def test_diagnose_fakes_the_same_correction(tiny, calib, bias_correction):
    from int8eval.diagnose import FakeQuantModel, FakeQuantSpec

    fq = FakeQuantModel(tiny.module, FakeQuantSpec(bias_correction=bias_correction))
    batches = [torch.from_numpy(b) + 1.0 for b in calib.batches]  # inputs with a mean, as images have
    fq.calibrate(batches)
    first = fq.layer(fq.names[0])  # its input is the image: FP32 in every configuration
    x = torch.cat(batches)
    with torch.no_grad():
        mean_error = (first.forward_with(x, first.w_q) - first.forward_with(x, first.w_fp)).mean([0, 2, 3])
    if bias_correction:
        assert mean_error.abs().max() < 1e-5
    else:
        assert torch.equal(first.b_q, first.b_fp) and mean_error.abs().max() > 1e-3
