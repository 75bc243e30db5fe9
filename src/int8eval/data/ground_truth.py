"""Ground truth for the official flat val layout: LOC_val_solution.csv, or the devkit's
ILSVRC2012_validation_ground_truth.txt with its meta.mat (whose ILSVRC2012_IDs are not sorted-wnid order)."""

from __future__ import annotations

import csv
import io
import tarfile
from pathlib import Path

import numpy as np

from int8eval.errors import DatasetError

DEVKIT_GT = "ILSVRC2012_validation_ground_truth.txt"


def read_ground_truth(path: Path) -> dict[str, str]:
    """Map image file stem (e.g. `ILSVRC2012_val_00000001`) to wnid."""
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"ground-truth file {path} does not exist")
    if path.is_dir():
        return _from_devkit_dir(path)
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
        return _devkit_mapping(path.read_text(), meta.read_bytes(), str(path))
    raise DatasetError(
        f"unrecognised ground-truth file {path}: expected LOC_val_solution.csv, {DEVKIT_GT} (+ meta.mat), "
        "or the devkit folder/tar"
    )


def _from_loc_csv(path: Path) -> dict[str, str]:
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"ImageId", "PredictionString"} <= set(reader.fieldnames):
            raise DatasetError(f"{path} is not LOC_val_solution.csv: expected columns ImageId,PredictionString")
        return {row["ImageId"]: row["PredictionString"].split()[0] for row in reader}


def _from_devkit_dir(root: Path) -> dict[str, str]:
    for data_dir in (root / "data", root):
        gt, meta = data_dir / DEVKIT_GT, data_dir / "meta.mat"
        if gt.exists() and meta.exists():
            return _devkit_mapping(gt.read_text(), meta.read_bytes(), str(gt))
    raise DatasetError(f"{root} is not an ImageNet devkit folder: data/{DEVKIT_GT} and data/meta.mat not found")


def _from_devkit_tar(path: Path) -> dict[str, str]:
    with tarfile.open(path) as tar:
        members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
        if DEVKIT_GT not in members or "meta.mat" not in members:
            raise DatasetError(f"{path} does not contain {DEVKIT_GT} and meta.mat")
        gt = tar.extractfile(members[DEVKIT_GT]).read().decode()
        meta = tar.extractfile(members["meta.mat"]).read()
    return _devkit_mapping(gt, meta, str(path))


def _devkit_mapping(gt_text: str, meta_bytes: bytes, origin: str) -> dict[str, str]:
    from scipy.io import loadmat

    synsets = loadmat(io.BytesIO(meta_bytes), squeeze_me=True)["synsets"]
    # Leaf synsets (num_children == 0) are the 1000 classes; field order as in the devkit's meta.mat.
    id_to_wnid = {
        int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in np.atleast_1d(synsets) if int(s["num_children"]) == 0
    }
    mapping = {}
    for i, line in enumerate(gt_text.split(), start=1):
        class_id = int(line)
        if class_id not in id_to_wnid:
            raise DatasetError(f"{origin} line {i}: class id {class_id} is not a leaf synset in meta.mat")
        mapping[f"ILSVRC2012_val_{i:08d}"] = id_to_wnid[class_id]
    return mapping
