"""Find labelled images under a data root: folders per synset, the official flat val folder plus its ground
truth, or files named `<wnid>_*.JPEG`. Labels always come from the canonical 1000-synset list, never from
folder order. What cannot be used is kept in `skipped` with the reason, for the report."""

from __future__ import annotations

import errno
import os
import random
import stat
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from int8eval.data.class_labels import is_class_csv, read_class_csv
from int8eval.data.ground_truth import read_ground_truth
from int8eval.data.synsets import WNID, wnid_to_index
from int8eval.errors import ConfigError, DatasetError

UNLABELLED = -1  # Sample.label of an image without a label (labels-free runs)
UNLABELLED_LAYOUT = "unlabelled"
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


def is_image(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_SUFFIXES


def _why_not_a_file(entry: os.DirEntry) -> str | None:
    """Why a non-folder entry cannot be an image (None when it can). Decided from stat, before anything opens it:
    opening a FIFO or a device can block forever."""
    try:
        st = entry.stat()  # follows a symlink
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "symlink loop"
        return "broken symlink (its target does not exist)" if entry.is_symlink() else f"cannot read it ({e.strerror})"
    if not stat.S_ISREG(st.st_mode):
        kind = "a FIFO" if stat.S_ISFIFO(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode) else "a device"
        return f"not a regular file ({kind})"
    if st.st_size == 0:
        return "empty file (0 bytes)"
    return None


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()  # follows a symlink; a symlink loop raises instead of answering False
    except OSError:
        return False


def _scan(folder: str) -> list[os.DirEntry]:
    with os.scandir(folder) as it:
        return sorted(it, key=lambda e: e.name)


def reasons(skipped: list[dict], most: int = 3) -> str:
    """The commonest skip reasons with a count and an example: '2 x not an image file (e.g. a.txt); ...'."""
    counts = Counter(s["reason"] for s in skipped)
    first = {}
    for s in skipped:
        first.setdefault(s["reason"], s["path"])
    parts = [f"{n} x {r} (e.g. {first[r]})" for r, n in counts.most_common(most)]
    return "; ".join(parts) + ("; ..." if len(counts) > most else "")


def discover(root: Path, labels: Path | None = None, *, labels_free: bool = False,
             class_names: list[str] | None = None, num_classes: int | None = None) -> SampleSet:
    """List the labelled images under `root`.

    Args:
        root: a folder per synset (`n01440764/...`), or a flat folder of images.
        labels: ground truth for a flat folder (LOC_val_solution.csv, the devkit folder/tar, or its
            ground-truth txt with meta.mat beside it).
        labels_free: every image in `root` and in the folders in it, labelled UNLABELLED (layout "unlabelled"). A
            flat folder of images with no labels is read so without it, unless its files are named as the official
            ImageNet val folder's (then --labels was forgotten, and the error says so).
        class_names, num_classes: the label space of an `image,class` CSV given as `labels` (data.class_labels):
            its classes are names of `class_names` or indices below `num_classes`; its images, paths under `root`.

    Everything else is in `skipped` with its reason: hidden entries, anything that is not a regular file (never
    opened), empty files, folders inside a class folder (never taken as that class), non-images, and a file
    reachable twice (a link) after its first copy, or every copy when they sit in different class folders.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"data folder {root} does not exist or is not a folder")
    index = wnid_to_index()
    found: list[tuple[Sample, tuple[int, int]]] = []  # with the file's (device, inode), to find one file twice
    skipped: list[dict] = []
    dirs, files = [], []
    try:
        entries = _scan(root)
    except OSError as e:
        raise DatasetError(f"cannot list data folder {root}: {e.strerror}") from None

    def hidden(e: os.DirEntry, rel: str) -> bool:
        if e.name.startswith("."):
            skipped.append({"path": rel, "reason": "hidden (the name starts with '.')"})
        return e.name.startswith(".")

    def add(e: os.DirEntry, rel: str, wnid: str) -> None:
        st = e.stat()
        found.append((Sample(Path(e.path), index[wnid], rel), (st.st_dev, st.st_ino)))

    for e in entries:
        if hidden(e, e.name + ("/" if _is_dir(e) else "")):
            continue
        if _is_dir(e):
            dirs.append(e)
        elif why := _why_not_a_file(e):
            skipped.append({"path": e.name, "reason": why})
        else:
            files.append(e)

    if labels_free:
        return _unlabelled(root, dirs, files, skipped)
    if labels is not None and is_class_csv(labels):
        return _from_class_csv(root, labels, read_class_csv(labels, class_names, num_classes), skipped)
    if labels is not None:
        layout = "flat+ground-truth"
        truth = read_ground_truth(labels)  # every wnid in it is an ImageNet-1k synset
        for d in dirs:
            skipped.append({"path": d.name + "/", "reason": "folder (with --labels the images sit directly in the data folder)"})
        for e in files:
            stem = Path(e.name).stem
            if not is_image(e.name):
                skipped.append({"path": e.name, "reason": "not an image file"})
            elif stem not in truth:
                skipped.append({"path": e.name, "reason": f"no ground truth in {Path(labels).name}"})
            else:
                add(e, e.name, truth[stem])
    elif dirs:
        layout = "folder-per-synset"
        for d in dirs:
            if d.name not in index:
                why = "not an ImageNet-1k synset" if WNID.match(d.name) else "folder name is not a WordNet id"
                skipped.append({"path": d.name + "/", "reason": why})
                continue
            try:
                inside = _scan(d.path)
            except OSError as err:
                skipped.append({"path": d.name + "/", "reason": f"cannot list the folder ({err.strerror})"})
                continue
            before = len(found)
            for e in inside:
                rel = f"{d.name}/{e.name}"
                if hidden(e, rel + ("/" if _is_dir(e) else "")):
                    continue
                if _is_dir(e):
                    skipped.append({"path": rel + "/", "reason": f"folder inside a class folder (its images are not taken as {d.name})"})
                elif why := _why_not_a_file(e):
                    skipped.append({"path": rel, "reason": why})
                elif not is_image(e.name):
                    skipped.append({"path": rel, "reason": "not an image file"})
                else:
                    add(e, rel, d.name)
            if len(found) == before and not inside:
                skipped.append({"path": d.name + "/", "reason": "empty folder"})
        for e in files:
            skipped.append({"path": e.name, "reason": "file outside the synset folders"})
    else:
        layout = "wnid-prefixed files"
        unlabelled = []
        for e in files:
            wnid = e.name.split("_", 1)[0]
            if not is_image(e.name):
                skipped.append({"path": e.name, "reason": "not an image file"})
            elif wnid in index:
                add(e, e.name, wnid)
            else:
                unlabelled.append(e.name)
        if unlabelled and not found and not any(n.startswith("ILSVRC") for n in unlabelled):
            return _unlabelled(root, [], files, [s for s in skipped if s["reason"] != "not an image file"])
        if unlabelled and not found:
            raise DatasetError(
                f"{root} holds {len(unlabelled)} images but no synset folders and no ground truth: pass "
                "--labels LOC_val_solution.csv (or the devkit) for the official val folder, or run "
                "`int8eval data prepare` to sort it into folders per synset (or --labels-free to compare FP32 "
                "and INT8 answers without labels)"
            )
        skipped += [{"path": n, "reason": "file name does not start with a synset id"} for n in unlabelled]

    samples = _once_each(found, skipped)
    if not samples:
        what = f": {reasons(skipped)}" if skipped else ""
        raise DatasetError(f"no labelled images found under {root} ({layout} layout; {len(skipped)} entries skipped{what})")
    samples.sort(key=lambda s: s.id)
    return SampleSet(root, layout, samples, skipped)


def _from_class_csv(root: Path, labels: Path, truth: dict[str, int], skipped: list[dict]) -> SampleSet:
    """The images an `image,class` CSV lists, each a regular image file under `root`."""
    found: list[tuple[Sample, tuple[int, int]]] = []
    base = root.resolve()
    for image, label in truth.items():
        path = root / image
        inside = path.resolve().is_relative_to(base) and not Path(image).is_absolute()
        why = None if inside else "outside the data folder"
        if why is None and not path.is_file():
            why = "listed in the labels, but not a regular file under the data folder"
        if why is None and not is_image(path.name):
            why = "not an image file"
        if why is not None:
            skipped.append({"path": image, "reason": why})
            continue
        st = path.stat()
        found.append((Sample(path, label, Path(image).as_posix()), (st.st_dev, st.st_ino)))
    samples = _once_each(found, skipped)
    if not samples:
        raise DatasetError(f"none of the images {labels} lists is under {root} ({reasons(skipped)})")
    samples.sort(key=lambda s: s.id)
    return SampleSet(root, "image,class csv", samples, skipped)


def _unlabelled(root: Path, dirs: list[os.DirEntry], files: list[os.DirEntry], skipped: list[dict]) -> SampleSet:
    """Every image in `root` and in the folders directly in it, without labels (UNLABELLED)."""
    found: list[tuple[Sample, tuple[int, int]]] = []

    def take(e: os.DirEntry, rel: str) -> None:
        if e.name.startswith("."):
            skipped.append({"path": rel, "reason": "hidden (the name starts with '.')"})
        elif why := _why_not_a_file(e):
            skipped.append({"path": rel, "reason": why})
        elif not is_image(e.name):
            skipped.append({"path": rel, "reason": "not an image file"})
        else:
            st = e.stat()
            found.append((Sample(Path(e.path), UNLABELLED, rel), (st.st_dev, st.st_ino)))

    for e in files:
        take(e, e.name)
    for d in dirs:
        try:
            inside = _scan(d.path)
        except OSError as err:
            skipped.append({"path": d.name + "/", "reason": f"cannot list the folder ({err.strerror})"})
            continue
        for e in inside:
            if _is_dir(e):
                skipped.append({"path": f"{d.name}/{e.name}/", "reason": "folder two levels down (not read)"})
            else:
                take(e, f"{d.name}/{e.name}")
    samples = _once_each(found, skipped)
    if not samples:
        raise DatasetError(f"no images found under {root} ({len(skipped)} entries skipped: {reasons(skipped)})")
    samples.sort(key=lambda s: s.id)
    return SampleSet(root, UNLABELLED_LAYOUT, samples, skipped)


def _once_each(found: list[tuple[Sample, tuple[int, int]]], skipped: list[dict]) -> list[Sample]:
    """Each file once: a file reachable under two names (a symlink or hard link) would count twice, and under two
    class folders it has no single label."""
    by_file: dict[tuple[int, int], list[Sample]] = {}
    for sample, key in found:
        by_file.setdefault(key, []).append(sample)
    samples = []
    for copies in by_file.values():
        copies.sort(key=lambda s: s.id)
        if len({s.label for s in copies}) > 1:
            names = ", ".join(s.id for s in copies)
            skipped += [{"path": s.id, "reason": f"the same file is in several class folders ({names})"} for s in copies]
            continue
        samples.append(copies[0])
        skipped += [{"path": s.id, "reason": f"the same file as {copies[0].id}"} for s in copies[1:]]
    return samples


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


def split_training(
    samples: list[Sample], *, size: int = 300, seed: int = 0, train_root: Path | None = None
) -> tuple[list[Sample], list[Sample]]:
    """(training samples, the rest of `samples`): the rest is what may still be calibrated on or evaluated.

    Without `train_root` the training images are a seeded subset of `samples`; with another folder (not the one
    `samples` come from: pass None for that) they are a seeded subset of it, minus any file that is also in `samples`.
    """
    if size < 1:
        raise ConfigError(f"training set size must be at least 1, got {size}")
    eval_paths = {s.path.resolve() for s in samples}
    if train_root is not None:
        pool = [s for s in discover(train_root).samples if s.path.resolve() not in eval_paths]
        if not pool:
            raise DatasetError(f"--train-data {train_root} holds no images outside the evaluation set")
        chosen = pool if size >= len(pool) else [pool[i] for i in sorted(random.Random(seed).sample(range(len(pool)), size))]
        return chosen, samples
    if size >= len(samples):
        raise DatasetError(
            f"training on {size} of the {len(samples)} images leaves none to evaluate; lower the training set size "
            "or pass --train-data DIR"
        )
    # A different stream from the calibration split's, so the two subsets are not the same images.
    chosen = set(random.Random(f"train-{seed}").sample(range(len(samples)), size))
    return [s for i, s in enumerate(samples) if i in chosen], [s for i, s in enumerate(samples) if i not in chosen]


def split_tuning(samples: list[Sample], tune_size: int, confirm_size: int, seed: int) -> tuple[list[Sample], list[Sample]]:
    """(tuning samples, confirmation samples): two disjoint seeded subsets of `samples`, in their original order.
    `int8eval tune` chooses on the first and only confirms on the second."""
    if tune_size + confirm_size > len(samples):
        raise DatasetError(
            f"--tune-size {tune_size} and --confirm-size {confirm_size} need {tune_size + confirm_size} images, but "
            f"{len(samples)} are left after calibration (and training): lower them, or pass --confirm-data DIR"
        )
    # A stream of its own, so the sets do not depend on how the calibration split drew.
    chosen = random.Random(f"tune-{seed}").sample(range(len(samples)), tune_size + confirm_size)
    tuning, confirmation = set(chosen[:tune_size]), set(chosen[tune_size:])
    return ([s for i, s in enumerate(samples) if i in tuning], [s for i, s in enumerate(samples) if i in confirmation])
