"""AdaRound on OpenVINO (`backends.openvino_adaround`): the -adaround variant builds and predicts, its int8 weight
constants hold the learned integers within NNCF's integer range (7-bit with the overflow fix, 8-bit without) on NNCF's
unchanged scales, its layers' output error is not worse than NNCF's rounding, and bias correction measures them."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from conftest import require_package, varied_images

require_package("openvino", "nncf", extra="openvino")

import openvino as ov  # noqa: E402

from int8eval.backends import BuildContext  # noqa: E402
from int8eval.backends import openvino_adaround as oa  # noqa: E402
from int8eval.backends import openvino_backend as ob  # noqa: E402
from int8eval.backends.adaround import AdaRoundSpec  # noqa: E402
from int8eval.config import Recipe  # noqa: E402

FEW = AdaRoundSpec(iterations=100)
DENSE = ("features.6", "fc")  # NNCF's overflow fix makes these 7-bit; the depthwise features.3 stays 8-bit


@pytest.fixture
def few_iterations(monkeypatch):
    monkeypatch.setattr(oa, "learned_rounding", functools.partial(oa.learned_rounding, spec=FEW))


def _weights(variant) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Module path -> (int8 weights, scale) of each layer NNCF stored as INT8, read back from the saved IR."""
    model = ov.Core().read_model(str(variant.artifact))
    out = {}
    for path, ops in ob._module_ops(model).items():
        weight = oa.int8_weight(ops[0].input_value(1).get_node())
        if weight is not None:
            out[path] = (weight.integers.copy(), weight.scale)
    return out


def _biases(variant) -> dict[str, np.ndarray]:
    from int8eval.backends.openvino_nncf import layer_biases

    return layer_biases(ov.Core().read_model(str(variant.artifact)))


# INT8EVAL_CPU -> (the layers rounded, each one's integer range): with the overflow fix the first convolution stays
# FP32 and the dense layers' weights are 7-bit; without it every layer is 8-bit.
PATHS = {
    "avx2": {"features.3": (-127, 127), "features.6": (-64, 64), "fc": (-64, 64)},
    "vnni": {"features.0": (-127, 127), "features.3": (-127, 127), "features.6": (-127, 127), "fc": (-127, 127)},
}


@pytest.mark.parametrize("cpu", PATHS)
def test_adaround_writes_learned_int8_weights_within_nncfs_range(cpu, tiny, varied_calib, tmp_path, monkeypatch,
                                                                few_iterations):
    monkeypatch.setenv("INT8EVAL_CPU", cpu)
    context = BuildContext(workdir=tmp_path)
    plain = ob.build(tiny, Recipe(backend="openvino"), varied_calib, tmp_path, context)
    learned = ob.build(tiny, Recipe(backend="openvino", adaround=True), varied_calib, tmp_path, context)
    assert learned.name == "openvino-int8-minmax-adaround" and "adaround" not in plain.details
    out = learned.predict(varied_images(5, 3))
    assert out.shape == (5, 1000) and out.dtype == np.float32 and np.isfinite(out).all()

    ranges = PATHS[cpu]
    before, after = _weights(plain), _weights(learned)
    assert before.keys() == after.keys() == ranges.keys()
    changed = 0
    for path, (qmin, qmax) in ranges.items():
        (q0, s0), (q1, s1) = before[path], after[path]
        assert q1.dtype == q0.dtype == np.int8 and q1.shape == q0.shape
        np.testing.assert_array_equal(s1, s0, err_msg=path)  # NNCF's scales, unchanged
        assert np.abs(q1.astype(int) - q0.astype(int)).max() <= 1  # only the rounding direction moves
        assert qmin <= q1.min() and q1.max() <= qmax and qmin <= q0.min() and q0.max() <= qmax, path
        assert oa.integer_range(q0) == (qmin, qmax)
        changed += int(np.count_nonzero(q1 != q0))
    # NNCF's own 7-bit weights (round half up of W / scale in [-63.5, 63.5]) span -63..64; 8-bit ones -127..127.
    dense = [before[p][0] for p in DENSE]
    if cpu == "avx2":
        assert all(q.min() == -63 and q.max() == 64 for q in dense)
    else:
        assert all(q.min() == -127 and q.max() == 127 for q in dense)

    details = learned.details["adaround"]
    assert details["layers"] == len(ranges) and details["iterations"] == FEW.iterations
    assert details["weights_changed"] == changed > 0
    assert details["integer_ranges"] == {f"[{lo}, {hi}]": list(ranges.values()).count((lo, hi))
                                         for lo, hi in set(ranges.values())}
    layers = learned.details["adaround_layers"]
    assert set(layers) == set(ranges) and all(tuple(v["integer_range"]) == ranges[p] for p, v in layers.items())
    assert all(v["relative_output_mse_adaround"] <= v["relative_output_mse_nearest"] for v in layers.values())
    assert details["mean_relative_output_mse_adaround"] < details["mean_relative_output_mse_nearest"]

    # Measured independently: each layer's output error on the FP32 inputs the folded module gives it.
    folded = ob.conversion(tiny, context).folded
    inputs: dict[str, list[torch.Tensor]] = {}
    hooks = [folded.get_submodule(p).register_forward_hook(
        lambda _m, args, _o, p=p: inputs.setdefault(p, []).append(args[0])) for p in ranges]
    with torch.no_grad():
        for batch in varied_calib:
            folded(torch.from_numpy(batch))
    for h in hooks:
        h.remove()

    def error(path: str, q: np.ndarray, scale: np.ndarray) -> float:
        layer = folded.get_submodule(path)
        dw = torch.from_numpy((q.astype(np.float32) * scale).reshape(layer.weight.shape)) - layer.weight.detach()
        x = torch.cat(inputs[path])
        y = torch.nn.functional.linear(x, dw) if isinstance(layer, torch.nn.Linear) else torch.nn.functional.conv2d(
            x, dw, None, layer.stride, layer.padding, layer.dilation, layer.groups)
        return float(y.square().sum())

    for path in ranges:
        assert error(path, *after[path]) <= error(path, *before[path]) * (1 + 1e-5), path


