"""Static INT8 QDQ quantization of an ONNX model with ONNX Runtime, from the activation ranges int8eval computes.

ONNX Runtime's `quantize_static` inserts the QuantizeLinear/DequantizeLinear nodes well, but its calibrators do
not all do what their names say: through `quantize_static`, "Entropy" keeps its default 128 histogram bins and 128
quantized bins, so only one threshold (the full range) is ever tried and it equals MinMax; forcing 2048 bins
compares against a 64-level-per-side grid and clips too hard; there is no MSE method. So int8eval collects one
histogram per activation itself (`onnx_calibration`: one pass, shared by every method), computes the ranges there,
and hands them to `quantize_static` through its calibration cache (`calibration_cache_path`), ORT's own way to
supply ranges.

The same QDQ model feeds TensorRT's explicit quantization (`symmetric_activations=True`, per-channel weights).

The ONNX builders (onnxruntime, tensorrt and its CPU emulation) share one FP32 export and one calibration pass per
(model, calibration set) within a BuildContext: `fp32_export` and `activation_stats`.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationMethod,
    QuantFormat,
    QuantType,
    TensorData,
    TensorsData,
    quantize_static,
    save_tensors_data,
)
from onnxruntime.quantization.quant_utils import get_qmin_qmax_for_qType

from int8eval.backends.base import BuildContext, CalibrationData
from int8eval.backends.onnx_calibration import ActivationStats, activation_ranges, collect_activation_stats
from int8eval.backends.onnx_export import export_onnx
from int8eval.config import CalibMethod
from int8eval.errors import ConfigError

if TYPE_CHECKING:
    import torch

_ACTIVATION_TYPES = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}



def quantize_qdq(
    fp32_onnx: Path,
    calib: CalibrationData | ActivationStats,
    out_path: Path,
    *,
    method: CalibMethod = CalibMethod.minmax,
    percentile: float = 99.999,
    per_channel: bool = True,
    symmetric_activations: bool = False,
    activation_type: Literal["int8", "uint8"] = "int8",
    weight_qdq_pair: bool = False,
    reduce_range: bool = False,
    nodes_to_exclude: list[str] | tuple[str, ...] = (),
    op_types: tuple[str, ...] | None = None,
    bias_shifts: BiasShifts | None = None,
    weight_rounding: WeightRounding | None = None,
) -> Path:
    """Quantize `fp32_onnx` to a static INT8 QDQ model at `out_path` (signed, symmetric INT8 weights).

    Args:
        fp32_onnx: the FP32 model (as written by `export_onnx`).
        calib: calibration images, or stats already collected from `fp32_onnx` by `collect_activation_stats`
            (several recipes can share one collection).
        out_path: the .onnx file to write.
        method: how activation ranges are chosen (see `activation_ranges`).
        percentile: for `method=percentile`.
        per_channel: one weight scale per output channel (essential for depthwise convolutions) or one per tensor.
        symmetric_activations: zero-point 0 for activations, as TensorRT requires.
        activation_type: "int8" (S8S8) or "uint8" (U8S8: ~2x faster on x86 CPUs, not accepted by TensorRT).
        weight_qdq_pair: keep float weights behind a QuantizeLinear->DequantizeLinear pair instead of storing int8.
        nodes_to_exclude: nodes left in FP32 (see `onnx_export.keep_fp32_nodes`).
        op_types: the only op types quantized (None: every type ONNX Runtime quantizes, LayerNormalization and
            Softmax included); transformers pass ("Conv", "Gemm", "MatMul").
        bias_shifts: bias correction (see `bias_correction`, e.g. `module_bias_shifts`): given each quantized
            Conv/Gemm node's weight error (its INT8 weights as ONNX Runtime wrote them, dequantized, minus the FP32
            ones), the mean output shift per channel to take off its bias; the model is then quantized again
            from the corrected FP32 biases (the weights, and so their error, do not change).
        weight_rounding: learned rounding (e.g. `ModuleAdaRound`): given each quantized Conv/Gemm node's weights
            and ONNX Runtime's scale and integers (`QuantizedWeight`), new integers, each the floor or ceiling of
            W / scale; they replace the INT8 weights ONNX Runtime wrote (scales unchanged), before bias correction,
            which then corrects these weights' error.

    Example:
        >>> quantize_qdq(Path("m.onnx"), calib, Path("m.int8.onnx"), method=CalibMethod.percentile)
    """
    if activation_type not in _ACTIVATION_TYPES:
        raise ConfigError(f"activation_type {activation_type!r} is not one of {sorted(_ACTIVATION_TYPES)}")
    if weight_rounding is not None and weight_qdq_pair:
        raise ConfigError("learned weight rounding writes INT8 weights; weight_qdq_pair keeps float ones: drop one")
    if symmetric_activations and activation_type == "uint8":
        raise ConfigError("symmetric activations need signed int8 (activation_type='int8'), not uint8")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(calib, ActivationStats):
        if Path(calib.source).resolve() != Path(fp32_onnx).resolve():
            raise ValueError(f"stats were collected from {calib.source}, not from {fp32_onnx}")
        stats = calib
    else:
        stats = collect_activation_stats(fp32_onnx, calib, workdir=out_path.parent)
    chosen = activation_ranges(stats, method, percentile=percentile, symmetric=symmetric_activations)
    tensors = TensorsData(
        CalibrationMethod.MinMax,
        {k: TensorData(lowest=np.float32(lo), highest=np.float32(hi)) for k, (lo, hi) in chosen.items()},
    )
    with tempfile.TemporaryDirectory(prefix="int8eval-ort-") as tmp:
        cache = Path(tmp) / "ranges.json"
        save_tensors_data(tensors, cache)

        def quantize(model: Path) -> None:
            # The cache's method must match `calibrate_method`; the ranges in it are ours whatever the method.
            quantize_static(
                str(model),
                str(out_path),
                calibration_data_reader=None,
                calibration_cache_path=cache,
                calibrate_method=CalibrationMethod.MinMax,
                quant_format=QuantFormat.QDQ,
                per_channel=per_channel,
                reduce_range=reduce_range,
                nodes_to_exclude=list(nodes_to_exclude),
                op_types_to_quantize=list(op_types) if op_types is not None else None,
                activation_type=_ACTIVATION_TYPES[activation_type],
                weight_type=QuantType.QInt8,
                extra_options={
                    "ActivationSymmetric": symmetric_activations,
                    "WeightSymmetric": True,
                    "AddQDQPairToWeight": weight_qdq_pair,
                },
            )

        quantize(stats.model)
        integers: dict[str, np.ndarray] = {}
        scales: dict[str, np.ndarray] = {}
        if weight_rounding is not None:
            qmin, qmax = (int(v) for v in get_qmin_qmax_for_qType(onnx.TensorProto.INT8, reduce_range, symmetric=True))
            grids = quantized_weights(onnx.load(str(stats.model)), onnx.load(str(out_path)), qmin=qmin, qmax=qmax)
            integers = weight_rounding(grids)
            scales = {node: grids[node].scale for node in integers}
            _write_integers(out_path, integers, scales)
        if bias_shifts is not None:
            fp32 = onnx.load(str(stats.model))
            shifts = bias_shifts(weight_errors(fp32, onnx.load(str(out_path))))
            corrected = Path(tmp) / "bias_corrected.onnx"
            onnx.save(_subtract_from_biases(fp32, shifts), str(corrected))
            quantize(corrected)
            _write_integers(out_path, integers, scales)  # the same weights, so the same scales: written again
    if nodes_to_exclude:
        model = onnx.load(str(out_path))
        _float_inputs(model, set(nodes_to_exclude))
        onnx.save(model, str(out_path))
    return out_path


def _float_inputs(model, nodes: set[str]) -> None:
    """Feed `nodes` (left out of quantization) the float tensor behind any QuantizeLinear->DequantizeLinear pair on
    their inputs, in place. `quantize_static` quantizes a tensor once for all its consumers, so an excluded Conv
    would still read quantized activations (and only its weights would be FP32); PT2E and diagnose keep both.

    The float tensor is clamped to the pair's range: ONNX Runtime drops a Relu/Clip after a quantized Conv and lets
    the QuantizeLinear's saturation do its work, so only the rounding may go."""
    from onnx import helper, numpy_helper

    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    producer = {out: n for n in model.graph.node for out in n.output}

    def clamped_float(name: str) -> str | None:
        dq = producer.get(name)
        q = producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
        if q is None or q.op_type != "QuantizeLinear":
            return None
        scale, zero = inits.get(dq.input[1]), inits.get(dq.input[2]) if len(dq.input) > 2 else None
        if scale is None or zero is None or scale.size != 1:
            return None  # per-tensor activation pairs only
        info = np.iinfo(zero.dtype)
        twin = f"{name}.float"
        for bound, value in (("min", info.min), ("max", info.max)):
            limit = scale * (np.float32(value) - zero.astype(np.float32))
            model.graph.initializer.append(numpy_helper.from_array(np.asarray(limit, np.float32), f"{twin}.{bound}"))
        model.graph.node.append(helper.make_node("Clip", [q.input[0], f"{twin}.min", f"{twin}.max"], [twin], name=twin))
        return twin

    twins: dict[str, str | None] = {}  # a DequantizeLinear output -> its clamped float twin (one per tensor)
    for node in list(model.graph.node):
        if node.name in nodes:
            for i, name in enumerate(node.input):
                if name not in twins:
                    twins[name] = clamped_float(name)
                if twins[name] is not None:
                    node.input[i] = twins[name]
    _drop_unused_qdq(model)
    _sort_topologically(model)


