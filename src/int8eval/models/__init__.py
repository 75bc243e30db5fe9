"""Model loaders. Each returns a LoadedModel: an FP32 module in eval mode plus the weights' own preprocessing."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from int8eval.config import Preprocessing
from int8eval.errors import ConfigError, ModelLoadError

QUANT_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)  # the layers INT8 recipes quantize


@dataclass
class LoadedModel:
    name: str
    module: nn.Module
    preprocessing: Preprocessing
    source: str  # where the weights came from, for the report

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (3, self.preprocessing.crop, self.preprocessing.crop)

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.module.parameters())

    def example_input(self, batch: int = 1) -> torch.Tensor:
        return torch.randn(batch, *self.input_shape, generator=torch.Generator().manual_seed(0))

    @property
    def quantizable_layers(self) -> list[str]:
        """Module paths of the Conv/Linear layers, in model order: the names `keep_fp32` takes."""
        return [n for n, m in self.module.named_modules() if isinstance(m, QUANT_TYPES)]

    def check_layers(self, names: tuple[str, ...] | list[str]) -> None:
        """Raise ConfigError naming every entry of `names` that is not a Conv/Linear layer of this model."""
        layers = self.quantizable_layers
        bad = [n for n in names if n not in layers]
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
        name: `efficientnet_lite0`, a torchvision name (`resnet50`), `timm:NAME`, or `tiny_test`.
        checkpoint: a state_dict file for the architecture, loaded with `weights_only=True`.
        weights: torchvision weights enum name (e.g. `IMAGENET1K_V1`); default: the architecture's default.
        preprocessing: overrides the weights' own preprocessing (use with care: it is reported).

    Example:
        >>> m = load_model("efficientnet_lite0")
        >>> m.preprocessing.mean
        (0.5, 0.5, 0.5)
    """
    from int8eval.models import efficientnet_lite, hub, tiny

    if checkpoint is not None and not Path(checkpoint).is_file():
        raise ModelLoadError(f"checkpoint {checkpoint} does not exist")
    for loader in (efficientnet_lite, tiny, hub):
        if loader.handles(name):
            loaded = loader.load(name, checkpoint=checkpoint, weights=weights)
            break
    else:  # pragma: no cover - hub.handles raises with suggestions
        raise ModelLoadError(f"unknown model {name!r}")
    if preprocessing is not None:
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
    """Load a user checkpoint strictly; accepts a bare state_dict or {'state_dict'|'model': ...}."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for bad files
        raise ModelLoadError(f"cannot read checkpoint {path}: {e}") from e
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict):
        raise ModelLoadError(f"checkpoint {path} holds a {type(obj).__name__}, not a state_dict")
    obj = {k.removeprefix("module."): v for k, v in obj.items()}
    result = module.load_state_dict(obj, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ModelLoadError(
            f"checkpoint {path} does not match the architecture: "
            f"{len(result.missing_keys)} missing keys (e.g. {result.missing_keys[:3]}), "
            f"{len(result.unexpected_keys)} unexpected (e.g. {result.unexpected_keys[:3]})"
        )
