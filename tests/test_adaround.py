"""AdaRound: the learned rounding lowers a layer's output error with the backend's own scale, the ONNX Runtime Q/DQ
model gets it as its real INT8 weights (bias correction then corrects those), and only onnxruntime and openvino offer
it (OpenVINO's: tests/test_openvino_adaround.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import nn

from int8eval.backends.adaround import AdaRoundSpec, LayerGrid, gram_factor, input_grams, round_layer
from int8eval.config import Backend, Precision, Recipe
from int8eval.errors import ConfigError

FEW = AdaRoundSpec(iterations=200)


def _output(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if isinstance(layer, nn.Linear):
        return F.linear(x, weight)
    return F.conv2d(x, weight, None, layer.stride, layer.padding, layer.dilation, layer.groups)


@pytest.mark.parametrize("make, shape", [
    (lambda: nn.Conv2d(8, 16, 3, stride=2, padding=1), (32, 8, 12, 12)),
    (lambda: nn.Conv2d(8, 8, 3, padding=1, groups=8), (32, 8, 12, 12)),  # depthwise
    (lambda: nn.Conv2d(8, 16, 1), (32, 8, 6, 6)),
    (lambda: nn.Conv2d(4, 8, 3, padding=2, dilation=2, groups=2), (32, 4, 10, 10)),
    (lambda: nn.Linear(24, 10), (64, 24)),
], ids=["conv3x3", "depthwise", "conv1x1", "dilated-grouped", "linear"])
def test_learned_rounding_beats_nearest_with_the_same_scale(make, shape):
    torch.manual_seed(0)
    layer, x = make(), torch.randn(shape).relu()  # post-ReLU inputs: their mean makes the errors of a channel add up
    w = layer.weight.detach()
    scale = w.reshape(len(w), -1).abs().amax(1) / 127  # symmetric per-channel INT8, as ONNX Runtime's
    per_channel = scale.reshape([-1] + [1] * (w.dim() - 1))
    gram = input_grams(nn.Sequential(layer), ["0"], [x])["0"]
    rounding = round_layer(LayerGrid(w, scale, -127, 127), gram_factor(gram), FEW)

    q = rounding.integers
    ws = w / per_channel
    assert q.shape == w.shape and int(q.min()) >= -127 and int(q.max()) <= 127
    assert torch.all((q == ws.floor()) | (q == ws.ceil()))  # only the rounding direction is learned
    assert rounding.changed > 0 and not rounding.kept_nearest

    def error(integers: torch.Tensor) -> float:  # measured directly, not through the Gram matrix
        return float((_output(layer, x, integers.float() * per_channel - w)).square().sum(1).mean())

    nearest, learned = error(ws.round()), error(q)
    assert learned < 0.98 * nearest
    reference = float(_output(layer, x, w).square().sum(1).mean())
    np.testing.assert_allclose([rounding.error_nearest, rounding.error_learned],
                               [nearest / reference, learned / reference], rtol=1e-3)


def test_the_backends_rounding_is_kept_where_the_learned_one_is_worse():
    # The "backend" here rounds better than one AdaRound step can (its integers are a full AdaRound's): kept as is.
    torch.manual_seed(1)
    layer, x = nn.Linear(16, 8), torch.randn(64, 16).relu()
    w = layer.weight.detach()
    scale = w.abs().amax(1) / 127
    factor = gram_factor(input_grams(nn.Sequential(layer), ["0"], [x])["0"])
    good = round_layer(LayerGrid(w, scale, -127, 127), factor, FEW)
    assert good.changed > 0
    again = round_layer(LayerGrid(w, scale, -127, 127, nearest=good.integers), factor, AdaRoundSpec(iterations=1))
    assert again.kept_nearest and again.changed == 0 and torch.equal(again.integers, good.integers)
    assert again.error_learned == again.error_nearest == pytest.approx(good.error_learned, rel=1e-4)


def test_a_layer_it_cannot_round_is_refused():
    with pytest.raises(ValueError, match="'1' is not a Linear or zero-padded Conv2d"):
        input_grams(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), ["1"], [torch.zeros(1, 4)])


# --- the ONNX Runtime Q/DQ model ---------------------------------------------------------------------------------


def _weights_and_scales(model) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    from onnx import TensorProto, numpy_helper

    ints = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer if i.data_type == TensorProto.INT8}
    rest = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer if i.data_type != TensorProto.INT8}
    return ints, rest


def test_onnx_qdq_writes_the_learned_integers_as_its_int8_weights(tiny, varied_calib, tmp_path):
    pytest.importorskip("onnxruntime")
    import onnx

    from int8eval.backends.onnx_calibration import collect_activation_stats
    from int8eval.backends.onnx_export import export_onnx, module_nodes
    from int8eval.backends.onnx_qdq import ModuleAdaRound, quantize_qdq, weight_errors

    fp32 = export_onnx(tiny.module, tiny.example_input(1), tmp_path / "tiny.onnx")
    stats = collect_activation_stats(fp32, varied_calib)
    plain = onnx.load(str(quantize_qdq(fp32, stats, tmp_path / "plain.onnx")))
    rounding = ModuleAdaRound(tiny.module, stats.model, varied_calib, FEW)
    learned = onnx.load(str(quantize_qdq(fp32, stats, tmp_path / "ada.onnx", weight_rounding=rounding)))

    (plain_ints, plain_rest), (ints, rest) = _weights_and_scales(plain), _weights_and_scales(learned)
    assert plain_ints.keys() == ints.keys() and plain_rest.keys() == rest.keys()
    for name, value in plain_rest.items():  # scales, zero-points and INT32 biases: ONNX Runtime's, unchanged
        np.testing.assert_array_equal(rest[name], value, err_msg=name)
    diffs = {name: ints[name].astype(int) - value.astype(int) for name, value in plain_ints.items()}
    assert all(np.abs(d).max() <= 1 for d in diffs.values())
    assert sum(int(np.count_nonzero(d)) for d in diffs.values()) == rounding.details["weights_changed"] > 0
    # Every Conv and the Linear of the tiny model, each one a single node
    assert rounding.details["layers"] == 4 == len(rounding.layers)
    assert rounding.details["mean_relative_output_mse_adaround"] < rounding.details["mean_relative_output_mse_nearest"]

    # Measured independently: each layer's output error on the FP32 inputs of the calibration images, with the
    # dequantized ONNX weights of each model (the exported weights have BatchNorm folded in; its input is the same).
    fp32_model = onnx.load(str(stats.model))
    before, after = weight_errors(fp32_model, plain), weight_errors(fp32_model, learned)
    layers = {path: nodes[0] for path, nodes in module_nodes(stats.model, tiny.module).items()}
    assert set(layers) == set(rounding.layers) == {"features.0", "features.3", "features.6", "fc"}
    inputs = {}
    hooks = [tiny.module.get_submodule(p).register_forward_hook(
        lambda _m, args, _o, p=p: inputs.setdefault(p, []).append(args[0])) for p in layers]
    with torch.no_grad():
        for batch in varied_calib:
            tiny.module(torch.from_numpy(batch))
    for h in hooks:
        h.remove()
    total = {}
    for which, errors in (("nearest", before), ("learned", after)):
        total[which] = sum(
            float(_output(tiny.module.get_submodule(p), torch.cat(inputs[p]), torch.from_numpy(errors[node]))
                  .square().sum(1).mean())
            for p, node in layers.items()
        )
    assert total["learned"] < total["nearest"]


def test_bias_correction_corrects_the_learned_weights(tiny, varied_calib, tmp_path):
    pytest.importorskip("onnxruntime")
    import onnx

    from int8eval.backends.onnx_calibration import collect_activation_stats
    from int8eval.backends.onnx_export import export_onnx
    from int8eval.backends.onnx_qdq import ModuleAdaRound, quantize_qdq, weight_errors

    fp32 = export_onnx(tiny.module, tiny.example_input(1), tmp_path / "tiny.onnx")
    stats = collect_activation_stats(fp32, varied_calib)
    seen = {}

    def shifts(errors):
        seen.update(errors)
        return {node: np.full(len(e), 0.01, np.float32) for node, e in errors.items()}

    rounding = ModuleAdaRound(tiny.module, stats.model, varied_calib, FEW)
    both = onnx.load(str(quantize_qdq(fp32, stats, tmp_path / "both.onnx", bias_shifts=shifts,
                                      weight_rounding=rounding)))
    only = onnx.load(str(quantize_qdq(fp32, stats, tmp_path / "ada.onnx", weight_rounding=ModuleAdaRound(
        tiny.module, stats.model, varied_calib, FEW))))
    # The errors bias correction was given are those of the learned weights, which the final model keeps.
    final = weight_errors(onnx.load(str(stats.model)), both)
    assert seen.keys() == final.keys() and rounding.details["weights_changed"] > 0
    for node, error in seen.items():
        np.testing.assert_array_equal(error, final[node])
    assert _weights_and_scales(both)[0].keys() == _weights_and_scales(only)[0].keys()
    for name, value in _weights_and_scales(only)[0].items():
        np.testing.assert_array_equal(_weights_and_scales(both)[0][name], value)


def test_onnxruntime_variant_reports_it_and_is_closer_to_fp32(tiny, varied_calib, tmp_path):
    pytest.importorskip("onnxruntime")
    from conftest import torch_logits, varied_images

    from int8eval.backends import BuildContext, build_variant

    # Without bias correction, which on this tiny model leaves too little for the rounding to show in the logits.
    context = BuildContext(workdir=tmp_path)
    plain = build_variant(tiny, Recipe(backend="onnxruntime", bias_correction=False), varied_calib, tmp_path, context)
    learned = build_variant(tiny, Recipe(backend="onnxruntime", adaround=True, bias_correction=False), varied_calib,
                            tmp_path, context)
    assert learned.name == "onnxruntime-int8-minmax-adaround-nobc" and "adaround" not in plain.details
    details = learned.details["adaround"]
    assert details["layers"] == 4 and details["iterations"] == AdaRoundSpec().iterations
    assert details["weights_changed"] > 0 and set(learned.details["adaround_layers"]) == {
        "features.0", "features.3", "features.6", "fc"}

    x = varied_images(64, 99)
    ref = torch.log_softmax(torch.from_numpy(torch_logits(tiny, x)), 1)

    def kl(variant) -> float:  # mean KL(FP32 || variant) over the images
        out = torch.log_softmax(torch.from_numpy(variant.predict(x)), 1)
        return float((ref.exp() * (ref - out)).sum(1).mean())

    # Measured with three calibration/evaluation seeds: 4.9e-6 -> 4.2e-6 each time (about -14%).
    assert kl(learned) < 0.95 * kl(plain)


# --- where it applies --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, kind", [
    (dict(backend="torch"), "torch int8"),
    (dict(backend="onnxruntime", precision=Precision.fp32), "onnxruntime fp32"),
    (dict(backend="openvino", precision=Precision.fp32), "openvino fp32"),
    (dict(backend="tensorrt"), "tensorrt int8"),
    (dict(backend="torch", qat_epochs=1), "torch int8 QAT"),
])
def test_recipe_refuses_adaround_outside_onnxruntime_and_openvino_ptq(kwargs, kind):
    with pytest.raises(ValidationError,
                       match=f"adaround applies to onnxruntime and openvino INT8 post-training .* not to {kind};"):
        Recipe(adaround=True, **kwargs)


def test_recipe_name_and_expansion():
    from int8eval.session import expand_recipes

    assert Recipe(backend="onnxruntime", adaround=True).name == "onnxruntime-int8-minmax-adaround"
    nobc = Recipe(backend="onnxruntime", adaround=True, bias_correction=False)
    assert nobc.name == "onnxruntime-int8-minmax-adaround-nobc"
    assert Recipe(backend="openvino", calib="mse", adaround=True).name == "openvino-int8-mse-adaround"
    names = [r.name for r in expand_recipes(["onnxruntime", "torch"], ["minmax"], adaround=True)]
    assert names == ["onnxruntime-int8-minmax", "onnxruntime-int8-minmax-adaround", "torch-int8-minmax"]
    names = [r.name for r in expand_recipes(["openvino"], ["mse", "minmax"], adaround=True, channel_alignment=True)]
    assert names == ["openvino-int8-mse", "openvino-int8-mse-adaround", "openvino-int8-mse-ca",
                     "openvino-int8-minmax", "openvino-int8-minmax-adaround", "openvino-int8-minmax-ca"]
    with pytest.raises(ConfigError, match="--adaround applies to onnxruntime's and openvino's INT8 recipes"):
        expand_recipes(["torch"], adaround=True)


def test_a_deployment_cannot_be_adarounded(tmp_path):
    with pytest.raises(ValidationError, match="adaround cannot change it"):
        Recipe(backend="onnxruntime", deployed=tmp_path, adaround=True)


def test_run_refuses_adaround_without_onnxruntime_or_openvino(tmp_path, image_folder):
    from click.testing import CliRunner

    from int8eval.cli import main

    base = ["run", "-m", "tiny_test", "--data", str(image_folder), "--out", str(tmp_path / "r")]
    result = CliRunner().invoke(main, base + ["--backend", "torch", "--adaround"])
    assert result.exit_code == 2 and "--adaround applies to onnxruntime's and openvino's" in result.output
    result = CliRunner().invoke(main, base + ["--fp32-only", "--adaround"])
    assert result.exit_code == 2 and "--adaround has no effect with --fp32-only" in result.output


def test_the_ladder_offers_adaround_to_onnxruntime_and_openvino():
    from int8eval.tune.ladder import ladder

    def names(backend):
        return [s.name for s in ladder(backend, ranking=lambda: ["a"])]

    for backend in (Backend.onnxruntime, Backend.openvino):
        steps = names(backend)
        at = steps.index("AdaRound")
        assert steps.index("bias correction off") < at == steps.index("FP32 layers") - 1
    assert "AdaRound" not in names(Backend.torch) and "AdaRound" not in names(Backend.tensorrt)
    step = next(s for s in ladder(Backend.onnxruntime) if s.name == "AdaRound")
    base = Recipe(backend="onnxruntime", bias_correction=False)
    assert [r.name for r in step.candidates(base)] == ["onnxruntime-int8-minmax-adaround-nobc"]
    assert step.candidates(Recipe(backend="onnxruntime", adaround=True)) == []
    step = next(s for s in ladder(Backend.openvino) if s.name == "AdaRound")
    assert [r.name for r in step.candidates(Recipe(backend="openvino", calib="mse"))] == ["openvino-int8-mse-adaround"]
    assert step.candidates(Recipe(backend="openvino", adaround=True)) == []
