"""`int8eval diagnose`: per-layer INT8 sensitivity of a model on the session's images, written to OUT/sensitivity.json
and as the `sensitivity` section of OUT/report.json.

OUT holding a run of the same model gets the section added to its report.json (locked, atomic writes, report.md/.html
re-rendered; its predictions and artifacts untouched). OUT holding no run gets a new run folder: a report with no
variants, the session's data and calibration sections, and the sensitivity section. OUT holding a run of another
model is refused before any work.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from int8eval.commands import write_run
from int8eval.config import Backend, Recipe, SessionSpec
from int8eval.data.cache import using
from int8eval.data.decode import decode_samples
from int8eval.data.layouts import Sample, subsample
from int8eval.diagnose import (
    FakeQuantModel,
    FakeQuantSpec,
    RankBy,
    as_batches,
    diagnose,
    fast_diagnose,
    fast_fake_quant,
    keep_fp32_check,
)
from int8eval.environment import torch_threads
from int8eval.errors import ConfigError, RunFolderError
from int8eval.models import load_model
from int8eval.report import Report, write_rendered
from int8eval.report import folder as run_folder
from int8eval.report.folder import write_atomic
from int8eval.report.sections import Sensitivity
from int8eval.session import Session, new_report, open_session

SENSITIVITY = "sensitivity.json"
_IMAGE_IDS = ("calib_image_ids", "image_ids")  # in sensitivity.json only; report.json lists them in its data section
# Which ranking ran ("full" sweep or "fast"): in sensitivity.json; the report's section says it in its `rank_by` text
# until the Sensitivity section has a field for it.
_JSON_ONLY = (*_IMAGE_IDS, "sweep")


def run_diagnose(
    model_name: str,
    data_root: Path,
    out_dir: Path,
    *,
    recipe: Recipe | None = None,
    spec: FakeQuantSpec | None = None,
    calib_size: int = 100,
    max_images: int | None = 64,
    confirm_images: int | None = None,
    top_k: int = 5,
    rank_by: RankBy = "kl",
    split_effects: bool = True,
    fast: bool = False,
    layers: list[str] | None = None,
    seed: int = 0,
    batch_size: int = 32,
    workers: int = 0,
    labels: Path | None = None,
    checkpoint: Path | None = None,
    weights: str | None = None,
    threads: int | None = None,
    decode_cache: Path | None = None,
    console=None,
) -> dict:
    """`int8eval diagnose`: per-layer sensitivity of MODEL on DATA, written to OUT/sensitivity.json and returned (the
    same dict).

    Calibration images are the session's seeded split, the one `int8eval run` uses (same `calib_size` and `seed`), so
    the two agree. The sweep runs on the session's `max_images` evaluation images (agreement with FP32 needs few);
    with `confirm_images`, the top-k kept in FP32 is checked again on that many other images of the pool (disjoint
    from the sweep's where the data allows). `fast` ranks with `diagnose.fast_diagnose` (the same criterion as
    rank_by="kl", a fraction of the cost; no all-but, split-effect, SQNR or ONNX-name results); sensitivity.json's
    `sweep` says which ran. OUT/report.json gets the `sensitivity` section (see the module). Images are decoded
    through `decode_cache` (int8eval.data.cache; None: none).

    Example:
        >>> run_diagnose("efficientnet_lite0", Path("imagenet-sample"), Path("runs/lite0"), max_images=64, top_k=5)
    """
    start = time.perf_counter()
    out_dir = Path(out_dir)
    if fast and rank_by != "kl":
        raise ConfigError(f"the fast ranking ranks by the KL when only each layer is INT8, not by {rank_by}; "
                          "drop --rank-by or --fast")
    with torch_threads(threads or None), using(decode_cache):  # both restored on the way out
        say = (lambda msg: console.log(msg)) if console is not None else (lambda msg: None)
        if spec is None:
            spec = FakeQuantSpec.from_recipe(recipe) if recipe is not None else FakeQuantSpec()
        loaded = load_model(model_name, checkpoint=checkpoint, weights=weights)
        has_run = _check_out(out_dir, loaded.name)  # before any work: nothing is written into another model's run
        session_spec = SessionSpec(model=model_name, data=data_root, labels=labels, checkpoint=checkpoint,
                                   weights=weights, calib_size=calib_size, seed=seed, batch_size=batch_size,
                                   workers=workers, max_images=max_images, decode_cache=decode_cache)
        # An INT8 recipe, so the session splits off (and decodes) the calibration images as `int8eval run` does.
        session = open_session(session_spec, [Recipe(backend=Backend.torch)], loaded=loaded, say=say)
        result, eval_ids, skipped = _sweep(session, spec, top_k=top_k, rank_by=rank_by, split_effects=split_effects,
                                           fast=fast, layers=layers, confirm_images=confirm_images, say=say)
        result |= {"model": loaded.name, "data": str(Path(data_root).resolve()), "seed": seed,
                   "calib_image_ids": session.calib.image_ids, "image_ids": eval_ids}
        options = dict(spec=asdict(spec), calib_size=calib_size, max_images=max_images, confirm_images=confirm_images,
                       top_k=top_k, rank_by=rank_by, split_effects=split_effects, fast=fast, layers=layers, seed=seed,
                       batch_size=batch_size, workers=workers, threads=threads,
                       decode_cache=str(decode_cache) if decode_cache else None)
        timing = {"total_s": time.perf_counter() - start, "sweep_s": result["seconds"]}
        if has_run:
            add_to_run(out_dir, result)
        else:
            write_run(out_dir, lambda staging: _new_run(staging, session, result, skipped, options, timing))
        return result


def _check_out(out: Path, model: str) -> bool:
    """True when OUT holds a run (a report.json) of `model`, False when it holds none; a RunFolderError when it holds
    one of another model, or a report.json that is not a report."""
    path = out / run_folder.REPORT
    if not path.is_file():
        run_folder.check_out(out)  # a file, or a folder we cannot write to: said now, not after the sweep
        return False
    _same_model(out, Report.read(path), model)
    return True


def _same_model(out: Path, report: Report, model: str) -> None:
    if report.model.name != model:
        raise RunFolderError(
            f"--out {out} holds a run of {report.model.name}, not of {model}: the sensitivity of {model} does not "
            f"belong in its report; pick another --out (a new folder, or a run of {model})"
        )


def _decode(session: Session, samples: list[Sample], purpose: str, skipped: list[dict]):
    """(images as one array, labels, ids) of `samples`; those that cannot be read are added to `skipped` (the
    reason prefixed by `purpose` unless they were to be evaluated, as `int8eval run` records them)."""
    spec = session.spec
    prefix = "" if purpose == "evaluation" else f"{purpose}: "

    def seen(batch) -> None:
        skipped.extend({"path": samples[i].id, "reason": f"{prefix}{reason}"} for i, reason in batch.bad)

    images, ys, ids = decode_samples(samples, session.loaded.preprocessing, batch_size=spec.batch_size,
                                     workers=spec.workers, on_batch=seen)
    if not images:
        raise ConfigError(f"none of the {len(samples)} {purpose} images could be read")
    return np.concatenate(images), ys, ids


def _sweep(session: Session, spec: FakeQuantSpec, *, top_k: int, rank_by: RankBy, split_effects: bool, fast: bool,
           layers: list[str] | None, confirm_images: int | None, say) -> tuple[dict, list[str], list[dict]]:
    """The sweep on the session's evaluation images (and the confirmation on others): (the diagnosis, the ids of the
    images it evaluated, every image skipped: the session's first)."""
    loaded, batch_size, seed = session.loaded, session.spec.batch_size, session.spec.seed
    skipped = list(session.skipped)
    # One array re-split into batches, as diagnose always calibrated: the bias correction sums batch by batch.
    calib_images = np.concatenate(session.calib.batches)
    eval_images, eval_labels, eval_ids = _decode(session, session.eval_samples, "evaluation", skipped)
    say(f"diagnose {loaded.name}: {session.calib.num_images} calibration, {len(eval_ids)} evaluation images; "
        f"{spec.describe()}")
    # Calibrated once, for the sweep and the confirmation.
    if fast:
        fq = fast_fake_quant(loaded.module, spec, [calib_images], batch_size)
        result = fast_diagnose(loaded.module, spec, [calib_images], eval_images, labels=eval_labels, top_k=top_k,
                               layers=layers, batch_size=batch_size, progress=say, fq=fq)
    else:
        fq = FakeQuantModel(loaded.module, spec)
        fq.calibrate(as_batches([calib_images], batch_size))
        result = diagnose(
            loaded.module, spec, [calib_images], eval_images, labels=eval_labels, top_k=top_k, rank_by=rank_by,
            split_effects=split_effects, layers=layers, example_input=loaded.example_input(1), batch_size=batch_size,
            progress=say, fq=fq,
        ) | {"sweep": "full"}
    if confirm_images:
        used = {s.id for s in session.eval_samples}
        pool = [s for s in session.pool if s.id not in used] or session.pool
        images, ys, _ = _decode(session, subsample(pool, confirm_images, seed + 1), "confirmation", skipped)
        say(f"confirming the top {top_k} on {len(ys)} more images")
        result["confirm"] = keep_fp32_check(loaded.module, spec, [calib_images], images, result["top_k"], labels=ys,
                                            batch_size=batch_size, fq=fq)
    return result, eval_ids, skipped


