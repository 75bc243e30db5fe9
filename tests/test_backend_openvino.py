"""OpenVINO + NNCF backend: FP32 parity with PyTorch, a really-FP32 artifact, INT8 for each calibration method,
per-tensor weights, the histogram range narrowing, and recipe checks. Fast tests use `tiny_test` and random data."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import decode_sample, require_package, torch_logits

require_package("openvino", "nncf", extra="openvino")

import openvino as ov  # noqa: E402

from int8eval.backends import BuildContext, CalibrationData, build_variant  # noqa: E402
from int8eval.backends import check_recipe as registry_check_recipe  # noqa: E402
from int8eval.backends import openvino_backend as ob  # noqa: E402
from int8eval.backends import openvino_ranges  # noqa: E402
from int8eval.config import Backend, CalibMethod, Precision, Recipe  # noqa: E402
from int8eval.errors import ConfigError  # noqa: E402
from int8eval.models import load_model  # noqa: E402


def ov_recipe(**kw) -> Recipe:
    return Recipe(backend=Backend.openvino, **kw)


@pytest.fixture(scope="module")
def fp32(tiny, tmp_path_factory):
    return ob.build(tiny, ov_recipe(precision=Precision.fp32), None, tmp_path_factory.mktemp("fp32"))


@pytest.fixture(scope="module")
def int8_variants(tiny, calib, tmp_path_factory):
    """One INT8 build per calibration method (built once: NNCF takes seconds per model)."""
    workdir = tmp_path_factory.mktemp("int8")
    return {m: ob.build(tiny, ov_recipe(calib=m), calib, workdir) for m in CalibMethod}


def read(variant) -> ov.Model:
    return ov.Core().read_model(str(variant.artifact))


def activation_highs(model: ov.Model) -> dict[str, float]:
    """input_high of each activation FakeQuantize, by node name."""
    return {fq.get_friendly_name(): float(openvino_ranges.limit(fq, 2).max()) for fq in openvino_ranges.activation_quantizers(model)}


def weight_scale_sizes(model: ov.Model) -> list[int]:
    """Number of scales of each quantized weight (NNCF stores int8 constant -> Convert -> Multiply(scale))."""
    sizes = []
    for op in model.get_ordered_ops():
        if op.get_type_name() not in ("Convolution", "GroupConvolution", "MatMul"):
            continue
        w = op.input_value(1).get_node()
        if w.get_type_name() != "Multiply":
            continue
        scale = next(i.get_node() for i in w.input_values() if i.get_node().get_type_name() == "Constant")
        sizes.append(scale.get_data().size)
    return sizes


# --- FP32: the parity gate ----------------------------------------------------------------------------------------


def test_fp32_matches_torch_for_any_batch_size(tiny, fp32, images):
    ref = torch_logits(tiny, images)
    for n in (5, 3, 1):  # the last batch of an evaluation is smaller
        out = fp32.predict(images[:n])
        assert out.dtype == np.float32 and out.shape == (n, 1000)
        np.testing.assert_allclose(out, ref[:n], atol=1e-4, rtol=0)


def test_fp32_artifact_is_not_fp16_compressed(tiny, fp32):
    assert fp32.artifact.suffix == ".xml" and fp32.artifact.with_suffix(".bin").exists()
    bin_bytes = fp32.artifact.with_suffix(".bin").stat().st_size
    # BatchNorm folds into the convolutions, so a few parameters disappear; FP16 would give ~2 bytes each.
    assert 3.8 * tiny.num_params <= bin_bytes <= 4.1 * tiny.num_params
    assert fp32.size_mb * 1e6 > bin_bytes  # .xml + .bin
    types = {op.get_element_type() for op in read(fp32).get_ordered_ops() if op.get_type_name() == "Constant"}
    assert ov.Type.f16 not in types


def test_fp32_is_compiled_with_f32_inference_precision(fp32):
    # On CPUs with BF16 the plugin would otherwise silently run the "FP32" model in BF16.
    assert fp32.compiled.get_property("INFERENCE_PRECISION_HINT") == ov.Type.f32


def test_conversion_is_reused_until_the_weights_change(images, tmp_path):
    import openvino.properties.hint as hints

    loaded = load_model("tiny_test")
    context = BuildContext(workdir=tmp_path)
    first, second = ob.convert(loaded, context), ob.convert(loaded, context)
    assert first is not second  # callers get their own copy
    memo = context.openvino
    assert memo.module is loaded.module and memo.model is not first
    assert ob.conversion(loaded, context) is memo  # converted once per context
    assert ob.conversion(loaded, BuildContext(workdir=tmp_path)) is not memo  # another context shares nothing
    with torch.no_grad():
        loaded.module.fc.bias.add_(1.0)  # in place: the cached conversion is stale now
    # f32 as the FP32 variants compile: the plugin's default runs BF16 on CPUs with it (2.9e-4 off on an AMX Xeon).
    compiled = ov.Core().compile_model(ob.convert(loaded, context), "CPU", {hints.inference_precision: ov.Type.f32})
    out = compiled(images)[0]
    assert context.openvino is not memo and context.openvino.fingerprint != memo.fingerprint
    ref = torch_logits(loaded, images)
    # FP32 in another summation order (oneDNN's kernels per ISA): a few ulps per layer of the tiny model's sums, far
    # below 1e-4 of the logits' scale; a stale conversion is off by the +1 bias, BF16 by ~5e-3.
    np.testing.assert_allclose(out, ref, atol=1e-4 * np.abs(ref).max(), rtol=0)


def test_variant_reports_how_it_was_built(fp32, int8_variants):
    assert fp32.prepare_s > 0 and {"convert_s", "save_s", "compile_s"} <= fp32.details.keys()
    details = int8_variants[CalibMethod.minmax].details
    assert details["quantize_s"] > 0
    assert details["nncf"]["calibration_images"] == 16
    # int8eval's bias correction on every quantized layer of the tiny model (two convolutions, a depthwise, fc;
    # the first convolution is FP32 on CPUs whose INT8 kernels saturate: test_overflow_handling_follows_the_cpu)
    kept = details["first_layer_fp32"] or []
    assert details["bias_correction"] == "int8eval" and details["bias_corrected_layers"] == 4 - len(kept)
    # which code set the activation ranges, by method
    phrases = {m: v.details["calibration"] for m, v in int8_variants.items()}
    assert phrases[CalibMethod.minmax] == "NNCF MINMAX range estimator"
    assert phrases[CalibMethod.mse].startswith("NNCF HISTOGRAM")
    for method in (CalibMethod.percentile, CalibMethod.entropy):
        assert phrases[method].startswith("NNCF MINMAX, narrowed by int8eval ranges." + method.value)
        assert "4096-bin" in phrases[method] and "2048 bins of |x|" in phrases[method]


FIRST_CONV = "__module.features.0/aten::_convolution/Convolution"
# INT8EVAL_CPU -> (NNCF overflow fix, first convolution in FP32), written out by hand: where x86 INT8 sums saturate
# (no VNNI/AMX), 7-bit weights and an FP32 first convolution; elsewhere 8-bit weights everywhere.
CPU_PATHS = {"avx2": ("enable", True), "vnni": ("disable", False), "amx": ("disable", False), "arm": ("disable", False)}


@pytest.mark.parametrize("cpu", CPU_PATHS)
def test_overflow_handling_follows_the_cpu(cpu, tiny, calib, tmp_path, monkeypatch):
    monkeypatch.setenv("INT8EVAL_CPU", cpu)
    overflow_fix, first_fp32 = CPU_PATHS[cpu]
    assert ob.first_layer_fp32(ob.convert(tiny)) == ([FIRST_CONV] if first_fp32 else [])
    variant = ob.build(tiny, ov_recipe(), calib, tmp_path)
    assert variant.details["nncf"]["overflow_fix"] == overflow_fix
    assert variant.details["first_layer_fp32"] == ([FIRST_CONV] if first_fp32 else None)
    assert f"INT8EVAL_CPU={cpu}" in variant.details["why"]
    ops = {op.get_friendly_name(): op for op in read(variant).get_ordered_ops()}
    weight = ops[FIRST_CONV].input_value(1).get_node()
    assert (weight.get_type_name() == "Constant") is first_fp32  # FP32 weights, not INT8 behind a Multiply
    depthwise = ops["__module.features.3/aten::_convolution/GroupConvolution"]
    assert depthwise.input_value(1).get_node().get_type_name() == "Multiply"
    # The overflow fix stores the dense layers' INT8 weights on 7 bits (|q| <= 64) and leaves depthwise ones 8-bit
    # (that kernel widens every product); without it every layer's largest weight reaches 127.
    dense = [int(abs(_int8_weights(op).astype(np.int32)).max()) for op in ops.values() if _int8_weights(op) is not None]
    assert len(dense) == 3 - first_fp32 and (max(dense) <= 64) is (overflow_fix == "enable"), dense


def _int8_weights(op) -> np.ndarray | None:
    """The int8 constant of a Convolution or MatMul's weight (Constant -> Convert -> Multiply by the scale)."""
    if op.get_type_name() not in ("Convolution", "MatMul"):
        return None
    node = op.input_value(1).get_node()
    while node.get_type_name() in ("Multiply", "Subtract", "Convert", "Reshape"):
        node = node.input_value(0).get_node()
    if node.get_type_name() != "Constant" or node.get_element_type() != ov.Type.i8:
        return None
    return node.get_data()


