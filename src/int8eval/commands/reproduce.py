"""`int8eval reproduce`: a named recipe (int8eval.recipes) run by the session stages `run` uses -- one session (the
same split order: training, then calibration, then evaluation), one build loop, one pass -- into a run folder with
report.json (its `reproduction` section holds the seed-style table), report.md/.html, predictions.npz, artifacts/,
and seed_table.md/.json made from that section."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from int8eval.commands import write_run
from int8eval.config import SessionSpec
from int8eval.data.cache import using
from int8eval.errors import DatasetError, ModelLoadError
from int8eval.parity import REFERENCE, plan_recipes
from int8eval.recipes.reproduce import (
    ReproRecipe,
    offline_message,
    qat_weights_recipe,
    requirements,
    use_gpu,
    variant_recipes,
)
from int8eval.recipes.table import anchor_rows, failure_notes, measured_rows, seed_table
from int8eval.report import Report
from int8eval.report.schema import ReproductionSection
from int8eval.session import Built, Session, build_variants, measure, new_report, open_session
from int8eval.verdict import add_paired_stats

QAT_WEIGHTS_FROM = "torch-int8-qat"  # the variant whose trained float weights go through TensorRT's ONNX


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
    decode_cache: Path | None = None,
) -> Report:
    """Run `recipe` into the run folder `out` (see the module docstring) and return its Report.

    Without `train_data` the QAT rows are left out (and say so); `train_data` the same folder as `data` trains on a
    seeded split of it. Without TensorRT and a GPU the CPU recipes run, plus TensorRT's Q/DQ ONNX under ONNX Runtime.
    Missing weights or data raise an error that lists everything the recipe needs and where to put it.
    `compile=False` leaves the PT2E QAT model uncompiled (same numbers, none of the speed; for tests).
    `decode_cache`: the folder decoded images are kept in (int8eval.data.cache), None for none.

    Example:
        >>> report = reproduce(load_recipe("seed"), data=Path("imagenet/val"), train_data=Path("imagenet/train"),
        ...                    out=Path("runs/seed"))
    """
    start = time.perf_counter()
    needs = requirements(recipe, data=data, train_data=train_data, checkpoint=checkpoint)
    if data is None or not Path(data).is_dir():
        raise DatasetError(f"recipe {recipe.name} needs {offline_message(needs)}")
    on_gpu = use_gpu(gpu)
    plan = plan_recipes(tuple(variant_recipes(recipe, on_gpu=on_gpu, finetune=train_data is not None)))
    same = train_data is not None and Path(train_data).resolve() == Path(data).resolve()
    # --train-data the same folder as --data: a seeded split of it, as `run` makes without --train-data (by default
    # of SessionSpec.train_size images); another folder: all of its images unless a size is given.
    size = train_size or recipe.finetune.train_size or (None if same else 10**9)
    spec = SessionSpec(
        model=recipe.model, checkpoint=checkpoint, weights=recipe.weights, preprocessing=recipe.preprocessing,
        data=data, labels=labels, calib_size=calib_size or recipe.calib_size, seed=recipe.seed,
        batch_size=recipe.batch_size, workers=workers, max_images=max_images, decode_cache=decode_cache,
        train_data=None if same else train_data, train_batch_size=recipe.finetune.batch_size,
        **({"train_size": size} if size else {}),
    )

    def body(staging: Path) -> Report:
        try:
            session = open_session(spec, plan)
        except ModelLoadError as e:
            raise ModelLoadError(f"{e}. Recipe {recipe.name} needs: {offline_message(needs)}") from e
        artifacts = staging / "artifacts"
        context = session.context(artifacts)
        context.freeze_bn, context.legacy_engine = recipe.finetune.freeze_bn, recipe.finetune.engine
        context.compile_qat = compile
        built = build_variants(session, plan, artifacts, required=[REFERENCE], context=context)
        extra = _build_on_qat_weights(recipe, session, built, artifacts / "qat-weights", on_gpu)
        measured = measure(session, plan + extra, built)
        measured.predictions.save(staging / "predictions.npz")
        report = new_report(
            session, list(measured.results.values()), num_images=len(measured.predictions.labels),
            skipped=measured.skipped, config=_config(recipe, spec, on_gpu, compile),
            timing={"total_s": time.perf_counter() - start, "eval_s": measured.eval_s,
                    "images_per_s": len(measured.predictions.labels) / measured.eval_s},
        )
        add_paired_stats(report, measured.predictions)  # QAT against its control and PTQ, as `run` does
        notes = _notes(recipe, on_gpu, train_data is not None)
        notes.append(f"Evaluation pass: {measured.eval_s:.0f} s; speedups are ratios of the time each variant spent "
                     f"predicting the same batches of {recipe.batch_size}.")
        report.reproduction = ReproductionSection(
            recipe=recipe.model_dump(mode="json"),
            rows=anchor_rows(recipe) + measured_rows(report.variants, on_gpu=on_gpu),
            notes=notes + failure_notes(report.variants),
            requirements=[dataclasses.asdict(n) for n in needs],
            on_gpu=on_gpu,
        )
        md, js = seed_table(report)
        (staging / "seed_table.md").write_text(md)
        (staging / "seed_table.json").write_text(js)
        return report

    with using(decode_cache):
        return write_run(out, body)


def _build_on_qat_weights(recipe: ReproRecipe, session: Session, built: Built, workdir: Path, on_gpu: bool) -> list:
    """The seed's last step: the QAT-trained float weights through ONNX into TensorRT's INT8 calibration, built by
    the same loop (a failure is recorded, not raised) and added to `built`. Returns the recipes it built."""
    qat = built.variant(QAT_WEIGHTS_FROM)
    target = qat_weights_recipe(recipe, on_gpu=on_gpu)
    if qat is None or target is None:
        return []
    tuned = dataclasses.replace(session, loaded=dataclasses.replace(session.loaded, module=qat.result.float_module))
    more = build_variants(tuned, [target], workdir)  # its own context: nothing shared with the original weights
    for variant in more.variants:
        variant.details = {**(variant.details or {}), "weights": f"QAT-trained ({QAT_WEIGHTS_FROM})"}
    built.variants += more.variants
    built.failures |= more.failures
    return [target]


def _notes(recipe: ReproRecipe, on_gpu: bool, finetuned: bool) -> list[str]:
    notes = []
    if not on_gpu and recipe.tensorrt_on_cpu is not None:
        notes.append("No TensorRT or no GPU here: TensorRT's Q/DQ ONNX ran under ONNX Runtime on the CPU instead.")
    if not finetuned:
        notes.append(
            f"QAT ({recipe.finetune.epochs} epochs) and its FP32 control were not run: they need --train-data DIR "
            "(ImageNet training images, a folder per synset)."
        )
    return notes


def _config(recipe: ReproRecipe, spec: SessionSpec, on_gpu: bool, compile: bool) -> dict:
    return {"command": "reproduce", "recipe": recipe.name, **spec.model_dump(mode="json"), "gpu": on_gpu,
            "compile": compile}
