"""Named recipes that reproduce a published pipeline end to end, and the table they are judged by.

`seed` (seed.yaml beside this file) is the system int8eval grew from: ResNet50 with torchvision's V1 weights,
QAT for two epochs, ONNX, TensorRT INT8 with an entropy calibrator. `reproduce` runs its variants in one
evaluation pass (TensorRT where it and a GPU are present, else the best CPU backends plus TensorRT's Q/DQ ONNX
under ONNX Runtime), and writes the seed-style table (FP32 top-1, INT8 top-1, loss in points, speedup, size
reduction) beside the published numbers.

Example:
    >>> recipe = load_recipe("seed")
    >>> for need in requirements(recipe, data=Path("imagenet/val"), train_data=Path("imagenet/train")):
    ...     print(need)
    >>> result = reproduce(recipe, data=Path("imagenet/val"), train_data=Path("imagenet/train"), out=Path("runs/seed"))
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from int8eval.config import Backend, Precision, Preprocessing, Recipe
from int8eval.errors import ConfigError, DatasetError, ModelLoadError

RECIPES_DIR = Path(__file__).parent
REFERENCE_NAME = "torch-fp32"
FULL_VAL_IMAGES = 50_000


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Anchor(_Strict):
    """Published numbers a reproduction is compared with (top-1 in %, sizes in MB)."""

    source: str
    fp32_top1: float
    int8_top1: float
    fp32_size_mb: float | None = None
    int8_size_mb: float | None = None
    speedup: float | None = None
    size_reduction: float | None = Field(None, ge=0.0, le=1.0)

    @property
    def reduction(self) -> float | None:
        if self.size_reduction is not None:
            return self.size_reduction
        if self.fp32_size_mb and self.int8_size_mb:
            return 1.0 - self.int8_size_mb / self.fp32_size_mb
        return None


class FinetunePlan(_Strict):
    """The fine-tuning schedule shared by the recipe's QAT runs and their FP32 control."""

    epochs: int = Field(2, ge=1)
    lr: float = Field(1e-4, gt=0)
    batch_size: int = Field(32, gt=0)
    train_size: int | None = Field(None, gt=0)  # images from --train-data; None: all
    freeze_bn: bool = True
    engine: str = "fbgemm"
    legacy: bool = True  # the seed's eager torch.quantization QAT
    pt2e: bool = True  # torchao prepare_qat_pt2e / convert_pt2e
    control: bool = True  # the same schedule without fake quantization


class ReproRecipe(_Strict):
    """A reproduction: model, preprocessing, variants and the published numbers to compare with."""

    name: str
    description: str
    model: str
    weights: str | None = None
    preprocessing: Preprocessing
    calib_size: int = Field(500, gt=0)
    seed: int = 0
    batch_size: int = Field(32, gt=0)
    finetune: FinetunePlan = FinetunePlan()
    gpu_recipes: tuple[Recipe, ...] = ()
    cpu_recipes: tuple[Recipe, ...] = ()
    tensorrt_on_cpu: Recipe | None = None  # TensorRT's Q/DQ ONNX run by ONNX Runtime when there is no TensorRT
    anchors: dict[str, Anchor] = Field(default_factory=dict)


def known_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def load_recipe(name_or_path: str | Path) -> ReproRecipe:
    """A recipe by name (`seed`) or from a YAML file; raises ConfigError naming the problem."""
    path = Path(name_or_path)
    if not path.suffix:
        path = RECIPES_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            raise ConfigError(f"no recipe named {name_or_path!r}; known: {', '.join(known_recipes())}")
    if not path.is_file():
        raise ConfigError(f"recipe file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"recipe {path} is not valid YAML: {e}") from e
    try:
        return ReproRecipe.model_validate(raw)
    except ValidationError as e:
        msgs = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'recipe'}: {err['msg']}" for err in e.errors())
        raise ConfigError(f"recipe {path}: {msgs}") from e


# --------------------------------------------------------------------------------------------- requirements


@dataclass(frozen=True)
class Requirement:
    what: str
    where: str  # where it is looked for / where to put it
    present: bool
    needed_for: str

    def __str__(self) -> str:
        return f"[{'ok' if self.present else 'missing'}] {self.what}: {self.where} (for {self.needed_for})"


def weights_file(recipe: ReproRecipe) -> Path | None:
    """Where torchvision looks for (and would download) the recipe's weights; None for other model families."""
    import torch
    import torchvision

    try:
        enum = torchvision.models.get_model_weights(recipe.model)
        w = enum[recipe.weights] if recipe.weights else enum.DEFAULT
    except (ValueError, KeyError):
        return None
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(w.url).name