def _drop_unused_qdq(model) -> None:
    # Q/DQ pairs no longer read by anything: a DequantizeLinear first, then its QuantizeLinear.
    for _ in range(2):
        used = {name for n in model.graph.node for name in n.input} | {o.name for o in model.graph.output}
        for n in [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]:
            if n.output[0] not in used:
                model.graph.node.remove(n)
    drop_unused_initializers(model)


def drop_unused_initializers(model) -> None:
    """Remove the initializers no node reads (ONNX Runtime warns about each one when it loads the model)."""
    used = {name for n in model.graph.node for name in n.input} | {o.name for o in model.graph.output}
    for init in [i for i in model.graph.initializer if i.name not in used]:
        model.graph.initializer.remove(init)


def dequantize_constant(dq, inits: dict) -> np.ndarray | None:
    """The value (float64) of a DequantizeLinear node `dq` whose inputs are all initializers (`inits`: name ->
    TensorProto), per tensor or along its `axis`; None when an input is not a constant."""
    from onnx import numpy_helper

    names = [name for name in dq.input if name]
    if dq.op_type != "DequantizeLinear" or not all(name in inits for name in names):
        return None
    q, scale, *zp = (numpy_helper.to_array(inits[name]).astype(np.float64) for name in names)
    axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
    shape = [-1 if d == axis else 1 for d in range(q.ndim)] if scale.ndim else []
    return (q - (zp[0].reshape(shape) if zp else 0.0)) * scale.reshape(shape)


