"""Decode each image once, with the model's own preprocessing. Unreadable images come back as (index, reason)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torchvision import transforms

from int8eval.config import Preprocessing
from int8eval.data.layouts import Sample

_INTERPOLATION = {
    "nearest": transforms.InterpolationMode.NEAREST,
    "bilinear": transforms.InterpolationMode.BILINEAR,
    "bicubic": transforms.InterpolationMode.BICUBIC,
}


def build_transform(pre: Preprocessing) -> transforms.Compose:
    return transforms.Compose(
        [
            transforms.Resize(pre.resize, interpolation=_INTERPOLATION[pre.interpolation.value]),
            transforms.CenterCrop(pre.crop),
            transforms.ToTensor(),
            transforms.Normalize(pre.mean, pre.std),
        ]
    )


def load_rgb(path) -> Image.Image:
    # PIL detects the format from the content (a PNG named .JPEG works); convert() forces the full decode, so a
    # truncated file fails here, and CMYK / grayscale / palette images become RGB.
    with Image.open(path) as im:
        return im.convert("RGB")


class ImageDataset(torch.utils.data.Dataset):
    def __init__(self, samples: list[Sample], pre: Preprocessing) -> None:
        self.samples = samples
        self.transform = build_transform(pre)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        try:
            return i, self.transform(load_rgb(self.samples[i].path)), None
        except Exception as e:  # noqa: BLE001 - any decoder failure is a property of the file, reported per image
            return i, None, f"{type(e).__name__}: {e}"


@dataclass
class Batch:
    indices: np.ndarray  # positions in the sample list
    images: np.ndarray  # float32 [N, 3, H, W]
    bad: list[tuple[int, str]]  # (position, reason) of images that could not be decoded


def _collate(items) -> Batch:
    good = [(i, x) for i, x, err in items if err is None]
    bad = [(i, err) for i, _, err in items if err is not None]
    if good:
        idx, xs = zip(*good)
        images = torch.stack(xs).numpy()
    else:
        idx, images = (), np.zeros((0, 3, 1, 1), np.float32)
    return Batch(np.asarray(idx, dtype=np.int64), images, bad)


def batches(samples: list[Sample], pre: Preprocessing, *, batch_size: int, workers: int) -> Iterator[Batch]:
    """Decoded, preprocessed batches in sample order (workers decode ahead while the variants run)."""
    loader = torch.utils.data.DataLoader(
        ImageDataset(samples, pre),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=_collate,
        # Spawned, not forked: by now backends (OpenVINO, ONNX Runtime, inductor) have started thread pools, and
        # forking a process that holds them can crash the child.
        multiprocessing_context="spawn" if workers > 0 else None,
    )
    yield from loader
