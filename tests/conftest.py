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
    if not SHARED_SAMPLE.is_dir():
        pytest.skip(f"shared ImageNet sample not found at {SHARED_SAMPLE}")
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
def resnet50_random():
    """torchvision's ResNet50 with random (seeded) weights, as no weights can be downloaded here, and two noise
    images to calibrate it: (LoadedModel, CalibrationData). For structural tests, not accuracy."""
    import torch
    import torchvision

    from int8eval.backends import CalibrationData
    from int8eval.config import Preprocessing
    from int8eval.models import LoadedModel

    torch.manual_seed(0)
    module = torchvision.models.resnet50(weights=None).eval()
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
