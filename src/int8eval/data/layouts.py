"""Find labelled images under a data root: folders per synset, the official flat val folder plus its ground
truth, or files named `<wnid>_*.JPEG`. Labels always come from the canonical 1000-synset list, never from
folder order. What cannot be used is kept in `skipped` with the reason, for the report."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from pathlib import Path

from int8eval.data.ground_truth import read_ground_truth
from int8eval.data.synsets import WNID, wnid_to_index
from int8eval.errors import DatasetError

IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int
    id: str  # path relative to the data root, POSIX style: stable across machines


@dataclass
class SampleSet:
    root: Path
    layout: str
    samples: list[Sample]
    skipped: list[dict] = field(default_factory=list)  # {"path", "reason"}

    def __len__(self) -> int:
        return len(self.samples)


def _is_image(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_SUFFIXES


def discover(root: Path, labels: Path | None = None) -> SampleSet:
    """List the labelled images under `root`.

    Args:
        root: a folder per synset (`n01440764/...`), or a flat folder of images.
        labels: ground truth for a flat folder (LOC_val_solution.csv, the devkit folder/tar, or its
            ground-truth txt with meta.mat beside it).
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"data folder {root} does not exist or is not a folder")
    index = wnid_to_index()
    samples: list[Sample] = []
    skipped: list[dict] = []
    entries = sorted(os.scandir(root), key=lambda e: e.name)
    dirs = [e for e in entries if e.is_dir() and not e.name.startswith(".")]
    files = [e for e in entries if e.is_file() and not e.name.startswith(".")]

    if labels is not None:
        layout = "flat+ground-truth"
        truth = read_ground_truth(labels)
        for e in files:
            stem = Path(e.name).stem
            if not _is_image(e.name):
                skipped.append({"path": e.name, "reason": "not an image file"})
            elif stem not in truth:
                skipped.append({"path": e.name, "reason": f"no ground truth in {Path(labels).name}"})
            elif truth[stem] not in index:
                skipped.append({"path": e.name, "reason": f"ground truth {truth[stem]} is not an ImageNet-1k synset"})
            else:
                samples.append(Sample(Path(e.path), index[truth[stem]], e.name))
    elif dirs:
        layout = "folder-per-synset"
        for d in dirs:
            if d.name not in index:
                why = "not an ImageNet-1k synset" if WNID.match(d.name) else "folder name is not a WordNet id"
                skipped.append({"path": d.name + "/", "reason": why})
                continue
            found = 0
            for dirpath, _, names in os.walk(d.path):
                for name in sorted(names):
                    rel = Path(dirpath, name).relative_to(root).as_posix()
                    if name.startswith("."):
                        continue
                    if not _is_image(name):
                        skipped.append({"path": rel, "reason": "not an image file"})
                        continue
                    samples.append(Sample(Path(dirpath, name), index[d.name], rel))
                    found += 1
            if not found:
                skipped.append({"path": d.name + "/", "reason": "empty folder"})
        for e in files:
            skipped.append({"path": e.name, "reason": "file outside the synset folders"})
    else:
        layout = "wnid-prefixed files"
        unlabelled = []
        for e in files:
            wnid = e.name.split("_", 1)[0]
            if not _is_image(e.name):
                skipped.append({"path": e.name, "reason": "not an image file"})
            elif wnid in index:
                samples.append(Sample(Path(e.path), index[wnid], e.name))
            else:
                unlabelled.append(e.name)
        if unlabelled and not samples:
            raise DatasetError(
                f"{root} holds {len(unlabelled)} images but no synset folders and no ground truth: pass "
                "--labels LOC_val_solution.csv (or the devkit) for the official val folder, or run "
                "`int8eval data prepare` to sort it into folders per synset"
            )
        skipped += [{"path": n, "reason": "file name does not start with a synset id"} for n in unlabelled]

    if not samples:
        raise DatasetError(f"no labelled images found under {root} ({len(skipped)} entries skipped)")
    samples.sort(key=lambda s: s.id)
    return SampleSet(root, layout, samples, skipped)


def split(samples: list[Sample], calib_size: int, seed: int) -> tuple[list[Sample], list[Sample]]:
    """A seeded calibration subset and the disjoint rest for evaluation."""
    if calib_size >= len(samples):
        raise DatasetError(
            f"--calib-size {calib_size} leaves no images to evaluate ({len(samples)} found); "
            "lower it or pass --calib-data DIR"
        )
    chosen = set(random.Random(seed).sample(range(len(samples)), calib_size))
    calib = [s for i, s in enumerate(samples) if i in chosen]
    rest = [s for i, s in enumerate(samples) if i not in chosen]
    return calib, rest


def subsample(samples: list[Sample], n: int | None, seed: int) -> list[Sample]:
    """A seeded subset of `n` samples (all of them when n is None or larger), in the original order."""
    if n is None or n >= len(samples):
        return samples
    keep = set(random.Random(seed + 1).sample(range(len(samples)), n))
    return [s for i, s in enumerate(samples) if i in keep]
