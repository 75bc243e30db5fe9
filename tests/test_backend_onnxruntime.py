"""ONNX Runtime backend: export parity, QDQ graph structure, calibration methods, recipe checks."""

from __future__ import annotations

import types

import numpy as np
import pytest
from conftest import decode_sample, require_package, torch_logits

require_package("onnx", "onnxruntime", extra="onnxruntime")

import onnx  # noqa: E402
from onnx import numpy_helper  # noqa: E402

from int8eval.backends import BuildContext, CalibrationData, build_variant, check_recipe  # noqa: E402
from int8eval.backends import onnx_calibration, onnx_qdq, ranges  # noqa: E402
from int8eval.backends.onnx_calibration import TensorStats, activation_ranges, collect_activation_stats  # noqa: E402
from int8eval.backends.onnx_export import count_qdq, export_onnx, quantized_inputs  # noqa: E402
from int8eval.backends.onnx_qdq import quantize_qdq  # noqa: E402
from int8eval.config import Backend, CalibMethod, Precision, Recipe  # noqa: E402
from int8eval.errors import ConfigError  # noqa: E402
from int8eval.models import load_model  # noqa: E402


def ort_recipe(**kw) -> Recipe:
    return Recipe(backend=Backend.onnxruntime, **kw)


@pytest.fixture(scope="module")
def fp32_onnx(tiny, tmp_path_factory):
    return export_onnx(tiny.module, tiny.example_input(1), tmp_path_factory.mktemp("export") / "tiny.onnx")


@pytest.fixture(scope="module")
def outlier_stats(fp32_onnx, outlier_calib):
    return collect_activation_stats(fp32_onnx, outlier_calib)


def initializer(model: onnx.ModelProto, name: str) -> np.ndarray:
    return next(numpy_helper.to_array(i) for i in model.graph.initializer if i.name == name)


def dq_scale_of(model: onnx.ModelProto, tensor: str) -> np.ndarray:
    """The scale of the DequantizeLinear that follows the QuantizeLinear of `tensor`."""
    q = next(n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == tensor)
    return initializer(model, q.input[1])


# --- export -----------------------------------------------------------------------------------------------------


def test_export_matches_torch_at_any_batch(tiny, fp32_onnx, images):
    import onnxruntime as ort

    session = ort.InferenceSession(str(fp32_onnx), providers=["CPUExecutionProvider"])
    for x in (images[:1], images):  # exported with batch 1, the batch axis is dynamic
        out = session.run(["logits"], {"input": x})[0]
        np.testing.assert_allclose(out, torch_logits(tiny, x), atol=1e-4, rtol=0)
    model = onnx.load(str(fp32_onnx))
    assert [i.name for i in model.graph.input] == ["input"] and [o.name for o in model.graph.output] == ["logits"]
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert count_qdq(model) == {"QuantizeLinear": 0, "DequantizeLinear": 0}
    assert {q.kind for q in quantized_inputs(model)} == {"float"}


def test_fp32_variant_predicts_torch_logits(tiny, images, tmp_path):
    variant = build_variant(tiny, ort_recipe(precision=Precision.fp32), None, tmp_path)
    out = variant.predict(images)
    assert out.dtype == np.float32 and out.shape == (5, 1000)
    np.testing.assert_allclose(out, torch_logits(tiny, images), atol=1e-4, rtol=0)
    assert variant.artifact.suffix == ".onnx" and variant.size_mb > 0 and variant.prepare_s > 0


def test_fp16_variant_is_close_to_fp32(tiny, images, tmp_path):
    variant = build_variant(tiny, ort_recipe(precision=Precision.fp16), None, tmp_path)
    out = variant.predict(images)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, torch_logits(tiny, images), atol=2e-2, rtol=0)


