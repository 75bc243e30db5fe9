"""The stages every command shares: open a session (the model with its preprocessing, the images split in one
fixed order, the calibration images decoded once), expand the recipes asked for, and build the variants in one loop
that survives a failing variant.

`run`, `bench`, `diagnose` and `reproduce` (int8eval.commands) are short compositions of these stages, so a seed,
a calibration set or a failing backend means the same thing in each of them.

Example:
    >>> session = open_session(SessionSpec(model="efficientnet_lite0", data=Path("imagenet-sample")), recipes)
    >>> built = build_variants(session, plan_recipes(recipes), Path("runs/lite0/artifacts"))
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from int8eval import backends, stats
from int8eval.backends import BuildContext, CalibrationData, Variant
from int8eval.config import ActivationType, Backend, CalibMethod, OnBadImage, Precision, Recipe, SessionSpec
from int8eval.data.decode import batches, decode_samples
from int8eval.data.layouts import UNLABELLED_LAYOUT, Sample, discover, split, split_training, subsample
from int8eval.errors import ConfigError, DatasetError
from int8eval.environment import environment
from int8eval.evaluate import EvalOutcome, Predictions, evaluate
from int8eval.models import LoadedModel, load_model
from int8eval.parity import REFERENCE, apply_gate, reference_for
from int8eval.report import Report
from int8eval.report.schema import CalibrationSection, DataSection, ModelSection, VariantResult

Say = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


# --------------------------------------------------------------------------------------------------------------
# Recipes


def expand_recipes(
    backends_: Sequence[Backend | str] = (),
    calibs: Sequence[CalibMethod | str] = (),
    *,
    int8: bool = True,
    precisions: Sequence[Precision | str] = (),
    percentile: float = 99.999,
    per_channel: bool = True,
    legacy: bool = False,
    qat_epochs: int = 0,
    lr: float = 1e-5,
    tensorrt_on_cpu: bool = False,
    keeps: Sequence[tuple[str, ...]] = ((),),
    bias_correction: bool = True,
    activation_type: ActivationType | str | None = None,
    channel_alignment: bool = False,
    smooth_quant: Sequence[float] = (),
    adaround: bool = False,
    onnx_file: bool = False,
) -> tuple[Recipe, ...]:
    """The recipes a command asks for: per backend (default: every installed default backend), one INT8 recipe per
    calibration method (default: the backend's own, `backends.default_calib`) x set of layers kept in FP32 (`keeps`,
    () for none); then the other precisions asked for (fp32, bf16, fp16) per backend; then QAT and its FP32 control.

    `bias_correction=False` turns it off in the INT8 recipes; `activation_type` sets ONNX Runtime's INT8 activations
    (None: the CPU's choice); `legacy` adds the seed's torch.ao path on torch (and for QAT); `channel_alignment` and
    each `smooth_quant` alpha add, beside each OpenVINO INT8 recipe, the same with NNCF's algorithm; `adaround` adds,
    beside each ONNX Runtime and OpenVINO INT8 recipe, the same with AdaRound's learned weight rounding.

    `onnx_file` (the model is an ONNX file): the default backends are those that take one (`backends.takes_onnx`), and
    bias correction is off (it measures layer inputs in the PyTorch module; names end in -nobc)."""
    chosen = [Backend(b) for b in backends_] or [b for b, info in backends.BACKENDS.items() if info.installed and info.default
                                                 and (not onnx_file or backends.takes_onnx(b))]
    bias_correction = bias_correction and not onnx_file
    if activation_type is not None and Backend.onnxruntime not in chosen:
        raise ConfigError("--activation-type applies to onnxruntime's INT8 recipes; add --backend onnxruntime")
    nncf_extras = [{"channel_alignment": True}] * bool(channel_alignment) + [{"smooth_quant": a} for a in smooth_quant]
    if nncf_extras and Backend.openvino not in chosen:
        raise ConfigError("--channel-alignment and --smooth-quant are NNCF's and apply to openvino's INT8 recipes "
                          "(no other backend offers them); add --backend openvino")
    if adaround and Backend.onnxruntime not in chosen and Backend.openvino not in chosen:
        raise ConfigError("--adaround applies to onnxruntime's and openvino's INT8 recipes (it rewrites their INT8 "
                          "weights); add --backend onnxruntime or --backend openvino")
    recipes: list[Recipe] = []
    for backend in chosen:
        emulate = backend is Backend.tensorrt and tensorrt_on_cpu
        if int8:
            for method in [CalibMethod(c) for c in calibs] or [backends.default_calib(backend)]:
                for keep in keeps:
                    common = dict(backend=backend, calib=method, percentile=percentile, per_channel=per_channel,
                                  emulate=emulate, keep_fp32=keep)
                    act = dict(activation_type=activation_type) if backend is Backend.onnxruntime else {}
                    recipes.append(Recipe(**common, **act, bias_correction=None if bias_correction else False))
                    if adaround and backend in (Backend.onnxruntime, Backend.openvino):
                        recipes.append(Recipe(**common, **act, adaround=True,
                                              bias_correction=None if bias_correction else False))
                    if backend is Backend.openvino:
                        recipes += [Recipe(**common, **extra, bias_correction=None if bias_correction else False)
                                    for extra in nncf_extras]
                    if legacy and backend is Backend.torch:
                        recipes.append(Recipe(**common, legacy=True))
        for p in precisions:
            recipes.append(Recipe(backend=backend, precision=Precision(p), emulate=emulate))
    if qat_epochs:  # QAT and its control: the same fine-tuning without quantization
        recipes += qat_recipes(qat_epochs, lr, legacy=legacy)
    return tuple(recipes)


def qat_recipes(epochs: int, lr: float, *, legacy: bool = False, pt2e: bool = True, control: bool = True) -> list[Recipe]:
    """QAT (PT2E; `legacy`: also the seed's eager torch.ao QAT) and its FP32 control, the same fine-tuning without
    quantization."""
    tuned = dict(backend=Backend.torch, qat_epochs=epochs, lr=lr)
    recipes = [Recipe(**tuned, calib=CalibMethod.mse)] if pt2e else []  # its ranges: the X86 HistogramObserver's
    if control:
        recipes.append(Recipe(**tuned, precision=Precision.fp32))
    if legacy:
        recipes.append(Recipe(**tuned, legacy=True))
    return recipes


def resolve_keep(values: tuple[str, ...], sensitivity: Path | None, out: Path) -> tuple[tuple[str, ...], ...]:
    """`--keep-fp32` values -> sets of layer names: "none" (quantize every layer), "a,b,c" (module paths), or
    "topN" (the N most sensitive layers in `sensitivity`, a sensitivity.json that `int8eval diagnose` wrote;
    default: OUT/sensitivity.json)."""
    import json
    import re

    if not values:
        return ((),)
    sensitivity = sensitivity or Path(out) / "sensitivity.json"
    keeps = []
    for value in values:
        value = value.strip()
        if value == "none":
            keeps.append(())
        elif m := re.fullmatch(r"top(\d+)", value):
            if not sensitivity.is_file():
                raise ConfigError(
                    f"--keep-fp32 {value} reads the ranking of `int8eval diagnose`, and {sensitivity} does not exist: "
                    f"run `int8eval diagnose --out {sensitivity.parent}` first or pass --sensitivity FILE"
                )
            try:
                ranking = json.loads(sensitivity.read_text())["ranking"]
                if not isinstance(ranking, list) or not all(isinstance(r, str) for r in ranking):
                    raise ValueError("'ranking' is not a list of layer names")
            except (OSError, ValueError, KeyError, TypeError) as e:  # JSONDecodeError and UnicodeError are ValueErrors
                why = "no 'ranking'" if isinstance(e, (KeyError, TypeError)) else f"{type(e).__name__}: {e}"
                raise ConfigError(
                    f"--keep-fp32 {value}: cannot read the ranking in {sensitivity} ({why}); pass the sensitivity.json "
                    "that `int8eval diagnose` wrote, or run it again"
                ) from None
            n = int(m.group(1))
            if not 0 < n <= len(ranking):
                raise ConfigError(f"--keep-fp32 {value}: {sensitivity} ranks {len(ranking)} layers; choose top1..top{len(ranking)}")
            keeps.append(tuple(ranking[:n]))
        else:
            keeps.append(tuple(v.strip() for v in value.split(",")))
    return tuple(keeps)


# --------------------------------------------------------------------------------------------------------------
# The session: model, splits, calibration data


@dataclass
class Session:
    """A model and its images, split once: training (QAT), then calibration, then evaluation; never overlapping."""

    spec: SessionSpec
    loaded: LoadedModel
    layout: str  # how the images are laid out (data.layouts)
    num_found: int  # usable images found under spec.data
    eval_samples: list[Sample]  # the seeded spec.max_images subset of `pool`
    pool: list[Sample] = field(default_factory=list)  # every image neither trained nor calibrated on
    train: list[Sample] = field(default_factory=list)
    calib: CalibrationData | None = None
    calib_source: str | None = None  # "seeded split of DIR" or the --calib-data folder
    skipped: list[dict] = field(default_factory=list)  # images and folders not used, with why
    class_names: list[str] | None = None  # a label space of its own (stats.class_keys); None: ImageNet-1k's

    @property
    def labels_free(self) -> bool:
        """No accuracy is measured: asked for, or the images carry no labels."""
        return self.spec.labels_free or self.layout == UNLABELLED_LAYOUT

    @property
    def reference(self) -> Recipe:
        """The FP32 reference: PyTorch's, or ONNX Runtime's for an ONNX file (`parity.reference_for`)."""
        return reference_for(self.spec.model)

    def context(self, workdir: Path) -> BuildContext:
        """What the builds of this session share (an FP32 export, a converted model) and what QAT trains on."""
        s = self.spec
        return BuildContext(workdir=Path(workdir), train=self.train, train_batch_size=s.train_batch_size, seed=s.seed,
                            workers=s.workers)


def open_session(
    spec: SessionSpec,
    recipes: Iterable[Recipe] = (),
    *,
    loaded: LoadedModel | None = None,
    say: Say = _quiet,
    on_calibration: Callable[[int, int], None] | None = None,
    calibration_only: bool = False,
) -> Session:
    """Load the model (unless `loaded` is given), find the images, and split them in the one order every command
    uses: training images first (only when a recipe fine-tunes), then calibration images (only when a recipe is
    INT8), then a seeded `max_images` subset of the rest for evaluation. The calibration images are decoded here,
    once, for every build.

    `on_calibration(done, total)` follows the decoding of calibration images. `calibration_only` (a command that
    evaluates nothing, e.g. bench) calibrates on every image when there are no more than `calib_size`."""
    recipes = list(recipes)
    if loaded is None:
        say(f"loading {spec.model}")
        loaded = load_model(spec.model, checkpoint=spec.checkpoint, weights=spec.weights, preprocessing=spec.preprocessing)
    for recipe in recipes:
        loaded.check_layers(recipe.keep_fp32)
        backends.check_model(loaded, recipe)
    class_names = _label_space(spec, loaded)
    found = discover(spec.data, spec.labels, labels_free=spec.labels_free, class_names=class_names,
                     num_classes=loaded.num_classes)
    samples, skipped = found.samples, found.skipped
    train: list[Sample] = []
    if any(r.qat_epochs for r in recipes):  # training images are never calibrated on or evaluated
        other = spec.train_data is not None and Path(spec.train_data).resolve() != Path(spec.data).resolve()
        train, samples = split_training(samples, size=spec.train_size, seed=spec.seed,
                                        train_root=spec.train_data if other else None)
    calib_samples, calib_source = [], None
    if any(r.precision is Precision.int8 and r.deployed is None for r in recipes):  # a deployment is calibrated
        if calibration_only and spec.calib_data is None and spec.calib_size >= len(samples):
            calib_samples, calib_source, samples = samples, f"every image of {spec.data}", []
        else:
            calib_samples, calib_source, samples = _calibration_split(spec, samples, skipped)
    session = Session(
        spec=spec, loaded=loaded, layout=found.layout, num_found=len(found.samples),
        eval_samples=subsample(samples, spec.max_images, spec.seed), pool=samples, train=train, calib_source=calib_source,
        skipped=skipped, class_names=class_names,
    )
    if calib_samples:
        say(f"decoding {len(calib_samples)} calibration images")
        session.calib = _decode_calibration(spec, calib_samples, loaded, skipped, on_calibration)
    return session


def _label_space(spec: SessionSpec, loaded: LoadedModel) -> list[str] | None:
    """The class names of a label space other than ImageNet-1k's (--class-names, or the indices of an image,class
    CSV), checked against the model's number of classes; None for ImageNet-1k."""
    from int8eval.data.class_labels import is_class_csv, read_class_names

    if spec.class_names is not None:
        names = read_class_names(spec.class_names)
        if loaded.num_classes is not None and len(names) != loaded.num_classes:
            raise ConfigError(f"--class-names {spec.class_names} names {len(names)} classes, and {loaded.name} scores "
                              f"{loaded.num_classes}: give one name a line for each of its classes, in its order")
        return names
    if spec.labels is not None and is_class_csv(spec.labels):
        return [str(i) for i in range(loaded.num_classes or 0)]  # keyed by index (stats.class_keys)
    return None


def _calib_folder(spec: SessionSpec) -> Path | None:
    """--calib-data when it is another folder than --data (the same folder means the seeded split)."""
    if spec.calib_data is None or Path(spec.calib_data).resolve() == Path(spec.data).resolve():
        return None
    return Path(spec.calib_data)


def _calibration_split(spec: SessionSpec, samples: list[Sample], skipped: list[dict]):
    """(calibration samples, source label, the samples left to evaluate). Calibration images are never evaluated;
    what --calib-data holds but cannot use goes into `skipped`."""
    folder = _calib_folder(spec)
    if folder is None:
        calib, rest = split(samples, spec.calib_size, spec.seed)
        same = " (--calib-data is --data)" if spec.calib_data is not None else ""
        return calib, f"seeded split of {spec.data}{same}", rest
    calib_set = discover(folder)
    skipped += [{"path": f"{folder}/{s['path']}", "reason": f"calibration: {s['reason']}"} for s in calib_set.skipped]
    if spec.calib_size > len(calib_set.samples):
        raise DatasetError(
            f"--calib-size is {spec.calib_size}, but --calib-data {folder} holds {len(calib_set.samples)} usable "
            f"images: pass --calib-size {len(calib_set.samples)} or add images"
        )
    calib = subsample(calib_set.samples, spec.calib_size, spec.seed)
    calib_ids = {s.path.resolve() for s in calib}
    rest = [s for s in samples if s.path.resolve() not in calib_ids]
    if not rest:
        raise DatasetError(
            f"every image of --data {spec.data} is a calibration image from --calib-data {folder}, and those are "
            "never evaluated: give folders that do not overlap, or leave out --calib-data for a seeded split"
        )
    return calib, str(folder), rest


def _decode_calibration(spec: SessionSpec, samples: list[Sample], loaded: LoadedModel, skipped: list[dict],
                        on_progress: Callable[[int, int], None] | None) -> CalibrationData:
    """The decoded calibration images; those that cannot be read are added to `skipped` (or stop the run with
    --on-bad-image fail), never dropped unsaid."""
    folder = _calib_folder(spec)
    done = 0

    def seen(batch) -> None:
        nonlocal done
        done += len(batch.indices) + len(batch.bad)
        if on_progress:
            on_progress(done, len(samples))
        for i, reason in batch.bad:
            if spec.on_bad_image is OnBadImage.fail:
                raise DatasetError(f"cannot read calibration image {samples[i].path}: {reason} (use --on-bad-image skip to go on)")
            path = f"{folder}/{samples[i].id}" if folder is not None else samples[i].id
            skipped.append({"path": path, "reason": f"calibration: {reason}"})

    images, _, ids = decode_samples(samples, loaded.preprocessing, batch_size=spec.batch_size, workers=spec.workers,
                                    on_batch=seen)
    data = CalibrationData(batches=images, image_ids=ids)
    if not data.num_images:
        raise DatasetError(
            f"none of the {len(samples)} calibration images could be read (e.g. {skipped[-1]['path']}: {skipped[-1]['reason']})"
        )
    return data


# --------------------------------------------------------------------------------------------------------------
# Building


def check_recipes(recipes: Iterable[Recipe]) -> None:
    """Fail before any work on a missing backend or a recipe its backend cannot do (ConfigError, BackendUnavailable)."""
    for recipe in recipes:
        backends.check_recipe(recipe)


@dataclass
class Built:
    """What `build_variants` made: the variants, in recipe order, and why each of the others was not built."""

    variants: list[Variant]
    failures: dict[str, str]  # variant name -> "ExceptionType: message"

    def variant(self, name: str) -> Variant | None:
        return next((v for v in self.variants if v.name == name), None)


def build_variants(
    session: Session,
    recipes: Iterable[Recipe],
    workdir: Path,
    *,
    required: Iterable[Recipe] = (),
    say: Say = _quiet,
    context: BuildContext | None = None,
) -> Built:
    """Build every recipe for the session's model with its calibration data, artifacts under `workdir`. A recipe
    that fails to build is recorded in `failures` and the others go on; one in `required` (the reference) stops
    the command instead. Builds share one BuildContext (an FP32 export, a converted model)."""
    required = list(required)
    context = context or session.context(workdir)
    built = Built([], {})
    for recipe in recipes:
        say(f"building {recipe.name}")
        try:
            built.variants.append(backends.build_variant(session.loaded, recipe, session.calib, Path(workdir), context))
        except Exception as e:  # noqa: BLE001 - one failing variant does not stop the others
            if recipe in required:
                raise
            built.failures[recipe.name] = f"{type(e).__name__}: {e}"
    return built


# --------------------------------------------------------------------------------------------------------------
# One pass, accuracy and the parity gate; the report's common sections


@dataclass
class Measured:
    """The outcome of one pass: per-image predictions, one VariantResult per recipe of the plan, what was skipped."""

    predictions: Predictions
    results: dict[str, VariantResult]  # by variant name, in plan order
    skipped: list[dict]  # the session's skipped images and folders, then those the pass could not decode
    eval_s: float
    wait_s: float = 0.0  # of eval_s, waiting for decoded images


def variant_result(recipe: Recipe, variant: Variant | None, error: str | None,
                   reference: Recipe = REFERENCE) -> VariantResult:
    """A report row for `recipe`: what was built (size, artifact, provenance) or why it was not."""
    return VariantResult(
        name=recipe.name,
        backend=recipe.backend.value,
        precision=recipe.precision.value,
        status="error" if error else "ok",
        error=error,
        recipe=recipe.model_dump(mode="json"),
        reference=recipe == reference,
        size_mb=variant.size_mb if variant else None,
        artifact=str(variant.artifact) if variant and variant.artifact else None,
        prepare_s=variant.prepare_s if variant else None,
        details=variant.details if variant else None,
    )


def _fill_accuracy(result: VariantResult, preds: Predictions, reference: str, *, labels_free: bool = False,
                   class_names: list[str] | None = None) -> None:
    name = result.name
    if labels_free:  # no accuracy: only what agreement with the reference says
        if name != reference and reference in preds.top5:
            result.agreement_top1 = stats.agreement(preds.top1(name), preds.top1(reference))
        return
    correct1 = preds.correct1(name)
    result.top1, result.top1_ci95 = stats.accuracy_ci(correct1)
    result.top5, result.top5_ci95 = stats.accuracy_ci(preds.correct5(name))
    result.per_class_top1 = stats.per_class_accuracy(preds.labels, correct1, class_names)
    if name != reference and reference in preds.top5:
        result.agreement_top1 = stats.agreement(preds.top1(name), preds.top1(reference))
        result.delta_top1 = result.top1 - float(np.mean(preds.correct1(reference)))


def measure(session: Session, plan: Sequence[Recipe], built: Built, *, progress=None, checkpoint=None,
            engine: Callable[..., EvalOutcome] = evaluate) -> Measured:
    """Evaluate every built variant in one pass over the session's evaluation images (each decoded once), fill each
    recipe's accuracy (or, without labels, its agreement) against the reference, and apply the FP32 parity gate (int8eval.parity). `checkpoint`
    (int8eval.resume.EvalCheckpoint) saves the pass as it goes and resumes it. `engine` makes the pass, called as
    `evaluate` is (e.g. int8eval.distributed.RayEvaluator, the pass sharded over a Ray cluster)."""
    spec, reference = session.spec, session.reference
    fast_reference(session, built)
    outcome = engine(
        session.eval_samples, session.loaded.preprocessing, built.variants, reference=reference.name,
        batch_size=spec.batch_size, workers=spec.workers, on_bad_image=spec.on_bad_image, progress=progress,
        checkpoint=checkpoint, num_classes=session.loaded.num_classes,
    )
    preds = outcome.predictions
    results = {r.name: variant_result(r, built.variant(r.name), built.failures.get(r.name), reference) for r in plan}
    for name, message in outcome.errors.items():
        results[name].status, results[name].error = "error", message
    for name, result in results.items():
        if result.status == "ok":
            _fill_accuracy(result, preds, reference.name, labels_free=session.labels_free,
                           class_names=session.class_names)
            result.predict_s = outcome.predict_s.get(name)
    apply_gate(list(plan), results)
    return Measured(preds, results, session.skipped + outcome.skipped, outcome.seconds, outcome.wait_s)


def fast_reference(session: Session, built: Built) -> None:
    """Compile the torch FP32 reference for the pass when `spec.reference` asks for it, checked against eager on one
    seeded batch of evaluation images (int8eval.backends.fast_reference)."""
    # torch-fp32; an ONNX file's reference is ONNX Runtime's, which has nothing to compile
    reference = next((v for v in built.variants if v.name == REFERENCE.name), None)
    if reference is None:
        return
    from int8eval.backends.fast_reference import speed_up_reference

    samples, n = session.eval_samples, session.spec.batch_size

    def check_images() -> np.ndarray | None:
        picked = sorted(np.random.default_rng(session.spec.seed).permutation(len(samples))[:n])
        return next((b.images for b in batches([samples[i] for i in picked], session.loaded.preprocessing,
                                               batch_size=n, workers=0) if len(b.indices)), None)

    speed_up_reference(reference, check_images, session.spec.reference, len(samples))


def new_report(session: Session, variants: list[VariantResult], *, num_images: int, skipped: list[dict],
               config: dict, timing: dict) -> Report:
    """A Report of the session's model and data (calibration and training images listed) with `variants`."""
    spec = session.spec
    calib = session.calib
    return Report(
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        command=sys.argv,
        model=ModelSection(name=session.loaded.name, source=session.loaded.source,
                           num_params=session.loaded.num_params, preprocessing=session.loaded.preprocessing),
        data=DataSection(
            root=str(Path(spec.data).resolve()),
            layout=session.layout,
            labels_free=session.labels_free,
            class_names=session.class_names,
            num_found=session.num_found,
            num_images=num_images,
            num_skipped=len(skipped),
            skipped=skipped,
            calibration=CalibrationSection(source=session.calib_source, num_images=calib.num_images, seed=spec.seed,
                                           image_ids=calib.image_ids) if calib else None,
            seed=spec.seed,
            training={"num_images": len(session.train), "source": str(spec.train_data or spec.data),
                      "image_ids": [t.id for t in session.train]} if session.train else None,
        ),
        variants=variants,
        environment=environment(),
        timing=timing,
        config=config,
    )
