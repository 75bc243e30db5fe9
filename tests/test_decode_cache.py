"""The decoded-image cache (int8eval.data.cache): the same tensors as decoding, bit for bit; a changed file or
preprocessing is a miss; a broken entry is written again; writers sharing it leave whole entries; --cache and
--no-cache."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from torchvision import transforms
from conftest import write_image

from int8eval.cli import main
from int8eval.config import Interpolation, Preprocessing
from int8eval.data import discover
from int8eval.data.cache import CacheError, DecodeCache, active_cache, using
from int8eval.data.decode import batches, build_transform, load_rgb, pixels_to_tensor
from int8eval.data.layouts import subsample
from int8eval.models.efficientnet_lite import preprocessing

PRE = Preprocessing(resize=40, crop=32, interpolation=Interpolation.bicubic, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
LITE0 = preprocessing("efficientnet_lite0")  # bicubic 256, crop 224


def _images(samples, pre=PRE, cache=None) -> np.ndarray:
    with using(cache):
        return np.concatenate([b.images for b in batches(samples, pre, batch_size=4, workers=0)])


def _torchvision(samples, pre=PRE) -> np.ndarray:
    """The reference: torchvision's Resize, CenterCrop, ToTensor and Normalize of each decoded image."""
    tf = build_transform(pre)
    return np.stack([tf(load_rgb(s.path, pre.resize)).numpy() for s in samples])


def _entries(root: Path) -> list[Path]:
    return sorted(root.glob("*/*/*.npy"))


@pytest.fixture
def samples(tmp_path):
    """Generated images of several sizes, modes and formats (an 8-bit grayscale, a PNG, one smaller than the crop)."""
    root = tmp_path / "data"
    write_image(root / "n01443537" / "a.JPEG", seed=1, size=(64, 48))
    write_image(root / "n01443537" / "b.JPEG", seed=2, size=(37, 90), mode="L")
    write_image(root / "n04590129" / "c.JPEG", seed=3, size=(50, 50), fmt="PNG")
    write_image(root / "n04590129" / "d.JPEG", seed=4, size=(20, 28))
    write_image(root / "n15075141" / "e.JPEG", seed=5, size=(120, 41))
    return discover(root).samples


def test_cached_tensors_are_bit_identical_to_decoding(samples, tmp_path):
    cache = DecodeCache.open(tmp_path / "cache")
    plain = _torchvision(samples)
    assert np.array_equal(_images(samples), plain)  # no cache
    first = _images(samples, cache=cache)  # decoded and stored
    assert (cache.hits, cache.misses) == (0, len(samples)) and len(_entries(cache.root)) == len(samples)
    again = _images(samples, cache=cache)  # read back, memory-mapped
    assert (cache.hits, cache.misses) == (len(samples), len(samples))
    assert np.array_equal(plain, first) and np.array_equal(plain, again)
    stored = np.load(_entries(cache.root)[0], mmap_mode="r")
    assert stored.dtype == np.uint8 and stored.shape == (32, 32, 3)


@pytest.mark.parametrize("pre", [PRE, Preprocessing(resize=40, crop=32)], ids=["lite", "imagenet-mean-std"])
def test_pixels_to_tensor_is_totensor_and_normalize_bit_for_bit(pre):
    rng = np.random.default_rng(0)
    tail = transforms.Compose([transforms.ToTensor(), transforms.Normalize(pre.mean, pre.std)])
    for shape in [(32, 32, 3), (7, 13, 3), (224, 224, 3)]:
        pixels = rng.integers(0, 256, shape, dtype=np.uint8)
        pixels[0, 0], pixels[-1, -1] = 0, 255
        expected = tail(Image.fromarray(pixels)).numpy()
        got = pixels_to_tensor(pixels, pre).numpy()
        assert got.dtype == np.float32 and np.array_equal(got, expected)


def test_real_jpegs_are_bit_identical_with_lite0_preprocessing(shared_sample, tmp_path):
    real = subsample(discover(shared_sample).samples, 12, seed=0)
    cache = DecodeCache.open(tmp_path / "cache")
    plain = _torchvision(real, LITE0)
    assert np.array_equal(plain, _images(real, LITE0))
    assert np.array_equal(plain, _images(real, LITE0, cache)) and np.array_equal(plain, _images(real, LITE0, cache))
    assert cache.hits == len(real)


def test_a_changed_file_is_a_miss(samples, tmp_path):
    cache = DecodeCache.open(tmp_path / "cache")
    _images(samples, cache=cache)
    path = samples[0].path
    write_image(path, seed=99, size=(70, 50))  # other pixels, another size
    assert np.array_equal(_images(samples[:1], cache=cache), _torchvision(samples[:1]))
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the same bytes, touched
    _images(samples[:1], cache=cache)
    assert (cache.hits, cache.misses) == (0, len(samples) + 2)


