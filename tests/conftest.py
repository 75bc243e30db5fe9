"""Shared fixtures: generated image folders (no images are committed) and the shared ImageNet sample; and helpers
the test modules import (`from conftest import torch_logits`)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED_SAMPLE = Path(os.environ.get("INT8EVAL_SHARED_DATA", REPO.parent / "shared" / "data")) / "imagenet-sample"

# What may not be missing: INT8EVAL_REQUIRE=extras,data (CI sets it) turns the skips for a missing optional
# extra or a missing shared ImageNet sample into failures, so a green run has run those tests. TensorRT and a GPU
# stay optional everywhere.
REQUIRE = {w.strip() for w in os.environ.get("INT8EVAL_REQUIRE", "").split(",") if w.strip()}
NEVER_REQUIRED = ("tensorrt", "pycuda", "cuda", "gpu")


def pytest_configure(config):
    """int8eval's cache (the decoded-image cache the commands use by default, and where a fetched sample would go) in
    a folder of this test session, removed after it: tests never write into the user's ~/.cache, and the commands'
    default path (cache on) is the one tested. Set here, so spawned decoding workers and subprocesses inherit it."""
    import tempfile

    config._int8eval_cache = tempfile.mkdtemp(prefix="int8eval-test-cache-")
    os.environ["INT8EVAL_CACHE"] = config._int8eval_cache


def pytest_unconfigure(config):
    import shutil

    if getattr(config, "_int8eval_cache", None):
        shutil.rmtree(config._int8eval_cache, ignore_errors=True)


def skip_unless_required(reason: str, need: str) -> None:
    """Skip with `reason`, or fail when INT8EVAL_REQUIRE names `need` ("extras" or "data")."""
    if need in REQUIRE:
        pytest.fail(f"{reason} (INT8EVAL_REQUIRE={','.join(sorted(REQUIRE))} makes this a failure)", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def require_package(*names: str, extra: str) -> None:
    """Skip the calling test or module when a package of an optional extra is not installed (fail under
    INT8EVAL_REQUIRE=extras). One that is installed is imported here, so a broken install is an error, not the
    green skip `pytest.importorskip` would make of it."""
    import importlib
    import importlib.util

    missing = [n for n in names if importlib.util.find_spec(n) is None]
    if missing:
        skip_unless_required(f"needs {', '.join(missing)}: pip install 'int8eval[{extra}]'", "extras")
    for name in names:
        importlib.import_module(name)


def _required_skip(reason: str) -> str | None:
    """The requirement a skip reason says is missing, if INT8EVAL_REQUIRE forbids it: a backend's extra
    (BackendUnavailable names `int8eval[...]`), a module `importorskip` could not import, the shared sample."""
    text = reason.lower()
    if any(word in text for word in NEVER_REQUIRED):
        return None
    if "extras" in REQUIRE and ("int8eval[" in text or "could not import" in text):
        return "extras"
    if "data" in REQUIRE and "imagenet sample" in text:
        return "data"
    return None


def _fail_forbidden_skip(report) -> None:
    if REQUIRE and report.skipped and isinstance(report.longrepr, tuple):
        reason = str(report.longrepr[2])
        need = _required_skip(reason)
        if need is not None:
            report.outcome = "failed"
            report.longrepr = f"{reason} (INT8EVAL_REQUIRE={','.join(sorted(REQUIRE))}: {need} must be present)"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """Under INT8EVAL_REQUIRE, a skip for a missing extra or missing data, however a test made it, fails."""
    report = yield
    _fail_forbidden_skip(report)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    report = yield
    _fail_forbidden_skip(report)
    return report

# Synsets chosen far from the start of the list so a folder-order mapping (0, 1, 2) is visibly wrong.
WNIDS = ("n01443537", "n04590129", "n15075141")  # goldfish (1), window shade (905), toilet tissue (999)


def write_image(path: Path, seed: int = 0, size=(48, 40), mode="RGB", fmt="JPEG") -> Path:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    img = Image.fromarray(arr, "RGB")
    if mode != "RGB":
        img = img.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format=fmt)
    return path


def varied_images(n: int, seed: int) -> np.ndarray:
    """[n, 3, 32, 32] Gaussian noise at a random contrast and per-channel brightness for each image: unlike plain
    noise, whose pooled features are nearly the same for every image, these move the tiny model's logits from image
    to image, and calibrate ranges like real images do (plain noise makes entropy clip 18% off the logits)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 3, 32, 32))
    return (x * rng.uniform(0.2, 2.5, (n, 1, 1, 1)) + rng.uniform(-1.5, 1.5, (n, 3, 1, 1))).astype(np.float32)


