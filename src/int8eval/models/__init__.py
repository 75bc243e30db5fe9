"""Model loaders. Each returns a LoadedModel: an FP32 module in eval mode plus the weights' own preprocessing."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from int8eval.config import Layout, Preprocessing
from int8eval.errors import ConfigError, ModelLoadError

QUANT_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)  # the layers INT8 recipes quantize


@dataclass
class LoadedModel:
    name: str
    module: nn.Module | None  # None for an ONNX file (`onnx`), which only the ONNX-consuming backends take
    preprocessing: Preprocessing
    source: str  # where the weights came from, for the report
    # Top-1 (%) the weights' publisher reports on ImageNet-1K's validation set (torchvision's metadata), for the
    # preprocessing check (int8eval.preprocessing_check); None where nothing is published for these weights.
    published_top1: float | None = None
    published_source: str | None = None
    onnx: Any = None  # models.onnx_file.OnnxFile when the model is an ONNX file

    @property
    def input_shape(self) -> tuple[int, int, int]:
        crop = self.preprocessing.crop
        return (crop, crop, 3) if self.preprocessing.layout is Layout.nhwc else (3, crop, crop)

    @property
    def num_params(self) -> int:
        if self.module is None:
            return self.onnx.num_params
        return sum(p.numel() for p in self.module.parameters())

    @property
    def num_classes(self) -> int | None:
        """The classes the model scores (None: an ONNX file whose output leaves it symbolic)."""
        return self.onnx.num_classes if self.onnx is not None else 1000

    def example_input(self, batch: int = 1) -> torch.Tensor:
        return torch.randn(batch, *self.input_shape, generator=torch.Generator().manual_seed(0))

    @property
    def is_transformer(self) -> bool:
        """Whether the module is a vision transformer: LayerNorm and self-attention (nn.MultiheadAttention, or a
        module with a fused `qkv` projection or named *Attention, as timm's, Swin's and Hugging Face's are). Judged
        from the module, never its name: the backends then choose their transformer recipes. An ONNX file: from its
        ops (LayerNormalization and Softmax; an older export that spells LayerNorm out in primitives reads as a CNN)."""
        if self.module is None:
            ops = {n.op_type for n in self.onnx.model.graph.node}
            return {"LayerNormalization", "Softmax"} <= ops
        modules = list(self.module.modules())
        has_norm = any(isinstance(m, nn.LayerNorm) for m in modules)
        attention = any(
            isinstance(m, nn.MultiheadAttention)
            or type(m).__name__.endswith("Attention")
            or isinstance(getattr(m, "qkv", None), nn.Linear)
            for m in modules
        )
        return has_norm and attention

    @property
    def quantizable_layers(self) -> list[str]:
        """Module paths of the Conv/Linear layers, in model order: the names `keep_fp32` takes (none in an ONNX file)."""
        if self.module is None:
            return []
        return [n for n, m in self.module.named_modules() if isinstance(m, QUANT_TYPES)]

    def check_layers(self, names: tuple[str, ...] | list[str]) -> None:
        """Raise ConfigError naming every entry of `names` that is not a Conv/Linear layer of this model."""
        layers = self.quantizable_layers
        bad = [n for n in names if n not in layers]
        if bad and self.module is None:
            raise ConfigError(f"--keep-fp32 {', '.join(bad)}: layers are kept in FP32 by PyTorch module path, and "
                              f"{self.name} is an ONNX file; drop --keep-fp32")
        if bad:
            shown = ", ".join(layers[:8]) + (f", ... ({len(layers)} in all)" if len(layers) > 8 else "")
            raise ConfigError(
                f"--keep-fp32 {', '.join(bad)}: not a Conv/Linear layer of {self.name}. Its layers: {shown} "
                "(`int8eval diagnose` ranks them by sensitivity)"
            )


@dataclass(frozen=True)
class ModelInfo:
    name: str
    family: str
    weights: str


def list_models() -> list[ModelInfo]:
    """Models int8eval names explicitly; any torchvision classification name or `timm:NAME` also works."""
    from int8eval.models import efficientnet_lite, hub, tiny

    return [*efficientnet_lite.infos(), *hub.infos(), *tiny.infos()]


def load_model(
    name: str,
    *,
    checkpoint: Path | None = None,
    weights: str | None = None,
    preprocessing: Preprocessing | None = None,
) -> LoadedModel:
    """Load `name` in FP32 eval mode with its weights' preprocessing.

    Args:
        name: `efficientnet_lite0`, a torchvision name (`resnet50`), `timm:NAME`, `tiny_test`, or a path to an .onnx
            file (`models.onnx_file`; it needs `preprocessing`).
        checkpoint: a state_dict file for the architecture (`--weights-file`), loaded with `weights_only=True`
            (or a .safetensors file).
        weights: torchvision weights enum name (e.g. `IMAGENET1K_V1`) or timm tag; default: the architecture's
            default; `random`: seeded random weights (for structure and parity only).
        preprocessing: overrides the weights' own preprocessing (use with care: it is reported).

    Example:
        >>> m = load_model("efficientnet_lite0")
        >>> m.preprocessing.mean
        (0.5, 0.5, 0.5)
    """
    from int8eval.models import efficientnet_lite, hub, onnx_file, tiny

    if onnx_file.handles(name):
        return onnx_file.load(name, preprocessing=preprocessing, checkpoint=checkpoint, weights=weights)
    if checkpoint is not None and not Path(checkpoint).is_file():
        what = "does not exist" if not Path(checkpoint).exists() else "is not a regular file"
        raise ModelLoadError(f"weights file {checkpoint} {what}: pass the state_dict file saved with torch.save")
    for loader in (efficientnet_lite, tiny, hub):
        if loader.handles(name):
            loaded = loader.load(name, checkpoint=checkpoint, weights=weights)
            break
    else:  # pragma: no cover - hub.handles raises with suggestions
        raise ModelLoadError(f"unknown model {name!r}")
    if preprocessing is not None:
        if preprocessing.layout is Layout.nhwc:
            raise ConfigError(f"{name} is a PyTorch model, which reads NCHW images: drop --layout nhwc")
        loaded.preprocessing = preprocessing
    loaded.module.eval()
    return loaded


def fold_batchnorm(module: nn.Module) -> tuple[nn.Module, bool]:
    """An eval-mode copy with each Conv->BatchNorm folded into the convolution (module names unchanged), traced by
    torch.fx; (an unfolded copy, False) when the model does not trace."""
    import copy

    from torch.fx.experimental.optimization import fuse

    try:
        return fuse(module).eval(), True  # fuse deep-copies
    except Exception:  # noqa: BLE001 - torch.fx raises many types for untraceable Python
        return copy.deepcopy(module).eval(), False


def load_state_dict_file(module: nn.Module, path: Path) -> None:
    """Load a user checkpoint strictly; accepts a bare state_dict or {'state_dict'|'model': ...}. Every mismatch
    (keys, a value that is not a tensor, shapes, NaN or inf weights) is a ModelLoadError naming the first one."""
    try:
        if Path(path).suffix == ".safetensors":  # what the Hugging Face hub holds for timm models
            from safetensors.torch import load_file

            obj = load_file(str(path), device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for bad files
        raise ModelLoadError(
            f"cannot read checkpoint {path} ({_reason(e)}): pass a state_dict saved with torch.save"
        ) from None
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(k, str) for k in obj):
        what = type(obj).__name__ if not isinstance(obj, dict) else "dict with non-string keys"
        raise ModelLoadError(f"checkpoint {path} holds a {what}, not a state_dict")
    obj = {k.removeprefix("module."): v for k, v in obj.items()}
    check_state_dict(module, obj, path)
    module.load_state_dict(obj, strict=True)


def check_state_dict(module: nn.Module, state: dict, path) -> None:
    """Raise ModelLoadError naming what in `state` does not fit `module`, before load_state_dict would raise a
    multi-line RuntimeError."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise ModelLoadError(
            f"checkpoint {path} does not match the architecture: "
            f"{len(missing)} missing keys (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )
    params = {name for name, _ in module.named_parameters()}  # buffers may hold inf on purpose (attention masks)
    for key, want in expected.items():
        got = state[key]
        if not isinstance(got, torch.Tensor):
            raise ModelLoadError(f"checkpoint {path}: {key} holds a {type(got).__name__}, not a tensor")
        if got.shape != want.shape:
            raise ModelLoadError(
                f"checkpoint {path} does not match the architecture: {key} is {list(got.shape)} in the checkpoint "
                f"and {list(want.shape)} in the model (another number of classes or another variant?)"
            )
        if key in params and got.is_floating_point() and not bool(torch.isfinite(got).all()):
            bad = int((~torch.isfinite(got)).sum())
            raise ModelLoadError(f"checkpoint {path}: {key} holds {bad} NaN or inf values: the weights are broken")


def _reason(e: BaseException) -> str:
    """One line saying why torch.load failed; torch's own messages run over many lines, or are empty."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    if lines and lines[0].startswith("Weights only load failed"):  # a pickle that would run code, or odd content
        rest = [ln.split("WeightsUnpickler error:")[-1].strip() for ln in lines[1:] if not ln.startswith("Check the doc")]
        detail = next((r for r in rest if r), "unsupported content")
        return f"refused by the weights-only loader, which runs no code from the file: {detail[:300]}"
    if not lines:
        return f"{type(e).__name__}: " + ("the file is empty" if isinstance(e, EOFError) else "no detail given")
    return f"{type(e).__name__}: {lines[0].split('. ')[0][:300]}"
