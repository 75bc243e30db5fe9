"""OpenVINO percentile and entropy: NNCF has no global-percentile or KL-divergence estimator, so NNCF quantizes with
minmax ranges and each per-tensor activation quantizer is then narrowed to the range `ranges.histogram_range` picks
from a histogram of all calibration values (see `openvino_backend`'s docstring). Also what names, for the report,
the code that set an OpenVINO INT8 recipe's ranges.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np

from int8eval.backends.base import CalibrationData
from int8eval.backends.ranges import HIST_BINS, histogram_range
from int8eval.backends.ranges import calibration_phrase as ranges_phrase
from int8eval.config import CalibMethod, Recipe

if TYPE_CHECKING:
    import openvino as ov

log = logging.getLogger(__name__)

# Calibration methods whose activation ranges int8eval computes itself.
HISTOGRAM_METHODS = (CalibMethod.percentile, CalibMethod.entropy)
# Bins of the signed histogram over NNCF's minmax range that percentile/entropy narrow from; `ranges.histogram_range`
# folds it to ranges.HIST_BINS (2048) bins of |x|. Its own number, kept as measured (the other paths use 2048 and
# 8192): changing it would change the ranges.
NARROW_BINS = 4096


def activation_quantizers(model: ov.Model) -> list[ov.Node]:
    """Per-tensor FakeQuantize nodes on activations (NNCF has already folded the weight ones into int8 constants).

    Per-channel activation quantizers (NNCF gives depthwise convolutions' inputs one) keep NNCF's ranges.
    """
    out = []
    for op in model.get_ordered_ops():
        if op.get_type_name() != "FakeQuantize" or op.input_value(0).get_node().get_type_name() == "Constant":
            continue
        if limit(op, 2).size == 1:
            out.append(op)
    return out


def limit(fq: ov.Node, i: int) -> np.ndarray:
    """FakeQuantize input i (1..4: input_low, input_high, output_low, output_high), a constant."""
    return fq.input_value(i).get_node().get_data()


def narrow_activation_ranges(
    quantized: ov.Model, fp32: ov.Model, calib: CalibrationData, recipe: Recipe, *, device: str = "CPU"
) -> int:
    """Narrow each per-tensor activation quantizer of `quantized` (in place) to the range `recipe.calib` picks
    from a histogram of that activation over all calibration images in `fp32`. Returns how many were changed.

    The histogram spans the quantizer's minmax range; the new threshold T scales all four FakeQuantize limits by
    T / old_high, which keeps NNCF's grid (signed [-128, 127] or unsigned [0, 255] steps) and only shrinks it.
    """
    import openvino as ov
    import openvino.properties.hint as hints
    from openvino import opset13

    # Probe a copy of the FP32 model at every quantizer's input: the values the range should describe.
    stats_model = fp32.clone()
    fp32_nodes = {op.get_friendly_name(): op for op in stats_model.get_ordered_ops()}
    probes: list[tuple[ov.Node, ov.Output]] = []
    for fq in activation_quantizers(quantized):
        src = fq.input_value(0)
        node = fp32_nodes.get(src.get_node().get_friendly_name())
        if node is None:  # NNCF renamed or created the producer: this quantizer keeps its minmax range
            log.warning("no FP32 tensor for %s; its minmax range is kept", fq.get_friendly_name())
            continue
        probes.append((fq, node.output(src.get_index())))
    if not probes:
        return 0
    n_out = len(stats_model.outputs)
    stats_model.add_outputs([p for _, p in probes])
    compiled = ov.Core().compile_model(stats_model, device, {hints.inference_precision: ov.Type.f32})
    request = compiled.create_infer_request()

    limits = [(float(limit(fq, 1).min()), float(limit(fq, 2).max())) for fq, _ in probes]  # input_low, input_high
    hists = [np.zeros(NARROW_BINS, dtype=np.int64) for _ in probes]
    for batch in calib.batches:
        result = request.infer({0: np.ascontiguousarray(batch, dtype=np.float32)}, share_inputs=True)
        for k, (lo, hi) in enumerate(limits):
            v = np.asarray(result[n_out + k], dtype=np.float32).reshape(-1)
            idx = ((v - lo) * (NARROW_BINS / (hi - lo))).astype(np.intp) if hi > lo else np.zeros(v.size, np.intp)
            np.clip(idx, 0, NARROW_BINS - 1, out=idx)
            hists[k] += np.bincount(idx, minlength=NARROW_BINS)

    changed = 0
    for (fq, _), (lo, hi), counts in zip(probes, limits, hists, strict=True):
        if hi <= 0.0 or counts.sum() == 0:
            continue
        edges = np.linspace(lo, hi, NARROW_BINS + 1)
        r_lo, r_hi = histogram_range(recipe.calib.value, counts, edges, percentile=recipe.percentile)
        threshold = max(-r_lo, r_hi) if lo < 0.0 else r_hi
        if not 0.0 < threshold < hi:
            continue
        factor = threshold / hi
        for i in range(1, 5):
            old = limit(fq, i)
            new = opset13.constant((old * factor).astype(np.float32))
            fq.input(i).replace_source_output(new.output(0))
        changed += 1
    return changed


def calibration_phrase(recipe: Recipe) -> str:
    """What set an INT8 recipe's activation ranges (`details["calibration"]`): NNCF's range estimator, narrowed by
    int8eval's `ranges` for percentile and entropy (see the module docstring)."""
    if recipe.calib is CalibMethod.minmax:
        return "NNCF MINMAX range estimator"
    if recipe.calib is CalibMethod.mse:
        return "NNCF HISTOGRAM range estimator (L2 error search)"
    histogram = f"a {NARROW_BINS}-bin histogram within NNCF's min/max, folded to {HIST_BINS} bins of |x|"
    return "NNCF MINMAX, narrowed by " + ranges_phrase(recipe.calib.value, percentile=recipe.percentile, histogram=histogram)