def _sort_topologically(model) -> None:
    # ONNX wants every node after the producers of its inputs; the Clips were appended at the end.
    ready = {i.name for i in model.graph.input} | {i.name for i in model.graph.initializer} | {""}
    pending, order = list(model.graph.node), []
    while pending:
        rest = []
        for n in pending:
            if all(i in ready for i in n.input):
                order.append(n)
                ready.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):
            raise ValueError(f"the quantized graph has a cycle or a missing input at {rest[0].name}")
        pending = rest
    del model.graph.node[:]
    model.graph.node.extend(order)


# --- bias correction ---------------------------------------------------------------------------------------------

BiasShifts = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]  # node: Q(W) - W  ->  node: output shift


def weight_errors(fp32, qdq) -> dict[str, np.ndarray]:
    """Per Conv (and Gemm with transB=1, weights shaped like torch's) node whose weights `qdq` (an ONNX model from
    `quantize_static`) stores as INT8 behind a DequantizeLinear: the dequantized weights minus `fp32`'s."""
    from onnx import numpy_helper

    fp32_inits = {i.name: i for i in fp32.graph.initializer}
    fp32_nodes = {n.name: n for n in fp32.graph.node}
    inits = {i.name: i for i in qdq.graph.initializer}
    producer = {out: n for n in qdq.graph.node for out in n.output}
    errors = {}
    for node in qdq.graph.node:
        transposed = node.op_type == "Gemm" and not any(a.name == "transB" and a.i == 1 for a in node.attribute)
        if node.op_type not in ("Conv", "Gemm") or transposed or node.name not in fp32_nodes:
            continue
        dq = producer.get(node.input[1])
        w_name = fp32_nodes[node.name].input[1]
        # None for a Q->DQ pair on float weights (weight_qdq_pair): not read here
        dequantized = dequantize_constant(dq, inits) if dq is not None else None
        if dequantized is None or w_name not in fp32_inits:
            continue
        errors[node.name] = dequantized.astype(np.float32) - numpy_helper.to_array(fp32_inits[w_name])
    return errors


