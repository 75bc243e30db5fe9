"""The seed's eager QAT API, kept as a labelled baseline (`legacy` on a QAT recipe): torchvision's quantizable twin
of the architecture, `fuse_model(is_qat=True)`, `torch.ao.quantization.get_default_qat_qconfig(engine)` (moving-
average min/max fake quantizers), `prepare_qat`, train, `convert`. Deprecated in PyTorch, offered only where the
installed version still has it, and only for architectures torchvision ships a quantizable twin of (ResNet,
MobileNetV2/V3, GoogLeNet, Inception v3, ShuffleNetV2, ResNeXt). Training itself is `qat`'s, shared with PT2E.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from int8eval.errors import BackendUnavailable, ConfigError

ENGINES = ("x86", "fbgemm", "qnnpack", "onednn")  # quantized engines torch.ao's eager API accepts


def quantizable_twin(loaded) -> nn.Module:
    """torchvision's quantizable twin of `loaded` (QuantStub/DeQuantStub, FloatFunctional adds) with its weights."""
    if not all(hasattr(torch.ao.quantization, f) for f in ("get_default_qat_qconfig", "prepare_qat", "convert")):
        raise BackendUnavailable(
            f"this PyTorch ({torch.__version__}) no longer has the eager torch.ao.quantization QAT API; use the PT2E path"
        )
    import torchvision.models.quantization as tvq

    builder = getattr(tvq, loaded.name, None)
    if builder is None or not callable(builder):
        raise ConfigError(
            f"legacy eager QAT needs a torchvision architecture with a quantizable twin (resnet18, resnet50, "
            f"mobilenet_v2, mobilenet_v3_large, googlenet, inception_v3, shufflenet_v2_*, resnext101_*); "
            f"{loaded.name} has none: use the PT2E path (drop legacy)"
        )
    twin = builder(weights=None, quantize=False)
    result = twin.load_state_dict(loaded.module.state_dict(), strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ConfigError(
            f"{loaded.name}'s weights do not fit torchvision's quantizable {loaded.name}: "
            f"missing {result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]}"
        )
    return twin.eval()


def prepare(loaded, engine: str) -> nn.Module:
    """The quantizable twin of `loaded`, fused and prepared for eager QAT with `engine`'s default QAT qconfig."""
    twin = quantizable_twin(loaded)
    twin.fuse_model(is_qat=True)  # conv+bn(+relu) -> torch.ao.nn.intrinsic QAT modules (fuse_modules_qat)
    twin.qconfig = torch.ao.quantization.get_default_qat_qconfig(engine)
    twin.train()  # prepare_qat insists on training mode
    torch.ao.quantization.prepare_qat(twin, inplace=True)
    return twin


def finish(qat_model: nn.Module, engine: str) -> tuple[nn.Module, nn.Module]:
    """(the INT8 model `convert` makes of the trained `qat_model`, the trained weights computing in float), on the CPU."""
    model = qat_model.cpu().eval()
    float_model = float_weights(model)
    torch.backends.quantized.engine = engine
    return torch.ao.quantization.convert(model, inplace=False), float_model


def float_weights(qat_model: nn.Module) -> nn.Module:
    """The QAT-trained model computing in float: fake quantization and observers switched off."""
    float_model = copy.deepcopy(qat_model)
    float_model.apply(torch.ao.quantization.disable_fake_quant)
    float_model.apply(torch.ao.quantization.disable_observer)
    return float_model.eval()
