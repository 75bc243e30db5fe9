"""`int8eval run`: spec -> model -> data -> variants -> one pass -> statistics -> report.json/md."""

from __future__ import annotations

import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from int8eval import backends, stats
from int8eval.backends import CalibrationData, Variant
from int8eval.config import OnBadImage, Precision, Recipe, RunConfig
from int8eval.data.decode import decode_samples
from int8eval.data.layouts import discover, split, subsample
from int8eval.environment import environment
from int8eval.errors import DatasetError
from int8eval.evaluate import evaluate
from int8eval.models import LoadedModel, load_model
from int8eval.parity import REFERENCE, apply_gate, plan_recipes
from int8eval.report import Report, write_rendered
from int8eval.report import folder as run_folder
from int8eval.verdict import add_paired_stats
from int8eval.report.schema import CalibrationSection, DataSection, ModelSection, VariantResult


def _check(recipe: Recipe) -> None:
    if recipe.qat_epochs:
        from int8eval import qat

        qat.check_recipe(recipe)
    else:
        backends.check_recipe(recipe)


def _build(recipe: Recipe, loaded: LoadedModel, calib, train, config: RunConfig, workdir: Path) -> Variant:
    if recipe.qat_epochs:
        from int8eval import qat

        spec = qat.FinetuneSpec(
            epochs=recipe.qat_epochs, lr=recipe.lr, batch_size=config.train_batch_size, seed=config.seed,
            workers=config.workers,
        )
        quantize = recipe.precision is Precision.int8
        return qat.build_finetuned_variant(
            loaded, train, workdir, spec=spec, quantize=quantize, legacy=recipe.legacy, calib=calib, recipe=recipe
        )
    return backends.build_variant(loaded, recipe, calib, workdir)


def _progress(console: Console) -> Progress:
    return Progress(
        SpinnerColumn(),
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )


def _calib_folder(config: RunConfig) -> Path | None:
    """--calib-data when it is another folder than --data (the same folder means the seeded split)."""
    if config.calib_data is None or Path(config.calib_data).resolve() == Path(config.data).resolve():
        return None
    return Path(config.calib_data)


def _calibration(config: RunConfig, found):
    """(calibration samples, source label, evaluation samples). Calibration images are never evaluated; what
    --calib-data holds but cannot use goes into found.skipped."""
    if not config.needs_calibration:
        return [], None, found.samples
    folder = _calib_folder(config)
    if folder is not None:
        calib_set = discover(folder)
        found.skipped += [{"path": f"{folder}/{s['path']}", "reason": f"calibration: {s['reason']}"} for s in calib_set.skipped]
        if config.calib_size > len(calib_set.samples):
            raise DatasetError(
                f"--calib-size is {config.calib_size} (default 100), but --calib-data {folder} holds "
                f"{len(calib_set.samples)} usable images: pass --calib-size {len(calib_set.samples)} or add images"
            )
        calib = subsample(calib_set.samples, config.calib_size, config.seed)
        calib_ids = {s.path.resolve() for s in calib}
        rest = [s for s in found.samples if s.path.resolve() not in calib_ids]
        if not rest:
            raise DatasetError(
                f"every image of --data {config.data} is a calibration image from --calib-data {folder}, and those are "
                "never evaluated: give folders that do not overlap, or leave out --calib-data for a seeded split"
            )
        return calib, str(folder), rest
    calib, rest = split(found.samples, config.calib_size, config.seed)
    same = " (--calib-data is --data)" if config.calib_data is not None else ""
    return calib, f"seeded split of {config.data}{same}", rest


def _decode_calibration(samples, preprocessing, config: RunConfig, progress: Progress, skipped: list[dict]) -> CalibrationData:
    """The decoded calibration images; those that cannot be read are added to `skipped` (or stop the run with
    --on-bad-image fail), never dropped unsaid."""
    task = progress.add_task("decoding calibration images", total=len(samples))
    folder = _calib_folder(config)

    def seen(batch) -> None:
        progress.update(task, advance=len(batch.indices) + len(batch.bad))
        for i, reason in batch.bad:
            if config.on_bad_image is OnBadImage.fail:
                raise DatasetError(f"cannot read calibration image {samples[i].path}: {reason} (use --on-bad-image skip to go on)")
            path = f"{folder}/{samples[i].id}" if folder is not None else samples[i].id
            skipped.append({"path": path, "reason": f"calibration: {reason}"})

    images, _, ids = decode_samples(samples, preprocessing, batch_size=config.batch_size, workers=config.workers, on_batch=seen)
    data = CalibrationData(batches=images, image_ids=ids)
    if not data.num_images:
        raise DatasetError(
            f"none of the {len(samples)} calibration images could be read (e.g. {skipped[-1]['path']}: {skipped[-1]['reason']})"
        )
    return data


def _variant_result(recipe: Recipe, variant: Variant | None, error: str | None) -> VariantResult:
    return VariantResult(
        name=recipe.name,
        backend=recipe.backend.value,
        precision=recipe.precision.value,
        status="error" if error else "ok",
        error=error,
        recipe=recipe.model_dump(mode="json"),
        reference=recipe == REFERENCE,
        size_mb=variant.size_mb if variant else None,
        artifact=str(variant.artifact) if variant and variant.artifact else None,
        prepare_s=variant.prepare_s if variant else None,
        details=variant.details if variant else None,
    )