# --- INT8 ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", list(CalibMethod), ids=lambda m: m.value)
def test_int8_builds_predicts_and_is_smaller(method, tiny, fp32, int8_variants, images):
    variant = int8_variants[method]
    out = variant.predict(images)
    assert out.dtype == np.float32 and out.shape == (5, 1000) and np.isfinite(out).all()
    assert variant.predict(images[:2]).shape == (2, 1000)
    ref = torch_logits(tiny, images)
    assert np.corrcoef(out.ravel(), ref.ravel())[0, 1] > 0.95
    assert variant.size_mb < 0.6 * fp32.size_mb
    assert any(op.get_type_name() == "FakeQuantize" for op in read(variant).get_ordered_ops())


def test_per_tensor_weights_have_one_scale(tiny, calib, int8_variants, tmp_path):
    per_channel = weight_scale_sizes(read(int8_variants[CalibMethod.minmax]))
    assert max(per_channel) > 1  # one scale per output channel
    variant = ob.build(tiny, ov_recipe(calib=CalibMethod.minmax, per_channel=False), calib, tmp_path)
    per_tensor = weight_scale_sizes(read(variant))
    assert len(per_tensor) == len(per_channel) and set(per_tensor) == {1}


def test_keep_fp32_layers_keep_float_weights(tiny, calib, int8_variants, tmp_path):
    first = len(int8_variants[CalibMethod.minmax].details["first_layer_fp32"] or [])  # FP32 where INT8 saturates
    assert len(weight_scale_sizes(read(int8_variants[CalibMethod.minmax]))) == 4 - first
    variant = ob.build(tiny, ov_recipe(keep_fp32=("features.3", "fc")), calib, tmp_path)
    model = read(variant)
    assert len(weight_scale_sizes(model)) == 2 - first
    float_layers = [op.get_friendly_name() for op in model.get_ordered_ops()
                    if op.get_type_name() in ("GroupConvolution", "MatMul")]
    assert [ob.layer_ops(model, ["features.3", "fc"])] == [float_layers]
    with pytest.raises(ConfigError, match="features.9"):
        ob.layer_ops(model, ["features.9"])