def requirements(
    recipe: ReproRecipe, *, data: Path | None, train_data: Path | None = None, checkpoint: Path | None = None
) -> list[Requirement]:
    """Everything the recipe needs (weights, evaluation and training images, optional backends), present or not."""
    needs = []
    if checkpoint is not None:
        needs.append(Requirement(f"{recipe.model} weights", str(checkpoint), Path(checkpoint).is_file(), "every variant"))
    else:
        target = weights_file(recipe)
        if target is not None:
            url = f"https://download.pytorch.org/models/{target.name}"
            needs.append(
                Requirement(
                    f"{recipe.model} {recipe.weights} weights ({url})",
                    f"{target} (downloaded there when online; offline, put the file there or pass --checkpoint PATH)",
                    target.is_file(),
                    "every variant",
                )
            )
    needs.append(
        Requirement(
            "ImageNet validation images (the published numbers use all 50,000)",
            f"--data {data}" if data else "--data DIR: a folder per synset, or the flat val folder with --labels",
            data is not None and Path(data).is_dir(),
            "evaluation and calibration",
        )
    )
    needs.append(
        Requirement(
            "ImageNet training images (a folder per synset; a few thousand are enough)",
            f"--train-data {train_data}" if train_data else "--train-data DIR",
            train_data is not None and Path(train_data).is_dir(),
            f"QAT ({recipe.finetune.epochs} epochs) and its FP32 control",
        )
    )
    needs.append(
        Requirement(
            "TensorRT and an NVIDIA GPU",
            "pip install 'int8eval[tensorrt]' on a machine with a GPU",
            _tensorrt_gpu(),
            "TensorRT engines (else the CPU backends and TensorRT's Q/DQ ONNX under ONNX Runtime)",
        )
    )
    return needs


def _tensorrt_gpu() -> bool:
    """Whether TensorRT is installed and a CUDA GPU is available."""
    if importlib.util.find_spec("tensorrt") is None:
        return False
    import torch

    return torch.cuda.is_available()


def offline_message(needs: list[Requirement]) -> str:
    missing = [n for n in needs if not n.present]
    return "; ".join(f"{n.what}: {n.where}" for n in missing)


# --------------------------------------------------------------------------------------------- the table


@dataclass
class SeedRow:
    """One row of the seed-style table. Accuracies in %, size reduction as a fraction."""

    name: str
    kind: str  # "published" or "measured"
    fp32_top1: float | None
    int8_top1: float | None
    speedup: float | None = None
    size_reduction: float | None = None
    note: str = ""

    @property
    def loss_points(self) -> float | None:
        if self.fp32_top1 is None or self.int8_top1 is None:
            return None
        return self.fp32_top1 - self.int8_top1


@dataclass
class SeedResult:
    recipe: ReproRecipe
    rows: list[SeedRow]
    num_images: int
    data: str
    notes: list[str] = field(default_factory=list)
    table_path: Path | None = None


def anchor_rows(recipe: ReproRecipe) -> list[SeedRow]:
    return [
        SeedRow(f"{key} (published)", "published", a.fp32_top1, a.int8_top1, a.speedup, a.reduction, a.source)
        for key, a in recipe.anchors.items()
    ]


def _fmt(x: float | None, spec: str, suffix: str = "") -> str:
    return "—" if x is None else f"{format(x, spec)}{suffix}"


def render_table(result: SeedResult) -> str:
    """The seed-style Markdown table, published numbers first."""
    r = result.recipe
    lines = [
        f"# {r.name}: {r.description}",
        "",
        f"- Model: {r.model} ({r.weights}); preprocessing resize {r.preprocessing.resize} "
        f"({r.preprocessing.interpolation.value}), crop {r.preprocessing.crop}",
        f"- Evaluated on {result.num_images} images from `{result.data}`"
        + (
            f" (the published numbers use the {FULL_VAL_IMAGES:,} ImageNet validation images: compare differences, "
            "not absolute values)"
            if result.num_images < FULL_VAL_IMAGES
            else ""
        ),
        "",
        "| variant | FP32 top-1 % | INT8 top-1 % | loss (points) | speedup | size reduction | note |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in result.rows:
        lines.append(
            f"| {row.name} | {_fmt(row.fp32_top1, '.2f')} | {_fmt(row.int8_top1, '.2f')} | "
            f"{_fmt(row.loss_points, '+.2f')} | {_fmt(row.speedup, '.2f', 'x')} | "
            f"{_fmt(None if row.size_reduction is None else 100 * row.size_reduction, '.1f', '%')} | {row.note} |"
        )
    if result.notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in result.notes]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------- running it


