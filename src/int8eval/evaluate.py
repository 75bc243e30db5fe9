"""The engine: one pass over the images, each decoded once and fed to every variant; per-image predictions kept."""

from __future__ import annotations

import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from rich.progress import Progress

from int8eval.backends import Variant
from int8eval.config import OnBadImage, Preprocessing
from int8eval.data.decode import Batch, batches, prefetched
from int8eval.data.layouts import Sample
from int8eval.errors import DatasetError, ModelLoadError, RunFolderError

if TYPE_CHECKING:  # only annotated here: int8eval.resume reaches int8eval.report, which imports much
    from int8eval.resume import EvalCheckpoint

TOPK = 5
NUM_CLASSES = 1000  # ImageNet-1k: class index = position in the synset list


@dataclass
class Predictions:
    """Per-image results: the true label and each variant's top-5; for non-reference variants, the KL divergence
    and cosine similarity of their logits to the reference's (so logits need not be stored)."""

    image_ids: list[str]
    labels: np.ndarray
    top5: dict[str, np.ndarray]
    kl_to_ref: dict[str, np.ndarray] = field(default_factory=dict)
    cos_to_ref: dict[str, np.ndarray] = field(default_factory=dict)

    def top1(self, name: str) -> np.ndarray:
        return self.top5[name][:, 0]

    def correct1(self, name: str) -> np.ndarray:
        return self.top1(name) == self.labels

    def correct5(self, name: str) -> np.ndarray:
        return (self.top5[name] == self.labels[:, None]).any(axis=1)

    def save(self, path: Path) -> None:
        arrays = {"image_ids": np.asarray(self.image_ids), "labels": self.labels}
        for prefix, table in (("top5", self.top5), ("kl", self.kl_to_ref), ("cos", self.cos_to_ref)):
            arrays |= {f"{prefix}::{name}": a for name, a in table.items()}
        from int8eval.report.folder import write_atomic  # not at the top: int8eval.report imports much

        write_atomic(Path(path), lambda f: np.savez_compressed(f, **arrays))  # never a truncated file

    @classmethod
    def load(cls, path: Path) -> Predictions:
        """Read predictions.npz; a RunFolderError when it is missing, truncated or not a predictions file."""
        try:
            with np.load(path) as z:  # allow_pickle stays False: nothing in the file can run code
                tables: dict[str, dict[str, np.ndarray]] = {"top5": {}, "kl": {}, "cos": {}}
                for key in z.files:
                    if "::" in key:
                        prefix, name = key.split("::", 1)
                        tables[prefix][name] = z[key]
                preds = cls(list(z["image_ids"]), z["labels"], tables["top5"], tables["kl"], tables["cos"])
        except FileNotFoundError as e:
            raise RunFolderError(f"{path} is missing: paired statistics need the per-image predictions of a run") from e
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
            raise RunFolderError(f"{path} cannot be read ({type(e).__name__}: {e}): it is truncated or not a "
                                 "predictions file; re-run to write it again") from e
        n = len(preds.labels)
        bad = [name for name, a in preds.top5.items() if a.ndim != 2 or len(a) != n]
        if preds.labels.ndim != 1 or len(preds.image_ids) != n or bad:
            raise RunFolderError(f"{path} is inconsistent: {n} labels, {len(preds.image_ids)} image ids, "
                                 f"top-5 tables of another length: {bad}")
        return preds


def _state(done: int, live, errors, nonfinite, predict_s, lists, kept, skipped) -> tuple[dict, dict[str, np.ndarray]]:
    """The pass after `done` images, as (JSON-able meta, arrays) for a checkpoint."""
    meta = {"done": done, "live": list(live), "errors": errors, "nonfinite": nonfinite, "predict_s": predict_s,
            "skipped": skipped}
    arrays = {f"{kind}::{name}": np.concatenate(a) for kind, table in lists.items() for name, a in table.items() if a}
    if kept:
        arrays["kept"] = np.concatenate(kept)
    return meta, arrays


def _top5(logits: np.ndarray) -> np.ndarray:
    """Each row's 5 best classes, best first; ties broken by class index (a stable sort)."""
    return np.argsort(-logits, axis=1, kind="stable")[:, :TOPK].astype(np.int16)