def _fill_accuracy(result: VariantResult, preds, reference: str) -> None:
    name = result.name
    correct1 = preds.correct1(name)
    result.top1, result.top1_ci95 = stats.accuracy_ci(correct1)
    result.top5, result.top5_ci95 = stats.accuracy_ci(preds.correct5(name))
    result.per_class_top1 = stats.per_class_accuracy(preds.labels, correct1)
    if name != reference and reference in preds.top5:
        result.agreement_top1 = stats.agreement(preds.top1(name), preds.top1(reference))
        result.delta_top1 = result.top1 - float(np.mean(preds.correct1(reference)))


def run(config: RunConfig, *, console: Console | None = None) -> Report:
    """Evaluate the FP32 reference and every recipe of `config` in one pass; write report.json/.md/.html,
    predictions.npz and artifacts/ into `config.out`.

    Everything is written into a staging folder under OUT first and replaces OUT's previous run only once complete
    (int8eval.report.folder): a run that fails or is killed leaves the previous one readable, never a mix.

    Example:
        >>> run(RunConfig(model="efficientnet_lite0", data=Path("imagenet-sample"), out=Path("runs/lite0")))
    """
    console = console or Console(stderr=True)
    start = time.perf_counter()
    plan = plan_recipes(config.recipes)
    for recipe in plan:  # fail before any work on a missing backend or an impossible recipe
        _check(recipe)
    with run_folder.new_run(Path(config.out)) as staging:  # OUT checked (a folder we can write to) before any work
        report = _run_into(staging.path, config, plan, console, start)
        report = _seal(report, staging)
    return report


def _seal(report: Report, staging: run_folder.Staging) -> Report:
    """Point the report at where its files will be once committed, record their run id and checksums, render it,
    and write report.json last: the staging folder then holds a complete run."""
    report = Report.model_validate(staging.moved(report.model_dump(mode="json")))
    report.run_id = staging.run_id
    report.files = run_folder.checksums(staging.path)
    write_rendered(report, staging.path)
    report.write(staging.path / "report.json")
    return report


def _run_into(out: Path, config: RunConfig, plan: list[Recipe], console: Console, start: float) -> Report:
    """The run itself: predictions.npz and artifacts/ are written under `out` (the staging folder)."""
    with _progress(console) as progress:
        task = progress.add_task(f"loading {config.model}", total=None)
        loaded = load_model(config.model, checkpoint=config.checkpoint, weights=config.weights)
        for recipe in plan:
            loaded.check_layers(recipe.keep_fp32)
        progress.update(task, total=1, completed=1)
        found = discover(config.data, config.labels)
        train: list = []
        num_found = len(found.samples)
        if config.needs_training:  # training images are never evaluated either
            from int8eval import qat

            train, rest = qat.split_training(
                found.samples, size=config.train_size, seed=config.seed, train_root=config.train_data
            )
            found.samples = rest
        calib_samples, calib_source, eval_samples = _calibration(config, found)
        eval_samples = subsample(eval_samples, config.max_images, config.seed)
        calib = _decode_calibration(calib_samples, loaded.preprocessing, config, progress, found.skipped) if calib_samples else None

        variants: list[Variant] = []
        results: dict[str, VariantResult] = {}
        for recipe in plan:
            task = progress.add_task(f"building {recipe.name}", total=None)
            try:
                variant = _build(recipe, loaded, calib, train, config, out / "artifacts")
                variants.append(variant)
                results[recipe.name] = _variant_result(recipe, variant, None)
            except Exception as e:  # noqa: BLE001 - one failing variant does not stop the others
                if recipe == REFERENCE:
                    raise
                results[recipe.name] = _variant_result(recipe, None, f"{type(e).__name__}: {e}")
            progress.update(task, total=1, completed=1)

        outcome = evaluate(
            eval_samples,
            loaded.preprocessing,
            variants,
            reference=REFERENCE.name,
            batch_size=config.batch_size,
            workers=config.workers,
            on_bad_image=config.on_bad_image,
            progress=progress,
        )

    preds = outcome.predictions
    preds.save(out / "predictions.npz")
    for name, message in outcome.errors.items():
        results[name].status, results[name].error = "error", message
    for name, result in results.items():
        if result.status == "ok":
            _fill_accuracy(result, preds, REFERENCE.name)
            result.predict_s = outcome.predict_s.get(name)
    apply_gate(plan, results)

    skipped = found.skipped + outcome.skipped
    report = Report(
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        command=sys.argv,
        model=ModelSection(
            name=loaded.name, source=loaded.source, num_params=loaded.num_params, preprocessing=loaded.preprocessing
        ),
        data=DataSection(
            root=str(Path(config.data).resolve()),
            layout=found.layout,
            num_found=num_found,
            num_images=len(preds.labels),
            num_skipped=len(skipped),
            skipped=skipped,
            calibration=CalibrationSection(
                source=calib_source, num_images=calib.num_images, seed=config.seed, image_ids=calib.image_ids
            )
            if calib
            else None,
            seed=config.seed,
            training={"num_images": len(train), "source": str(config.train_data or config.data), "image_ids": [t.id for t in train]}
            if train
            else None,
        ),
        variants=[results[r.name] for r in plan],
        environment=environment(),
        timing={
            "total_s": time.perf_counter() - start,
            "eval_s": outcome.seconds,
            "images_per_s": len(preds.labels) / outcome.seconds,
        },
        config=config.model_dump(mode="json"),
    )
    add_paired_stats(report, preds, config.acceptance)
    if config.bench:
        from int8eval.bench import add_bench

        console.print("timing every variant (--bench)")
        report.bench = add_bench(results, variants, loaded, reference=REFERENCE.name, workdir=out / "artifacts")
    return report