# --- INT8 structure -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("per_channel", [True, False])
def test_int8_qdq_structure(tiny, calib, images, tmp_path, per_channel):
    variant = build_variant(tiny, ort_recipe(per_channel=per_channel), calib, tmp_path)
    model = onnx.load(str(variant.artifact))
    counts = count_qdq(model)
    assert counts["QuantizeLinear"] > 0 and counts["DequantizeLinear"] > counts["QuantizeLinear"]
    inputs = quantized_inputs(model)
    nodes = {q.node for q in inputs}
    assert len(nodes) == 4  # three Conv and the classifier's Gemm
    weights = {n.name: n for n in model.graph.node}
    for q in inputs:
        if q.index == 0:  # activations: a Q/DQ pair of the type chosen for the CPU (test_activations_follow_the_cpu)
            assert q.kind == "qdq" and q.dtype == variant.details["activation_type"] and q.scale_shape == ()
        elif q.index == 1:  # weights: int8 constants behind a DequantizeLinear
            assert q.kind == "dq" and q.dtype == "int8"
            out_channels = _weight_out_channels(model, weights[q.node])
            assert q.scale_shape == ((out_channels,) if per_channel else ())
        else:  # bias: int32
            assert q.kind == "dq" and q.dtype == "int32"
    out = variant.predict(images)
    assert out.shape == (5, 1000) and np.isfinite(out).all()


# INT8EVAL_CPU -> (activation type of the QDQ model, exact-kernel session option), written out by hand
CPU_PATHS = {"avx2": ("uint8", True), "vnni": ("uint8", False), "amx": ("uint8", False), "arm": ("int8", False)}


def _activation_zero_point_types(path) -> set[str]:
    model = onnx.load(str(path))
    return {str(initializer(model, n.input[2]).dtype) for n in model.graph.node if n.op_type == "QuantizeLinear"}


def _exact_kernels(variant) -> bool:
    try:
        return variant.session.get_session_options().get_session_config_entry("session.x64quantprecision") == "1"
    except RuntimeError:  # not set
        return False


@pytest.mark.parametrize("cpu", CPU_PATHS)
def test_activations_follow_the_cpu(cpu, tiny, calib, tmp_path, monkeypatch):
    # U8S8 on x86 (with VNNI/AMX ~2x S8S8's speed; exact U8U8 kernels where the int16 sums saturate), S8S8 on Arm.
    monkeypatch.setenv("INT8EVAL_CPU", cpu)
    activation_type, exact = CPU_PATHS[cpu]
    variant = build_variant(tiny, ort_recipe(), calib, tmp_path)
    assert variant.name == "onnxruntime-int8-minmax"  # the default recipe's name does not depend on the CPU
    assert _activation_zero_point_types(variant.artifact) == {activation_type}
    assert _exact_kernels(variant) is exact and variant.details["exact_int8_kernels"] is exact
    assert variant.details["activation_type"] == activation_type
    assert f"INT8EVAL_CPU={cpu}" in variant.details["why"]  # the reason names the CPU path


@pytest.mark.parametrize("cpu", ["avx2", "vnni"])
def test_the_pass_session_does_not_spin_and_the_bench_times_it_as_deployed(cpu, tiny, calib, tmp_path, monkeypatch):
    """Between its calls the evaluation pass runs other runtimes, so the variant's own session stops its idle
    threads spinning; the bench's static session is ORT's default (spinning), with the same exact-kernel choice."""
    from int8eval.bench.deploy import _onnxruntime_static

    monkeypatch.setenv("INT8EVAL_CPU", cpu)
    variant = build_variant(tiny, ort_recipe(), calib, tmp_path)
    entry = variant.session.get_session_options().get_session_config_entry
    assert entry("session.intra_op.allow_spinning") == "0"
    static = _onnxruntime_static(variant, np.zeros((2, 3, 32, 32), np.float32)).form
    options = static.get_session_options()
    with pytest.raises(RuntimeError):  # not set: ORT's default, spinning
        options.get_session_config_entry("session.intra_op.allow_spinning")
    assert _exact_kernels(variant) is _exact_kernels(types.SimpleNamespace(session=static)) is (cpu == "avx2")