def predict_batch(variant: Variant, images: np.ndarray, batch_size: int) -> np.ndarray:
    """`variant`'s logits of one batch of the pass. A short batch (the last, or one with unreadable images) is padded
    with zeros to `batch_size` for a variant compiled for static shapes (`Variant.static_shapes`), which would
    otherwise compile again for it (measured: 7 s for EfficientNet-Lite0's PT2E INT8 on 2 cores, once per run); in
    eval mode rows are independent, so the padding changes no other row's logits."""
    n = len(images)
    if 0 < n < batch_size and getattr(variant, "static_shapes", False):  # duck-typed variants have none
        padded = np.concatenate([images, np.zeros((batch_size - n, *images.shape[1:]), images.dtype)])
        return np.asarray(variant.predict(padded), dtype=np.float32)[:n]
    return np.asarray(variant.predict(images), dtype=np.float32)


def _replay(saved: dict, first: list[Sample], preprocessing: Preprocessing, live: dict[str, Variant],
            reference: str | None, batch_size: int) -> list[str]:
    """The variants whose predictions on the first batch differ from the checkpoint's: rebuilt models must give the
    saved numbers exactly before the rest of a pass is added to them."""
    batch = next(iter(batches(first, preprocessing, batch_size=len(first), workers=0)))
    rows = len(batch.indices)
    arrays, logits = saved["arrays"], {}
    for name in saved["meta"]["live"]:
        if name in live:
            try:
                logits[name] = predict_batch(live[name], batch.images, batch_size)
            except Exception:  # noqa: BLE001 - it fails now where it did not: it differs
                logits[name] = None
    changed = [n for n, x in logits.items() if x is None or not np.array_equal(
        _top5(x), arrays.get(f"top5::{n}", [])[:rows])]
    if reference in logits and logits[reference] is not None and reference not in changed:
        ref = _RefStats.of(logits[reference])
        for name, x in logits.items():
            if name != reference and name not in changed:
                k, c = _kl_and_cosine(ref, x)
                if not (np.array_equal(k, arrays[f"kl::{name}"][:rows]) and np.array_equal(c, arrays[f"cos::{name}"][:rows])):
                    changed.append(name)
    return changed


def _restore(saved: dict, live, errors, nonfinite, predict_s, lists, kept, skipped, total: int) -> int:
    """Put a checkpoint's state into the pass's accumulators; returns how many images it covered. A checkpoint of
    other variants (names) is a programming error: its key should have differed."""
    meta, arrays = saved["meta"], saved["arrays"]
    if set(meta["live"]) - set(live) or set(meta["nonfinite"]) != set(nonfinite) or not 0 < meta["done"] <= total:
        raise ValueError(f"the checkpoint is of other variants or images: {sorted(meta['nonfinite'])}")
    for name in set(live) - set(meta["live"]):
        del live[name]  # failed before the interruption: stays failed
    errors.update(meta["errors"])
    nonfinite.update(meta["nonfinite"])
    predict_s.update(meta["predict_s"])
    skipped += meta["skipped"]
    for key, a in arrays.items():
        if key == "kept":
            kept.append(a)
        else:
            kind, name = key.split("::", 1)
            lists[kind][name].append(a)
    return int(meta["done"])


def decode_set(samples: list[Sample], preprocessing: Preprocessing, *, batch_size: int, workers: int) -> list[Batch]:
    """Every batch of `samples` decoded and kept in memory, for `evaluate(..., decoded=...)`: a set evaluated many
    times (tune's tuning and confirmation images) is decoded once."""
    return list(batches(samples, preprocessing, batch_size=batch_size, workers=workers))


class Remembered(Variant):
    """`variant` whose logits are computed once per batch array and then remembered: the FP32 reference evaluated
    again on the same `decode_set` batches gives the same logits without running again. Keyed by the array object
    itself (kept alive here, so its id cannot be reused), never by its values."""

    def __init__(self, variant: Variant) -> None:
        super().__init__(variant.recipe)
        self.variant, self.artifact, self.details = variant, variant.artifact, variant.details
        self._seen: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    @property
    def name(self) -> str:
        return self.variant.name

    def predict(self, images: np.ndarray) -> np.ndarray:
        seen = self._seen.get(id(images))
        if seen is not None and seen[0] is images:
            return seen[1]
        logits = np.asarray(self.variant.predict(images), dtype=np.float32)
        self._seen[id(images)] = (images, logits)
        return logits


