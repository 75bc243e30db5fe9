"""The fast ranking: the sweep's default criterion (mean KL to the FP32 logits when only a layer is INT8) without the
rest of the sweep. Only the "only this layer" runs, each finishing from the shared FP32 prefix; no all-but,
weight-only or activation-only runs, no SQNR hooks, no ONNX export; by default FAST_IMAGES images; images in
channels-last memory, which PyTorch's CPU convolutions run about 1.5x faster; and calibration in one FP32 pass whose
bias correction measures each batch's summed images. The last two move the numbers by float rounding only, so the
ranking can differ from the full sweep's on the same images only between layers whose KLs are that close.

benchmarks/bench_sensitivity.py measures what it costs against the full `diagnose` and how its ranking compares
(rank correlation, top-k overlap, and the agreement with FP32 of the model with its top layers kept in FP32, on other
images). The tuner ranks with it; `int8eval diagnose --fast` writes it as the sensitivity section.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import asdict

import numpy as np
import torch
from torch import nn

from int8eval.config import Recipe
from int8eval.diagnose.fakequant import FakeQuantModel, FakeQuantSpec
from int8eval.diagnose.sweep import (
    RANK_LABELS,
    EvalImages,
    Tallies,
    Tally,
    as_batches,
    layer_entry,
    per_layer_runs,
    rank,
    sweep_modes,
    swept_layers,
)

# Images the fast ranking runs on by default: half the full sweep's 64 (see benchmarks/bench_sensitivity.py).
FAST_IMAGES = 32
FAST_LABEL = RANK_LABELS["kl"] + " (fast ranking: only-this-layer runs, no all-but, split-effect or SQNR runs)"
_NOT_FOLDED = " (model did not trace: BatchNorm NOT folded)"
_ONLY = [mode for mode in sweep_modes(split_effects=False) if mode[0] == "only"]


def _channels_last(batches: list[torch.Tensor]) -> list[torch.Tensor]:
    return [b.contiguous(memory_format=torch.channels_last) if b.dim() == 4 else b for b in batches]


def fast_fake_quant(module: nn.Module, spec: FakeQuantSpec | Recipe, calib: Iterable,
                    batch_size: int = 32) -> FakeQuantModel:
    """`module` as a FakeQuantModel calibrated on `calib` as the fast ranking calibrates: channels-last batches, the
    bias correction's error measured on each batch's summed images (`FakeQuantModel.calibrate(summed_errors=True)`)."""
    fq = FakeQuantModel(module, FakeQuantSpec.from_recipe(spec) if isinstance(spec, Recipe) else spec)
    fq.calibrate(_channels_last(as_batches(list(calib), batch_size)), summed_errors=True)
    return fq


def _calibrated(module: nn.Module, spec: FakeQuantSpec | Recipe, calib: Iterable, batch_size: int,
                fq: FakeQuantModel | None) -> tuple[FakeQuantModel, int]:
    """(`fq`, or `module` as a FakeQuantModel calibrated on `calib`; the number of calibration images)."""
    calib = list(calib)
    if fq is None:
        fq = fast_fake_quant(module, spec, calib, batch_size)
    return fq, sum(len(b) for b in as_batches(calib, batch_size))


def _fast_sweep(fq: FakeQuantModel, swept: list[str], images: EvalImages, with_labels: bool,
                progress) -> tuple[list[dict], list[str], Tally, bool]:
    """The FP32 reference (into `images.ref_logp`) and the "only this layer INT8" run of every swept layer: (their
    entries, the ranking, the reference's tally, whether the prefixes were cached)."""
    images.batches = _channels_last(images.batches)
    reference = Tally()
    fq.configure()
    for b, x in enumerate(images.batches):
        logits = fq(x)
        images.ref_logp.append(torch.log_softmax(logits.double(), dim=1))
        reference.add(images.ref_logp[b], logits, images.label(b))
    tallies = Tallies()
    prefix_cached = per_layer_runs(fq, swept, _ONLY, images, tallies, progress)
    entries = [layer_entry(fq, name, _ONLY, tallies, None, with_labels) for name in swept]
    return entries, rank(entries, "kl"), reference, prefix_cached


def fast_ranking(
    module: nn.Module,
    spec: FakeQuantSpec | Recipe,
    calib_batches: Iterable,
    images,
    *,
    batch_size: int = 32,
    layers: Iterable[str] | None = None,
    fq: FakeQuantModel | None = None,
    progress=None,
) -> list[str]:
    """Conv/Linear layers of `module` (module paths), most sensitive first by the mean KL to the FP32 logits when only
    that layer is fake INT8: the order `diagnose` ranks by default, at a fraction of its cost.

    Args:
        module: a PyTorch model, FP32, eval mode (not modified; a folded copy is quantized).
        spec: a FakeQuantSpec, or an int8eval Recipe (minmax/percentile, per-channel or per-tensor).
        calib_batches: calibration images (arrays or tensors, [N, 3, H, W]); unused when `fq` is given.
        images: the images to rank on (one array or tensor, or batches); FAST_IMAGES of them rank as the full sweep.
        layers: rank only these layers (default: every quantizable layer, each once).
        fq: `module` as a FakeQuantModel with `spec`, already calibrated (reused: calibration costs a few forwards);
            default: `fast_fake_quant(module, spec, calib_batches, batch_size)`.
    """
    fq, _ = _calibrated(module, spec, calib_batches, batch_size, fq)
    swept = swept_layers(fq.names, layers)
    evaluation = EvalImages.of(images, None, batch_size)
    return _fast_sweep(fq, swept, evaluation, False, progress)[1]


def fast_diagnose(
    model: nn.Module,
    spec: FakeQuantSpec | Recipe,
    calib: Iterable,
    eval_images,
    *,
    labels: np.ndarray | None = None,
    top_k: int = 5,
    layers: Iterable[str] | None = None,
    batch_size: int = 32,
    progress=None,
    fq: FakeQuantModel | None = None,
) -> dict:
    """`diagnose`'s result from the fast ranking: the same keys the sensitivity section reads (per-layer "only this
    layer" tallies, the ranking, the top-k, every layer INT8 and the top-k kept in FP32), with `sweep` = "fast";
    no all-but, weight-only, activation-only, SQNR or ONNX-name results. Arguments as `diagnose`'s."""
    start_time = time.perf_counter()
    fq, num_calib = _calibrated(model, spec, calib, batch_size, fq)
    names = fq.names
    swept = swept_layers(names, layers)
    images = EvalImages.of(eval_images, labels, batch_size)
    with_labels = labels is not None
    entries, ranking, reference, prefix_cached = _fast_sweep(fq, swept, images, with_labels, progress)
    top = ranking[:top_k]

    every = set(names)
    whole, keep = Tally(), Tally()  # every layer INT8; the top-k kept in FP32
    for b, x in enumerate(images.batches):
        for tally, kept in ((whole, set()), (keep, set(top))):
            fq.configure(weights=every - kept, acts=every - kept)
            tally.add(images.ref_logp[b], fq(x), images.label(b))

    return {
        "sweep": "fast",
        "spec": asdict(fq.spec),
        "spec_description": fq.spec.describe() + ("" if fq.bn_folded else _NOT_FOLDED),
        "bn_folded": fq.bn_folded,
        "prefix_cached": prefix_cached,
        "num_calib": num_calib,
        "num_images": images.num_images,
        "num_layers": len(names),
        "reference": reference.result(with_labels),
        "all_quantized": whole.result(with_labels),
        "rank_by": FAST_LABEL,
        "ranking": ranking,
        "top_k": top,
        "keep_fp32": {"layers": top, **keep.result(with_labels)},
        "layers": entries,
        "seconds": time.perf_counter() - start_time,
    }
