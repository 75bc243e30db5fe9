"""Decode each image once, with the model's own preprocessing. Unreadable images come back as (index, reason).
Evaluation batches go through the active decode cache (int8eval.data.cache), which keeps each image's crop."""

from __future__ import annotations

import contextvars
import json
import os
import queue
import stat
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import PIL
import torch
import torchvision
from PIL import Image, UnidentifiedImageError, features
from torchvision import transforms

from int8eval.config import ChannelOrder, Layout, Preprocessing, ResizeMode, ValueRange
from int8eval.data.cache import DecodeCache, active_cache
from int8eval.data.layouts import Sample
from int8eval.errors import DatasetError

INTERPOLATION = {
    "nearest": transforms.InterpolationMode.NEAREST,
    "bilinear": transforms.InterpolationMode.BILINEAR,
    "bicubic": transforms.InterpolationMode.BICUBIC,
}


def crop_transform(pre: Preprocessing) -> transforms.Compose:
    """Resize + CenterCrop of a PIL image: the part of `build_transform` whose uint8 result the decode cache keeps."""
    size = pre.resize if pre.resize_mode is ResizeMode.short_side else (pre.resize, pre.resize)
    return transforms.Compose(
        [
            transforms.Resize(size, interpolation=INTERPOLATION[pre.interpolation.value]),
            transforms.CenterCrop(pre.crop),
        ]
    )


def build_transform(pre: Preprocessing) -> transforms.Compose:
    tensor = [transforms.ToTensor(), transforms.Normalize(pre.mean, pre.std)]
    return transforms.Compose([*crop_transform(pre).transforms, *tensor])


def pixels_to_tensor(pixels: np.ndarray, pre: Preprocessing) -> torch.Tensor:
    """ToTensor + Normalize of uint8 [H, W, 3] RGB pixels: float32 [3, H, W], bit for bit torchvision's. The same
    float32 operations (/ 255, - mean, / std: each exactly rounded, IEEE 754), in numpy on one thread: torch would
    spread each of these small operations over its thread pool, which costs milliseconds apiece when other work holds
    the cores. The model's own conventions (`Preprocessing`): BGR reverses the channels first, 0-255 skips the
    division, NHWC keeps the channels last."""
    if pre.channel_order is ChannelOrder.bgr:
        pixels = pixels[..., ::-1]
    x = pixels.transpose(2, 0, 1).astype(np.float32, order="C")  # a copy: a memory-mapped cache entry is read-only
    if pre.value_range is ValueRange.unit:
        x /= np.float32(255)
    x -= np.asarray(pre.mean, np.float32)[:, None, None]
    x /= np.asarray(pre.std, np.float32)[:, None, None]
    if pre.layout is Layout.nhwc:
        x = np.ascontiguousarray(x.transpose(1, 2, 0))
    return torch.from_numpy(x)


# Decode bounds, checked from the header before any pixel is decoded or resized: photos in ImageNet are a few
# megapixels (the shared 800-image sample: at most 1600 px on the short side, aspect at most 1:3.4).
MAX_PIXELS = 50_000_000  # decoded pixels (150 MB as RGB); a larger JPEG is decoded at 1/2, 1/4 or 1/8 scale
MAX_ASPECT = 25  # longer side / shorter side: resizing the short side of a 1:100000 sliver needs gigabytes
_UINT16_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
# Bump when decoding (load_rgb) or the crop changes what the pixels of a file are: cached crops are then decoded again.
DECODE_VERSION = 1


def cache_kind(pre: Preprocessing) -> str:
    """Everything a cached crop depends on besides the file: the crop, the decoder (its version and bounds)."""
    kind = {"version": DECODE_VERSION, "resize": pre.resize, "crop": pre.crop,
            "interpolation": pre.interpolation.value, "max_pixels": MAX_PIXELS, "max_aspect": MAX_ASPECT,
            "pillow": PIL.__version__, "libjpeg": features.version("jpg"), "torchvision": torchvision.__version__}
    if pre.resize_mode is not ResizeMode.short_side:  # only then: the keys of crops cached before stay the same
        kind["resize_mode"] = pre.resize_mode.value
    return json.dumps(kind, sort_keys=True)


class ImageRefused(DatasetError):
    """An image that is not decoded: the message is the reason, reported with the file's path."""


def load_rgb(path, min_side: int | None = None) -> Image.Image:
    """The image at `path` as 8-bit RGB, within MAX_PIXELS and MAX_ASPECT (else ImageRefused).

    A JPEG over MAX_PIXELS is decoded at reduced scale (Pillow's draft), keeping its short side >= `min_side`
    (the resize target); images within the limit decode exactly as before.
    """
    # O_NONBLOCK: opening a FIFO for reading returns at once instead of waiting for a writer; fstat then refuses it.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ImageRefused("not a regular file: it is never read")
        with warnings.catch_warnings():
            # The header check below states its own, lower limit, and names the file; Pillow's warning names none.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            try:
                im = Image.open(f)
            except UnidentifiedImageError:
                raise ImageRefused(f"UnidentifiedImageError: cannot identify image file {str(path)!r}") from None
            except Image.DecompressionBombError as e:
                raise ImageRefused(f"too large to decode ({e}); the limit is {MAX_PIXELS / 1e6:.0f} megapixels") from None
        with im:
            _bound(im, min_side or 1)
            return _to_rgb(im)


