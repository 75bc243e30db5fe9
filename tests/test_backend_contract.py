"""The contract every backend answers the same way (one template, run per backend; skips when an extra is missing).

FP32 through the backend agrees with PyTorch (the parity gate's premise), INT8 builds from calibration data for
the backend's default recipe, predicts logits of the right shape for any batch size, writes a smaller artifact,
and impossible recipes fail before any work.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from int8eval import backends
from int8eval.config import Backend, CalibMethod, Precision, Recipe
from int8eval.errors import BackendUnavailable, ConfigError

CPU_BACKENDS = [Backend.torch, Backend.onnxruntime, Backend.openvino]


def _require(backend: Backend) -> None:
    try:
        backends.require(backend)
    except BackendUnavailable as e:
        pytest.skip(str(e))


@pytest.fixture(params=CPU_BACKENDS, ids=lambda b: b.value)
def backend(request) -> Backend:
    _require(request.param)
    return request.param


def test_fp32_matches_pytorch(backend, tiny, images, tmp_path):
    variant = backends.build_variant(tiny, Recipe(backend=backend, precision=Precision.fp32), None, tmp_path)
    with torch.no_grad():
        expected = tiny.module(torch.from_numpy(images)).numpy()
    for batch in (images, images[:1]):  # the last batch of a run is smaller
        np.testing.assert_allclose(variant.predict(batch), expected[: len(batch)], rtol=1e-4, atol=1e-4)
    assert variant.size_mb == pytest.approx(tiny.num_params * 4 / 1e6, rel=0.35)


def test_default_int8_recipe(backend, tiny, calib, images, tmp_path):
    recipe = Recipe(backend=backend, calib=backends.default_calib(backend))
    backends.check_recipe(recipe)
    fp32 = backends.build_variant(tiny, Recipe(backend=backend, precision=Precision.fp32), None, tmp_path / "fp32")
    int8 = backends.build_variant(tiny, recipe, calib, tmp_path / "int8")
    out = int8.predict(images)
    assert out.shape == (len(images), 1000) and out.dtype == np.float32 and np.isfinite(out).all()
    assert int8.predict(images[:2]).shape == (2, 1000)
    # INT8 logits track FP32's (a random tiny model: loose, but a broken quantizer is far off)
    ref = fp32.predict(images)
    corr = np.corrcoef(ref.ravel(), out.ravel())[0, 1]
    assert corr > 0.9, corr
    assert int8.size_mb < fp32.size_mb
    assert int8.prepare_s > 0
    # which code computed the activation ranges, named in the report (the method name alone means one per backend)
    assert isinstance(int8.details["calibration"], str) and int8.details["calibration"]
    assert "calibration" not in (fp32.details or {})


def test_int8_kernels_do_not_saturate_on_this_cpu(backend, tmp_path, monkeypatch):
    """The real kernels of this machine's own path (no override) on a layer built to overflow int16 pair sums: 64
    input channels of ~constant, positive activations (quantized to the top of their range) times weights of
    0.9..1 (the top of theirs), so 8-bit x 8-bit pairs reach 2 * 255 * 127 > 32767. Where the CPU has no VNNI/AMX,
    u8 x s8 kernels then saturate: with INT8EVAL_CPU=vnni on an AVX2-only EPYC every backend was 47% off FP32.
    The recipe for the path the CPU really has must stay within quantization error."""
    from int8eval.config import Preprocessing
    from int8eval.models import LoadedModel

    monkeypatch.delenv("INT8EVAL_CPU", raising=False)
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 64, 1), torch.nn.ReLU(), torch.nn.Conv2d(64, 8, 1)).eval()
    with torch.no_grad():
        module[0].weight.fill_(0.5)
        module[0].bias.zero_()
        module[2].weight.uniform_(0.9, 1.0)
    loaded = LoadedModel("saturating", module, Preprocessing(resize=8, crop=8), "test")
    x = (1 + 0.01 * np.random.default_rng(0).standard_normal((8, 3, 8, 8))).astype(np.float32)
    recipe = Recipe(backend=backend, calib=CalibMethod.minmax)
    out = backends.build_variant(loaded, recipe, backends.CalibrationData([x]), tmp_path).predict(x)
    with torch.no_grad():
        ref = module(torch.from_numpy(x)).numpy()
    # Half a step of 7-bit weights near their maximum (1/128) plus half a step of 8-bit activations near theirs
    # (1/510), with 7-bit activations 1/254: at most ~1.2% of the output; saturation halves it.
    assert np.abs(out - ref).max() <= 0.02 * np.abs(ref).max()


def test_a_bad_cpu_override_fails_before_any_work(backend, monkeypatch):
    monkeypatch.setenv("INT8EVAL_CPU", "avx512")
    with pytest.raises(ConfigError, match="INT8EVAL_CPU='avx512' is not one of avx2, vnni, amx, arm"):
        backends.check_recipe(Recipe(backend=backend, calib=backends.default_calib(backend)))
    backends.check_recipe(Recipe(backend=backend, precision=Precision.fp32))  # FP32 does not depend on it


def test_legacy_is_torch_only(backend):
    recipe = Recipe(backend=backend, legacy=True)
    if backend is Backend.torch:
        backends.check_recipe(recipe)
    else:
        with pytest.raises(ConfigError, match="legacy"):
            backends.check_recipe(recipe)


def test_missing_backend_names_the_extra(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "openvino" else real(name, *a))
    with pytest.raises(BackendUnavailable, match=r"int8eval\[openvino\]"):
        backends.require(Backend.openvino)


def test_keep_fp32(backend, tiny, calib, images, tmp_path):
    """Layers named in keep_fp32 stay FP32: keeping every layer gives FP32's logits; keeping some changes the
    INT8 model but still quantizes the rest."""
    fp32 = backends.build_variant(tiny, Recipe(backend=backend, precision=Precision.fp32), None, tmp_path / "fp32")
    ref = fp32.predict(images)
    every = tuple(tiny.quantizable_layers)
    assert every == ("features.0", "features.3", "features.6", "fc")
    outputs = {}
    for keep in ((), ("features.0", "fc"), every):
        recipe = Recipe(backend=backend, calib=backends.default_calib(backend), keep_fp32=keep)
        outputs[keep] = backends.build_variant(tiny, recipe, calib, tmp_path / f"keep{len(keep)}").predict(images)
    error = {keep: float(np.abs(out - ref).max()) for keep, out in outputs.items()}
    if backend is Backend.torch:  # nothing is left to quantize: FP32 up to summation order
        assert error[every] <= 1e-5 * np.abs(ref).max(), error
    # ONNX Runtime and OpenVINO still quantize the pooling between the kept layers. Its rounding alone (up to half a
    # step of the pooled range, 1.86 / 255, through fc's rows of L1 norm ~3.6: 0.013) can cost as much as the
    # bias-corrected layers' (0.0037 against 0.0074 all-INT8 with ONNX Runtime's 8-bit pooling), so only "closer"
    # holds on every path.
    assert error[every] < error[()], error
    some = outputs[("features.0", "fc")]
    assert not np.array_equal(some, outputs[()]) and not np.array_equal(some, outputs[every])
