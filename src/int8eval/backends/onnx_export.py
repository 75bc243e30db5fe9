"""Shared ONNX export (PyTorch -> .onnx) and Q/DQ graph inspection, for every ONNX-consuming backend.

The legacy TorchScript exporter (`dynamo=False`) is used on purpose: it needs no onnxscript, folds BatchNorm into
the convolutions in eval mode, and its logits match PyTorch's to ~1e-5 on the models int8eval ships.
"""

from __future__ import annotations

import copy
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
OPSET = 17  # QDQ with per-channel `axis` needs >= 13; 17 is what ORT, OpenVINO and TensorRT 8.6+ all parse
QUANTIZED_OP_TYPES = ("Conv", "Gemm", "MatMul")


def export_onnx(
    module: torch.nn.Module,
    example_input: torch.Tensor,
    path: Path,
    *,
    dynamic_batch: bool = True,
    opset: int = OPSET,
) -> Path:
    """Export `module` (FP32, eval mode) to `path` with input "input" and output "logits".

    Args:
        module: the PyTorch model; it is put in eval mode and not otherwise changed.
        example_input: a float32 [N, 3, H, W] tensor; H and W are fixed in the graph, N is not if `dynamic_batch`.
        path: the .onnx file to write (its folder is created).
        dynamic_batch: keep the batch dimension symbolic ("batch") so one file serves every batch size.
        opset: ONNX opset version.

    Example:
        >>> m = load_model("tiny_test")
        >>> export_onnx(m.module, m.example_input(1), Path("/tmp/tiny.onnx"))
        PosixPath('/tmp/tiny.onnx')
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module.eval()
    dynamic_axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic_batch else None
    with warnings.catch_warnings(), torch.no_grad():
        # The legacy exporter warns that it is deprecated in favour of dynamo; that is a choice made here, not news.
        warnings.simplefilter("ignore", category=DeprecationWarning)
        warnings.simplefilter("ignore", category=FutureWarning)
        # ZeroPad2d's pad arithmetic is left unfolded ("Only steps=1 can be constant folded"); ORT folds it later.
        warnings.filterwarnings("ignore", message="Constant folding", category=UserWarning)
        # Transformers (timm's ViT) turn shapes and flags into Python values while traced: fixed for the fixed input
        # size exported here, and the FP32 parity gate checks the export's answers in any case.
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
        torch.onnx.export(
            module,
            (example_input,),
            str(path),
            dynamo=False,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes=dynamic_axes,
            opset_version=opset,
            do_constant_folding=True,
        )
    return path


def export_onnx_fp16(loaded, path: Path) -> Path:
    """Export a half-precision copy of `loaded.module` (a LoadedModel's; left unchanged) to `path`, with a float16
    input: runtimes then run their fp16 kernels, as the types are in the graph."""
    half = copy.deepcopy(loaded.module).half()
    return export_onnx(half, loaded.example_input(1).half(), path)


def _load(model) -> "onnx.ModelProto":  # noqa: F821 - onnx is imported lazily
    import onnx

    return model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))


def count_qdq(model) -> dict[str, int]:
    """Number of QuantizeLinear and DequantizeLinear nodes in `model` (a path or an onnx.ModelProto)."""
    ops = Counter(n.op_type for n in _load(model).graph.node)
    return {"QuantizeLinear": ops["QuantizeLinear"], "DequantizeLinear": ops["DequantizeLinear"]}


@dataclass(frozen=True)
class QuantizedInput:
    """How one input of a Conv/Gemm/MatMul node reaches it in a QDQ graph."""

    node: str
    op_type: str
    index: int  # input position: 0 data, 1 weight, 2 bias
    tensor: str
    # "qdq": QuantizeLinear -> DequantizeLinear on a float tensor (activations; weights with AddQDQPairToWeight);
    # "dq": DequantizeLinear of an integer constant (ORT's default for weights and biases); "float": not quantized.
    kind: Literal["qdq", "dq", "float"]
    scale_shape: tuple[int, ...] | None  # shape of the DequantizeLinear scale: () per-tensor, (C,) per-channel
    dtype: str | None  # integer type feeding the DequantizeLinear ("int8", "uint8", "int32"), if known


def quantized_inputs(model, op_types: tuple[str, ...] = QUANTIZED_OP_TYPES) -> list[QuantizedInput]:
    """For every input of every `op_types` node: is it fed by a Q/DQ pair, a DQ of a constant, or a float tensor?

    Used to check a QDQ graph's structure (TensorRT's explicit quantization needs Q/DQ on the data and weight
    inputs of every Conv/Gemm/MatMul it should run in INT8).
    """
    import onnx

    graph = _load(model).graph
    producer = {out: n for n in graph.node for out in n.output}
    inits = {i.name: i for i in graph.initializer}
    constants = {n.output[0]: n.attribute[0].t for n in graph.node if n.op_type == "Constant" and n.attribute}
    value_types = {vi.name: vi.type.tensor_type.elem_type for vi in [*graph.value_info, *graph.input, *graph.output]}

    def shape_of(name: str) -> tuple[int, ...] | None:
        if name in inits:
            return tuple(inits[name].dims)
        if name in constants:
            return tuple(constants[name].dims)
        return None

    def dtype_of(name: str) -> str | None:
        elem = inits[name].data_type if name in inits else value_types.get(name)
        if elem is None and name in constants:
            elem = constants[name].data_type
        if elem is None and name in producer and producer[name].op_type == "QuantizeLinear":
            zp = producer[name].input[2] if len(producer[name].input) > 2 else ""
            elem = inits[zp].data_type if zp in inits else onnx.TensorProto.UINT8
        return onnx.helper.tensor_dtype_to_np_dtype(elem).name if elem else None

    out: list[QuantizedInput] = []
    for node in graph.node:
        if node.op_type not in op_types:
            continue
        for index, tensor in enumerate(node.input):
            if not tensor:
                continue
            dq = producer.get(tensor)
            if dq is None or dq.op_type != "DequantizeLinear":
                out.append(QuantizedInput(node.name, node.op_type, index, tensor, "float", None, None))
                continue
            src = dq.input[0]
            kind = "qdq" if src in producer and producer[src].op_type == "QuantizeLinear" else "dq"
            scale_shape = shape_of(dq.input[1])
            out.append(QuantizedInput(node.name, node.op_type, index, tensor, kind, scale_shape, dtype_of(src)))
    return out


def activation_matmuls(model) -> list[str]:
    """Names of the MatMul nodes of `model` (a path or an onnx.ModelProto) with no constant input: in a transformer,
    attention's Q x K^T and softmax(.) x V, between two activations, as opposed to the Linear layers' MatMuls (whose
    weight is an initializer, or a DequantizeLinear of one in a QDQ model)."""
    graph = _load(model).graph
    constants = {i.name for i in graph.initializer} | {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    constants |= {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in constants}
    return [n.name for n in graph.node if n.op_type == "MatMul" and not any(i in constants for i in n.input)]


def module_nodes(onnx_path: Path, module: torch.nn.Module) -> dict[str, list[str]]:
    """PyTorch module path -> names of its Conv/Gemm/MatMul nodes in an ONNX file `export_onnx` wrote from `module`.

    The legacy exporter names a node by its module scopes, e.g. `/blocks/blocks.0/depthwise/depthwise.0/Conv` for
    `blocks.0.depthwise.0`: a scope that extends the previous one with ".i" is a container's child. Only names that
    resolve to a real Conv/Linear module are kept. ORT's quantization pre-processing keeps these names.
    """
    import onnx

    from int8eval.models import QUANT_TYPES

    modules = dict(module.named_modules())
    out: dict[str, list[str]] = {}
    for node in onnx.load(str(onnx_path), load_external_data=False).graph.node:
        if node.op_type not in QUANTIZED_OP_TYPES:
            continue
        path_parts: list[str] = []
        for part in node.name.strip("/").split("/")[:-1]:
            if path_parts and part.startswith(path_parts[-1] + "."):
                path_parts[-1] = part
            else:
                path_parts.append(part)
        name = ".".join(path_parts)
        if isinstance(modules.get(name), QUANT_TYPES):
            out.setdefault(name, []).append(node.name)
    return out


def keep_fp32_nodes(onnx_path: Path, module: torch.nn.Module, layers: tuple[str, ...] | list[str]) -> list[str]:
    """The ONNX node names of `layers` (module paths), for the quantizer's `nodes_to_exclude`; every layer must
    be found, or the variant would silently quantize it."""
    from int8eval.errors import ConfigError

    if not layers:
        return []  # nothing kept: no need to load the model
    nodes = module_nodes(onnx_path, module)
    missing = [layer for layer in layers if layer not in nodes]
    if missing:
        raise ConfigError(f"keep_fp32: no ONNX node found for {', '.join(missing)} in {onnx_path}")
    return [n for layer in layers for n in nodes[layer]]
