"""An ONNX file as a model source: `int8eval run --model path/to/model.onnx` with its preprocessing stated
(`models.preprocessing`: flags, a YAML file or a preset).

The file takes the place of the FP32 export every ONNX-consuming backend starts from (`OnnxFile.save`): ONNX Runtime
runs it as the FP32 reference and quantizes it (QDQ), OpenVINO reads it and NNCF quantizes that. So that it slots
into the same stages, the copy they get is normalised once, here, and each change is recorded in `notes`:

- an opset below 13 (per-channel Q/DQ needs 13) is upgraded with onnx's version converter, or refused naming it;
- the one input is renamed `input` and the one output `logits`, as `onnx_export` names them; initializers listed
  as graph inputs (old exporters did) stop being inputs;
- a final Softmax is left out, so that KL and cosine compare logits as for every other model (the top-1 and top-5
  classes do not change);
- a fixed batch dimension is made symbolic, so one file serves every batch size.

The input's layout (NCHW or NHWC) is read from its shape when the preprocessing does not state it, and a stated
one that contradicts the shape is refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from int8eval.config import Layout, Preprocessing
from int8eval.errors import ConfigError, ModelLoadError

if TYPE_CHECKING:
    import onnx

    from int8eval.models import LoadedModel

MIN_OPSET = 13  # QuantizeLinear with a per-channel `axis`; older files are upgraded to it
INPUT_NAME = "input"  # as onnx_export names them, so the backends' sessions read every model alike
OUTPUT_NAME = "logits"


def handles(name: str) -> bool:
    return str(name).lower().endswith(".onnx")


@dataclass
class OnnxFile:
    """The user's ONNX file and the normalised copy the backends build from."""

    path: Path  # the file given
    model: onnx.ModelProto  # normalised: opset >= MIN_OPSET, input `input`, output `logits`, no final Softmax
    opset: int  # the file's own
    num_classes: int | None  # the output's class dimension (None when symbolic)
    notes: list[str] = field(default_factory=list)  # what the normalisation changed, for the report

    def save(self, folder: Path) -> Path:
        """The normalised copy as FOLDER/<stem>.fp32.onnx (written once; what every backend reads)."""
        import onnx

        out = Path(folder) / f"{self.path.stem}.fp32.onnx"
        if not out.exists():
            out.parent.mkdir(parents=True, exist_ok=True)
            onnx.save(self.model, str(out))
        return out

    @property
    def num_params(self) -> int:
        import numpy as np

        return int(sum(np.prod(i.dims) for i in self.model.graph.initializer))


def load(name: str, *, preprocessing: Preprocessing | None, checkpoint=None, weights=None) -> LoadedModel:
    """`name` (a path to an .onnx file) as a LoadedModel with no PyTorch module and `onnx` set.

    Example:
        >>> m = load("nsfw.onnx", preprocessing=preset("caffe-bgr"))
        >>> m.onnx.num_classes, m.preprocessing.layout
        (2, <Layout.nhwc: 'nhwc'>)
    """
    import onnx

    from int8eval.models import LoadedModel

    path = Path(name).expanduser()
    if checkpoint is not None or weights is not None:
        raise ConfigError(f"--checkpoint and --weights apply to PyTorch models; {path} holds its own weights: drop them")
    if preprocessing is None:
        raise ConfigError(
            f"an ONNX file carries no preprocessing: state it for {path} with --preset torchvision|inception|caffe-bgr, "
            "--preprocessing FILE.yaml or --resize/--crop/--mean/... (`int8eval run --help`)"
        )
    if not path.is_file():
        raise ModelLoadError(f"ONNX file {path} does not exist or is not a regular file")
    try:
        model = onnx.load(str(path))
    except Exception as e:  # noqa: BLE001 - protobuf and onnx raise many types for a bad file
        raise ModelLoadError(f"cannot read {path} as an ONNX model ({type(e).__name__}: {str(e)[:200]})") from None
    opset = default_opset(model)
    notes: list[str] = []
    model = upgrade(model, opset, path, notes)
    _rename_io(model, path, notes)
    _drop_final_softmax(model, notes)
    layout, num_classes = _check_shapes(model, preprocessing, path, notes)
    loaded = LoadedModel(name=path.stem, module=None, preprocessing=preprocessing.model_copy(update={"layout": layout}),
                         source=f"ONNX file {path.resolve()} (opset {opset}{'; ' if notes else ''}{'; '.join(notes)})")
    loaded.onnx = OnnxFile(path, model, opset, num_classes, notes)
    return loaded


