"""Quantization-aware training (QAT) and its FP32 control: the same fine-tuning schedule, without quantization.

The seed fine-tuned ResNet50 with fake quantization for two epochs and compared the result with the original FP32
model, so a change in accuracy could come from the fine-tuning as much as from QAT. Here every QAT run has a twin
that trains the same float model on the same images, in the same order, with the same augmentation and optimizer,
but without fake quantization ("torch-fp32-finetuned"); the report can then separate the two effects.

This module is the registered builder of every recipe with `qat_epochs` (`build`): the fine-tuning settings
come from the recipe (epochs, lr) and the BuildContext (training images, batch size, seed, workers).

Two QAT paths:

- PT2E (current): `torch.export` -> torchao's `prepare_qat_pt2e` with `X86InductorQuantizer(is_qat=True)` ->
  train -> `convert_pt2e`; the INT8 model is compiled with inductor, which lowers it to oneDNN INT8 kernels.
  The model surgery (tracing, BatchNorm folding, preparation, the PTQ-calibrated ranges) is in `qat_pt2e`.
- legacy (the seed's eager torch.ao API, `qat_legacy`): torchvision's quantizable twin, `prepare_qat`, `convert`.

Activation ranges. torchao's QAT config tracks each activation's min/max by a moving average, which starts from the
first batch; on EfficientNet-Lite0 min/max ranges cost ~6 points of top-1 (FINDINGS: PT2E with min/max vs the
histogram observer). So, given calibration images, PT2E QAT first calibrates the activations as PTQ does (the X86
quantizer's HistogramObserver), loads those ranges into the fake quantizers and keeps them fixed: QAT then starts
from the PTQ model and trains the weights to fit it (NVIDIA's pytorch-quantization recipe: calibrate, then QAT).
Its recipe is therefore recorded with `calib: mse` (the HistogramObserver's L2 search, as torch PTQ's mse), and
`details["calibration"]` names what ran.

BatchNorm. By default (`freeze_bn=True`) BatchNorm is folded into the convolutions before training and the model
trains in eval mode (no dropout): with a few hundred images in batches of 32, updating BatchNorm statistics would
change the model more than QAT does. It also avoids two torchao limits: its QAT conv-bn fusion and its train/eval
BatchNorm rewrite both hard-code eps=1e-5 (EfficientNet-Lite uses 1e-3).

Example:
    >>> loaded = load_model("efficientnet_lite0")
    >>> train, rest = split_training(discover(root).samples, size=300, seed=0)  # int8eval.data.layouts
    >>> spec = FinetuneSpec(epochs=1, lr=1e-5)
    >>> qat = build_finetuned_variant(loaded, train, Path("runs/x"), spec=spec, quantize=True)
    >>> control = build_finetuned_variant(loaded, train, Path("runs/x"), spec=spec, quantize=False)
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import numpy as np
import torch
from torch import nn

from int8eval.backends import qat_legacy, qat_pt2e
from int8eval.backends.base import BuildContext, CalibrationData
from int8eval.backends.pt2e import save_program
from int8eval.backends.torch_backend import TorchVariant
from int8eval.config import Backend, CalibMethod, Precision, Preprocessing, Recipe
from int8eval.data.decode import INTERPOLATION, ImageDataset
from int8eval.data.decode import loader as image_loader
from int8eval.data.layouts import Sample
from int8eval.errors import BackendUnavailable, ConfigError, DatasetError


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
        if self.engine not in qat_legacy.ENGINES:
            raise ConfigError(f"quantized engine {self.engine!r} is not one of {', '.join(qat_legacy.ENGINES)}")
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
    if recipe.precision is Precision.int8 and recipe.calib in (CalibMethod.percentile, CalibMethod.entropy):
        raise ConfigError(
            f"QAT takes its activation ranges from PyTorch's observers (PT2E: the X86 quantizer's HistogramObserver, "
            f"calib mse; legacy: moving-average min/max, calib minmax), not {recipe.calib.value}; leave calib out"
        )
    if recipe.precision is Precision.int8 and not recipe.legacy and importlib.util.find_spec("torchao") is None:
        raise BackendUnavailable("PT2E QAT needs torchao: pip install 'int8eval[pt2e]' (or use legacy)")


def finetune_spec(recipe: Recipe, context: BuildContext) -> FinetuneSpec:
    """The schedule of a fine-tuning recipe: epochs and learning rate from `recipe`, training batch size, seed,
    decoding workers, BatchNorm freezing and the legacy engine from the session's `context`."""
    return FinetuneSpec(
        epochs=recipe.qat_epochs, lr=recipe.lr, batch_size=context.train_batch_size, seed=context.seed,
        workers=context.workers, freeze_bn=context.freeze_bn, engine=context.legacy_engine,
    )