@pytest.mark.parametrize(("cpu", "asked"), [("vnni", "int8"), ("arm", "uint8"), ("avx2", "int8")])
def test_the_activation_type_asked_for_wins(cpu, asked, tiny, calib, tmp_path, monkeypatch):
    monkeypatch.setenv("INT8EVAL_CPU", cpu)
    variant = build_variant(tiny, ort_recipe(activation_type=asked), calib, tmp_path)
    assert variant.name == "onnxruntime-int8-minmax-" + {"uint8": "u8s8", "int8": "s8s8"}[asked]
    assert _activation_zero_point_types(variant.artifact) == {asked}
    assert variant.details["activation_type"] == asked and "asked for" in variant.details["why"]
    assert _exact_kernels(variant) is CPU_PATHS[cpu][1]  # saturating CPUs keep exact kernels whatever is asked


def test_integer_kernels_compute_what_the_qdq_model_says(tiny, calib, images, tmp_path):
    """On this machine's own path (no override): ONNX Runtime's fused integer kernels against the same QDQ model run
    op by op in float (graph optimisations off: QuantizeLinear, DequantizeLinear, float Conv). Measured on an AVX2
    EPYC: identical with the exact kernels, 0.14 off (12% of the largest logit) with INT8EVAL_CPU=vnni, where
    U8S8 int16 pair sums saturate."""
    import onnxruntime as ort

    variant = build_variant(tiny, ort_recipe(calib=CalibMethod.percentile), calib, tmp_path)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    reference = ort.InferenceSession(str(variant.artifact), opts, providers=["CPUExecutionProvider"])
    expected = reference.run(None, {"input": images})[0]
    # Float accumulation may round a requantized value to the neighbouring step where the exact integer sum sits on
    # a rounding boundary; a few steps of the logits' range (1/255 each) bound what such flips add up to.
    tolerance = 4 * float(expected.max() - expected.min()) / 255
    assert np.abs(variant.predict(images) - expected).max() <= tolerance


def test_keep_fp32_layers_have_no_qdq(tiny, calib, images, tmp_path):
    variant = build_variant(tiny, ort_recipe(keep_fp32=("features.3", "fc")), calib, tmp_path)
    inputs = quantized_inputs(onnx.load(str(variant.artifact)))
    expected = {"/features/features.0/Conv": "dq", "/features/features.3/Conv": "float",
                "/features/features.6/Conv": "dq", "/fc/Gemm": "float"}
    assert {q.node: q.kind for q in inputs if q.index == 1} == expected  # weights
    # ...and activations: a kept layer reads the float tensor, not the Q/DQ its neighbours share.
    activations = {node: "qdq" if kind == "dq" else kind for node, kind in expected.items()}
    assert {q.node: q.kind for q in inputs if q.index == 0} == activations
    # The float inputs keep what the pair did besides rounding (ORT drops a ReLU after a quantized Conv and lets
    # the QuantizeLinear clamp): kept layers bring the model closer to FP32, never further.
    fp32 = torch_logits(tiny, images)
    whole = build_variant(tiny, ort_recipe(), calib, tmp_path / "all")
    error = {v.recipe.name: np.abs(v.predict(images) - fp32).max() for v in (variant, whole)}
    assert error[variant.recipe.name] < error[whole.recipe.name], error


def _weight_out_channels(model: onnx.ModelProto, node: onnx.NodeProto) -> int:
    dq = next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.output[0] == node.input[1])
    return initializer(model, dq.input[0]).shape[0]


@pytest.mark.parametrize("method", list(CalibMethod))
def test_every_calibration_method_builds_and_predicts(tiny, varied_calib, images, tmp_path, method):
    variant = build_variant(tiny, ort_recipe(calib=method), varied_calib, tmp_path)
    out = variant.predict(images)
    assert out.shape == (5, 1000) and np.isfinite(out).all()
    # A random 1000-class head on random images is a poor accuracy check, but INT8 should stay near FP32.
    ref = torch_logits(tiny, images)
    assert np.abs(out - ref).max() < 0.1 * np.abs(ref).max()


