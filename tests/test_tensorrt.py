"""TensorRT: the Q/DQ ONNX it is fed (checked on the CPU, run by ONNX Runtime), and engines where TensorRT and a
GPU exist (skipped elsewhere)."""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest
import torch

from int8eval.config import Backend, CalibMethod, Precision, Recipe
from int8eval.errors import BackendUnavailable, ConfigError
from conftest import require_package

require_package("onnx", "onnxruntime", extra="onnxruntime")

from int8eval import backends  # noqa: E402
from int8eval.backends import tensorrt_backend as trt_backend  # noqa: E402
from int8eval.backends import tensorrt_on_cpu  # noqa: E402
from int8eval.backends.onnx_export import export_onnx, quantized_inputs  # noqa: E402

HAS_TRT = importlib.util.find_spec("tensorrt") is not None


def _recipe(**kw) -> Recipe:
    return Recipe(backend=Backend.tensorrt, **kw)


@pytest.fixture(scope="module")
def qdq(tiny, calib, tmp_path_factory):
    work = tmp_path_factory.mktemp("trt")
    fp32 = export_onnx(tiny.module, tiny.example_input(1), work / "tiny.fp32.onnx")
    return fp32, trt_backend.build_trt_qdq_onnx(fp32, calib, work / "tiny.qdq.onnx", method=CalibMethod.entropy)


def test_importing_the_backend_does_not_import_tensorrt(monkeypatch):
    """Whether TensorRT is installed or not: with `import tensorrt` made to fail, a fresh import of the backend
    modules (and listing or checking a CPU-emulated recipe through the registry) still works."""
    import importlib

    import int8eval.backends

    monkeypatch.setattr(int8eval.backends, "tensorrt_backend", trt_backend)  # restored after the fresh import
    monkeypatch.setattr(int8eval.backends, "tensorrt_on_cpu", tensorrt_on_cpu)
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # None in sys.modules: any `import tensorrt` raises
    monkeypatch.delitem(sys.modules, "int8eval.backends.tensorrt_backend")
    monkeypatch.delitem(sys.modules, "int8eval.backends.tensorrt_on_cpu")
    fresh = importlib.import_module("int8eval.backends.tensorrt_on_cpu")
    assert fresh is not tensorrt_on_cpu
    fresh.check_recipe(_recipe(emulate=True))
    backends.check_recipe(_recipe(emulate=True))


@pytest.mark.parametrize(
    "kw, word",
    [
        ({"precision": Precision.bf16}, "bf16"),
        ({"precision": Precision.fp16, "legacy": True}, "legacy"),
        ({"calib": CalibMethod.percentile, "legacy": True}, "entropy"),
        ({"per_channel": False}, "per-channel"),
        ({"calib": CalibMethod.entropy, "legacy": True, "keep_fp32": ("fc",)}, "keep_fp32"),
    ],
)
def test_impossible_recipes_fail_before_any_work(kw, word):
    with pytest.raises(ConfigError, match=word):
        trt_backend.check_recipe(_recipe(**kw))


@pytest.mark.skipif(HAS_TRT and torch.cuda.is_available(), reason="TensorRT and a GPU are here")
def test_without_tensorrt_or_a_gpu_the_backend_says_what_is_missing():
    with pytest.raises(BackendUnavailable, match="tensorrt|GPU"):
        trt_backend.check_recipe(_recipe())


def test_every_conv_and_gemm_input_has_a_signed_symmetric_qdq_pair(qdq):
    import onnx
    from onnx import numpy_helper

    _, path = qdq
    model = onnx.load(str(path))
    assert trt_backend.qdq_problems(model) == []
    inputs = quantized_inputs(model, ("Conv", "Gemm"))
    ops = {q.node for q in inputs}
    assert len(ops) == 4  # three convolutions and the classifier
    weight_shapes = {i.name: tuple(i.dims) for i in model.graph.initializer}
    for q in inputs:
        if q.index == 0:
            assert q.kind == "qdq" and q.dtype == "int8", q
        elif q.index == 1:
            assert q.kind in ("dq", "qdq") and q.dtype == "int8", q
            assert q.scale_shape is not None and len(q.scale_shape) == 1 and q.scale_shape[0] > 1, q  # per channel
        else:
            assert q.kind == "float", q  # TensorRT takes float biases
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear":
            zp = next(i for i in model.graph.initializer if i.name == node.input[2])
            assert zp.data_type == onnx.TensorProto.INT8 and not numpy_helper.to_array(zp).any()
    assert weight_shapes  # sanity: the weights are stored in the graph


