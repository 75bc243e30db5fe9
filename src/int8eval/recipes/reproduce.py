"""Named recipes that reproduce a published pipeline end to end: the recipe, what it needs, and the variants it builds.

`seed` (seed.yaml beside this file) is the system int8eval grew from: ResNet50 with torchvision's V1 weights,
QAT for two epochs, ONNX, TensorRT INT8 with an entropy calibrator. `int8eval reproduce` (int8eval.commands.reproduce)
builds its variants (`variant_recipes`: TensorRT where it and a GPU are present, else the best CPU backends plus
TensorRT's Q/DQ ONNX under ONNX Runtime) and evaluates them in one pass; int8eval.recipes.table writes the
seed-style table (FP32 top-1, INT8 top-1, loss in points, speedup, size reduction) beside the published numbers.

Example:
    >>> recipe = load_recipe("seed")
    >>> for need in requirements(recipe, data=Path("imagenet/val"), train_data=Path("imagenet/train")):
    ...     print(need)
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from int8eval.config import Precision, Preprocessing, Recipe
from int8eval.errors import ConfigError

RECIPES_DIR = Path(__file__).parent


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
                    f"{target} (downloaded there when online; offline, put the file there or pass --weights-file PATH)",
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
            tensorrt_gpu(),
            "TensorRT engines (else the CPU backends and TensorRT's Q/DQ ONNX under ONNX Runtime)",
        )
    )
    return needs


def tensorrt_gpu() -> bool:
    """Whether TensorRT is installed and a CUDA GPU is available."""
    if importlib.util.find_spec("tensorrt") is None:
        return False
    import torch

    return torch.cuda.is_available()


def offline_message(needs: list[Requirement]) -> str:
    missing = [n for n in needs if not n.present]
    return "; ".join(f"{n.what}: {n.where}" for n in missing)


# --------------------------------------------------------------------------------------------- the variants


class QatWeightsRecipe(Recipe):
    """A recipe built from the QAT-trained float weights instead of the model's own: the seed's last step (QAT, then
    ONNX into TensorRT's INT8 calibrator). Built exactly like the recipe it copies; reported as NAME+qat-weights."""

    @property
    def name(self) -> str:
        return f"{super().name}+qat-weights"


def use_gpu(gpu: bool | None) -> bool:
    """Whether to build the GPU recipes: `gpu` (True fails without TensorRT and a GPU), else whether both are here."""
    available = tensorrt_gpu()
    if gpu and not available:
        raise ConfigError("--gpu asks for TensorRT, but TensorRT or a CUDA GPU is missing; leave it out to use the CPU")
    return available if gpu is None else gpu


def variant_recipes(recipe: ReproRecipe, *, on_gpu: bool, finetune: bool) -> list[Recipe]:
    """What the reproduction builds besides the FP32 reference: the GPU recipes, or the CPU recipes and TensorRT's
    ONNX run by ONNX Runtime (`emulate`); then, with `finetune` (training images), QAT and its FP32 control."""
    from int8eval.session import qat_recipes

    recipes = list(recipe.gpu_recipes if on_gpu else recipe.cpu_recipes)
    if not on_gpu and recipe.tensorrt_on_cpu is not None:
        recipes.append(Recipe.model_validate({**recipe.tensorrt_on_cpu.model_dump(), "emulate": True}))
    if finetune:
        plan = recipe.finetune
        recipes += qat_recipes(plan.epochs, plan.lr, legacy=plan.legacy, pt2e=plan.pt2e, control=plan.control)
    return recipes


def qat_weights_recipe(recipe: ReproRecipe, *, on_gpu: bool) -> QatWeightsRecipe | None:
    """The TensorRT INT8 recipe the QAT-trained weights go through: on a GPU the seed's implicit calibrator where
    TensorRT still has it (<= 10), else explicit Q/DQ; on the CPU TensorRT's ONNX under ONNX Runtime."""
    if on_gpu:
        from int8eval.backends.tensorrt_backend import trt_major

        int8 = [r for r in recipe.gpu_recipes if r.precision is Precision.int8]
        legacy_ok = trt_major() < 11
        target = next((r for r in int8 if r.legacy == legacy_ok), int8[0] if int8 else None)
    elif recipe.tensorrt_on_cpu is not None:
        target = Recipe.model_validate({**recipe.tensorrt_on_cpu.model_dump(), "emulate": True})
    else:
        target = None
    return None if target is None else QatWeightsRecipe.model_validate(target.model_dump())