@pytest.fixture
def counted(monkeypatch):
    """Calls of the FP32 export and of the calibration pass, by name."""
    calls = []
    for name in ("export_onnx", "collect_activation_stats"):
        real = getattr(onnx_qdq, name)
        monkeypatch.setattr(onnx_qdq, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    return calls


def test_recipes_of_one_context_share_one_export_and_one_calibration_pass(tiny, calib, tmp_path, counted):
    context = BuildContext(workdir=tmp_path)
    fp32 = build_variant(tiny, ort_recipe(precision=Precision.fp32), None, tmp_path, context)
    first = build_variant(tiny, ort_recipe(calib=CalibMethod.minmax), calib, tmp_path, context)
    second = build_variant(tiny, ort_recipe(calib=CalibMethod.entropy), calib, tmp_path, context)
    assert counted == ["export_onnx", "collect_activation_stats"]
    assert context.onnx.module is tiny.module and fp32.artifact == context.onnx.fp32
    assert second.prepare_s >= context.onnx.export_s  # full cost still reported
    assert first.artifact != second.artifact


def test_two_contexts_share_nothing(tiny, calib, tmp_path, counted):
    one, two = BuildContext(workdir=tmp_path / "one"), BuildContext(workdir=tmp_path / "two")
    build_variant(tiny, ort_recipe(calib=CalibMethod.minmax), calib, tmp_path / "one", one)
    build_variant(tiny, ort_recipe(calib=CalibMethod.minmax), calib, tmp_path / "two", two)
    build_variant(tiny, ort_recipe(calib=CalibMethod.minmax), calib, tmp_path / "three")  # no context: a fresh one
    assert counted == ["export_onnx", "collect_activation_stats"] * 3
    assert one.onnx is not two.onnx and one.onnx.fp32.parent == tmp_path / "one"


def test_a_context_exports_again_for_another_module(tiny, calib, tmp_path, counted):
    context = BuildContext(workdir=tmp_path)
    build_variant(tiny, ort_recipe(precision=Precision.fp32), None, tmp_path, context)
    other = load_model("tiny_test")
    build_variant(other, ort_recipe(precision=Precision.fp32), None, tmp_path / "other", context)
    assert counted == ["export_onnx", "export_onnx"] and context.onnx.module is other.module


@pytest.mark.parametrize("method", list(CalibMethod))
def test_int8_details_name_the_code_that_set_the_ranges(tiny, calib, tmp_path, method):
    variant = build_variant(tiny, ort_recipe(calib=method), calib, tmp_path)
    phrase = variant.details["calibration"]
    assert phrase.startswith("int8eval") and (method.value in phrase or method is CalibMethod.minmax)
    assert ("2048 bins of |x|" in phrase) is (method is not CalibMethod.minmax)


# --- calibration methods ------------------------------------------------------------------------------------------


def test_minmax_ranges_equal_onnxruntime_calibrator(fp32_onnx, calib, tmp_path):
    from onnxruntime.quantization import CalibrationMethod, create_calibrator

    stats = collect_activation_stats(fp32_onnx, calib, workdir=tmp_path)
    ours = activation_ranges(stats, CalibMethod.minmax)
    calibrator = create_calibrator(
        stats.model, augmented_model_path=str(tmp_path / "aug.onnx"), calibrate_method=CalibrationMethod.MinMax
    )
    calibrator.collect_data(onnx_calibration.CalibrationReader(calib))
    theirs = calibrator.compute_data()
    # Aliased tensors (a Conv output before its ReLU) take the activation's range, as ORT's quantizer does later.
    common = (set(ours) - set(stats.aliases)) & set(theirs.keys())
    assert len(common) >= 6
    for name in common:
        lo, hi = (np.asarray(v).item() for v in theirs[name].range_value)
        assert ours[name] == pytest.approx((lo, hi), rel=1e-6, abs=1e-6), name


def test_entropy_and_percentile_clip_outliers_that_minmax_keeps(outlier_stats):
    # One pixel in 3072 is an outlier (0.03%): the 99.9th percentile of |x| lies among the Gaussian values.
    ranges = {m: activation_ranges(outlier_stats, m, percentile=99.9)["input"] for m in CalibMethod}
    assert ranges[CalibMethod.minmax][1] == pytest.approx(60.0)
    for method in (CalibMethod.percentile, CalibMethod.entropy):
        lo, hi = ranges[method]
        assert 2.0 < hi < 20.0 and -20.0 < lo < -2.0, (method, lo, hi)
    # Squared error weighs 16 values 56 off more than rounding everything else coarsely: mse keeps them (almost).
    assert 40.0 < ranges[CalibMethod.mse][1] <= 60.0
    assert len({ranges[m] for m in CalibMethod}) == 4  # four different answers


def test_the_chosen_range_reaches_the_qdq_graph(fp32_onnx, outlier_stats, tmp_path):
    scales = {}
    for method in (CalibMethod.minmax, CalibMethod.entropy):
        path = quantize_qdq(fp32_onnx, outlier_stats, tmp_path / f"{method.value}.onnx", method=method)
        scales[method] = float(dq_scale_of(onnx.load(str(path)), "input"))
    # ORT's own "Entropy" through quantize_static gives minmax's scale; ours must not.
    assert scales[CalibMethod.minmax] == pytest.approx((60.0 - outlier_stats.tensors["input"].min) / 255, rel=1e-3)
    assert scales[CalibMethod.entropy] < scales[CalibMethod.minmax] / 3


def test_symmetric_activations_and_weight_qdq_pairs_for_tensorrt(fp32_onnx, calib, tmp_path):
    path = quantize_qdq(
        fp32_onnx, calib, tmp_path / "trt.onnx", method=CalibMethod.percentile, symmetric_activations=True,
        weight_qdq_pair=True,
    )
    model = onnx.load(str(path))
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear":
            zero_point = initializer(model, node.input[2])
            assert zero_point.dtype == np.int8 and not zero_point.any(), node.name
    for q in quantized_inputs(model):
        assert q.kind == ("qdq" if q.index < 2 else "dq"), q


def test_stats_from_another_model_are_refused(fp32_onnx, outlier_stats, tmp_path):
    with pytest.raises(ValueError, match="collected from"):
        quantize_qdq(tmp_path / "other.onnx", outlier_stats, tmp_path / "x.onnx")


def _stats_of(values: np.ndarray, chunks: int = 1) -> TensorStats:
    s = TensorStats(np.inf, -np.inf, np.zeros(onnx_calibration.HIST_BINS, dtype=np.int64), 0.0)
    for part in np.array_split(values, chunks):
        s.add(part.copy())
    return s


def test_histogram_grows_without_losing_counts():
    values = np.random.default_rng(3).standard_normal(200_000).astype(np.float32)
    values[-10:] *= 8  # the last chunk widens the range 8x
    one, many = _stats_of(values), _stats_of(values, chunks=5)
    assert many.count == one.count == values.size
    assert (many.min, many.max) == (one.min, one.max) == (float(values.min()), float(values.max()))
    assert many.hist_max >= np.abs(values).max()
    t_one = ranges.percentile_threshold(one.hist, one.hist_max, 99.9)
    t_many = ranges.percentile_threshold(many.hist, many.hist_max, 99.9)
    assert t_one == pytest.approx(3.29, abs=0.05) and t_many == pytest.approx(t_one, abs=0.05)


def test_gaussian_thresholds_are_plausible():
    s = _stats_of(np.random.default_rng(4).standard_normal(1_000_000).astype(np.float32))
    # A Gaussian's optimal 8-bit clip is about 3-5 sigma, inside its ~4.9 sigma maximum.
    assert 2.5 < ranges.entropy_threshold(s.hist, s.hist_max, 127) < s.max
    assert 2.5 < ranges.mse_threshold(s.hist, s.hist_max, 127, s.zeros) < s.max


def test_all_zero_activation_gets_a_zero_range():
    s = _stats_of(np.zeros(1000, dtype=np.float32))
    stats = onnx_calibration.ActivationStats(None, None, {"z": s}, {}, 1, 0.0)
    for method in CalibMethod:
        assert activation_ranges(stats, method)["z"] == (0.0, 0.0)
    tiny_values = _stats_of(np.full(1000, 1e-35, dtype=np.float32))  # bins / max would overflow float32
    assert tiny_values.count == 1000 and tiny_values.max == pytest.approx(1e-35)


# --- recipe checks ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("recipe", "words"),
    [
        (ort_recipe(legacy=True), "legacy"),
        (ort_recipe(precision=Precision.bf16), "bfloat16"),
    ],
)
def test_impossible_recipes_are_rejected_before_work(recipe, words):
    with pytest.raises(ConfigError, match=words):
        check_recipe(recipe)


