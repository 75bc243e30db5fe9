"""Ground truth for the official flat val layout: LOC_val_solution.csv, or the devkit's
ILSVRC2012_validation_ground_truth.txt with its meta.mat (whose ILSVRC2012_IDs are not sorted-wnid order).

Every class read is checked against the ImageNet-1k label space, and every problem is reported with the file and
line: a labels file is also what `data prepare` turns into folder names, so nothing unchecked may come out of it."""

from __future__ import annotations

import csv
import io
import stat
import tarfile
import zlib
from pathlib import Path

import numpy as np

from int8eval.data.synsets import WNID, wnid_to_index
from int8eval.errors import DatasetError

DEVKIT_GT = "ILSVRC2012_validation_ground_truth.txt"
# What a broken or truncated tar (or .tar.gz) raises while it is opened or read.
TAR_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error)


def read_ground_truth(path: Path) -> dict[str, str]:
    """Map image file stem (e.g. `ILSVRC2012_val_00000001`) to wnid.

    Each wnid is an ImageNet-1k synset and each stem a plain file name, or a DatasetError names the file and line.
    An image listed twice with different classes is an error naming both lines; listed twice with the same class
    it is accepted (the duplicate changes no number).
    """
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"ground-truth file {path} does not exist")
    if path.is_dir():
        return _from_devkit_dir(path)
    _check_regular(path)
    if path.suffix == ".csv":
        return _from_loc_csv(path)
    if path.name.endswith((".tar.gz", ".tgz", ".tar")):
        return _from_devkit_tar(path)
    if path.suffix == ".txt":
        meta = next((p for p in (path.with_name("meta.mat"), path.parent.parent / "data" / "meta.mat") if p.exists()), None)
        if meta is None:
            raise DatasetError(
                f"{path.name} holds ILSVRC2012 class ids, which need the devkit's meta.mat beside it to map to synsets; "
                f"pass the devkit folder or ILSVRC2012_devkit_t12.tar.gz instead, or LOC_val_solution.csv"
            )
        return _from_devkit_files(path, meta)
    raise DatasetError(
        f"unrecognised ground-truth file {path}: expected LOC_val_solution.csv, {DEVKIT_GT} (+ meta.mat), "
        "or the devkit folder/tar"
    )


def _check_regular(path: Path) -> None:
    # Opening a FIFO or a device for reading can block forever.
    if not stat.S_ISREG(path.stat().st_mode):
        raise DatasetError(f"ground-truth file {path} is not a regular file")


