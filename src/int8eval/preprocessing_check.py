"""Is the FP32 reference as accurate as its weights' publisher says? A labelled FP32 run far below the published
top-1 almost always means the images reach the model differently from how it was trained (the commonest "INT8
loss" in peers' issue trackers is this, seen before INT8 was even built).

The rule (`check`): warn when the upper end of the 99% Wilson interval of the measured top-1 is more than
MARGIN_POINTS below the published top-1.

- The interval covers sampling error: the published number is on ImageNet's 50,000 validation images, ours on a
  sample; 99% rather than 95% because a false alarm sends the user hunting for a bug that is not there. With few
  images the interval is wide and the rule stays quiet unless the gap is huge (0 of 50 right against a published
  70% still warns: its upper end is 11.7%).
- The margin covers what a correct pipeline still differs by on a sample of another make-up than the full
  validation set (a sample of one class each, other decoders, PIL against tensor resizing: typically under 1 point,
  a few on an unrepresentative sample) and leaves out what INT8 is about. The mistakes it catches cost more: RGB read
  as BGR, 0-255 against 0-1 input, another mean/std, bilinear against bicubic or another resize/crop ratio cost from
  a couple to tens of points on ImageNet classifiers.
- One-sided on purpose: a sample easier than ImageNet val (the shared sample is from the training split, where
  Lite0 scores 89% against its published 75.1%) must not warn; such a sample hides moderate mistakes (Lite0 with
  ImageNet's mean/std and bilinear resizing still scored 81.5% on 200 of its images), gross ones still show.
"""

from __future__ import annotations

import numpy as np

from int8eval.config import Preprocessing
from int8eval.report.sections import PreprocessingCheck

CONFIDENCE = 0.99
MARGIN_POINTS = 3.0
CULPRITS = (
    "mean/std (normalisation, and 0-1 against 0-255 input)",
    "channel order (RGB against BGR)",
    "interpolation (bilinear against bicubic)",
    "resize/crop (short side and crop size, the crop ratio)",
)


def check(correct: np.ndarray, published_top1: float, *, source: str,
          preprocessing: Preprocessing | None = None) -> PreprocessingCheck:
    """Judge the FP32 reference's per-image top-1 `correct` (booleans) against `published_top1` (a fraction).

    Example:
        >>> check(np.array([True] * 30 + [False] * 70), 0.761, source="torchvision").suspect
        True
    """
    from int8eval.stats import accuracy_ci

    if not 0.0 < published_top1 <= 1.0:
        raise ValueError(f"published top-1 {published_top1!r} is not a fraction in (0, 1]")
    measured, (lo, hi) = accuracy_ci(np.asarray(correct, dtype=bool), alpha=1.0 - CONFIDENCE)
    gap = (published_top1 - hi) * 100.0
    suspect = bool(len(correct)) and gap > MARGIN_POINTS
    warning = None
    if suspect:
        used = ""
        if preprocessing is not None:
            p = preprocessing
            used = (f" (used: resize {p.resize} {p.interpolation.value}, crop {p.crop}, mean {list(p.mean)}, "
                    f"std {list(p.std)})")
        warning = (
            f"FP32 top-1 {measured * 100:.2f}% on {len(correct)} images is far below the published "
            f"{published_top1 * 100:.2f}% ({source}): even its 99% CI's upper end, {hi * 100:.2f}%, is {gap:.1f} "
            f"points below (more than {MARGIN_POINTS:g} counts). The preprocessing is probably wrong{used}; check "
            f"{'; '.join(CULPRITS)}. INT8 numbers measured on these inputs say little about the deployed model."
        )
    return PreprocessingCheck(
        published_top1=published_top1, published_source=source, measured_top1=measured, measured_ci=(lo, hi),
        confidence=CONFIDENCE, margin_points=MARGIN_POINTS, num_images=len(correct), suspect=suspect,
        warning=warning,
    )


def for_reference(loaded, correct: np.ndarray | None) -> PreprocessingCheck | None:
    """The check of `loaded` (a LoadedModel) when its weights publish a top-1 and the run has labels, else None."""
    if loaded.published_top1 is None or correct is None or len(correct) == 0:
        return None
    return check(correct, loaded.published_top1 / 100.0, source=loaded.published_source or "published",
                 preprocessing=loaded.preprocessing)