class _Renamed:
    """A variant reported under another name (a recipe run on QAT-trained weights)."""

    def __init__(self, variant, name: str) -> None:
        self._variant, self.name = variant, name
        self.recipe, self.artifact, self.prepare_s = variant.recipe, variant.artifact, variant.prepare_s
        self.details = {**(getattr(variant, "details", None) or {}), "weights": "QAT-trained (torch-int8-qat)"}

    def predict(self, images: np.ndarray) -> np.ndarray:
        return self._variant.predict(images)

    @property
    def size_mb(self) -> float | None:
        return self._variant.size_mb


def _seed_tensorrt_recipe(recipe: ReproRecipe) -> Recipe | None:
    """The TensorRT INT8 recipe the QAT weights go through: the seed's implicit calibrator where TensorRT still has
    it (<= 10), else explicit Q/DQ."""
    from int8eval.backends.tensorrt_backend import trt_major

    int8 = [r for r in recipe.gpu_recipes if r.precision is Precision.int8]
    legacy_ok = trt_major() < 11
    return next((r for r in int8 if r.legacy == legacy_ok), int8[0] if int8 else None)


def _use_gpu(gpu: bool | None) -> bool:
    available = _tensorrt_gpu()
    if gpu and not available:
        raise ConfigError("--gpu asks for TensorRT, but TensorRT or a CUDA GPU is missing; leave it out to use the CPU")
    return available if gpu is None else gpu


def reproduce(
    recipe: ReproRecipe,
    *,
    data: Path,
    out: Path,
    train_data: Path | None = None,
    labels: Path | None = None,
    checkpoint: Path | None = None,
    max_images: int | None = None,
    calib_size: int | None = None,
    train_size: int | None = None,
    gpu: bool | None = None,
    workers: int = 0,
    compile: bool = True,
) -> SeedResult:
    """Run `recipe` and write OUT/seed_table.md and OUT/seed_table.json (and the per-image predictions).

    Without `train_data` the QAT rows are left out (and say so); without TensorRT and a GPU the CPU recipes run,
    plus TensorRT's Q/DQ ONNX under ONNX Runtime. Missing weights or data raise an error that lists everything
    the recipe needs and where to put it. `compile=False` leaves the PT2E QAT model uncompiled (same numbers,
    none of the speed; for tests).
    """
    from int8eval import backends, qat
    from int8eval.backends import CalibrationData
    from int8eval.backends.tensorrt_backend import build_qdq_onnx_variant, emulated_name
    from int8eval.data.decode import decode_samples
    from int8eval.data.layouts import discover, split, subsample
    from int8eval.evaluate import evaluate
    from int8eval.models import load_model

    needs = requirements(recipe, data=data, train_data=train_data, checkpoint=checkpoint)
    if data is None or not Path(data).is_dir():
        raise DatasetError(f"recipe {recipe.name} needs {offline_message(needs)}")
    try:
        loaded = load_model(recipe.model, checkpoint=checkpoint, weights=recipe.weights, preprocessing=recipe.preprocessing)
    except ModelLoadError as e:
        raise ModelLoadError(f"{e}. Recipe {recipe.name} needs: {offline_message(needs)}") from e

    out = Path(out)
    artifacts = out / "artifacts"
    artifacts.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    found = discover(data, labels)
    calib_samples, rest = split(found.samples, calib_size or recipe.calib_size, recipe.seed)
    train_samples: list = []
    if train_data is not None:
        same = Path(train_data).resolve() == Path(data).resolve()
        size = train_size or recipe.finetune.train_size or (qat.DEFAULT_TRAIN_SIZE if same else 10**9)
        train_samples, rest = qat.split_training(rest, size=size, seed=recipe.seed, train_root=None if same else train_data)
    eval_samples = subsample(rest, max_images, recipe.seed)
    calib_images, _, calib_ids = decode_samples(calib_samples, loaded.preprocessing, batch_size=recipe.batch_size, workers=workers)
    calib = CalibrationData(batches=calib_images, image_ids=calib_ids)

    variants, errors = [], {}

    def attempt(name: str, make) -> None:
        try:
            variants.append(make())
        except Exception as e:  # noqa: BLE001 - one failing variant does not stop the others
            errors[name] = f"{type(e).__name__}: {e}"

    variants.append(backends.build_variant(loaded, Recipe(backend=Backend.torch, precision=Precision.fp32), None, artifacts))
    on_gpu = _use_gpu(gpu)
    for r in recipe.gpu_recipes if on_gpu else recipe.cpu_recipes:
        attempt(r.name, lambda r=r: backends.build_variant(loaded, r, calib, artifacts))
    trt_cpu = recipe.tensorrt_on_cpu
    if not on_gpu and trt_cpu is not None:
        attempt(emulated_name(trt_cpu), lambda: build_qdq_onnx_variant(loaded, trt_cpu, calib, artifacts))
        notes.append("No TensorRT or no GPU here: TensorRT's Q/DQ ONNX ran under ONNX Runtime on the CPU instead.")

    plan = recipe.finetune
    if train_samples:
        spec = qat.FinetuneSpec(
            epochs=plan.epochs, lr=plan.lr, batch_size=plan.batch_size, seed=recipe.seed,
            freeze_bn=plan.freeze_bn, engine=plan.engine, workers=workers,
        )
        runs = [(True, True, plan.legacy), (True, False, plan.pt2e), (False, False, plan.control)]
        for quantize, legacy, wanted in runs:
            if wanted:
                name = qat.variant_name(quantize=quantize, legacy=legacy)
                attempt(name, lambda q=quantize, lg=legacy: qat.build_finetuned_variant(
                    loaded, train_samples, artifacts, spec=spec, quantize=q, legacy=lg, calib=calib, compile=compile
                ))
        # The seed's last step: the QAT-trained weights through ONNX into TensorRT's INT8 calibrator.
        qat_float = next((v.result.float_module for v in variants if getattr(v, "name", "") == "torch-int8-qat"), None)
        if qat_float is not None:
            tuned = dataclasses.replace(loaded, module=qat_float)
            target = _seed_tensorrt_recipe(recipe) if on_gpu else trt_cpu
            if target is not None:
                label = f"{target.name if on_gpu else emulated_name(target)}+qat-weights"
                build = backends.build_variant if on_gpu else build_qdq_onnx_variant
                attempt(label, lambda: _Renamed(build(tuned, target, calib, artifacts / "qat-weights"), label))
    else:
        notes.append(
            f"QAT ({plan.epochs} epochs) and its FP32 control were not run: they need --train-data DIR "
            "(ImageNet training images, a folder per synset)."
        )

    start = time.perf_counter()
    outcome = evaluate(eval_samples, loaded.preprocessing, variants, reference=REFERENCE_NAME,
                       batch_size=recipe.batch_size, workers=workers)
    errors |= outcome.errors
    outcome.predictions.save(out / "predictions.npz")
    result = SeedResult(recipe, anchor_rows(recipe), len(outcome.predictions.labels), str(data), notes)
    result.rows += _measured_rows(variants, outcome, on_gpu, errors)
    result.notes.append(f"Evaluation pass: {time.perf_counter() - start:.0f} s; speedups are ratios of the time "
                        f"each variant spent predicting the same batches of {recipe.batch_size}.")
    result.notes += [f"{name} failed: {msg}" for name, msg in errors.items()]
    result.table_path = out / "seed_table.md"
    result.table_path.write_text(render_table(result))
    (out / "seed_table.json").write_text(json.dumps(
        {"recipe": recipe.model_dump(mode="json"), "num_images": result.num_images, "data": result.data,
         "train_images": len(train_samples), "calib_image_ids": calib.image_ids,
         "rows": [asdict(r) | {"loss_points": r.loss_points} for r in result.rows],
         "requirements": [asdict(n) for n in needs], "notes": result.notes}, indent=2) + "\n")
    return result


