"""Activation statistics of an FP32 ONNX model over the calibration images, and the ranges each method takes
from them.

ONNX Runtime's calibrators do not all do what their names say (see `onnx_qdq`), so int8eval runs the calibration
images through the model once, keeps every float activation's exact min/max and a histogram of |x|
(`ranges.HIST_BINS` = 2048 bins, as TensorRT's histogram calibrator), and computes each method's range with
`int8eval.backends.ranges`. One collection serves every method and every recipe of a calibration set.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import CalibrationDataReader, quant_pre_process

from int8eval.backends import ranges
from int8eval.backends.base import CalibrationData
from int8eval.backends.onnx_export import INPUT_NAME
from int8eval.config import CalibMethod
from int8eval.errors import ConfigError

HIST_BINS = ranges.HIST_BINS  # bins of |x| per activation, as TensorRT's histogram calibrator
MAX_CALIB_BATCH = 8  # images per calibration run: every activation of the batch is held in memory at once


class CalibrationReader(CalibrationDataReader):
    """ORT's CalibrationDataReader over int8eval's CalibrationData, in batches of at most `max_batch` images."""

    def __init__(self, calib: CalibrationData, *, input_name: str = INPUT_NAME, max_batch: int = MAX_CALIB_BATCH):
        self._chunks = [
            np.ascontiguousarray(b[i : i + max_batch], dtype=np.float32)
            for b in calib.batches
            for i in range(0, len(b), max_batch)
        ]
        self._input_name = input_name
        self._pos = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._pos >= len(self._chunks):
            return None
        self._pos += 1
        return {self._input_name: self._chunks[self._pos - 1]}

    def __len__(self) -> int:
        return len(self._chunks)

    def rewind(self) -> None:
        self._pos = 0


@dataclass
class TensorStats:
    """Exact min/max of one activation plus a histogram of |x| over [0, hist_max] in HIST_BINS equal bins."""

    min: float
    max: float
    hist: np.ndarray  # int64 counts of |x|
    hist_max: float
    zeros: int = 0  # exact zeros (ReLU outputs): representable without error, so MSE leaves them out

    @property
    def count(self) -> int:
        return int(self.hist.sum())

    def add(self, values: np.ndarray) -> None:
        """Fold one batch of this activation in. `values` is overwritten (the calibration outputs are ours)."""
        v = values.reshape(-1)
        lo, hi = float(v.min(initial=np.inf)), float(v.max(initial=-np.inf))
        self.min, self.max = min(self.min, lo), max(self.max, hi)
        self.zeros += v.size - int(np.count_nonzero(v))
        amax = max(-lo, hi, 0.0)
        if amax > self.hist_max:
            self._grow(amax)
        if self.hist_max == 0.0:
            self.hist[0] += v.size
            return
        bins = len(self.hist)
        # In place, in float32: this loop is most of the calibration time.
        np.abs(v, out=v)
        v *= np.float32(bins / self.hist_max)
        idx = v.astype(np.intp)
        np.minimum(idx, bins - 1, out=idx)
        self.hist += np.bincount(idx, minlength=bins)

    def _grow(self, amax: float) -> None:
        # Double the range until amax fits, merging bin pairs, so old counts stay exactly on bin boundaries.
        if self.hist_max == 0.0:
            # Floor the range so bins / hist_max stays finite in float32 for denormal-sized activations.
            self.hist_max = max(amax, 1e-30)
            return  # the (empty or all-zero) counts stay in bin 0, which still holds 0
        factor = 2 ** math.ceil(math.log2(amax / self.hist_max))
        self.hist = ranges.widen_histogram(self.hist, factor)
        self.hist_max *= factor


@dataclass
class ActivationStats:
    """Per-tensor statistics of one ONNX model's activations over a calibration set (every method reads them)."""

    model: Path  # the (pre-processed) model the tensor names belong to; quantize this one
    source: Path  # the FP32 model the caller passed in
    tensors: dict[str, TensorStats]
    aliases: dict[str, str]  # tensor -> the tensor whose range it takes (not collected itself)
    num_images: int
    collect_s: float  # seconds spent pre-processing the model and running the calibration images
    image_ids: list[str] = field(default_factory=list)


def preprocess(model: Path, out_path: Path) -> Path:
    """ORT's quantization pre-processing: shape inference plus graph optimisation (folds Pad into Conv, removes
    the exporter's shape arithmetic), so fewer Q/DQ nodes are needed and every tensor has a known type."""
    quant_pre_process(str(model), str(out_path))
    return out_path


def _float_tensors(model: onnx.ModelProto) -> list[str]:
    inferred = onnx.shape_inference.infer_shapes(model)
    graph = inferred.graph
    inits = {i.name for i in graph.initializer}
    float_types = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16}
    infos = {vi.name: vi for vi in [*graph.input, *graph.value_info, *graph.output]}
    names = dict.fromkeys(t for n in graph.node for t in [*n.input, *n.output] if t and t not in inits)
    return [t for t in names if t in infos and infos[t].type.tensor_type.elem_type in float_types]