def test_possible_recipes_pass():
    for recipe in [
        ort_recipe(precision=Precision.fp32),
        ort_recipe(precision=Precision.fp16),
        *(ort_recipe(calib=m, per_channel=pc) for m in CalibMethod for pc in (True, False)),
    ]:
        check_recipe(recipe)


@pytest.mark.parametrize(
    "options",
    [{"backend": "torch"}, {"backend": "openvino"}, {"backend": "tensorrt"}, {"backend": "onnxruntime", "precision": "fp32"}],
)
def test_activation_type_is_for_onnxruntime_int8_only(options):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="activation_type applies to onnxruntime int8"):
        Recipe(**options, activation_type="int8")


def test_the_cli_sets_the_activation_type_on_onnxruntime_recipes_only():
    from int8eval.session import expand_recipes

    recipes = expand_recipes(("onnxruntime", "openvino"), precisions=("fp16",), activation_type="int8")
    assert [r.name for r in recipes] == [
        "onnxruntime-int8-percentile99.999-s8s8", "onnxruntime-fp16", "openvino-int8-percentile99.999", "openvino-fp16"
    ]
    with pytest.raises(ConfigError, match="--backend onnxruntime"):
        expand_recipes(("openvino",), activation_type="uint8")


def test_int8_without_calibration_images_is_a_config_error(tiny, tmp_path):
    with pytest.raises(ConfigError, match="calibration"):
        build_variant(tiny, ort_recipe(), None, tmp_path)
    with pytest.raises(ConfigError, match="calibration"):
        build_variant(tiny, ort_recipe(), CalibrationData([]), tmp_path)