def _subtract_from_biases(model, shifts: dict[str, np.ndarray]):
    """`model` (FP32 ONNX) with bias -= shift for each named Conv/Gemm node (a node without a bias gets one)."""
    from onnx import numpy_helper

    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for node in model.graph.node:
        if node.name not in shifts:
            continue
        shift = np.asarray(shifts[node.name], dtype=np.float32)
        has_bias = len(node.input) > 2 and node.input[2]
        # Always a new initializer: exporters share equal constants (e.g. the zero biases of folded BatchNorms).
        name = f"{node.name}.bias_corrected"
        model.graph.initializer.append(numpy_helper.from_array((inits[node.input[2]] if has_bias else 0) - shift, name))
        if has_bias:
            node.input[2] = name
        else:
            node.input.extend([""] * (2 - len(node.input)) + [name])
    drop_unused_initializers(model)  # the biases replaced
    return model


def module_bias_shifts(module: torch.nn.Module, onnx_path: Path, calib: CalibrationData) -> BiasShifts:
    """`bias_shifts` for `quantize_qdq` of a model `export_onnx` wrote from `module`: each node's output shift
    measured on the calibration images with the FP32 inputs `module` gives the layer it came from."""
    import torch

    from int8eval.backends.bias_correction import output_shifts
    from int8eval.backends.onnx_export import module_nodes

    # A module exported as several nodes (called more than once) has no single input to measure: left as is.
    path_of = {nodes[0]: path for path, nodes in module_nodes(onnx_path, module).items() if len(nodes) == 1}

    def shifts(errors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        by_path = {path_of[n]: torch.from_numpy(e) for n, e in errors.items() if n in path_of}
        node_of = {path: node for node, path in path_of.items()}
        return {node_of[path]: s for path, s in output_shifts(module, by_path, calib).items()}

    return shifts


# --- learned weight rounding (AdaRound) ---------------------------------------------------------------------------


@dataclass(frozen=True)
class QuantizedWeight:
    """A Conv/Gemm node's weights in a Q/DQ model: the FP32 weights, ONNX Runtime's scale (per output channel, or
    one) and its integers, zero-point 0, in [qmin, qmax] (symmetric INT8: -127..127)."""

    fp32: np.ndarray
    scale: np.ndarray
    integers: np.ndarray
    qmin: int
    qmax: int


WeightRounding = Callable[[dict[str, QuantizedWeight]], dict[str, np.ndarray]]  # node: its weights -> new integers


def _weight_dequantizers(qdq) -> dict[str, onnx.NodeProto]:
    """Conv node (and Gemm with transB=1) -> the DequantizeLinear of its constant INT8 weights, zero-point 0 on
    axis 0 or per tensor (what `quantize_qdq` writes; a Q->DQ pair on float weights is not one)."""
    from onnx import numpy_helper

    inits = {i.name: i for i in qdq.graph.initializer}
    producer = {out: n for n in qdq.graph.node for out in n.output}
    out = {}
    for node in qdq.graph.node:
        transposed = node.op_type == "Gemm" and not any(a.name == "transB" and a.i == 1 for a in node.attribute)
        dq = producer.get(node.input[1]) if node.op_type in ("Conv", "Gemm") and not transposed else None
        if dq is None or dq.op_type != "DequantizeLinear" or not all(n in inits for n in dq.input if n):
            continue
        axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
        zero = numpy_helper.to_array(inits[dq.input[2]]) if len(dq.input) > 2 and dq.input[2] else np.zeros(1)
        scale = numpy_helper.to_array(inits[dq.input[1]])
        if inits[dq.input[0]].data_type == onnx.TensorProto.INT8 and not zero.any() and (scale.ndim == 0 or axis == 0):
            out[node.name] = dq
    return out


def quantized_weights(fp32, qdq, *, qmin: int, qmax: int) -> dict[str, QuantizedWeight]:
    """Per Conv/Gemm node of `qdq` (an ONNX model from `quantize_static`) with INT8 weights: what they were in
    `fp32` (the model it quantized), and the scale and integers ONNX Runtime chose."""
    from onnx import numpy_helper

    fp32_inits = {i.name: i for i in fp32.graph.initializer}
    fp32_nodes = {n.name: n for n in fp32.graph.node}
    inits = {i.name: i for i in qdq.graph.initializer}
    out = {}
    for name, dq in _weight_dequantizers(qdq).items():
        w_name = fp32_nodes[name].input[1] if name in fp32_nodes else None
        if w_name in fp32_inits:
            out[name] = QuantizedWeight(
                fp32=numpy_helper.to_array(fp32_inits[w_name]), scale=numpy_helper.to_array(inits[dq.input[1]]),
                integers=numpy_helper.to_array(inits[dq.input[0]]), qmin=qmin, qmax=qmax,
            )
    return out


def _write_integers(path: Path, integers: dict[str, np.ndarray], scales: dict[str, np.ndarray]) -> None:
    """Replace the INT8 weights of the named nodes of the Q/DQ model at `path` by `integers` (same shapes), which
    were chosen for `scales`: the model's must be those."""
    from onnx import numpy_helper

    if not integers:
        return
    model = onnx.load(str(path))
    inits = {i.name: i for i in model.graph.initializer}
    dequantizers = _weight_dequantizers(model)
    for node, values in integers.items():
        if node not in dequantizers:
            raise ValueError(f"learned rounding: node {node!r} has no INT8 weights in {path}")
        init = inits[dequantizers[node].input[0]]
        if not np.array_equal(numpy_helper.to_array(inits[dequantizers[node].input[1]]), scales[node]):
            raise ValueError(f"learned rounding: the weight scales of {node!r} in {path} are not those it learnt on")
        if tuple(init.dims) != values.shape or values.min() < -128 or values.max() > 127:
            raise ValueError(f"learned rounding: {node!r} needs int8 weights shaped {tuple(init.dims)}")
        init.CopyFrom(numpy_helper.from_array(values.astype(np.int8), init.name))
    onnx.save(model, str(path))


class ModuleAdaRound:
    """`weight_rounding` for `quantize_qdq` of a model `export_onnx` wrote from `module`: AdaRound
    (`backends.adaround`) of each node's weights on the FP32 inputs `module` gives the layer it came from, over the
    calibration images. After the call, `details` says what it did and `layers` how each layer's error changed."""

    def __init__(self, module: torch.nn.Module, onnx_path: Path, calib: CalibrationData, spec=None) -> None:
        from int8eval.backends.adaround import AdaRoundSpec

        self.module, self.onnx_path, self.calib = module, Path(onnx_path), calib
        self.spec = spec if spec is not None else AdaRoundSpec()
        self.details: dict | None = None
        self.layers: dict[str, dict] = {}

    def __call__(self, weights: dict[str, QuantizedWeight]) -> dict[str, np.ndarray]:
        import torch

        from int8eval.backends.adaround import LayerGrid, round_layers, summary, supported
        from int8eval.backends.onnx_export import module_nodes

        start = time.perf_counter()
        modules = dict(self.module.named_modules())
        # A module exported as several nodes (called more than once) has no single input: left to ONNX Runtime.
        nodes_of = module_nodes(self.onnx_path, self.module)
        path_of = {nodes[0]: path for path, nodes in nodes_of.items() if len(nodes) == 1}
        grids = {
            path_of[node]: LayerGrid(torch.tensor(w.fp32), torch.tensor(w.scale), w.qmin, w.qmax,
                                     torch.tensor(w.integers.astype(np.int64)))
            for node, w in weights.items() if node in path_of and supported(modules[path_of[node]])
        }
        roundings = round_layers(self.module, grids, self.calib, self.spec)
        self.details = summary(roundings, self.spec, time.perf_counter() - start)
        self.layers = {path: {"weights_changed": r.changed, "relative_output_mse_nearest": r.error_nearest,
                              "relative_output_mse_adaround": r.error_learned} for path, r in roundings.items()}
        node_of = {path: node for node, path in path_of.items()}
        return {node_of[path]: r.integers.numpy().astype(np.int8) for path, r in roundings.items()}


# --- shared within a BuildContext: the FP32 export and its activation statistics ---------------------------------


@dataclass
class PreparedOnnx:
    """What the ONNX recipes of one model share: the FP32 export and the calibration statistics per calibration set."""

    module: torch.nn.Module | Any  # the module exported (or the models.onnx_file.OnnxFile): the memo holds for it only
    fp32: Path
    export_s: float
    stats: dict[int, tuple[CalibrationData, ActivationStats]] = field(default_factory=dict)


def fp32_export(loaded, context: BuildContext) -> PreparedOnnx:
    """`loaded`'s FP32 ONNX export (`context.workdir`/<model>.fp32.onnx), written once per context and model while
    the file exists. Its `export_s` is the export's cost, for the `prepare_s` of every variant built from it."""
    prepared = context.onnx
    # An ONNX file is its own FP32 export (normalised by models.onnx_file): the memo then holds for that file.
    source = loaded.module if loaded.onnx is None else loaded.onnx
    if prepared is None or prepared.module is not source or not prepared.fp32.exists():
        start = time.perf_counter()
        if loaded.onnx is not None:
            path = loaded.onnx.save(Path(context.workdir))
        else:
            path = export_onnx(loaded.module, loaded.example_input(1), Path(context.workdir) / f"{loaded.name}.fp32.onnx")
        prepared = PreparedOnnx(source, path, time.perf_counter() - start)
        context.onnx = prepared
    return prepared


def activation_stats(prepared: PreparedOnnx, calib: CalibrationData, context: BuildContext) -> ActivationStats:
    """`collect_activation_stats` of `prepared.fp32` over `calib`, collected once per calibration set."""
    # Each recipe gets the same CalibrationData object; holding it keeps its id from being reused.
    cached = prepared.stats.get(id(calib))
    if cached is not None and cached[0] is calib and cached[1].model.exists():
        return cached[1]
    stats = collect_activation_stats(prepared.fp32, calib, workdir=Path(context.workdir))
    prepared.stats[id(calib)] = (calib, stats)
    return stats