def _measured_rows(variants, outcome, on_gpu: bool, errors: dict[str, str]) -> list[SeedRow]:
    preds = outcome.predictions
    live = {v.name: v for v in variants if v.name not in errors}
    top1 = {name: 100 * float(np.mean(preds.correct1(name))) for name in live}
    ref = top1[REFERENCE_NAME]
    ref_size = live[REFERENCE_NAME].size_mb
    baseline = "tensorrt-fp32" if on_gpu and "tensorrt-fp32" in live else REFERENCE_NAME
    rows = []
    for name, v in live.items():
        if name == REFERENCE_NAME or v.recipe.precision is not Precision.int8 and name != "torch-fp32-finetuned":
            continue
        size = v.size_mb
        speed = outcome.predict_s[baseline] / outcome.predict_s[name] if outcome.predict_s.get(name) else None
        note = f"speedup vs {baseline}"
        if name == "torch-fp32-finetuned":
            rows.append(SeedRow(name, "measured", top1[name], None, None, None,
                                f"the control: QAT's fine-tuning without quantization ({top1[name] - ref:+.2f} points "
                                "vs the original FP32)"))
            continue
        if name.startswith("torch-int8-qat") and "torch-fp32-finetuned" in top1:
            note += f"; {top1['torch-fp32-finetuned'] - top1[name]:+.2f} points below the fine-tuned FP32 control"
        if on_gpu and "tensorrt-fp16" in live and outcome.predict_s.get(name):
            note += f"; {outcome.predict_s['tensorrt-fp16'] / outcome.predict_s[name]:.2f}x vs tensorrt-fp16"
        rows.append(SeedRow(name, "measured", ref, top1[name], speed,
                            None if size is None or not ref_size else 1.0 - size / ref_size, note))
    return rows

