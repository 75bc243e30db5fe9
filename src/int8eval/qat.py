"""Quantization-aware training (QAT) and its FP32 control: the same fine-tuning schedule, without quantization.

The seed fine-tuned ResNet50 with fake quantization for two epochs and compared the result with the original FP32
model, so a change in accuracy could come from the fine-tuning as much as from QAT. Here every QAT run has a twin
that trains the same float model on the same images, in the same order, with the same augmentation and optimizer,
but without fake quantization ("torch-fp32-finetuned"); the report can then separate the two effects.

Two QAT paths:

- PT2E (current): `torch.export` -> torchao's `prepare_qat_pt2e` with `X86InductorQuantizer(is_qat=True)` ->
  train -> `convert_pt2e`; the INT8 model is compiled with inductor, which lowers it to oneDNN INT8 kernels.
- legacy (the seed's API): torchvision's quantizable twin of the architecture, `fuse_model(is_qat=True)`,
  `torch.ao.quantization.get_default_qat_qconfig(engine)`, `prepare_qat`, train, `convert`. Deprecated in PyTorch,
  offered only where the installed version still has it, and only for architectures torchvision ships a
  quantizable twin of (ResNet, MobileNetV2/V3, GoogLeNet, Inception v3, ShuffleNetV2, ResNeXt).

Activation ranges. torchao's QAT config tracks each activation's min/max by a moving average, which starts from the
first batch; on EfficientNet-Lite0 min/max ranges cost ~6 points of top-1 (FINDINGS: PT2E with min/max vs the
histogram observer). So, given calibration images, PT2E QAT first calibrates the activations as PTQ does (the X86
quantizer's HistogramObserver), loads those ranges into the fake quantizers and keeps them fixed: QAT then starts
from the PTQ model and trains the weights to fit it (NVIDIA's pytorch-quantization recipe: calibrate, then QAT).

BatchNorm. By default (`freeze_bn=True`) BatchNorm is folded into the convolutions before training and the model
trains in eval mode (no dropout): with a few hundred images in batches of 32, updating BatchNorm statistics would
change the model more than QAT does. It also avoids two torchao limits: its QAT conv-bn fusion and its train/eval
BatchNorm rewrite both hard-code eps=1e-5 (EfficientNet-Lite uses 1e-3).

Example:
    >>> loaded = load_model("efficientnet_lite0")
    >>> train, rest = split_training(discover(root).samples, size=300, seed=0)
    >>> spec = FinetuneSpec(epochs=1, lr=1e-5)
    >>> qat = build_finetuned_variant(loaded, train, Path("runs/x"), spec=spec, quantize=True)
    >>> control = build_finetuned_variant(loaded, train, Path("runs/x"), spec=spec, quantize=False)
"""

from __future__ import annotations

import copy
import importlib.util
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import numpy as np
import torch
from torch import nn

from int8eval.backends.base import CalibrationData
from int8eval.backends.torch_backend import (
    TorchVariant,
    _calibrate,
    _drop_unused_tensors,
    _export,
    save_program,
    untie_reused_modules,
)
from int8eval.config import Backend, Precision, Preprocessing, Recipe
from int8eval.data.decode import _INTERPOLATION, ImageDataset
from int8eval.data.decode import loader as image_loader
from int8eval.data.layouts import Sample, discover
from int8eval.errors import BackendUnavailable, ConfigError, DatasetError

DEFAULT_TRAIN_SIZE = 300
_TORCHAO_BN_EPS = 1e-5  # what torchao's QAT conv-bn pattern and train/eval rewrite assume
_LEGACY_ENGINES = ("x86", "fbgemm", "qnnpack", "onednn")


class QATMethod(str, Enum):
    pt2e = "pt2e"  # torchao prepare_qat_pt2e / convert_pt2e with the X86 inductor quantizer
    legacy = "legacy"  # the seed's torch.ao.quantization eager API (prepare_qat / convert)
    none = "none"  # the FP32 control: the same schedule without fake quantization


