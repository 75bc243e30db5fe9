"""`int8eval bench`: speed and size of a model per backend and precision, no accuracy pass. The variants are built
by the session stages `run` uses; the report (report.json with its bench section, rendered to report.md/.html) goes
into a run folder of its own."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from int8eval.bench import add_bench
from int8eval.bench.timing import make_input
from int8eval.backends import CalibrationData
from int8eval.commands import write_run
from int8eval.config import Precision, Recipe, SessionSpec
from int8eval.data.cache import using
from int8eval.errors import ConfigError, DatasetError, Int8EvalError, RunFolderError
from int8eval.models import load_model
from int8eval.report import Report
from int8eval.session import Built, Session, build_variants, check_recipes, expand_recipes, new_report, open_session
from int8eval.session import variant_result

NOISE_NOTE = ("INT8 variants were calibrated on random noise (no images found): their speed is representative, "
              "their accuracy is not")


def bench_recipes(backends: Sequence[str] = (), precisions: Sequence[str] = ("fp32", "int8"), *,
                  keeps: Sequence[tuple[str, ...]] = ((),), activation_type: str | None = None):
    """(recipes to build, [(recipe, why it is skipped)]) for `int8eval bench`: each backend's FP32 first (the speedups need it),
    then each asked precision, INT8 once per set of layers in `keeps`. A precision the backend or CPU lacks (BF16
    without BF16 hardware) is reported as skipped, not fatal; a backend that cannot run FP32 stops the command."""
    wanted = [Precision(p) for p in precisions]
    fp32 = expand_recipes(backends, int8=False, precisions=[Precision.fp32])
    others = expand_recipes(backends, int8=Precision.int8 in wanted, keeps=keeps, activation_type=activation_type,
                            precisions=[p for p in wanted if p not in (Precision.fp32, Precision.int8)])
    check_recipes(fp32)
    recipes, skipped = list(fp32), []
    for recipe in others:
        try:
            check_recipes([recipe])
            recipes.append(recipe)
        except ConfigError as e:
            skipped.append((recipe, f"skipped: {e}"))
    return recipes, skipped


def bench_session(model: str, recipes: Sequence[Recipe], *, data: Path | None = None, calib_size: int = 32,
                  seed: int = 0, checkpoint: Path | None = None, weights: str | None = None) -> tuple[Session, list[str]]:
    """The session for a speed-only run: calibration images from `data` (default: $INT8EVAL_DATA or the cached
    sample) when a recipe is INT8, else seeded noise, which is fine for speed and says so (the returned notes)."""
    from int8eval.data.fetch import default_data_root

    loaded = load_model(model, checkpoint=checkpoint, weights=weights)
    for recipe in recipes:
        loaded.check_layers(recipe.keep_fp32)
    try:
        root = data or default_data_root()
        spec = SessionSpec(model=model, checkpoint=checkpoint, weights=weights, data=root, calib_size=calib_size, seed=seed)
        return open_session(spec, recipes, loaded=loaded, calibration_only=True), []
    except DatasetError:
        if data is not None:
            raise
    spec = SessionSpec(model=model, checkpoint=checkpoint, weights=weights, data=Path("."), calib_size=calib_size, seed=seed)
    session = Session(spec=spec, loaded=loaded, layout="none (noise)", num_found=0, eval_samples=[])
    notes = []
    if any(r.precision is Precision.int8 for r in recipes):
        session.calib = CalibrationData(batches=[make_input(loaded.input_shape, calib_size, seed=seed)], image_ids=[])
        session.calib_source = "seeded random noise"
        notes.append(NOISE_NOTE)
    return session, notes


def bench(
    model: str,
    backends: Sequence[str] = (),
    precisions: Sequence[str] = ("fp32", "int8"),
    *,
    out: Path,
    data: Path | None = None,
    calib_size: int = 32,
    seed: int = 0,
    checkpoint: Path | None = None,
    weights: str | None = None,
    keeps: Sequence[tuple[str, ...]] = ((),),
    activation_type: str | None = None,
    on_progress: Callable[[str], None] | None = None,
    decode_cache: Path | None = None,
    **bench_kw: Any,
) -> Report:
    """Build `model` on each backend in each precision and benchmark it (no accuracy): writes OUT/report.json (its
    `bench` section and each variant's) and report.md/.html. `**bench_kw` goes to `bench.benchmark`; calibration
    images are decoded through `decode_cache` (int8eval.data.cache; None: none).

    Example:
        >>> bench("efficientnet_lite0", ["onnxruntime", "openvino"], ["fp32", "int8"], out=Path("runs/bench"))
    """
    start = time.perf_counter()
    _refuse_another_commands_run(Path(out))
    recipes, skipped = bench_recipes(backends, precisions, keeps=keeps, activation_type=activation_type)

    def body(staging: Path) -> Report:
        session, notes = bench_session(model, recipes, data=data, calib_size=calib_size, seed=seed,
                                       checkpoint=checkpoint, weights=weights)
        built = build_variants(session, recipes, staging / "artifacts", say=on_progress or (lambda _: None))
        results = _results(recipes, built, skipped)
        section = add_bench(results, built.variants, session.loaded, workdir=staging / "artifacts",
                            on_progress=on_progress, **bench_kw)
        section.warnings += notes
        report = new_report(session, list(results.values()), num_images=0, skipped=session.skipped,
                            config={"command": "bench", "model": model, "backends": list(backends),
                                    "precisions": list(precisions), "calib_size": calib_size, "seed": seed,
                                    "keeps": [list(k) for k in keeps], "activation_type": activation_type,
                                    "data": str(data) if data else None,
                                    "decode_cache": str(decode_cache) if decode_cache else None},
                            timing={"total_s": time.perf_counter() - start})
        report.bench = section
        return report

    with using(decode_cache):
        return write_run(out, body)


def _results(recipes: Sequence[Recipe], built: Built, skipped: list[tuple[Recipe, str]]) -> dict:
    """A report row per recipe built or not, and one per precision skipped (e.g. BF16 without BF16 hardware)."""
    results = {r.name: variant_result(r, built.variant(r.name), built.failures.get(r.name)) for r in recipes}
    results |= {r.name: variant_result(r, None, why) for r, why in skipped}
    return results


def _refuse_another_commands_run(out: Path) -> None:
    """bench writes a run folder of its own: it never replaces a folder holding the report of another command (an
    accuracy run, a diagnosis), whose numbers would be lost."""
    path = out / "report.json"
    if not path.is_file():
        return
    try:
        written_by = (getattr(Report.read(path), "config", None) or {}).get("command", "run")
    except Int8EvalError:
        return  # not a report int8eval can read: the run folder code decides what happens to it
    if written_by != "bench":
        raise RunFolderError(
            f"--out {out} holds the report of an `int8eval {written_by}`, which bench would replace: give bench another "
            f"--out, or time that run's variants with `int8eval run ... --bench`"
        )
