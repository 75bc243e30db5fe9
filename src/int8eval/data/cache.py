"""Decoded images kept on disk between runs, so a rerun reads each image instead of decoding it again.

Layout: ROOT/<hash of what the pixels depend on besides the file>/<2 hex>/<sha1 of (path, size, mtime)>.npy, each
a uint8 [H, W, 3] array (the resized and centre-cropped image, before ToTensor and normalisation) read back
memory-mapped. `decode.batches` goes through the cache made active by `using` (the commands' --cache / --no-cache).

Safe when runs share it: every entry is written to a temporary file in its folder and renamed into place, so a
reader sees a whole entry or none. An entry that cannot be read (truncated, not an .npy, another shape) is a miss and
is written again; an image that fails to decode is never stored.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import os
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from int8eval.data.fetch import cache_dir
from int8eval.errors import Int8EvalError


class CacheError(Int8EvalError):
    """The cache folder cannot be created or written."""


def default_root() -> Path:
    """$INT8EVAL_CACHE/decoded, else $XDG_CACHE_HOME/int8eval/decoded, else ~/.cache/int8eval/decoded: beside the
    sample `int8eval data fetch-sample` caches."""
    return cache_dir() / "decoded"


class DecodeCache:
    """The decoded images under `root`. `hits` and `misses` count this process's reads (not decoding workers')."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.hits = self.misses = 0

    @classmethod
    def open(cls, root: Path | str) -> DecodeCache:
        """The cache at `root`, created if needed; a CacheError naming it when it cannot be written."""
        root = Path(root).expanduser()
        try:
            root.mkdir(parents=True, exist_ok=True)
            tempfile.TemporaryFile(dir=root).close()  # said now, not as a silent miss for every image
        except OSError as e:
            raise CacheError(f"cannot write the decoded-image cache {root} ({e.strerror or e}): pass --cache DIR "
                             "(a folder you can write to) or --no-cache") from None
        return cls(root)

    def get(self, path: Path, kind: str, shape: tuple[int, ...], decode: Callable[[], np.ndarray]) -> np.ndarray:
        """The uint8 pixels of the image at `path`, `shape`, as `decode()` makes them for `kind` (a string naming
        everything they depend on besides the file): read from the cache, else decoded and stored. What `decode`
        raises goes through, and nothing is stored."""
        entry = self._entry(path, kind)
        pixels = _read(entry, shape) if entry is not None else None
        if pixels is not None:
            self.hits += 1
            return pixels
        self.misses += 1
        pixels = decode()
        if entry is not None and pixels.shape == shape and pixels.dtype == np.uint8:
            _write(entry, pixels)
        return pixels

    def _entry(self, path: Path, kind: str) -> Path | None:
        # The file's identity is its resolved path, size and modification time: a file rewritten in place changes
        # one of them (within the filesystem's timestamp resolution), and the old entry is never read again.
        try:
            real = Path(path).resolve(strict=True)
            st = real.stat()
        except (OSError, RuntimeError):  # missing, a link loop: decoding says why
            return None
        if not stat.S_ISREG(st.st_mode):  # a FIFO or device is refused by the decoder, never read twice
            return None
        folder = hashlib.sha1(kind.encode()).hexdigest()[:16]
        name = hashlib.sha1(os.fsencode(real) + f"\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()
        return self.root / folder / name[:2] / f"{name}.npy"

    def size(self) -> tuple[int, int]:
        """(entries, bytes) under the root, every preprocessing included."""
        count = total = 0
        for entry in self.root.glob("*/*/*.npy"):
            with contextlib.suppress(OSError):  # replaced or removed meanwhile by another run
                total += entry.stat().st_size
                count += 1
        return count, total


def _read(entry: Path, shape: tuple[int, ...]) -> np.ndarray | None:
    try:
        pixels = np.load(entry, mmap_mode="r", allow_pickle=False)
    except Exception:  # noqa: BLE001 - missing, truncated or not an .npy: a miss, written again, never an error
        return None
    return pixels if pixels.shape == shape and pixels.dtype == np.uint8 else None


def _write(entry: Path, pixels: np.ndarray) -> None:
    # No fsync: an entry cut short by a crash fails _read and is written again.
    tmp = None
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=entry.parent, prefix=".", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            np.save(f, np.ascontiguousarray(pixels), allow_pickle=False)
        os.replace(tmp, entry)  # atomic: a concurrent reader or writer of the same entry sees a whole file
    except OSError:  # a full or read-only disk costs the cache, never the run
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


_ACTIVE: contextvars.ContextVar[DecodeCache | None] = contextvars.ContextVar("decode_cache", default=None)


def active_cache() -> DecodeCache | None:
    """The cache `decode.batches` reads and writes now (None: none)."""
    return _ACTIVE.get()


@contextlib.contextmanager
def using(cache: DecodeCache | Path | str | None, say: Callable[[str], None] | None = None
          ) -> Iterator[DecodeCache | None]:
    """Make `cache` the active one inside the block: a folder is opened (or the active cache kept, when it is that
    folder), None decodes every image. When the block ends without an error, `say` hears one line: the cache's
    location and size, and what the block read from it and added to it."""
    if cache is not None and not isinstance(cache, DecodeCache):
        current = _ACTIVE.get()
        root = Path(cache).expanduser()
        cache = current if current is not None and current.root == root else DecodeCache.open(root)
    before = cache.size()[0] if cache is not None and say else 0
    token = _ACTIVE.set(cache)
    try:
        yield cache
    finally:
        _ACTIVE.reset(token)
    if say and cache is None:
        say("decode cache: off, every image was decoded")
    elif say:
        count, total = cache.size()
        # Reads in decoding workers (--workers N) are not counted here: the images added are, wherever written.
        seen = f"{cache.hits} read, {cache.misses} decoded, " if cache.hits + cache.misses else ""
        say(f"decode cache: {cache.root}: {seen}{count - before} added, now {count} images ({total / 1e6:.0f} MB)")