@dataclass(frozen=True)
class FinetuneSpec:
    """One fine-tuning schedule, shared by a QAT run and its FP32 control.

    Args:
        epochs: passes over the training images.
        lr: SGD learning rate (a pretrained model wants a small one: 1e-5 to 1e-4).
        batch_size: training images per step.
        momentum, weight_decay: SGD settings.
        seed: data order and augmentation (identical for the QAT run and its control).
        freeze_bn: fold BatchNorm into the convolutions and train in eval mode (no BN statistics, no dropout).
        workers: decoding processes for the training images.
        device: "cuda", "cpu" or None (CUDA when available).
        engine: quantized engine of the legacy path ("x86", PyTorch's default since 2.0; the seed used "fbgemm").
        calibrate_first: PT2E QAT with calibration images: set the activation ranges by the X86 quantizer's PTQ
            calibration (its HistogramObserver) and keep them fixed while the weights train. Off, or without
            calibration images: torchao's QAT default, moving averages of each batch's min/max.
    """

    epochs: int = 1
    lr: float = 1e-5
    batch_size: int = 32
    momentum: float = 0.9
    weight_decay: float = 0.0
    seed: int = 0
    freeze_bn: bool = True
    workers: int = 0
    device: str | None = None
    engine: str = "x86"
    calibrate_first: bool = True

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f"QAT/fine-tuning epochs must be at least 1, got {self.epochs}")
        if not self.lr > 0:
            raise ConfigError(f"learning rate must be positive, got {self.lr}")
        if self.batch_size < 1:
            raise ConfigError(f"training batch size must be at least 1, got {self.batch_size}")
        if self.engine not in _LEGACY_ENGINES:
            raise ConfigError(f"quantized engine {self.engine!r} is not one of {', '.join(_LEGACY_ENGINES)}")
        if self.device not in (None, "cpu", "cuda"):
            raise ConfigError(f"device {self.device!r} is not 'cpu' or 'cuda'")

    def resolved_device(self) -> str:
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device 'cuda' was asked for but PyTorch sees no CUDA GPU; leave the device unset")
        return self.device or ("cuda" if torch.cuda.is_available() else "cpu")


def variant_name(*, quantize: bool, legacy: bool = False) -> str:
    """The name a fine-tuned variant is reported under: torch-int8-qat[-legacy] or torch-fp32-finetuned."""
    if not quantize:
        return "torch-fp32-finetuned"
    return "torch-int8-qat-legacy" if legacy else "torch-int8-qat"


def check_recipe(recipe: Recipe) -> None:
    """Reject a fine-tuning recipe that cannot run, before any work: QAT and its control are PyTorch INT8 / FP32."""
    if recipe.backend is not Backend.torch:
        raise ConfigError(f"QAT and its FP32 control run in PyTorch; {recipe.name} is for {recipe.backend.value}")
    if recipe.precision not in (Precision.int8, Precision.fp32):
        raise ConfigError(f"fine-tuning gives an INT8 (QAT) or FP32 (control) model, not {recipe.precision.value}")
    if recipe.legacy and recipe.precision is not Precision.int8:
        raise ConfigError("legacy selects the seed's eager QAT API; the FP32 control has no legacy form")
    if recipe.keep_fp32:
        raise ConfigError("keep_fp32 applies to post-training quantization; QAT quantizes every layer here")
    if recipe.precision is Precision.int8 and not recipe.legacy and importlib.util.find_spec("torchao") is None:
        raise BackendUnavailable("PT2E QAT needs torchao: pip install 'int8eval[pt2e]' (or use legacy)")


@dataclass
class FinetuneResult:
    """What fine-tuning produced. `module` is what to evaluate (INT8 after QAT, FP32 for the control), on the CPU;
    `float_module` holds the trained float weights as a plain module (FP32 export, other backends)."""

    module: nn.Module
    float_module: nn.Module
    method: QATMethod
    spec: FinetuneSpec
    losses: list[float]  # mean training loss per epoch
    num_images: int  # training images used (unreadable ones are skipped)
    train_s: float
    prepare_s: float  # tracing, folding, QAT preparation and conversion (not training)
    device: str
    skipped: list[dict] = field(default_factory=list)  # {"path", "reason"} of unreadable training images
    fixed_ranges: int = 0  # activations whose ranges came from PTQ calibration and stayed fixed (calibrate_first)


# ---------------------------------------------------------------------------------------------- training data