def two_batch_outliers():
    """CalibrationData of two batches of 16 Gaussian images: the largest value (+60) in the first, the most negative
    (-30) in the second, so a range from one batch only is visibly wrong; two outliers among 98304 input values
    (0.002%), which percentile 99.99 and entropy clip and minmax keeps."""
    from int8eval.backends import CalibrationData

    rng = np.random.default_rng(5)
    a = rng.standard_normal((16, 3, 32, 32)).astype(np.float32)
    b = rng.standard_normal((16, 3, 32, 32)).astype(np.float32)
    a[0, 0, 5, 5] = 60.0
    b[1, 1, 7, 7] = -30.0
    return CalibrationData([a, b])


def torch_logits(loaded, x: np.ndarray) -> np.ndarray:
    """The FP32 PyTorch logits of `loaded` for the batch `x`: the reference the backends are compared with."""
    import torch

    with torch.no_grad():
        return loaded.module(torch.from_numpy(x)).numpy()


def decode_sample(root: Path, loaded, n: int, seed: int = 0) -> np.ndarray:
    """A seeded subset of `n` images of the folder `root`, decoded and preprocessed for `loaded`: [n, 3, H, W]."""
    from int8eval.data import discover
    from int8eval.data.decode import build_transform, load_rgb
    from int8eval.data.layouts import subsample

    tf = build_transform(loaded.preprocessing)
    samples = subsample(discover(root).samples, n, seed=seed)
    return np.stack([tf(load_rgb(s.path)).numpy() for s in samples])


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """Three synset folders with four good JPEGs each."""
    root = tmp_path / "data"
    for c, wnid in enumerate(WNIDS):
        for i in range(4):
            write_image(root / wnid / f"{wnid}_{i}.JPEG", seed=10 * c + i)
    return root


@pytest.fixture
def shared_sample() -> Path:
    """The shared ImageNet sample (../shared/data, or $INT8EVAL_SHARED_DATA): a skip, a failure in CI."""
    if not SHARED_SAMPLE.is_dir():
        skip_unless_required(f"shared ImageNet sample not found at {SHARED_SAMPLE}", "data")
    return SHARED_SAMPLE


# Backend contract fixtures: the tiny model and random calibration/evaluation batches of its 32x32 input.
@pytest.fixture(scope="session")
def tiny():
    from int8eval.models import load_model

    return load_model("tiny_test")


@pytest.fixture(scope="session")
def calib():
    from int8eval.backends import CalibrationData

    rng = np.random.default_rng(0)
    return CalibrationData([rng.standard_normal((8, 3, 32, 32)).astype(np.float32) for _ in range(2)], ["a", "b"])


@pytest.fixture(scope="session")
def varied_calib():
    """Two batches of `varied_images` to calibrate the tiny model."""
    from int8eval.backends import CalibrationData

    return CalibrationData([varied_images(8, 10), varied_images(8, 11)])


@pytest.fixture(scope="session")
def resnet50_random():
    """torchvision's ResNet50 with random (seeded) weights and BatchNorm statistics, as no weights can be downloaded
    here, and two noise images to calibrate it: (LoadedModel, CalibrationData). For structural tests, not accuracy."""
    import torch
    import torchvision

    from int8eval.backends import CalibrationData
    from int8eval.config import Preprocessing
    from int8eval.models import LoadedModel

    from int8eval.models.tiny import seed_batchnorm

    torch.manual_seed(0)
    module = torchvision.models.resnet50(weights=None).eval()
    seed_batchnorm(module)  # identity BatchNorm would hide a backend that drops it instead of folding it
    loaded = LoadedModel("resnet50_random", module, Preprocessing(resize=224, crop=224), "random init")
    rng = np.random.default_rng(0)
    return loaded, CalibrationData([rng.standard_normal((2, 3, 224, 224)).astype(np.float32)])


@pytest.fixture(scope="session")
def outlier_calib():
    """Gaussian images with one huge pixel each: minmax spends its whole range on the outliers."""
    from int8eval.backends import CalibrationData

    rng = np.random.default_rng(1)
    x = rng.standard_normal((16, 3, 32, 32)).astype(np.float32)
    x[:, 0, 5, 5] = 60.0
    return CalibrationData([x[:8], x[8:]])


@pytest.fixture(scope="session")
def images() -> np.ndarray:
    return np.random.default_rng(2).standard_normal((5, 3, 32, 32)).astype(np.float32)
