"""Where data comes from when --data is not given, fetching the public sample, and `data prepare`."""

from __future__ import annotations

import io
import os
import shutil
import tarfile
import urllib.request
import zipfile
from pathlib import Path

from int8eval.data.ground_truth import read_ground_truth
from int8eval.data.layouts import _is_image
from int8eval.data.synsets import wnid_to_index
from int8eval.errors import DatasetError

SAMPLE_URL = "https://github.com/EliSchwartz/imagenet-sample-images/archive/refs/heads/master.zip"


def cache_dir() -> Path:
    base = os.environ.get("INT8EVAL_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "int8eval"
    return Path(base)


def sample_dir() -> Path:
    return cache_dir() / "imagenet-sample"


def default_data_root() -> Path:
    """--data when not given: $INT8EVAL_DATA, else the cached public sample, else a clear error."""
    env = os.environ.get("INT8EVAL_DATA")
    if env:
        return Path(env)
    if sample_dir().is_dir():
        return sample_dir()
    raise DatasetError(
        "no data given: pass --data DIR (a folder per synset, or the val folder with --labels), set "
        f"INT8EVAL_DATA, or run `int8eval data fetch-sample` (needs the internet) to cache the public "
        f"1000-image sample in {sample_dir()}"
    )


def fetch_sample(dest: Path | None = None, url: str = SAMPLE_URL) -> Path:
    """Download the public one-image-per-class ImageNet sample and sort it into folders per synset."""
    dest = Path(dest or sample_dir())
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            payload = response.read()
    except OSError as e:
        raise DatasetError(
            f"could not download {url} ({e}). Offline? Copy any ImageNet images into folders per synset and pass "
            "--data DIR (or set INT8EVAL_DATA)"
        ) from e
    index = wnid_to_index()
    count = 0
    with zipfile.ZipFile(io.BytesIO(payload)) as z:
        for info in z.infolist():
            name = Path(info.filename).name
            wnid = name.split("_", 1)[0]
            if info.is_dir() or not _is_image(name) or wnid not in index:
                continue
            target = dest / wnid / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(z.read(info))
            count += 1
    if not count:
        raise DatasetError(f"{url} held no images named <wnid>_*.JPEG")
    return dest


def prepare(source: Path, labels: Path, out: Path, *, copy: bool = False) -> int:
    """Sort the official flat val folder (or ILSVRC2012_img_val.tar) into OUT/<wnid>/<file>.

    Files are symlinked from a folder (copied with copy=True) and extracted from a tar. Returns the count.
    """
    truth = read_ground_truth(labels)
    source, out = Path(source), Path(out)
    count = 0
    if source.is_file() and source.name.endswith((".tar", ".tar.gz", ".tgz")):
        with tarfile.open(source) as tar:
            for member in tar:
                stem = Path(member.name).stem
                if member.isfile() and stem in truth:
                    target = out / truth[stem] / Path(member.name).name
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with tar.extractfile(member) as f, target.open("wb") as g:
                        shutil.copyfileobj(f, g)
                    count += 1
    elif source.is_dir():
        for path in sorted(source.iterdir()):
            if path.is_file() and path.stem in truth:
                target = out / truth[path.stem] / path.name
                target.parent.mkdir(parents=True, exist_ok=True)
                if target.exists() or target.is_symlink():
                    target.unlink()
                if copy:
                    shutil.copy2(path, target)
                else:
                    target.symlink_to(path.resolve())
                count += 1
    else:
        raise DatasetError(f"{source} is neither a folder nor a .tar of the val images")
    if not count:
        raise DatasetError(f"no file in {source} has an entry in {labels}: is it the matching ground truth?")
    return count