def test_changed_preprocessing_is_another_key_but_normalisation_is_not(samples, tmp_path):
    cache = DecodeCache.open(tmp_path / "cache")
    _images(samples, PRE, cache)
    other = PRE.model_copy(update={"interpolation": Interpolation.bilinear})
    smaller = PRE.model_copy(update={"crop": 24})
    for pre in (other, smaller):
        assert np.array_equal(_images(samples, pre, cache), _torchvision(samples, pre))
    assert cache.hits == 0 and len({p.parent.parent for p in _entries(cache.root)}) == 3
    renormalised = PRE.model_copy(update={"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)})
    assert np.array_equal(_images(samples, renormalised, cache), _torchvision(samples, renormalised))
    assert cache.hits == len(samples)  # the crop is stored before normalisation: the same entries


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "other shape"])
def test_a_broken_entry_is_a_miss_and_written_again(samples, tmp_path, damage):
    cache = DecodeCache.open(tmp_path / "cache")
    plain = _images(samples, cache=cache)
    entry = _entries(cache.root)[0]
    if damage == "truncate":
        entry.write_bytes(entry.read_bytes()[:-100])
    elif damage == "garbage":
        entry.write_bytes(os.urandom(3200))
    elif damage == "empty":
        entry.write_bytes(b"")
    else:
        np.save(entry, np.zeros((8, 8, 3), np.uint8))
    assert np.array_equal(_images(samples, cache=cache), plain)
    assert cache.misses == len(samples) + 1
    assert np.load(entry).shape == (32, 32, 3)  # written again, whole


def test_writers_sharing_the_cache_leave_whole_entries(samples, tmp_path):
    root, plain = tmp_path / "cache", _torchvision(samples)
    start, results, errors = threading.Barrier(4), [], []

    def decode():  # each thread a run of its own, on the same empty cache: they race on every entry
        try:
            start.wait()
            results.append(_images(samples, cache=DecodeCache(root)))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=decode) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 4 and all(np.array_equal(r, plain) for r in results)
    assert len(_entries(root)) == len(samples) and not list(root.rglob("*.tmp"))  # no temporary file left
    reader = DecodeCache(root)
    assert np.array_equal(_images(samples, cache=reader), plain) and reader.hits == len(samples)


# In a fresh interpreter: a DataLoader worker spawned from pytest's process, after the backends' thread pools and
# inductor's have started in it, once crashed that process with a segmentation fault (not reproduced since).
SPAWNED = """
import sys
from pathlib import Path
import numpy as np
from int8eval.config import Interpolation, Preprocessing
from int8eval.data import discover
from int8eval.data.cache import DecodeCache, using
from int8eval.data.decode import batches
pre = Preprocessing(resize=40, crop=32, interpolation=Interpolation.bicubic, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
samples = discover(Path(sys.argv[1])).samples
with using(DecodeCache(Path(sys.argv[2]))):
    images = np.concatenate([b.images for b in batches(samples, pre, batch_size=2, workers=1)])
np.save(sys.argv[3], images)
"""


def test_a_spawned_decoding_worker_writes_the_cache(samples, tmp_path):
    """--workers N: the cache active in the run goes with the dataset into each spawned worker, which writes it."""
    import subprocess
    import sys

    root, plain = tmp_path / "cache", _torchvision(samples)
    data = tmp_path / "data"  # the samples fixture's folder: the script discovers the same samples in the same order
    done = subprocess.run([sys.executable, "-c", SPAWNED, str(data), str(root), str(tmp_path / "images.npy")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert np.array_equal(np.load(tmp_path / "images.npy"), plain) and len(_entries(root)) == len(samples)


def test_images_that_fail_to_decode_are_not_stored(samples, tmp_path):
    broken = samples[0].path.parent / "broken.JPEG"
    broken.write_bytes(b"not an image")
    cache = DecodeCache.open(tmp_path / "cache")
    for _ in range(2):
        with using(cache):
            (batch,) = list(batches(discover(tmp_path / "data").samples, PRE, batch_size=8, workers=0))
        assert len(batch.bad) == 1 and "cannot identify" in batch.bad[0][1]
    assert len(_entries(cache.root)) == len(samples) and cache.misses == len(samples) + 2


def test_an_unwritable_cache_is_one_clear_error(tmp_path, image_folder):
    (tmp_path / "file").write_text("in the way")
    bad = tmp_path / "file" / "cache"  # a folder inside a file: not even root can create it
    with pytest.raises(CacheError, match="--cache DIR"):
        DecodeCache.open(bad)
    result = CliRunner().invoke(main, ["run", "-m", "tiny_test", "--data", str(image_folder), "--fp32-only",
                                       "--out", str(tmp_path / "run"), "--cache", str(bad)])
    assert result.exit_code == 1 and str(bad) in result.output and "--no-cache" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "run").exists()


def test_cli_cache_and_no_cache(tmp_path, image_folder, monkeypatch):
    monkeypatch.setenv("INT8EVAL_CACHE", str(tmp_path / "user-cache"))
    args = ["run", "-m", "tiny_test", "--data", str(image_folder), "--fp32-only", "--workers", "0"]
    result = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "a"), "--no-cache"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "user-cache").exists() and "decode cache: off" in result.output
    assert json.loads((tmp_path / "a" / "report.json").read_text())["config"]["decode_cache"] is None

    for out in ("b", "c"):  # the default folder: decoded on the first run, read on the second
        result = CliRunner().invoke(main, [*args, "--out", str(tmp_path / out)], catch_exceptions=False)
        assert result.exit_code == 0, result.output
    default = tmp_path / "user-cache" / "decoded"
    assert len(_entries(default)) == 12 and "12 read, 0 decoded, 0 added, now 12 images" in result.output
    assert json.loads((tmp_path / "c" / "report.json").read_text())["config"]["decode_cache"] == str(default)
    preds = [np.load(tmp_path / out / "predictions.npz")["top5::torch-fp32"] for out in "abc"]
    assert np.array_equal(preds[0], preds[1]) and np.array_equal(preds[0], preds[2])

    result = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "d"), "--cache", str(tmp_path / "x"),
                                       "--no-cache"])
    assert result.exit_code == 2 and "--no-cache" in result.output and not (tmp_path / "x").exists()
    assert active_cache() is None  # nothing left active after a command