def test_percentile_and_entropy_narrow_what_minmax_spends_on_outliers(tiny, outlier_calib, tmp_path, monkeypatch):
    monkeypatch.setenv("INT8EVAL_CPU", "vnni")  # the first convolution's input quantized
    minmax = activation_highs(read(ob.build(tiny, ov_recipe(calib=CalibMethod.minmax), outlier_calib, tmp_path)))
    input_fq = next(name for name in minmax if name.startswith("x/"))  # the quantizer on the model input
    assert minmax[input_fq] >= 59.0
    # The 16 outliers are 0.03% of the input values: a 99.9 percentile clips them, 99.999 would not.
    for recipe in (ov_recipe(calib=CalibMethod.percentile, percentile=99.9), ov_recipe(calib=CalibMethod.entropy)):
        highs = activation_highs(read(ob.build(tiny, recipe, outlier_calib, tmp_path)))
        assert highs.keys() == minmax.keys()
        assert highs[input_fq] < 10.0, recipe.name  # N(0, 1) pixels: a few sigma, not 60
        assert all(highs[k] <= minmax[k] * (1 + 1e-6) for k in highs)  # narrowed, never widened


def test_nncf_options_express_the_recipe(monkeypatch):
    from nncf.quantization.advanced_parameters import OverflowFix
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    opts = ob.nncf_options(ov_recipe(calib=CalibMethod.mse, per_channel=False))
    adv = opts["advanced_parameters"]
    assert adv.activations_range_estimator_params == RangeEstimatorParametersSet.HISTOGRAM
    assert adv.weights_quantization_params.per_channel is False
    for method in (CalibMethod.minmax, CalibMethod.percentile, CalibMethod.entropy):
        params = ob.nncf_options(ov_recipe(calib=method))["advanced_parameters"]
        assert params.activations_range_estimator_params == RangeEstimatorParametersSet.MINMAX
    for cpu, (fix, _) in CPU_PATHS.items():
        monkeypatch.setenv("INT8EVAL_CPU", cpu)
        assert ob.nncf_options(ov_recipe())["advanced_parameters"].overflow_fix is OverflowFix(fix)
        # a transformer (a ViT) takes the same CPU path
        assert ob.nncf_options(ov_recipe(), transformer=True)["advanced_parameters"].overflow_fix is OverflowFix(fix)


