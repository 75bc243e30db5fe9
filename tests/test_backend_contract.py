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
from int8eval.config import Backend, Precision, Recipe
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
    # ONNX Runtime and OpenVINO still quantize the pooling between the kept layers, so "every layer" is not exactly
    # FP32 there (and bias correction already makes the all-INT8 model close).
    assert error[every] < error[()] / 2, error
    some = outputs[("features.0", "fc")]
    assert not np.array_equal(some, outputs[()]) and not np.array_equal(some, outputs[every])