def _activation_aliases(model: onnx.ModelProto) -> dict[str, str]:
    """Tensors whose only consumer is a Clip/Relu -> that activation's output.

    ORT's quantizer gives such a tensor (a Conv output before its ReLU6) the range of the activation's output
    (`adjust_tensor_ranges`), so collecting it would be wasted work: about half of all activations in a CNN.
    """
    graph = model.graph
    consumers: dict[str, int] = {}
    for n in graph.node:
        for t in n.input:
            consumers[t] = consumers.get(t, 0) + 1
    outputs = {o.name for o in graph.output}
    direct = {
        n.input[0]: n.output[0]
        for n in graph.node
        if n.op_type in ("Clip", "Relu") and consumers.get(n.input[0]) == 1 and n.input[0] not in outputs
    }
    aliases = {}
    for src, dst in direct.items():
        while dst in direct:  # Relu -> Clip chains end at the last activation
            dst = direct[dst]
        aliases[src] = dst
    return aliases


def collect_activation_stats(
    model: Path,
    calib: CalibrationData,
    *,
    workdir: Path | None = None,
    preprocess_model: bool = True,
    max_batch: int = MAX_CALIB_BATCH,
) -> ActivationStats:
    """Run the calibration images through `model` once and record every float activation's min, max and histogram.

    Args:
        model: an FP32 .onnx file with one input.
        calib: the calibration images (preprocessed float32 NCHW batches).
        workdir: where the pre-processed model is written (default: beside `model`).
        preprocess_model: run ORT's `quant_pre_process` first (recommended by ORT; the stats then describe it).
        max_batch: images per inference run (memory: every activation of the batch is held at once).
    """
    if calib.num_images == 0:
        raise ConfigError("INT8 calibration needs at least one calibration image; got an empty calibration set")
    start = time.perf_counter()
    model = Path(model)
    workdir = Path(workdir) if workdir is not None else model.parent
    target = preprocess(model, workdir / f"{model.stem}.pre.onnx") if preprocess_model else model
    proto = onnx.load(str(target))
    aliases = _activation_aliases(proto)
    names = [n for n in _float_tensors(proto) if n not in aliases]
    input_name = proto.graph.input[0].name
    # Expose every activation as an output; ORT's calibrators also disable graph optimisation so none is fused away.
    known = {o.name for o in proto.graph.output}
    proto.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in known)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    outputs = [o.name for o in session.get_outputs()]
    stats = {n: TensorStats(np.inf, -np.inf, np.zeros(HIST_BINS, dtype=np.int64), 0.0) for n in names}
    for feed in CalibrationReader(calib, input_name=input_name, max_batch=max_batch):
        for name, value in zip(outputs, session.run(outputs, feed), strict=True):
            if name in stats:
                # `add` works in place; a graph input returned as an output may share the caller's images
                # (onnxruntime issue 21922), so that one is copied.
                stats[name].add(value.copy() if name == input_name else value)
    elapsed = time.perf_counter() - start
    return ActivationStats(target, model, stats, aliases, calib.num_images, elapsed, list(calib.image_ids))


def activation_ranges(
    stats: ActivationStats,
    method: CalibMethod,
    *,
    percentile: float = 99.999,
    symmetric: bool = False,
) -> dict[str, tuple[float, float]]:
    """The (min, max) range each activation is quantized over, by `method`.

    minmax: the observed range. percentile: clip |x| at that percentile of the calibration values.
    entropy: TensorRT's KL-divergence threshold (2048 bins against a grid of as many levels as the real one).
    mse: the threshold minimising expected squared quantization error. A threshold t on |x| becomes the range
    (max(min, -t), min(max, t)), so a non-negative tensor keeps 0 as its lower end. The math is in `ranges`.
    """
    method = CalibMethod(method)
    out: dict[str, tuple[float, float]] = {}
    for name, s in stats.tensors.items():
        if s.count == 0 or not np.isfinite(s.min) or s.hist_max == 0.0 or method is CalibMethod.minmax:
            out[name] = (s.min, s.max) if np.isfinite(s.min) else (0.0, 0.0)
            continue
        levels = ranges.steps(256, s.min >= 0 and not symmetric)
        t = ranges.threshold(method.value, s.hist, s.hist_max, percentile=percentile, levels=levels, zeros=s.zeros)
        out[name] = ranges.clip_range(t, s.min, s.max)
    for src, dst in stats.aliases.items():
        if dst in out:
            out[src] = out[dst]
    return out


def calibration_phrase(method: CalibMethod, percentile: float = 99.999) -> str:
    """What set the activation ranges of an ONNX Q/DQ model quantized with `activation_ranges` (for
    `details["calibration"]`)."""
    if CalibMethod(method) is CalibMethod.minmax:
        return "int8eval: each activation's observed min/max"
    return ranges.calibration_phrase(CalibMethod(method).value, percentile=percentile)