def test_int8_without_calibration_images_is_rejected(tiny, tmp_path):
    with pytest.raises(ConfigError, match="calibration images"):
        ob.build(tiny, ov_recipe(), None, tmp_path)
    with pytest.raises(ConfigError, match="calibration images"):
        ob.build(tiny, ov_recipe(), CalibrationData([]), tmp_path)


# --- recipe checks -------------------------------------------------------------------------------------------------


@pytest.fixture
def cpu_without_bf16(monkeypatch):
    monkeypatch.setattr(ob, "plugin_capabilities", lambda: ("Test CPU", frozenset({"FP32", "INT8"})))


@pytest.mark.parametrize("precision", [Precision.bf16, Precision.fp16])
def test_reduced_float_precision_needs_the_cpu_capability(precision, cpu_without_bf16, tiny, tmp_path):
    recipe = ov_recipe(precision=precision)
    with pytest.raises(ConfigError, match=f"no {precision.value.upper()} inference on this CPU \\(Test CPU"):
        ob.check_recipe(recipe)
    with pytest.raises(ConfigError):
        ob.build(tiny, recipe, None, tmp_path)  # before any conversion work


def test_legacy_is_rejected_through_the_registry():
    with pytest.raises(ConfigError, match="legacy.*only applies to backend torch"):
        registry_check_recipe(ov_recipe(legacy=True))


def test_supported_recipes_pass_the_check():
    for method in CalibMethod:
        ob.check_recipe(ov_recipe(calib=method))
        ob.check_recipe(ov_recipe(calib=method, per_channel=False))
    ob.check_recipe(ov_recipe(precision=Precision.fp32))


def test_bf16_runs_where_the_cpu_has_it(tiny, images, tmp_path):
    if "BF16" not in ob.plugin_capabilities()[1]:
        pytest.skip(f"OpenVINO reports no BF16 on {ob.plugin_capabilities()[0]}")
    variant = ob.build(tiny, ov_recipe(precision=Precision.bf16), None, tmp_path)
    assert variant.compiled.get_property("INFERENCE_PRECISION_HINT") == ov.Type.bf16
    out = variant.predict(images)
    assert out.dtype == np.float32
    assert np.corrcoef(out.ravel(), torch_logits(tiny, images).ravel())[0, 1] > 0.99


# --- real models (slow) -------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_lite0_fp32_parity_and_int8_agreement(shared_sample, tmp_path):
    loaded = load_model("efficientnet_lite0")
    x = decode_sample(shared_sample, loaded, 64)
    calib, evals = CalibrationData([x[:16]]), x[16:]  # small, to stay well under a minute
    ref = torch_logits(loaded, evals)
    fp32 = build_variant(loaded, ov_recipe(precision=Precision.fp32), None, tmp_path)
    out = fp32.predict(evals)
    # FP32 in another summation order: within 1e-3 every image whose top-2 margin exceeds 2e-3 keeps its top-1; top-1
    # itself is not compared, as a near-tie may flip on another CPU's kernels.
    assert np.abs(out - ref).max() < 1e-3
    int8 = build_variant(loaded, ov_recipe(calib=CalibMethod.minmax), calib, tmp_path)
    agreement = np.mean(int8.predict(evals).argmax(1) == ref.argmax(1))
    assert agreement >= 0.9, agreement  # 97.5% measured on 400 images with 100 calibration images
    assert int8.size_mb < 6.0  # 18.7 MB in FP32


@pytest.mark.slow
def test_resnet50_converts_quantizes_and_runs(resnet50_random, tmp_path):
    loaded, calib = resnet50_random
    variant = build_variant(loaded, ov_recipe(calib=CalibMethod.minmax), calib, tmp_path)
    model = read(variant)
    convs = [op for op in model.get_ordered_ops() if op.get_type_name() in ("Convolution", "MatMul")]
    assert len(convs) == 54  # 53 convolutions + the classifier
    # every weight is int8 (the first convolution's FP32 where INT8 saturates)
    assert len(weight_scale_sizes(model)) == 54 - len(variant.details["first_layer_fp32"] or [])
    assert variant.size_mb < 30  # ~102 MB in FP32
    assert variant.predict(calib.batches[0][:1]).shape == (1, 1000)