def default_opset(model: onnx.ModelProto) -> int:
    """The model's opset of the default ONNX domain."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def upgrade(model: onnx.ModelProto, opset: int, path: Path, notes: list[str]) -> onnx.ModelProto:
    """`model` at opset MIN_OPSET when it is older (onnx.version_converter), checked; a ConfigError naming the opset
    when it cannot be."""
    import onnx
    from onnx import version_converter

    if opset >= MIN_OPSET:
        return model
    try:
        upgraded = version_converter.convert_version(model, MIN_OPSET)
        onnx.checker.check_model(upgraded)
    except Exception as e:  # noqa: BLE001 - the converter raises RuntimeError, ValidationError, ...
        reason = " ".join(str(e).split())[:300]
        raise ConfigError(
            f"{path} is opset {opset}, and onnx's version converter cannot upgrade it to opset {MIN_OPSET} (which INT8 "
            f"Q/DQ with per-channel scales needs): {reason}. Re-export the model with opset >= {MIN_OPSET}"
        ) from None
    notes.append(f"upgraded from opset {opset} to {MIN_OPSET} by onnx's version converter")
    return upgraded


def _rename_io(model: onnx.ModelProto, path: Path, notes: list[str]) -> None:
    graph = model.graph
    constants = {i.name for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in constants]
    if len(inputs) != 1 or len(graph.output) != 1:
        raise ModelLoadError(
            f"{path} has inputs {[i.name for i in inputs]} and outputs {[o.name for o in graph.output]}; int8eval "
            "evaluates a classifier with one image input and one output of class scores"
        )
    if len(inputs) != len(graph.input):  # old exporters listed the weights as inputs, which blocks constant folding
        del graph.input[:]
        graph.input.extend(inputs)
        notes.append("initializers are no longer graph inputs")
    _rename(model, inputs[0].name, INPUT_NAME)
    _rename(model, graph.output[0].name, OUTPUT_NAME)


def _rename(model: onnx.ModelProto, old: str, new: str) -> None:
    if old == new:
        return
    graph = model.graph
    for node in graph.node:
        node.input[:] = [new if n == old else n for n in node.input]
        node.output[:] = [new if n == old else n for n in node.output]
    for info in (*graph.input, *graph.output, *graph.value_info):
        if info.name == old:
            info.name = new


def _drop_final_softmax(model: onnx.ModelProto, notes: list[str]) -> None:
    graph = model.graph
    last = next((n for n in graph.node if OUTPUT_NAME in n.output), None)
    if last is None or last.op_type != "Softmax":
        return
    readers = [n for n in graph.node if last.input[0] in n.input]
    if len(readers) != 1:  # the scores before it are used elsewhere too: keep the graph as it is
        return
    graph.node.remove(last)
    _rename(model, last.input[0], OUTPUT_NAME)
    notes.append("the final Softmax is left out, so KL and cosine compare logits (the classes ranked do not change)")


def _dims(info) -> list[int | None]:
    return [d.dim_value if d.HasField("dim_value") else None for d in info.type.tensor_type.shape.dim]


def _check_shapes(model: onnx.ModelProto, pre: Preprocessing, path: Path, notes: list[str]) -> tuple[Layout, int | None]:
    """The input's layout (stated or read from its shape) and the number of classes; a ConfigError when the input
    is not one image batch the preprocessing makes."""
    graph = model.graph
    dims, out = _dims(graph.input[0]), _dims(graph.output[0])
    shown = "x".join("?" if d is None else str(d) for d in dims)
    if len(dims) != 4:
        raise ModelLoadError(f"{path}: its input is {shown}, not a batch of images (N, C, H, W or N, H, W, C)")
    channels = {Layout.nchw: dims[1], Layout.nhwc: dims[3]}
    fits = [layout for layout, c in channels.items() if c == 3]
    layout = pre.layout
    if layout is None:
        if len(fits) != 1:
            raise ConfigError(f"{path}: cannot tell from its input shape {shown} whether it is NCHW or NHWC: "
                              "state --layout nchw or nhwc")
        layout = fits[0]
    elif channels[layout] not in (3, None):
        other = Layout.nhwc if layout is Layout.nchw else Layout.nchw
        raise ConfigError(f"{path}: its input is {shown}, which is not {layout.value.upper()} with 3 channels: "
                          f"pass --layout {other.value}" + " (or leave --layout out)" * (other in fits))
    spatial = dims[2:4] if layout is Layout.nchw else dims[1:3]
    if any(d is not None and d != pre.crop for d in spatial):
        raise ConfigError(f"{path}: its input is {shown}, but the preprocessing crops {pre.crop}x{pre.crop}: "
                          f"pass --crop {next(d for d in spatial if d is not None)} (and a --resize to match)")
    if len(out) != 2:
        raise ModelLoadError(f"{path}: its output has {len(out)} dimensions; int8eval needs class scores [N, classes]")
    if dims[0] is not None:  # one file for every batch size, as onnx_export writes it
        for info in (graph.input[0], graph.output[0]):
            info.type.tensor_type.shape.dim[0].dim_param = "batch"
        notes.append(f"its fixed batch of {dims[0]} made symbolic")
    return layout, out[1]