def test_the_checker_flags_what_tensorrt_would_not_take(qdq, calib, tmp_path):
    from int8eval.backends.onnx_qdq import quantize_qdq

    fp32, _ = qdq
    cpu_style = quantize_qdq(fp32, calib, tmp_path / "u8.onnx", activation_type="uint8")
    problems = trt_backend.qdq_problems(cpu_style)
    assert any("uint8" in p for p in problems) and any("bias" in p for p in problems)
    per_tensor = quantize_qdq(fp32, calib, tmp_path / "pt.onnx", per_channel=False, symmetric_activations=True)
    assert any("per channel" in p for p in trt_backend.qdq_problems(per_tensor))


def test_the_tensorrt_qdq_onnx_runs_on_the_cpu_with_onnx_runtime(tiny, calib, tmp_path):
    variant = tensorrt_on_cpu.build(tiny, _recipe(calib=CalibMethod.entropy), calib, tmp_path)
    assert variant.name == "tensorrt-int8-entropy@onnxruntime"
    assert variant.artifact.name.endswith(".qdq.onnx") and variant.size_mb > 0
    assert variant.details["calibration"].startswith("int8eval ranges.entropy_threshold")
    x = calib.batches[0]
    with torch.no_grad():
        ref = tiny.module(torch.from_numpy(x)).numpy()
    out = variant.predict(x)
    assert out.shape == ref.shape
    cos = (out * ref).sum(1) / np.linalg.norm(out, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() > 0.99


def test_kept_layers_are_the_only_ones_tensorrt_would_run_in_float(tiny, calib, tmp_path):
    recipe = _recipe(calib=CalibMethod.entropy, keep_fp32=("features.3",))
    variant = tensorrt_on_cpu.build(tiny, recipe, calib, tmp_path)
    assert variant.name == "tensorrt-int8-entropy-keep1@onnxruntime"
    problems = trt_backend.qdq_problems(variant.artifact)
    assert problems and all("/features/features.3/Conv" in p for p in problems), problems


def test_the_fp16_onnx_for_tensorrt_runs_on_the_cpu(tiny, tmp_path):
    variant = tensorrt_on_cpu.build(tiny, _recipe(precision=Precision.fp16), None, tmp_path)
    assert variant.name == "tensorrt-fp16@onnxruntime"
    x = np.random.default_rng(1).standard_normal((2, *tiny.input_shape)).astype(np.float32)
    with torch.no_grad():
        ref = tiny.module(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(variant.predict(x), ref, atol=0.05)


def test_an_emulate_recipe_is_built_through_the_registry(tiny, calib, tmp_path):
    recipe = _recipe(calib=CalibMethod.entropy, emulate=True)
    assert backends.builder_key(recipe) == "tensorrt-on-cpu"
    backends.check_recipe(recipe)  # no TensorRT or GPU needed
    variant = backends.build_variant(tiny, recipe, calib, tmp_path)
    assert isinstance(variant, tensorrt_on_cpu.EmulatedVariant)
    assert variant.name == recipe.name == "tensorrt-int8-entropy@onnxruntime"
    assert variant.predict(calib.batches[0]).shape == (len(calib.batches[0]), 1000)


def test_the_legacy_calibrator_cannot_run_on_onnx_runtime(tiny, calib, tmp_path):
    with pytest.raises(ConfigError, match="legacy"):
        tensorrt_on_cpu.build(tiny, _recipe(calib=CalibMethod.entropy, legacy=True), calib, tmp_path)


# --- with TensorRT and a GPU --------------------------------------------------------------------------------------


@pytest.fixture
def tensorrt():
    trt = pytest.importorskip("tensorrt")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT needs a CUDA GPU")
    return trt


@pytest.mark.tensorrt
@pytest.mark.parametrize("precision", [Precision.fp32, Precision.fp16, Precision.int8])
def test_engines_agree_with_pytorch(tensorrt, tiny, calib, tmp_path, precision):
    variant = trt_backend.build(tiny, _recipe(precision=precision, calib=CalibMethod.entropy), calib, tmp_path)
    assert variant.artifact.suffix == ".engine" and (tmp_path / trt_backend.TIMING_CACHE).exists()
    x = np.concatenate(calib.batches)
    with torch.no_grad():
        ref = tiny.module(torch.from_numpy(x)).numpy()
    out = variant.predict(x)
    cos = (out * ref).sum(1) / np.linalg.norm(out, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() > (0.9999 if precision is Precision.fp32 else 0.99)


@pytest.mark.tensorrt
def test_the_legacy_entropy_calibrator_where_tensorrt_still_has_it(tensorrt, tiny, calib, tmp_path):
    recipe = _recipe(calib=CalibMethod.entropy, legacy=True)
    if trt_backend.trt_major(tensorrt) >= 11:
        with pytest.raises(ConfigError, match="removed"):
            trt_backend.check_recipe(recipe)
        return
    variant = trt_backend.build(tiny, recipe, calib, tmp_path)
    assert list(tmp_path.glob("*.calib-cache"))
    assert variant.details["calibration"] == "TensorRT's implicit IInt8EntropyCalibrator2 (legacy)"
    assert variant.predict(calib.batches[0]).shape == (8, 1000)