def build(
    loaded, recipe: Recipe, calib: CalibrationData | None, workdir: Path, context: BuildContext | None = None
) -> FinetunedVariant:
    """The registered builder of recipes with `qat_epochs`: fine-tune `loaded` on `context.train` (QAT for an INT8
    recipe, PT2E or `legacy` eager; the FP32 control otherwise), artifacts under `workdir`."""
    check_recipe(recipe)
    context = context if context is not None else BuildContext(workdir=Path(workdir))
    return build_finetuned_variant(
        loaded, context.train, workdir, spec=finetune_spec(recipe, context), quantize=recipe.precision is Precision.int8,
        legacy=recipe.legacy, calib=calib, recipe=recipe, compile=context.compile_qat,
    )


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


def train_transform(pre: Preprocessing):
    """Training-time augmentation at the model's input size and normalisation: RandomResizedCrop + flip."""
    from torchvision import transforms

    return transforms.Compose(
        [
            transforms.RandomResizedCrop(pre.crop, interpolation=INTERPOLATION[pre.interpolation.value]),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(pre.mean, pre.std),
        ]
    )


def training_loader(samples: list[Sample], pre: Preprocessing, spec: FinetuneSpec):
    """The training images, augmented (`train_transform`) and shuffled by `spec.seed`."""
    # A seeded generator drives both the shuffling and (through the workers' seeds or the global RNG reset in
    # _train) the augmentation, so the QAT run and its control see the same crops in the same order.
    return image_loader(
        ImageDataset(samples, train_transform(pre)),
        batch_size=spec.batch_size,
        workers=spec.workers,
        shuffle=True,
        generator=torch.Generator().manual_seed(spec.seed),
    )


# ---------------------------------------------------------------------------------------------- training


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
        model = qat_legacy.prepare(loaded, spec.engine).to(device)
        set_mode = lambda train: qat_pt2e.set_mode(model, train=train, exported=False)  # noqa: E731
    else:
        gm = qat_pt2e.float_graph(loaded, freeze_bn=spec.freeze_bn)
        if method is QATMethod.none:
            model = gm.to(device)
            set_mode = lambda train: qat_pt2e.set_mode(model, train=train, exported=False)  # noqa: E731
        else:
            if not spec.freeze_bn:
                qat_pt2e.check_bn_eps(gm)
            model = qat_pt2e.prepare(gm, example)
            if spec.calibrate_first and calib is not None and calib.num_images:
                fixed = qat_pt2e.fix_activation_ranges(model, qat_pt2e.ptq_activation_qparams(gm, example, calib))
            model = model.to(device)
            set_mode = lambda train: qat_pt2e.set_mode(model, train=train, exported=True)  # noqa: E731
    if method is not QATMethod.none and not fixed:
        set_mode(False)
        _warm_up_observers(model, calib, device)
    prepare_s = time.perf_counter() - start

    train_start = time.perf_counter()
    losses, seen, bad = _train(model, training_loader(train_samples, loaded.preprocessing, spec), spec, device, set_mode)
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
        return qat_legacy.finish(model, spec.engine)
    return qat_pt2e.finish(loaded, model, freeze_bn=spec.freeze_bn, example=example, device=device)


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
    if recipe is None:  # what was built, as a recipe: PT2E QAT's ranges come from the HistogramObserver (mse)
        pt2e = result.method is QATMethod.pt2e
        recipe = Recipe(
            backend=Backend.torch, precision=Precision.int8 if quantize else Precision.fp32, legacy=legacy and quantize,
            qat_epochs=spec.epochs, lr=spec.lr, calib=CalibMethod.mse if pt2e else CalibMethod.minmax,
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
        **({"calibration": _calibration_phrase(result)} if result.method is not QATMethod.none else {}),
        **({"legacy": "PyTorch's eager torch.ao.quantization QAT (prepare_qat/convert) on torchvision's quantizable "
                      "twin"} if result.method is QATMethod.legacy else {}),
    }


def _calibration_phrase(result: FinetuneResult) -> str:
    """What set a QAT model's activation ranges (`details["calibration"]`)."""
    if result.method is QATMethod.legacy:
        return f"torch.ao default QAT qconfig ({result.spec.engine}): moving-average min/max fake quantizers"
    if result.fixed_ranges:
        return "torchao HistogramObserver (X86 PTQ config, L2 error search over 2048 bins), fixed while training"
    return "torchao X86 QAT config: moving-average min/max fake quantizers"
