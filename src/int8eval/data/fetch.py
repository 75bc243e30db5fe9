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
from int8eval.data.layouts import is_image
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
    dest.mkdir(parents=True, exist_ok=True)
    root = dest.resolve()
    with zipfile.ZipFile(io.BytesIO(payload)) as z:
        for info in z.infolist():
            name = Path(info.filename).name
            wnid = name.split("_", 1)[0]
            if info.is_dir() or not is_image(name) or wnid not in index:
                continue
            target = _target(root, wnid, name)  # under DEST, never through a link
            _in_the_way(target, want="file")
            _replace(target, lambda tmp: tmp.write_bytes(z.read(info)))
            count += 1
    if not count:
        raise DatasetError(f"{url} held no images named <wnid>_*.JPEG")
    return dest


def prepare(source: Path, labels: Path, out: Path, *, copy: bool = False) -> int:
    """Sort the official flat val folder (or ILSVRC2012_img_val.tar) into OUT/<wnid>/<file>.

    Files are symlinked from a folder (copied with copy=True) and extracted from a tar. Returns the count.
    Only image files with a ground-truth entry are used (from a tar: regular members only, never links or
    devices), every path written is checked to stay under OUT, and nothing is written through a link: an entry
    in the way that prepare would not replace (a symlink where a file goes, a file where a symlink goes) stops it
    with a message naming the entry.
    """
    truth = read_ground_truth(labels)
    source, out = Path(source), Path(out)
    if out.exists() and not out.is_dir():
        raise DatasetError(f"--out {out} is a file: give a folder (it is created if missing)")
    if not (source.is_dir() or (source.is_file() and source.name.endswith((".tar", ".tar.gz", ".tgz")))):
        raise DatasetError(f"{source} is neither a folder nor a .tar of the val images")
    try:
        out.mkdir(parents=True, exist_ok=True)
        root = out.resolve()
        if source.is_dir():
            count = _prepare_from_folder(source, truth, root, copy=copy)
        else:
            count = _prepare_from_tar(source, truth, root)
    except OSError as e:
        raise DatasetError(f"prepare into {out} failed on {e.filename or out}: {e.strerror or e}") from None
    if not count:
        raise DatasetError(f"no image file in {source} has an entry in {labels}: is it the matching ground truth?")
    return count


def _prepare_from_folder(source: Path, truth: dict[str, str], root: Path, *, copy: bool) -> int:
    count = 0
    for path in sorted(source.iterdir()):
        # stat follows a symlink; anything but a regular file (a FIFO, a device) is never opened.
        if not (is_image(path.name) and path.stem in truth and path.is_file()):
            continue
        target = _target(root, truth[path.stem], path.name)
        if os.path.lexists(target) and not target.is_symlink() and os.path.samefile(target, path):
            count += 1  # OUT/<wnid> is where the file already is
            continue
        if copy:
            _in_the_way(target, want="file")
            _replace(target, lambda tmp: shutil.copy2(path, tmp))
        else:
            _in_the_way(target, want="symlink")
            _replace(target, lambda tmp: os.symlink(path.resolve(), tmp))
        count += 1
    return count


def _prepare_from_tar(source: Path, truth: dict[str, str], root: Path) -> int:
    from int8eval.data.ground_truth import TAR_ERRORS, tar_error

    count, seen = 0, {}
    try:
        with tarfile.open(source) as tar:
            for member in tar:
                # Only the file name counts: a member's folders (../, absolute paths) never reach the target path.
                name = Path(member.name).name
                if not (member.isfile() and is_image(name) and Path(name).stem in truth):
                    continue
                if name in seen:
                    raise DatasetError(f"{source} holds {name} twice ({seen[name]} and {member.name}): which one is the image?")
                seen[name] = member.name
                target = _target(root, truth[Path(name).stem], name)
                _in_the_way(target, want="file")
                with tar.extractfile(member) as f:
                    _replace(target, lambda tmp: _write_stream(f, tmp))
                count += 1
    except TAR_ERRORS as e:
        if isinstance(e, OSError) and e.filename:  # a write failed, not the tar
            raise
        raise DatasetError(
            f"cannot read {source} ({tar_error(e)}) after {count} images: is the download complete?"
        ) from None
    return count


def _target(root: Path, wnid: str, name: str) -> Path:
    """ROOT/<wnid>/<name>, checked to stay inside ROOT (wnid is a synset, name a plain file name)."""
    folder = root / wnid
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        what = f"a symlink to {os.readlink(folder)}" if folder.is_symlink() else "a file"
        raise DatasetError(f"{folder} is {what}, not a folder: move it away or prepare into an empty --out")
    folder.mkdir(exist_ok=True)
    target = folder / name
    if name in ("", ".", "..") or target.name != name or Path(os.path.realpath(target.parent)) != folder:
        raise DatasetError(f"refusing to write {target}: it is not a file inside {root}")
    return target


def _in_the_way(target: Path, *, want: str) -> None:
    """Stop when `target` holds something prepare did not put there for this mode: writing would replace or go
    through it (a symlink from a folder prepare points at the user's source image)."""
    if target.is_symlink() and want == "file":
        raise DatasetError(
            f"{target} is a symlink to {os.readlink(target)} (from a `data prepare` of a folder?): prepare would "
            "replace the link where it should write a file; delete the folder's links or prepare into an empty --out"
        )
    if target.is_dir():
        raise DatasetError(f"{target} is a folder: move it away or prepare into an empty --out")
    if os.path.lexists(target) and not target.is_symlink() and want == "symlink":
        raise DatasetError(
            f"{target} is a file (from a tar or --copy prepare?): prepare would replace it with a link; "
            "delete it, pass --copy, or prepare into an empty --out"
        )


def _replace(target: Path, write) -> None:
    """Write through `write(tmp)` to a temporary name beside `target`, then rename it into place: an existing entry
    is replaced, never written through, and an interrupted prepare leaves no half-written image."""
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    if os.path.lexists(tmp):
        tmp.unlink()
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        if os.path.lexists(tmp):
            tmp.unlink()


def _write_stream(f, path: Path) -> None:
    with open(path, "xb") as g:
        shutil.copyfileobj(f, g)