@dataclass
class EvalOutcome:
    predictions: Predictions
    skipped: list[dict]  # {"path", "reason"} for images that could not be decoded
    errors: dict[str, str]  # variant name -> error message (that variant stopped; the others went on)
    seconds: float
    predict_s: dict[str, float]  # time each variant spent in predict(), data loading excluded
    wait_s: float = 0.0  # time spent waiting for decoded images


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


@dataclass
class _RefStats:
    """What KL and cosine need of the reference's logits for one batch, computed once for every variant."""

    logits: np.ndarray  # float64
    log_p: np.ndarray  # log-softmax
    p: np.ndarray  # softmax
    norm: np.ndarray  # L2 norm per image

    @classmethod
    def of(cls, ref: np.ndarray) -> _RefStats:
        r, lp = ref.astype(np.float64), _log_softmax(ref)
        return cls(r, lp, np.exp(lp), np.linalg.norm(r, axis=1))


def _kl_and_cosine(ref: _RefStats, other: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    lq = _log_softmax(other)
    kl = (ref.p * (ref.log_p - lq)).sum(axis=1)
    o = other.astype(np.float64)
    cos = (ref.logits * o).sum(axis=1) / np.maximum(ref.norm * np.linalg.norm(o, axis=1), 1e-12)
    return kl.astype(np.float32), cos.astype(np.float32)


def evaluate(
    samples: list[Sample],
    preprocessing: Preprocessing,
    variants: list[Variant],
    *,
    reference: str | None = None,
    batch_size: int = 32,
    workers: int = 0,
    on_bad_image: OnBadImage = OnBadImage.skip,
    progress: Progress | None = None,
    decoded: Sequence[Batch] | None = None,
    checkpoint: EvalCheckpoint | None = None,
    num_classes: int | None = NUM_CLASSES,
) -> EvalOutcome:
    """Run every variant on every image in one pass.

    Args:
        samples: the evaluation images with their labels.
        preprocessing: the model's own; each image is decoded and preprocessed once.
        variants: built variants; one that raises is recorded in `errors` and dropped, the others go on.
        reference: name of the FP32 reference variant, against which KL and cosine are computed.
        decoded: the batches of `samples` already decoded (`decode_set`), for a set evaluated many times.
        checkpoint: where the pass so far is saved every `checkpoint.every` images and, when saved before, resumed
            from (`int8eval.resume`): the same batches, so the same predictions as an uninterrupted pass.
        num_classes: the classes every variant's logits must score (the model's, `LoadedModel.num_classes`); None
            takes the first variant's.
    """
    if not samples:
        raise DatasetError("no images to evaluate: every image found was used for calibration or training")
    if checkpoint is not None and (decoded is not None or checkpoint.every % batch_size):
        raise ValueError("a checkpoint needs batches decoded here, every `checkpoint.every` images a whole number of "
                         f"batches (every={checkpoint.every}, batch_size={batch_size})")
    start = time.perf_counter()
    live = {v.name: v for v in variants}
    errors: dict[str, str] = {}
    nonfinite = {name: 0 for name in live}  # images whose logits hold a NaN or inf: such a variant is never ranked
    predict_s = {name: 0.0 for name in live}
    top5: dict[str, list[np.ndarray]] = {name: [] for name in live}
    kl: dict[str, list[np.ndarray]] = {name: [] for name in live if name != reference}
    cos: dict[str, list[np.ndarray]] = {name: [] for name in live if name != reference}
    kept: list[np.ndarray] = []
    skipped: list[dict] = []
    task = progress.add_task("evaluating", total=len(samples)) if progress else None
    lists = {"top5": top5, "kl": kl, "cos": cos}
    done = 0
    wait_s = 0.0  # time the pass waited for decoded images (what decoding ahead did not hide)
    if checkpoint is not None and (saved := checkpoint.load()) is not None:
        changed = _replay(saved, samples[:batch_size], preprocessing, live, reference, batch_size)
        if changed:
            checkpoint.say(f"--resume: {', '.join(changed)} now predict the first images otherwise than in the "
                           "interrupted run (built otherwise?), so evaluating from the first image")
        else:
            done = _restore(saved, live, errors, nonfinite, predict_s, lists, kept, skipped, len(samples))
        if progress is not None:
            progress.update(task, advance=done)

    offset = done  # the first image after the checkpoint
    # Decoded ahead in a thread (worker processes, when asked for, already decode ahead), so it overlaps inference.
    source = decoded if decoded is not None else prefetched(batches(samples[offset:], preprocessing,
                                                                     batch_size=batch_size, workers=workers))
    waited = time.perf_counter()
    for batch in source:
        wait_s += time.perf_counter() - waited
        if offset:  # positions in samples[offset:] -> positions in samples
            batch = Batch(batch.indices + offset, batch.labels, batch.images, [(i + offset, r) for i, r in batch.bad])
        for i, reason in batch.bad:
            if on_bad_image is OnBadImage.fail:
                raise DatasetError(f"cannot read {samples[i].path}: {reason} (use --on-bad-image skip to go on)")
            skipped.append({"path": samples[i].id, "reason": reason})
        if len(batch.indices):
            logits: dict[str, np.ndarray] = {}
            for name, variant in list(live.items()):
                t = time.perf_counter()
                try:
                    out = predict_batch(variant, batch.images, batch_size)
                    if out.ndim != 2 or out.shape[0] != len(batch.images) or out.shape[1] != (num_classes or out.shape[1]):
                        raise ValueError(f"logits of shape {list(out.shape)} for {len(batch.images)} images; "
                                         f"the label space has {num_classes} classes")  # e.g. 1001 with a background
                    num_classes = out.shape[1]  # the first variant's, when the model leaves it open
                except Exception as e:  # noqa: BLE001 - a failing variant must not stop the others
                    errors[name] = f"{type(e).__name__}: {e}"
                    del live[name]
                    continue
                predict_s[name] += time.perf_counter() - t
                bad = int((~np.isfinite(out)).any(axis=1).sum())
                if bad and name == reference:
                    first = samples[batch.indices[~np.isfinite(out).all(axis=1)][0]].id
                    raise ModelLoadError(
                        f"the reference {name} gave non-finite logits (NaN or inf) for {bad} of {len(out)} images "
                        f"(first: {first}): its weights are broken, so nothing can be compared with it"
                    )
                nonfinite[name] += bad
                logits[name] = out
                top5[name].append(_top5(out))
            if reference in logits:
                ref_stats = _RefStats.of(logits[reference])
                for name in kl:
                    if name in logits:
                        k, c = _kl_and_cosine(ref_stats, logits[name])
                        kl[name].append(k)
                        cos[name].append(c)
            kept.append(batch.indices)
        if progress is not None:
            progress.update(task, advance=len(batch.indices) + len(batch.bad))
        if checkpoint is not None:
            n = int(max([*batch.indices, *(i for i, _ in batch.bad)])) + 1
            if n // checkpoint.every > done // checkpoint.every or n == len(samples):
                checkpoint.save(*_state(n, live, errors, nonfinite, predict_s, lists, kept, skipped))
            done = n
        waited = time.perf_counter()

    if not kept:
        raise DatasetError(f"none of the {len(samples)} images could be read (first: {skipped[0]['reason']})")
    order = np.concatenate(kept)
    for name, bad in nonfinite.items():
        if bad and name in live:
            errors[name] = f"non-finite logits (NaN or inf) for {bad} of {len(order)} images: not ranked"
            del live[name]
    predictions = Predictions(
        image_ids=[samples[i].id for i in order],
        labels=np.asarray([samples[i].label for i in order], dtype=np.int64),
        top5={n: np.concatenate(a) for n, a in top5.items() if n in live},
        kl_to_ref={n: np.concatenate(a) for n, a in kl.items() if n in live and a},
        cos_to_ref={n: np.concatenate(a) for n, a in cos.items() if n in live and a},
    )
    return EvalOutcome(predictions, skipped, errors, time.perf_counter() - start, predict_s, wait_s)
