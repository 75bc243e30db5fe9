"""OpenVINO + NNCF backend: FP32 parity with PyTorch, a really-FP32 artifact, INT8 for each calibration method,
per-tensor weights, the histogram range narrowing, and recipe checks. Fast tests use `tiny_test` and random data."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import decode_sample, torch_logits

pytest.importorskip("openvino")
pytest.importorskip("nncf")

import openvino as ov  # noqa: E402

from int8eval.backends import CalibrationData, build_variant  # noqa: E402
from int8eval.backends import check_recipe as registry_check_recipe  # noqa: E402
from int8eval.backends import openvino_backend as ob  # noqa: E402
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
    return {fq.get_friendly_name(): float(ob._limit(fq, 2).max()) for fq in ob._activation_quantizers(model)}


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


def test_conversion_is_reused_until_the_weights_change(images):
    loaded = load_model("tiny_test")
    first, second = ob.convert(loaded), ob.convert(loaded)
    assert first is not second  # callers get their own copy
    assert ob._CONVERTED[loaded.module][1] is not first
    key = ob._CONVERTED[loaded.module][0]
    with torch.no_grad():
        loaded.module.fc.bias.add_(1.0)  # in place: the cached conversion is stale now
    out = ov.Core().compile_model(ob.convert(loaded), "CPU")(images)[0]
    assert ob._CONVERTED[loaded.module][0] != key
    np.testing.assert_allclose(out, torch_logits(loaded, images), atol=1e-4, rtol=0)


def test_variant_reports_how_it_was_built(fp32, int8_variants):
    assert fp32.prepare_s > 0 and {"convert_s", "save_s", "compile_s"} <= fp32.details.keys()
    details = int8_variants[CalibMethod.minmax].details
    assert details["quantize_s"] > 0
    assert details["nncf"]["calibration_images"] == 16
    # int8eval's bias correction on every quantized layer of the tiny model (two convolutions, a depthwise, fc;
    # the first convolution is FP32 on CPUs whose INT8 kernels saturate)
    kept = details["first_layer_fp32"] or []
    assert kept == ([] if not ob.x86_without_vnni() else ["__module.features.0/aten::_convolution/Convolution"])
    assert details["bias_correction"] == "int8eval" and details["bias_corrected_layers"] == 4 - len(kept)


@pytest.mark.parametrize("saturates", [True, False])
def test_first_convolution_stays_fp32_only_where_int8_saturates(saturates, tiny, calib, tmp_path, monkeypatch):
    monkeypatch.setattr(ob, "x86_without_vnni", lambda: saturates)
    first = "__module.features.0/aten::_convolution/Convolution"
    assert ob.first_layer_fp32(ob.convert(tiny)) == ([first] if saturates else [])
    variant = ob.build(tiny, ov_recipe(), calib, tmp_path)
    ops = {op.get_friendly_name(): op for op in ov.Core().read_model(str(variant.artifact)).get_ordered_ops()}
    weight = ops[first].input_value(1).get_node()
    assert (weight.get_type_name() == "Constant") is saturates  # FP32 weights, not INT8 behind a Multiply
    depthwise = ops["__module.features.3/aten::_convolution/GroupConvolution"]
    assert depthwise.input_value(1).get_node().get_type_name() == "Multiply"


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
    first = 1 if ob.x86_without_vnni() else 0  # the first convolution is FP32 where INT8 saturates
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
    monkeypatch.setattr(ob, "x86_without_vnni", lambda: False)  # the first convolution's input quantized, as on VNNI
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
    monkeypatch.setattr(ob, "x86_without_vnni", lambda: True)
    assert ob.nncf_options(ov_recipe())["advanced_parameters"].overflow_fix is OverflowFix.ENABLE
    monkeypatch.setattr(ob, "x86_without_vnni", lambda: False)
    assert ob.nncf_options(ov_recipe())["advanced_parameters"].overflow_fix is OverflowFix.FIRST_LAYER


def test_int8_without_calibration_images_is_rejected(tiny, tmp_path):
    with pytest.raises(ConfigError, match="calibration images"):
        ob.build(tiny, ov_recipe(), None, tmp_path)
    with pytest.raises(ConfigError, match="calibration images"):
        ob.build(tiny, ov_recipe(), CalibrationData([]), tmp_path)


# --- recipe checks -------------------------------------------------------------------------------------------------


@pytest.fixture
def cpu_without_bf16(monkeypatch):
    monkeypatch.setattr(ob, "cpu_capabilities", lambda: ("Test CPU", frozenset({"FP32", "INT8"})))


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
    if "BF16" not in ob.cpu_capabilities()[1]:
        pytest.skip(f"OpenVINO reports no BF16 on {ob.cpu_capabilities()[0]}")
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
    assert np.abs(out - ref).max() < 1e-3 and (out.argmax(1) == ref.argmax(1)).all()  # the parity gate
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
    assert len(weight_scale_sizes(model)) == 54 - (1 if ob.x86_without_vnni() else 0)
    assert variant.size_mb < 30  # ~102 MB in FP32
    assert variant.predict(calib.batches[0][:1]).shape == (1, 1000)