def _bound(im: Image.Image, min_side: int) -> None:
    w, h = im.size
    if min(w, h) < 1 or max(w, h) > MAX_ASPECT * min(w, h):
        raise ImageRefused(f"{w}x{h} pixels: aspect ratio beyond 1:{MAX_ASPECT}, not a photo to classify")
    if w * h <= MAX_PIXELS:
        return
    # Only over the limit: draft changes the decoded pixels, so images within it never go through it.
    scale = next(
        (k for k in (8, 4, 2) if min(w, h) // k >= min_side and (w // k) * (h // k) <= MAX_PIXELS), None
    ) if im.format == "JPEG" else None
    if scale is None:
        raise ImageRefused(
            f"{w}x{h} pixels ({w * h / 1e6:.0f} megapixels) is over the decode limit of {MAX_PIXELS / 1e6:.0f} "
            "megapixels: downscale the image"
        )
    im.draft(None, (w // scale, h // scale))


def _to_rgb(im: Image.Image) -> Image.Image:
    # PIL detects the format from the content (a PNG named .JPEG works); convert() forces the full decode, so a
    # truncated file fails here, and CMYK / grayscale / palette images become RGB. convert() clips wider pixels
    # to 255, which turns 16-bit grayscale all white: those are scaled, and pixels of unknown range refused.
    if im.mode in _UINT16_MODES:
        return Image.fromarray((np.asarray(im).astype(np.uint16) >> 8).astype(np.uint8), "L").convert("RGB")
    if im.mode == "I":
        lo, hi = im.getextrema()
        if lo < 0 or hi > 255:
            raise ImageRefused(f"32-bit integer pixels from {lo} to {hi}: their scale is unknown; save the image as 8 or 16 bit")
    if im.mode == "F":
        raise ImageRefused("floating-point pixels: their scale (0-1 or 0-255) is unknown; save the image as 8 or 16 bit")
    return im.convert("RGB")


class ImageDataset(torch.utils.data.Dataset):
    """(position, label, image tensor or None, error or None): the transform is the eval one or a training one.
    `min_side` (the resize target) lets an over-large JPEG decode at reduced scale."""

    def __init__(self, samples: list[Sample], transform, min_side: int | None = None) -> None:
        self.samples = samples
        self.transform = transform
        self.min_side = min_side

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        label = self.samples[i].label
        try:
            return i, label, self.image(self.samples[i].path), None
        except ImageRefused as e:
            return i, label, None, str(e)
        except Exception as e:  # noqa: BLE001 - any decoder failure is a property of the file, reported per image
            return i, label, None, f"{type(e).__name__}: {e}"

    def image(self, path) -> torch.Tensor:
        return self.transform(load_rgb(path, self.min_side))


class EvalDataset(ImageDataset):
    """The model's eval preprocessing of each image, `build_transform` in two parts: the uint8 crop, read from the
    `cache` when it holds it (else decoded, and stored there), then ToTensor and Normalize (`pixels_to_tensor`)."""

    def __init__(self, samples: list[Sample], pre: Preprocessing, cache: DecodeCache | None = None) -> None:
        super().__init__(samples, crop_transform(pre), min_side=pre.resize)
        self.pre, self.cache, self.kind, self.shape = pre, cache, cache_kind(pre), (pre.crop, pre.crop, 3)

    def image(self, path) -> torch.Tensor:
        decode = lambda: np.asarray(self.transform(load_rgb(path, self.min_side)))  # noqa: E731
        pixels = decode() if self.cache is None else self.cache.get(path, self.kind, self.shape, decode)
        return pixels_to_tensor(pixels, self.pre)


@dataclass
class Batch:
    indices: np.ndarray  # positions in the sample list
    labels: np.ndarray  # int64 class indices of the decoded images
    images: np.ndarray  # float32 [N, 3, H, W] ([N, H, W, 3] for an NHWC model)
    bad: list[tuple[int, str]]  # (position, reason) of images that could not be decoded


def collate(items) -> Batch:
    good = [(i, y, x) for i, y, x, err in items if err is None]
    bad = [(i, err) for i, _, _, err in items if err is not None]
    if good:
        idx, ys, xs = zip(*good)
        # numpy's copy runs on one thread: torch.stack's waits on its thread pool, ~0.2 s a batch when other work
        # holds the cores, more than reading a batch from the decode cache takes.
        images = np.stack([x.numpy() for x in xs])
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
    """Decoded, preprocessed batches in sample order (workers decode ahead while the variants run), through the
    decode cache active when iterating starts (`cache.using`)."""
    dataset = EvalDataset(samples, pre, active_cache())
    yield from loader(dataset, batch_size=batch_size, workers=workers, shuffle=False)


def prefetched(source: Iterable[Batch], depth: int = 2) -> Iterator[Batch]:
    """`source`'s batches, in order, decoded up to `depth` ahead by a thread while the caller runs the variants on the
    current one (JPEG decoding, resizing and the runtimes' kernels release the GIL). The thread runs in this context
    (the active decode cache); its exception is raised here; it stops when the caller does."""
    ready: queue.Queue = queue.Queue(depth)
    stop = threading.Event()
    end = object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for batch in source:
                if not put((batch, None)):
                    return
            put((end, None))
        except BaseException as e:  # noqa: BLE001 - raised again in the caller's thread
            put((None, e))

    thread = threading.Thread(target=contextvars.copy_context().run, args=(produce,), daemon=True)
    thread.start()
    try:
        while True:
            item, error = ready.get()
            if error is not None:
                raise error
            if item is end:
                return
            yield item
    finally:
        stop.set()
        thread.join()


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
