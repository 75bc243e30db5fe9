"""Decode each image once, with the model's own preprocessing. Unreadable images come back as (index, reason)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
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
    """(position, label, image tensor or None, error or None): the transform is the eval one or a training one."""

    def __init__(self, samples: list[Sample], transform) -> None:
        self.samples = samples
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        label = self.samples[i].label
        try:
            return i, label, self.transform(load_rgb(self.samples[i].path)), None
        except Exception as e:  # noqa: BLE001 - any decoder failure is a property of the file, reported per image
            return i, label, None, f"{type(e).__name__}: {e}"


@dataclass
class Batch:
    indices: np.ndarray  # positions in the sample list
    labels: np.ndarray  # int64 class indices of the decoded images
    images: np.ndarray  # float32 [N, 3, H, W]
    bad: list[tuple[int, str]]  # (position, reason) of images that could not be decoded


def collate(items) -> Batch:
    good = [(i, y, x) for i, y, x, err in items if err is None]
    bad = [(i, err) for i, _, _, err in items if err is not None]
    if good:
        idx, ys, xs = zip(*good)
        images = torch.stack(xs).numpy()
    else:
        idx, ys, images = (), (), np.zeros((0, 3, 1, 1), np.float32)
    return Batch(np.asarray(idx, dtype=np.int64), np.asarray(ys, dtype=np.int64), images, bad)


def loader(dataset: ImageDataset, *, batch_size: int, workers: int, **kw) -> torch.utils.data.DataLoader:
    """A DataLoader of `dataset` collated into Batches; `kw` (shuffle, generator, ...) goes to DataLoader."""
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=collate,
        # Spawned, not forked: by now backends (OpenVINO, ONNX Runtime, inductor) have started thread pools, and
        # forking a process that holds them can crash the child.
        multiprocessing_context="spawn" if workers > 0 else None,
        **kw,
    )


def batches(samples: list[Sample], pre: Preprocessing, *, batch_size: int, workers: int) -> Iterator[Batch]:
    """Decoded, preprocessed batches in sample order (workers decode ahead while the variants run)."""
    yield from loader(ImageDataset(samples, build_transform(pre)), batch_size=batch_size, workers=workers, shuffle=False)


def decode_samples(
    samples: list[Sample],
    pre: Preprocessing,
    *,
    batch_size: int,
    workers: int,
    on_batch: Callable[[Batch], None] | None = None,
) -> tuple[list[np.ndarray], np.ndarray, list[str]]:
    """(image batches, int64 labels, image ids) of the samples that decode; batches with no readable image are
    left out. `on_batch` sees every batch, empty ones included (e.g. to advance a progress bar)."""
    images: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    ids: list[str] = []
    for batch in batches(samples, pre, batch_size=batch_size, workers=workers):
        if len(batch.indices):
            images.append(batch.images)
            labels.append(batch.labels)
            ids += [samples[i].id for i in batch.indices]
        if on_batch is not None:
            on_batch(batch)
    return images, np.concatenate(labels) if labels else np.zeros(0, np.int64), ids
