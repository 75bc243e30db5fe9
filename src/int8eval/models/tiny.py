"""`tiny_test`: a small random CNN, and `tiny_vit_test`: a small random timm ViT, for fast tests (the role timm's
`test_*` models play; timm's own test ViTs take 160x160 images, these fit ImageNet's 224 crop and 1000 classes)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from int8eval.config import Interpolation, Preprocessing

NAME = "tiny_test"
VIT_NAME = "tiny_vit_test"


class TinyNet(nn.Module):
    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 32, 1, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def seed_batchnorm(module: nn.Module, seed: int = 1) -> None:
    """Give every BatchNorm seeded, non-identity statistics and affine parameters, as trained weights have: with
    the defaults (mean 0, var 1, weight 1, bias 0) BatchNorm is almost the identity, and a backend that dropped it
    instead of folding it would still match PyTorch. Used by the test models (here and the tests' ResNet50)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for bn in module.modules():
            if isinstance(bn, nn.BatchNorm2d):
                n = bn.num_features
                bn.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
                bn.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.25)  # 0.25 .. 1.75
                bn.weight.copy_(torch.rand(n, generator=g) + 0.5)  # 0.5 .. 1.5
                bn.bias.copy_(torch.randn(n, generator=g) * 0.3)


def infos():
    from int8eval.models import ModelInfo

    return [ModelInfo(NAME, "test", "random, seeded (for tests)"),
            ModelInfo(VIT_NAME, "test", "timm ViT (patch 32, depth 2, width 64), random, seeded (for tests)")]


def handles(name: str) -> bool:
    return name in (NAME, VIT_NAME)


def tiny_vit() -> nn.Module:
    """A timm VisionTransformer small enough for the CPU tests: 224x224 input, 7x7 patches of 32, two blocks."""
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=224, patch_size=32, embed_dim=64, depth=2, num_heads=2, mlp_ratio=2.0,
                             num_classes=1000)


def load(name: str, *, checkpoint: Path | None = None, weights: str | None = None):
    from int8eval.models import LoadedModel, load_state_dict_file

    torch.manual_seed(0)
    if name == VIT_NAME:
        module = tiny_vit()
        pre = Preprocessing(resize=256, crop=224, interpolation=Interpolation.bicubic, mean=(0.5,) * 3, std=(0.5,) * 3)
    else:
        module = TinyNet()
        seed_batchnorm(module)
        pre = Preprocessing(resize=40, crop=32, interpolation=Interpolation.bilinear)
    source = "random init, seed 0"
    if checkpoint is not None:
        load_state_dict_file(module, checkpoint)
        source = str(checkpoint)
    return LoadedModel(name, module.eval(), pre, source)