def split_training(
    samples: list[Sample], *, size: int = DEFAULT_TRAIN_SIZE, seed: int = 0, train_root: Path | None = None
) -> tuple[list[Sample], list[Sample]]:
    """(training samples, the rest of `samples`): the rest is what may still be evaluated or calibrated on.

    Without `train_root` (or with the evaluation folder itself) the training images are a seeded subset of
    `samples`; with another folder they are a seeded subset of it, minus any file that is also in `samples`.
    """
    if size < 1:
        raise ConfigError(f"training set size must be at least 1, got {size}")
    eval_paths = {s.path.resolve() for s in samples}
    if train_root is not None:
        pool = [s for s in discover(train_root).samples if s.path.resolve() not in eval_paths]
        if not pool:
            raise DatasetError(f"--train-data {train_root} holds no images outside the evaluation set")
        chosen = pool if size >= len(pool) else [pool[i] for i in sorted(random.Random(seed).sample(range(len(pool)), size))]
        return chosen, samples
    if size >= len(samples):
        raise DatasetError(
            f"training on {size} of the {len(samples)} images leaves none to evaluate; lower the training set size "
            "or pass --train-data DIR"
        )
    # A different stream from the calibration split's, so the two subsets are not the same images.
    chosen = set(random.Random(f"train-{seed}").sample(range(len(samples)), size))
    return [s for i, s in enumerate(samples) if i in chosen], [s for i, s in enumerate(samples) if i not in chosen]


def train_transform(pre: Preprocessing):
    """Training-time augmentation at the model's input size and normalisation: RandomResizedCrop + flip."""
    from torchvision import transforms

    return transforms.Compose(
        [
            transforms.RandomResizedCrop(pre.crop, interpolation=_INTERPOLATION[pre.interpolation.value]),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(pre.mean, pre.std),
        ]
    )


def _loader(samples: list[Sample], pre: Preprocessing, spec: FinetuneSpec):
    # A seeded generator drives both the shuffling and (through the workers' seeds or the global RNG reset in
    # _train) the augmentation, so the QAT run and its control see the same crops in the same order.
    return image_loader(
        ImageDataset(samples, train_transform(pre)),
        batch_size=spec.batch_size,
        workers=spec.workers,
        shuffle=True,
        generator=torch.Generator().manual_seed(spec.seed),
    )


# ---------------------------------------------------------------------------------------------- model surgery


def trace(module: nn.Module) -> torch.fx.GraphModule:
    """`torch.fx.symbolic_trace`, with a usable error for models that cannot be traced."""
    try:
        return torch.fx.symbolic_trace(module)
    except Exception as e:  # noqa: BLE001 - tracing raises many types
        raise ConfigError(
            f"fine-tuning needs a model torch.fx can trace; {type(module).__name__} cannot be: {type(e).__name__}: {e}"
        ) from e


