"""`int8eval run`: spec -> model -> data -> variants -> one pass -> statistics -> report.json/md/html."""

from __future__ import annotations

import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import (
    BarColumn, MofNCompleteColumn, Progress, ProgressColumn, SpinnerColumn, TextColumn, TimeElapsedColumn,
)
from rich.text import Text

from int8eval import preprocessing_check, resume
from int8eval.commands import write_run
from int8eval.config import RunConfig
from int8eval.data.cache import using
from int8eval.evaluate import evaluate
from int8eval.parity import plan_recipes, reference_for
from int8eval.report import Report
from int8eval.session import build_variants, check_recipes, measure, new_report, open_session
from int8eval.verdict import add_paired_stats, check_judgeable


class RateColumn(ProgressColumn):
    """Items a second (images, for the evaluation pass) and the time left, from rich's moving estimate of the rate;
    blank until it has one."""

    def render(self, task) -> Text:
        if not task.speed or task.finished:
            return Text("")
        left = f", {int(task.time_remaining) // 60}:{int(task.time_remaining) % 60:02d} left" \
            if task.time_remaining is not None else ""
        return Text(f"{task.speed:.1f}/s{left}", style="progress.data.speed")


def progress_bar(console: Console) -> Progress:
    """Each step a line with its elapsed time; counted steps (decoding, evaluating) with their rate and time left."""
    return Progress(
        SpinnerColumn(), TextColumn("[progress.description]{task.description}"), BarColumn(bar_width=20),
        MofNCompleteColumn(), TimeElapsedColumn(), RateColumn(), console=console, transient=False,
    )


def run(config: RunConfig, *, console: Console | None = None) -> Report:
    """Evaluate the FP32 reference and every recipe of `config` in one pass; write report.json/.md/.html,
    predictions.npz and artifacts/ into `config.out` (staged, then moved in once complete).

    Example:
        >>> run(RunConfig(model="efficientnet_lite0", data=Path("imagenet-sample"), out=Path("runs/lite0")))
    """
    console = console or Console(stderr=True)
    start = time.perf_counter()
    plan = plan_recipes(config.recipes, reference_for(config.model))  # the reference first
    check_recipes(plan)  # fail before any work on a missing backend or an impossible recipe
    with using(config.decode_cache), _engine(config) as engine:
        report = write_run(config.out, lambda staging: _run_into(staging, config, plan, console, start, engine))
    resume.remove(config.out)  # the run is committed: its predictions.npz is the record
    return report


# Images between evaluation checkpoints (rounded up to whole batches): a kill loses at most this much evaluation, and
# each save rewrites the per-image predictions so far (a few MB for 50,000 images).
CHECKPOINT_IMAGES = 1000


def _checkpoint_every(batch_size: int) -> int:
    return -(-CHECKPOINT_IMAGES // batch_size) * batch_size


def _resume_key(config: RunConfig, session) -> dict:
    """What decides this run's predictions: the arguments (but --out, --resume and --bench, which come after the
    pass), the files and images it reads, the libraries and the CPU."""
    calib_root = Path(config.calib_data or config.data)
    return {
        "arguments": config.model_dump(mode="json", exclude={"out", "resume", "bench"}),
        "checkpoint file": resume.stamp(config.checkpoint),
        "labels file": resume.stamp(config.labels),
        "evaluation images": resume.images_digest((s.id, s.path) for s in session.eval_samples),
        "calibration images": resume.images_digest(
            (i, calib_root / i) for i in (session.calib.image_ids if session.calib else [])),
        "training images": resume.images_digest((s.id, s.path) for s in session.train),
        **resume.environment_key(),
    }


def _reference_correct(measured, reference: str) -> np.ndarray | None:
    """The FP32 reference's per-image top-1 hits, or None when it has no predictions (failed) or no labels."""
    predictions = measured.predictions
    if reference not in predictions.top5 or not len(predictions.labels) or (predictions.labels < 0).any():
        return None
    return predictions.correct1(reference)


def _engine(config: RunConfig):
    """The evaluation pass: here, or sharded over a Ray cluster (--ray; connected before any work)."""
    if config.ray is None:
        return nullcontext(evaluate)
    from int8eval.distributed import ray_evaluator

    return ray_evaluator(config, config.recipes, address=config.ray, workers=config.ray_workers)


def _run_into(out: Path, config: RunConfig, plan, console: Console, start: float, engine) -> Report:
    with progress_bar(console) as progress:
        task = progress.add_task(f"loading {config.model}", total=None)
        decoding = {}

        def on_calibration(done: int, total: int) -> None:
            if not decoding:
                progress.update(task, total=1, completed=1)
                decoding["task"] = progress.add_task("decoding calibration images", total=total)
            progress.update(decoding["task"], completed=done)

        session = open_session(config, config.recipes, on_calibration=on_calibration)
        check_judgeable(config.acceptance, session.labels_free)  # before any build
        opened = time.perf_counter()
        progress.update(task, total=1, completed=1)
        building: list = []

        def say(msg: str) -> None:  # one line per variant, ticked once the next one starts
            if building:
                progress.update(building[-1], total=1, completed=1)
            building.append(progress.add_task(msg, total=None))

        built = build_variants(session, plan, out / "artifacts", required=plan[:1], say=say)
        progress.update(building[-1], total=1, completed=1)
        built_at = time.perf_counter()
        checkpoint = None if config.ray else resume.open_checkpoint(
            config.out, _resume_key(config, session), resume=config.resume, every=_checkpoint_every(config.batch_size),
            say=lambda msg: console.print(msg, markup=False, highlight=False))
        measured = measure(session, plan, built, progress=progress, checkpoint=checkpoint, engine=engine)

    measured.predictions.save(out / "predictions.npz")
    report = new_report(
        session, [measured.results[r.name] for r in plan], num_images=len(measured.predictions.labels),
        skipped=measured.skipped, config=config.model_dump(mode="json"),
        timing={"total_s": None, "eval_s": measured.eval_s,
                "images_per_s": len(measured.predictions.labels) / measured.eval_s,
                # where the time went: opening (model, images listed, calibration images decoded), building the
                # variants, the pass (of which waiting for decoded images), then statistics and the report
                "open_s": opened - start, "build_s": built_at - opened, "eval_wait_s": measured.wait_s,
                **({"ray": engine.described} if config.ray else {})},
    )
    stats_start = time.perf_counter()
    add_paired_stats(report, measured.predictions, config.acceptance)
    report.preprocessing_check = preprocessing_check.for_reference(session.loaded, _reference_correct(measured, plan[0].name))
    report.timing["stats_s"] = time.perf_counter() - stats_start
    if config.bench:
        from int8eval.bench import add_bench

        console.print("timing every variant (--bench)")
        report.bench = add_bench(measured.results, built.variants, session.loaded, reference=plan[0].name,
                                 workdir=out / "artifacts")
    report.timing["total_s"] = time.perf_counter() - start
    return report