def _text(data: bytes, origin: str) -> str:
    """UTF-8 text (a byte-order mark is dropped), or an error naming the line with the first bad byte."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DatasetError(
            f"{origin} line {line} is not UTF-8 text (byte 0x{data[e.start]:02x}): save the file as UTF-8"
        ) from None


class _Mapping:
    """stem -> wnid, checking each entry and remembering where it came from, to name both lines of a conflict."""

    def __init__(self, origin: str) -> None:
        self.origin = origin
        self.wnids: dict[str, str] = {}
        self.lines: dict[str, int] = {}
        self.index = wnid_to_index()

    def add(self, stem: str, wnid: str, line: int) -> None:
        where = f"{self.origin} line {line}"
        if not stem or stem in (".", "..") or "/" in stem or "\\" in stem:
            raise DatasetError(f"{where}: image id {stem!r} is not a file name (e.g. ILSVRC2012_val_00000001)")
        if wnid not in self.index:
            what = "not an ImageNet-1k synset" if WNID.match(wnid) else "not a WordNet id (e.g. n01440764)"
            raise DatasetError(f"{where}: class {wnid!r} of {stem} is {what}")
        if stem in self.wnids and self.wnids[stem] != wnid:
            raise DatasetError(
                f"{where}: {stem} is {wnid}, but line {self.lines[stem]} says {self.wnids[stem]}: "
                "keep the right one of the two lines"
            )
        self.wnids.setdefault(stem, wnid)
        self.lines.setdefault(stem, line)


def _from_loc_csv(path: Path) -> dict[str, str]:
    from int8eval.data.layouts import IMAGE_SUFFIXES  # not at the top: layouts imports this module
    text = _text(path.read_bytes(), str(path))
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)  # an open quote would swallow the lines after it
    try:
        header = [h.strip() for h in next(reader, [])]
        if not {"ImageId", "PredictionString"} <= set(header):
            raise DatasetError(f"{path} is not LOC_val_solution.csv: expected columns ImageId,PredictionString")
        id_col, pred_col = header.index("ImageId"), header.index("PredictionString")
        mapping = _Mapping(str(path))
        for row in reader:
            line = reader.line_num
            if not row or not "".join(row).strip():
                continue  # blank line
            if len(row) <= max(id_col, pred_col):
                raise DatasetError(f"{path} line {line}: {len(row)} fields, expected ImageId,PredictionString")
            stem, tokens = row[id_col].strip(), row[pred_col].split()
            if Path(stem).suffix.lower() in IMAGE_SUFFIXES:  # the file name, not its stem: as clear
                stem = Path(stem).stem
            if not tokens:
                raise DatasetError(f"{path} line {line}: {stem} has an empty PredictionString (expected 'WNID x y x y ...')")
            # Every box of an image is of its class: boxes of two classes leave the label ambiguous.
            classes = list(dict.fromkeys(t for t in tokens if WNID.match(t)))
            if len(classes) > 1:
                raise DatasetError(f"{path} line {line}: {stem} has boxes of several classes ({', '.join(classes)})")
            mapping.add(stem, tokens[0], line)
    except csv.Error as e:
        raise DatasetError(f"{path} line {reader.line_num}: not valid CSV ({e})") from None
    return mapping.wnids


def _from_devkit_dir(root: Path) -> dict[str, str]:
    for data_dir in (root / "data", root):
        gt, meta = data_dir / DEVKIT_GT, data_dir / "meta.mat"
        if gt.exists() and meta.exists():
            return _from_devkit_files(gt, meta)
    raise DatasetError(f"{root} is not an ImageNet devkit folder: data/{DEVKIT_GT} and data/meta.mat not found")


def _from_devkit_files(gt: Path, meta: Path) -> dict[str, str]:
    for p in (gt, meta):
        _check_regular(p)
    return _devkit_mapping(gt.read_bytes(), meta.read_bytes(), str(gt), str(meta))


def _from_devkit_tar(path: Path) -> dict[str, str]:
    try:
        with tarfile.open(path) as tar:
            members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
            if DEVKIT_GT not in members or "meta.mat" not in members:
                raise DatasetError(f"{path} does not contain {DEVKIT_GT} and meta.mat")
            gt = tar.extractfile(members[DEVKIT_GT]).read()
            meta = tar.extractfile(members["meta.mat"]).read()
    except TAR_ERRORS as e:
        raise DatasetError(f"cannot read {path} ({tar_error(e)}): is it the complete ILSVRC2012_devkit_t12.tar.gz?") from None
    return _devkit_mapping(gt, meta, f"{path}:{DEVKIT_GT}", f"{path}:meta.mat")


def tar_error(e: BaseException) -> str:
    """A one-line reason for a tarfile failure (tarfile.open lists one line per compression it tried)."""
    lines = [ln.strip(" -") for ln in str(e).splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[-1] if lines else 'truncated or not a tar archive'}"


def _leaf_synsets(meta_bytes: bytes, origin: str) -> dict[int, str]:
    """ILSVRC2012_ID -> wnid of the leaf synsets (num_children == 0): the 1000 classes."""
    from scipy.io import loadmat

    try:
        synsets = loadmat(io.BytesIO(meta_bytes), squeeze_me=True)["synsets"]
        # Field order as in the devkit's meta.mat.
        return {
            int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in np.atleast_1d(synsets) if int(s["num_children"]) == 0
        }
    except Exception as e:  # noqa: BLE001 - scipy raises many types for a file that is not the devkit's meta.mat
        reason = "no 'synsets' table" if isinstance(e, KeyError) else f"{type(e).__name__}: {e}"
        raise DatasetError(f"cannot read {origin} ({reason}): pass the devkit's own data/meta.mat") from None


def _devkit_mapping(gt_bytes: bytes, meta_bytes: bytes, origin: str, meta_origin: str) -> dict[str, str]:
    id_to_wnid = _leaf_synsets(meta_bytes, meta_origin)
    lines = _text(gt_bytes, origin).splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    mapping = _Mapping(origin)
    for i, line in enumerate(lines, start=1):
        # Line i is the class of ILSVRC2012_val_<i>: a blank or extra line would shift every label after it.
        try:
            class_id = int(line.strip())
        except ValueError:
            raise DatasetError(
                f"{origin} line {i}: {line.strip()!r} is not a class id (one integer per line, for val images 1, 2, ...)"
            ) from None
        if class_id not in id_to_wnid:
            raise DatasetError(f"{origin} line {i}: class id {class_id} is not a leaf synset in meta.mat")
        wnid = id_to_wnid[class_id]
        if wnid not in mapping.index:
            raise DatasetError(f"{origin} line {i}: class id {class_id} is {wnid!r} in {meta_origin}, not an ImageNet-1k synset")
        mapping.add(f"ILSVRC2012_val_{i:08d}", wnid, i)
    return mapping.wnids