def fold_batchnorm(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Fold every BatchNorm that follows a convolution into it (eval-mode statistics); all weights trainable."""
    from torch.fx.experimental.optimization import fuse

    folded = fuse(gm.eval(), inplace=False)
    for p in folded.parameters():  # fuse() creates the folded biases without gradients
        p.requires_grad_(True)
    return folded


def _float_graph(loaded, spec: FinetuneSpec) -> torch.fx.GraphModule:
    """The float model as an FX graph: BatchNorm folded (when frozen), each reused module untied."""
    gm = trace(copy.deepcopy(loaded.module).eval())
    if spec.freeze_bn:
        gm = fold_batchnorm(gm)
    # Trace again after untying: retargeted nodes keep the nn_module_stack recorded for the shared module, and
    # torch.export reuses it, so the X86 quantizer would still see one partition with several outputs.
    return torch.fx.symbolic_trace(untie_reused_modules(gm))


def _check_bn_eps(module: nn.Module) -> None:
    odd = sorted({m.eps for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)} - {_TORCHAO_BN_EPS})
    if odd:
        raise ConfigError(
            f"this model's BatchNorm uses eps {odd}; torchao's QAT conv-bn fusion assumes eps=1e-5 and would change "
            "the model. Keep BatchNorm frozen (freeze_bn=True, the default), which folds it before training"
        )


def _pt2e_prepare(gm: torch.fx.GraphModule, example: torch.Tensor) -> torch.fx.GraphModule:
    try:
        from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e
        from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
            X86InductorQuantizer,
            get_default_x86_inductor_quantization_config,
        )
    except ImportError as e:
        raise BackendUnavailable("PT2E QAT needs torchao: pip install 'int8eval[pt2e]'") from e
    quantizer = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config(is_qat=True))
    return prepare_qat_pt2e(_export(gm, example).module(), quantizer)


def _ptq_activation_qparams(gm: torch.fx.GraphModule, example: torch.Tensor, calib: CalibrationData) -> dict:
    """{observer name: (scale, zero_point)} of every activation, calibrated the PTQ way (X86 default config)."""
    from torchao.quantization.pt2e import ObserverBase
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    quantizer = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(_export(gm, example).module(), quantizer)
    _calibrate(prepared, calib)
    return {
        name: obs.calculate_qparams()
        for name, obs in prepared.named_modules()
        if isinstance(obs, ObserverBase) and obs.qscheme == torch.per_tensor_affine
    }


def _fix_activation_ranges(model: nn.Module, qparams: dict) -> int:
    """Load PTQ activation qparams into the QAT fake quantizers of the same names and stop their observers.

    BatchNorm is folded before both graphs are prepared, so prepare_pt2e and prepare_qat_pt2e annotate the same
    graph and name their observers alike. The observer's min/max are set to the grid's ends too, because
    convert_pt2e reads the qparams from the observer, not from the fake quantizer."""
    from torchao.quantization.pt2e import FakeQuantizeBase

    done = 0
    for name, fq in model.named_modules():
        if not isinstance(fq, FakeQuantizeBase) or name not in qparams:
            continue
        scale, zero_point = (t.detach().reshape(-1) for t in qparams[name])
        fq.scale.resize_(scale.shape).copy_(scale)
        fq.zero_point.resize_(zero_point.shape).copy_(zero_point)
        obs = fq.activation_post_process
        obs.min_val = ((obs.quant_min - zero_point) * scale).reshape(obs.min_val.shape or ()).to(obs.min_val)
        obs.max_val = ((obs.quant_max - zero_point) * scale).reshape(obs.max_val.shape or ()).to(obs.max_val)
        fq.disable_observer()
        done += 1
    return done


def _legacy_twin(loaded) -> nn.Module:
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


def _legacy_prepare(loaded, spec: FinetuneSpec) -> nn.Module:
    twin = _legacy_twin(loaded)
    twin.fuse_model(is_qat=True)  # conv+bn(+relu) -> torch.ao.nn.intrinsic QAT modules (fuse_modules_qat)
    twin.qconfig = torch.ao.quantization.get_default_qat_qconfig(spec.engine)
    twin.train()  # prepare_qat insists on training mode
    torch.ao.quantization.prepare_qat(twin, inplace=True)
    return twin


# ---------------------------------------------------------------------------------------------- training


def _set_mode(model: nn.Module, *, train: bool, exported: bool) -> None:
    if exported:  # exported graphs refuse .train()/.eval(); torchao rewrites their dropout/BN ops instead
        from torchao.quantization.pt2e import move_exported_model_to_eval, move_exported_model_to_train

        (move_exported_model_to_train if train else move_exported_model_to_eval)(model)
    else:
        model.train(train)


def _train(
    model: nn.Module, loader, spec: FinetuneSpec, device: str, set_mode: Callable[[bool], None]
) -> tuple[list[float], int, list[tuple[int, str]]]:
    # Frozen BN: train in eval mode (folded BN, no dropout); else BN statistics and dropout as in model.train().
    set_mode(not spec.freeze_bn)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay)
    torch.manual_seed(spec.seed)  # augmentation draws from the global RNG when decoding in this process
    losses, seen, bad = [], 0, []
    for _ in range(spec.epochs):
        total, count = 0.0, 0
        for batch in loader:
            bad += batch.bad
            if not len(batch.indices):
                continue
            images, labels = torch.from_numpy(batch.images).to(device), torch.from_numpy(batch.labels).to(device)
            loss = nn.functional.cross_entropy(model(images), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(labels)
            count += len(labels)
        losses.append(total / max(count, 1))
        seen = count
    set_mode(False)
    if not seen:
        raise DatasetError("none of the training images could be read")
    return losses, seen, list(dict.fromkeys(bad))  # (position, reason), once each over the epochs


@torch.no_grad()
def _warm_up_observers(model: nn.Module, calib: CalibrationData | None, device: str) -> None:
    """Initialise the fake quantizers' ranges on clean (eval-transform) images before training moves them."""
    if calib is None:
        return
    for batch in calib.batches:
        model(torch.from_numpy(batch).to(device))


def qat_finetune(
    loaded,
    train_samples: list[Sample],
    *,
    epochs: int = 1,
    lr: float = 1e-5,
    batch_size: int = 32,
    quantize: bool = True,
    legacy: bool = False,
    spec: FinetuneSpec | None = None,
    calib: CalibrationData | None = None,
) -> FinetuneResult:
    """Fine-tune `loaded` (a LoadedModel) on `train_samples`, with fake quantization (QAT) or without (the control).

    Args:
        loaded: the FP32 model; it is not modified.
        train_samples: labelled training images (decoded with RandomResizedCrop + flip at the model's input size).
        epochs, lr, batch_size: the schedule (ignored when `spec` is given).
        quantize: True: QAT, then convert to a real INT8 model; False: the FP32 control, same schedule.
        legacy: QAT with the seed's eager torch.ao.quantization API instead of PT2E (torchvision architectures).
        spec: the full schedule (optimizer, seed, BatchNorm, device, legacy engine).
        calib: calibration images (eval transform). PT2E with `spec.calibrate_first` (the default): they set the
            activation ranges by PTQ calibration, fixed while training; else they warm up the moving-average
            observers before training.

    Returns:
        A FinetuneResult whose `module` runs on the CPU: INT8 (not yet compiled) or the fine-tuned FP32 model.
    """
    spec = spec or FinetuneSpec(epochs=epochs, lr=lr, batch_size=batch_size)
    if not train_samples:
        raise DatasetError("fine-tuning needs training images; none were given (--train-data DIR)")
    device = spec.resolved_device()
    method = QATMethod.none if not quantize else QATMethod.legacy if legacy else QATMethod.pt2e
    start = time.perf_counter()
    example = loaded.example_input(2)  # batch 2: a batch of 1 would be specialised by torch.export
    fixed = 0  # activation fake quantizers whose ranges come from PTQ calibration

    if method is QATMethod.legacy:
        model = _legacy_prepare(loaded, spec).to(device)
        set_mode = lambda train: _set_mode(model, train=train, exported=False)  # noqa: E731
    else:
        gm = _float_graph(loaded, spec)
        if method is QATMethod.none:
            model = gm.to(device)
            set_mode = lambda train: _set_mode(model, train=train, exported=False)  # noqa: E731
        else:
            if not spec.freeze_bn:
                _check_bn_eps(gm)
            model = _pt2e_prepare(gm, example)
            if spec.calibrate_first and calib is not None and calib.num_images:
                fixed = _fix_activation_ranges(model, _ptq_activation_qparams(gm, example, calib))
            model = model.to(device)
            set_mode = lambda train: _set_mode(model, train=train, exported=True)  # noqa: E731
    if method is not QATMethod.none and not fixed:
        set_mode(False)
        _warm_up_observers(model, calib, device)
    prepare_s = time.perf_counter() - start

    train_start = time.perf_counter()
    losses, seen, bad = _train(model, _loader(train_samples, loaded.preprocessing, spec), spec, device, set_mode)
    skipped = [{"path": train_samples[i].id, "reason": reason} for i, reason in bad]
    train_s = time.perf_counter() - train_start

    convert_start = time.perf_counter()
    module, float_module = _finish(loaded, model, method, spec, example, device)
    prepare_s += time.perf_counter() - convert_start
    return FinetuneResult(module, float_module, method, spec, losses, seen, train_s, prepare_s, device, skipped, fixed)


def _finish(loaded, model: nn.Module, method: QATMethod, spec: FinetuneSpec, example: torch.Tensor, device: str):
    """(module to evaluate on the CPU, trained float weights as a plain module)."""
    if method is QATMethod.none:
        model = model.cpu().eval()
        return model, model
    if method is QATMethod.legacy:
        model = model.cpu().eval()
        float_model = _legacy_float_weights(model)
        torch.backends.quantized.engine = spec.engine
        return torch.ao.quantization.convert(model, inplace=False), float_model
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if device != "cpu":
        # Exported graphs may hold device-specific constants: rebuild the prepared graph on the CPU and load the
        # trained weights and quantizer states into it, rather than moving the GPU graph back.
        model = _pt2e_prepare(_float_graph(loaded, spec), example)
        model.load_state_dict(state)
    _set_mode(model, train=False, exported=True)
    float_model = _float_graph(loaded, spec)
    # The prepared graph keeps the float module's parameter names: the QAT-trained float weights load back.
    float_model.load_state_dict({k: v for k, v in state.items() if k in float_model.state_dict()}, strict=True)
    converted = convert_pt2e(model)
    _drop_unused_tensors(converted)
    return converted, float_model.eval()


def _legacy_float_weights(qat_model: nn.Module) -> nn.Module:
    """The QAT-trained model computing in float: fake quantization and observers switched off."""
    float_model = copy.deepcopy(qat_model)
    float_model.apply(torch.ao.quantization.disable_fake_quant)
    float_model.apply(torch.ao.quantization.disable_observer)
    return float_model.eval()


# ---------------------------------------------------------------------------------------------- variants


class FinetunedVariant(TorchVariant):
    """A fine-tuned model on the CPU: QAT INT8 (PT2E compiled by inductor, or legacy eager) or the FP32 control."""

    def __init__(
        self,
        recipe: Recipe,
        name: str,
        module: nn.Module,
        artifact: Path | None,
        *,
        freezing: bool = False,
        engine: str | None = None,
    ) -> None:
        super().__init__(recipe, module, artifact, freezing=freezing)
        self._name = name
        self.engine = engine  # legacy eager INT8 needs its quantized engine selected when it runs
        self.result: FinetuneResult | None = None

    @property
    def name(self) -> str:
        return self._name

    def predict(self, images: np.ndarray) -> np.ndarray:
        if self.engine is not None:
            torch.backends.quantized.engine = self.engine
        return super().predict(images)


def _save_artifact(result: FinetuneResult, example: torch.Tensor, path: Path) -> Path:
    """The deployable file: an exported program (.pt2) for PT2E INT8, else a state_dict (its size is reported)."""
    if result.method is QATMethod.pt2e:
        return save_program(result.module, example, path.with_suffix(".pt2"))
    torch.save(result.module.state_dict(), path.with_suffix(".pt"))
    return path.with_suffix(".pt")


def build_finetuned_variant(
    loaded,
    train_samples: list[Sample],
    workdir: Path,
    *,
    spec: FinetuneSpec,
    quantize: bool,
    legacy: bool = False,
    calib: CalibrationData | None = None,
    compile: bool = True,
    recipe: Recipe | None = None,
) -> FinetunedVariant:
    """Fine-tune (QAT or the FP32 control), then wrap the result as a Variant named by `variant_name`.

    `prepare_s` covers preparation, training and conversion (and compilation of the PT2E INT8 model).
    """
    start = time.perf_counter()
    result = qat_finetune(loaded, train_samples, quantize=quantize, legacy=legacy, spec=spec, calib=calib)
    name = variant_name(quantize=quantize, legacy=legacy)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    example = loaded.example_input(2)
    artifact = _save_artifact(result, example, workdir / name)
    compiled = result.method is QATMethod.pt2e and compile
    module = result.module
    if compiled:
        import torchao.quantization.pt2e.quantize_pt2e  # noqa: F401 - registers the quantized_decomposed ops

        # Compile the saved program, not the in-memory convert_pt2e graph: on EfficientNet-Lite0 inductor's INT8
        # lowering of the in-memory graph (also after re-exporting it) agreed with FP32 on 85% of images, the
        # same model saved and loaded back on 97.6%, as the uncompiled Q/DQ model does.
        module = torch.compile(torch.export.load(artifact).module(), dynamic=False)
    recipe = recipe or Recipe(
        backend=Backend.torch, precision=Precision.int8 if quantize else Precision.fp32, legacy=legacy and quantize
    )
    engine = spec.engine if result.method is QATMethod.legacy else None
    variant = FinetunedVariant(recipe, name, module, artifact, freezing=compiled, engine=engine)
    variant.result = result
    variant.details = finetune_summary(result)  # the schedule and what it did, in the report's variant entry
    if compiled:  # compile now (lazily otherwise) so that prepare_s counts it
        variant.predict(example.numpy())
    variant.prepare_s = time.perf_counter() - start
    return variant


def finetune_summary(result: FinetuneResult) -> dict:
    """A JSON-able record of the schedule and what it did (for the report's variant entry)."""
    s = result.spec
    return {
        "method": result.method.value,
        "epochs": s.epochs,
        "lr": s.lr,
        "batch_size": s.batch_size,
        "momentum": s.momentum,
        "weight_decay": s.weight_decay,
        "seed": s.seed,
        "freeze_bn": s.freeze_bn,
        "device": result.device,
        "engine": s.engine if result.method is QATMethod.legacy else None,
        "train_images": result.num_images,
        "train_loss_per_epoch": result.losses,
        "train_s": result.train_s,
        "activation_ranges": f"PTQ-calibrated, fixed ({result.fixed_ranges})" if result.fixed_ranges else
        ("moving average" if result.method is not QATMethod.none else None),
        "skipped": result.skipped,
    }