def _section(result: dict) -> Sensitivity:
    return Sensitivity.model_validate({k: v for k, v in result.items() if k not in _JSON_ONLY})


def _json(result: dict) -> str:
    return json.dumps(result, indent=2) + "\n"


def _new_run(staging: Path, session: Session, result: dict, skipped: list[dict], options: dict,
             timing: dict) -> Report:
    write_atomic(staging / SENSITIVITY, _json(result))
    report = new_report(session, [], num_images=result["num_images"], skipped=skipped, config=options, timing=timing)
    report.sensitivity = _section(result)
    return report


def add_to_run(run_dir: Path, result: dict) -> Report:
    """Add `result` (a diagnosis of the run's model) to the run in RUN_DIR: sensitivity.json and report.json's
    `sensitivity` section, written atomically under the folder's lock, and report.md/.html re-rendered. The run's
    predictions and artifacts are untouched, so its checksums still verify."""
    run_dir = Path(run_dir)
    with run_folder.locked(run_dir):
        run_folder.recover(run_dir)  # a run whose move was cut short is finished first
        report = Report.read(run_dir / run_folder.REPORT)
        _same_model(run_dir, report, result["model"])  # the run may have been replaced during the sweep
        report.sensitivity = _section(result)
        write_rendered(report, run_dir)  # a report that cannot be rendered is refused before report.json changes
        write_atomic(run_dir / SENSITIVITY, _json(result))
        report.write(run_dir / run_folder.REPORT)
    return report