# --- real models (slow) -------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_resnet50_quantizes_every_conv_and_gemm(resnet50_random, tmp_path):
    loaded, calib = resnet50_random
    variant = build_variant(loaded, ort_recipe(calib=CalibMethod.percentile), calib, tmp_path)
    inputs = quantized_inputs(variant.artifact)
    assert len({q.node for q in inputs}) == 54  # 53 Conv + 1 Gemm
    assert all(q.kind == "qdq" for q in inputs if q.index == 0)
    assert all(q.kind == "dq" and len(q.scale_shape) == 1 for q in inputs if q.index == 1)
    assert variant.size_mb < 30  # ~102 MB in FP32
    assert variant.predict(calib.batches[0]).shape == (2, 1000)


@pytest.mark.slow
def test_lite0_fp32_parity_and_int8_agreement(shared_sample, tmp_path):
    loaded = load_model("efficientnet_lite0")
    x = decode_sample(shared_sample, loaded, 80)
    calib, evals = CalibrationData([x[:16]]), x[16:]
    ref = torch_logits(loaded, evals)
    fp32 = build_variant(loaded, ort_recipe(precision=Precision.fp32), None, tmp_path)
    out = fp32.predict(evals)
    # FP32 in another summation order: within 1e-3 every image whose top-2 margin exceeds 2e-3 keeps its top-1; top-1
    # itself is not compared, as a near-tie may flip on another CPU's kernels.
    assert np.abs(out - ref).max() < 1e-3
    int8 = build_variant(loaded, ort_recipe(calib=CalibMethod.percentile), calib, tmp_path)
    agreement = np.mean(int8.predict(evals).argmax(1) == ref.argmax(1))
    assert agreement >= 0.9, agreement  # ~98% measured on 400 images