def test_bias_correction_measures_the_learned_weights(tiny, varied_calib, tmp_path, monkeypatch, few_iterations):
    from int8eval.backends.bias_correction import output_shifts

    monkeypatch.setenv("INT8EVAL_CPU", "avx2")
    context = BuildContext(workdir=tmp_path)
    both = ob.build(tiny, Recipe(backend="openvino", adaround=True), varied_calib, tmp_path, context)
    only = ob.build(tiny, Recipe(backend="openvino", adaround=True, bias_correction=False), varied_calib, tmp_path,
                    context)
    assert both.details["bias_correction"] == "int8eval" and both.details["bias_corrected_layers"] == 3
    weights = _weights(both)
    for path, (q, scale) in _weights(only).items():  # the same learned integers with or without bias correction
        np.testing.assert_array_equal(weights[path][0], q)
    # Each corrected bias is the uncorrected one less the mean output shift of the learned weights' error.
    folded = ob.conversion(tiny, context).folded
    errors = {p: torch.from_numpy((q.astype(np.float32) * s).reshape(folded.get_submodule(p).weight.shape))
              - folded.get_submodule(p).weight.detach() for p, (q, s) in weights.items()}
    shifts = output_shifts(folded, errors, varied_calib)
    corrected, uncorrected = _biases(both), _biases(only)
    ops = {p: ops[0].get_friendly_name() for p, ops in ob._module_ops(ob.convert(tiny, context)).items()}
    for path, shift in shifts.items():
        name = ops[path]
        np.testing.assert_allclose(corrected[name].reshape(-1), uncorrected[name].reshape(-1) - shift.reshape(-1),
                                   rtol=1e-5, atol=1e-6, err_msg=path)


def test_the_integer_range_is_read_from_the_stored_weights():
    assert oa.integer_range(np.array([-63, 0, 64], np.int8)) == oa.HALF_RANGE == (-64, 64)
    assert oa.integer_range(np.array([-127, 3, 100], np.int8)) == oa.FULL_RANGE == (-127, 127)
    assert oa.integer_range(np.array([-65, 3], np.int8)) == oa.FULL_RANGE


def test_weights_that_are_not_nncfs_int8_subgraph_are_left_alone():
    import openvino.opset13 as ops

    scale = ops.constant(np.full((2, 1), 0.5, np.float32))
    int8 = ops.constant(np.array([[1, -2], [3, 4]], np.int8))
    found = oa.int8_weight(ops.multiply(ops.convert(int8, "f32"), scale))
    assert found is not None and found.integers.tolist() == [[1, -2], [3, 4]] and found.scale.shape == (2, 1)
    assert oa.int8_weight(ops.constant(np.zeros((2, 2), np.float32))) is None  # FP32 weights
    uint8 = ops.convert(ops.constant(np.zeros((2, 2), np.uint8)), "f32")
    assert oa.int8_weight(ops.multiply(uint8, scale)) is None
    shifted = ops.subtract(ops.convert(int8, "f32"), ops.constant(np.ones((2, 1), np.float32)))
    assert oa.int8_weight(ops.multiply(shifted, scale)) is None  # a zero point: not symmetric
    zero = ops.subtract(ops.convert(int8, "f32"), ops.constant(np.zeros((2, 1), np.float32)))
    assert oa.int8_weight(ops.multiply(zero, scale)) is not None


def test_a_ladders_recipes_reuse_each_layers_rounding_within_a_session(tiny, varied_calib, tmp_path, monkeypatch,
                                                                       few_iterations):
    """The FP32-layers step builds AdaRound recipes that differ only in the layers kept FP32: the other layers'
    grids and FP32 inputs are the same, so their learned rounding is taken from the session's BuildContext, and is
    what a build of its own learns."""
    from int8eval.backends import adaround

    monkeypatch.setenv("INT8EVAL_CPU", "avx2")
    asked: list[set[str]] = []
    learn = adaround.round_layers

    def spy(module, grids, calib, spec):
        asked.append(set(grids))
        return learn(module, grids, calib, spec)

    monkeypatch.setattr(adaround, "round_layers", spy)
    context = BuildContext(workdir=tmp_path)
    whole = ob.build(tiny, Recipe(backend="openvino", adaround=True), varied_calib, tmp_path, context)
    keep = Recipe(backend="openvino", adaround=True, keep_fp32=("features.6",))
    kept = ob.build(tiny, keep, varied_calib, tmp_path, context)
    alone = ob.build(tiny, keep, varied_calib, tmp_path / "alone", BuildContext(workdir=tmp_path / "alone"))
    assert asked[0] == {"features.3", "features.6", "fc"} and len(asked) == 2  # the second build learnt nothing
    assert kept.details["adaround"]["layers"] == 2 == alone.details["adaround"]["layers"]
    for path, (q, scale) in _weights(alone).items():
        np.testing.assert_array_equal(_weights(kept)[path][0], q, err_msg=path)
        np.testing.assert_array_equal(_weights(whole)[path][0], q, err_msg=path)
