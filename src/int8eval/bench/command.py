"""The two ways a benchmark is run: `run --bench` after the accuracy pass (`add_bench`), and the standalone
`int8eval bench` (`bench_command`), which builds the variants itself and evaluates nothing.

Both add the fast float baselines the CPU (or GPU) has without being asked (`deploy.build_float_baselines`):
BF16 on torch and OpenVINO where the CPU has BF16 hardware, FP16 for TensorRT on a GPU.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from int8eval.bench import deploy, machine
from int8eval.bench.comparison import BenchRun, bench_run
from int8eval.bench.render import render_markdown
from int8eval.bench.summary import fastest_variant
from int8eval.bench.timing import make_input

BASELINE_NOTE = "{precision} baseline, timed without being asked because this {device} has {precision} hardware; not evaluated"


def with_float_baselines(loaded, variants: Sequence, workdir: Path | None) -> tuple[list, dict[str, str], dict[str, str]]:
    """`variants` plus the BF16/FP16 baselines this machine has (`deploy.build_float_baselines`).

    Returns (variants to time, {baseline name: note}, {baseline name: why it was not built})."""
    bf16, gpu = machine.bf16_hardware(), machine.gpu_name() is not None
    if not (bf16 or gpu):
        return list(variants), {}, {}
    workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="int8eval-bench-"))
    built, failed = deploy.build_float_baselines(loaded, variants, workdir, bf16=bf16, gpu=gpu)
    notes = {}
    for v in built:
        precision = deploy.precision_of(v).upper()
        notes[v.name] = BASELINE_NOTE.format(precision=precision, device="GPU" if precision == "FP16" else "CPU")
    return [*variants, *built], notes, failed


def add_bench(
    results, variants: Iterable, loaded, *, reference: str | None = None, workdir: Path | None = None, **bench_kw: Any
) -> dict:
    """Benchmark the run's variants and fill `VariantResult.bench` for each; returns the report's `bench` section.

    Call it after accuracy, parity and verdicts are filled, so the fastest variant that passes can be named.
    Rows that are no report variant (a PyTorch variant's eager speed, BF16/FP16 baselines timed unasked) go to the
    section's `speed_only`.

    Args:
        results: VariantResults, as a dict by name or a list.
        variants: the built Variants (those that failed to build have no entry and are skipped).
        loaded: the LoadedModel (for the input shape, and to build the float baselines).
        reference: the reference variant's name.
        workdir: where float baselines write their artifacts (default: a temporary folder).
        **bench_kw: passed to `bench_run` and `benchmark`.
    """
    by_name = results if isinstance(results, Mapping) else {r.name: r for r in results}
    # A variant whose backend failed the FP32 parity gate still has a speed worth knowing; only broken ones are left out.
    live = [v for v in variants if v.name in by_name and by_name[v.name].status not in ("error", "skipped")]
    timed, notes, failed = with_float_baselines(loaded, live, workdir)
    run = bench_run(timed, loaded.input_shape, reference=reference, notes=notes, **bench_kw)
    speed_only = {}
    for name, d in run.variants.items():
        if name in by_name:
            by_name[name].bench = d
        else:
            speed_only[name] = d
    for name, message in failed.items():
        speed_only[name] = {"error": message, "note": "baseline not built"}
    run.fastest = fastest_variant(by_name.values())
    return {**run.section(), "speed_only": speed_only}


# --------------------------------------------------------------------------------------------------------------
# Standalone `int8eval bench`


def build_bench_variants(
    model: str,
    backends: Sequence[str] = (),
    precisions: Sequence[str] = ("fp32", "int8"),
    *,
    workdir: Path,
    data: Path | None = None,
    calib_size: int = 32,
    seed: int = 0,
    checkpoint: Path | None = None,
    weights: str | None = None,
    keeps: Sequence[tuple[str, ...]] = ((),),
    activation_type: str | None = None,
    on_progress: Callable[[str], None] | None = None,
):
    """Load `model` and build it on each backend in each precision (FP32 always, for the speedups); INT8 once per
    set of layers in `keeps` left in FP32 (() for none). `activation_type` sets ONNX Runtime's INT8 activations
    (uint8 / int8; None: the CPU's choice).

    Returns (loaded, variants, not_built, warnings): `not_built` maps a variant name to why it was skipped (a
    precision the backend or CPU lacks) or failed to build; the others are still built.
    """
    from int8eval import backends as registry
    from int8eval.config import Backend, Precision, Recipe
    from int8eval.errors import ConfigError
    from int8eval.models import load_model

    chosen = [Backend(b) for b in backends] or [b for b, info in registry.BACKENDS.items() if info.installed and info.default]
    if activation_type is not None and Backend.onnxruntime not in chosen:
        raise ConfigError("--activation-type applies to onnxruntime's INT8 recipes; add --backend onnxruntime")
    wanted = [Precision(p) for p in precisions]
    if Precision.fp32 not in wanted:  # speedups need the same backend's FP32
        wanted.insert(0, Precision.fp32)
    recipes, not_built = [], {}
    for backend in chosen:
        for p in wanted:
            for keep in keeps if p is Precision.int8 else ((),):
                act = {"activation_type": activation_type} if backend is Backend.onnxruntime and p is Precision.int8 else {}
                r = Recipe(backend=backend, precision=p, calib=registry.default_calib(backend), keep_fp32=keep, **act)
                try:
                    registry.check_recipe(r)
                    recipes.append(r)
                except ConfigError as e:
                    if p is Precision.fp32:
                        raise
                    not_built[r.name] = f"skipped: {e}"  # e.g. BF16 on a CPU without it: reported, not fatal
    loaded = load_model(model, checkpoint=checkpoint, weights=weights)
    for keep in keeps:
        loaded.check_layers(keep)
    warnings, calib = [], None
    if any(r.precision is Precision.int8 for r in recipes):
        calib, note = _bench_calibration(loaded, data, calib_size, seed)
        if note:
            warnings.append(note)
    variants = []
    for r in recipes:
        if on_progress:
            on_progress(f"building {r.name}")
        try:
            variants.append(registry.build_variant(loaded, r, calib, Path(workdir)))
        except Exception as e:  # noqa: BLE001 - one backend failing must not stop the others
            not_built[r.name] = f"{type(e).__name__}: {e}"
    return loaded, variants, not_built, warnings


def add_build_outcome(run: BenchRun, not_built: Mapping[str, str], warnings: Iterable[str]) -> None:
    """Record in `run` what `build_bench_variants` reported: each variant not built, with why, and its warnings."""
    for name, message in not_built.items():
        run.variants[name] = {"error": message}
    run.warnings += warnings


def bench_command(
    model: str,
    backends: Sequence[str] = (),
    precisions: Sequence[str] = ("fp32", "int8"),
    *,
    out: Path | None = None,
    data: Path | None = None,
    calib_size: int = 32,
    seed: int = 0,
    checkpoint: Path | None = None,
    weights: str | None = None,
    keeps: Sequence[tuple[str, ...]] = ((),),
    activation_type: str | None = None,
    on_progress: Callable[[str], None] | None = None,
    **bench_kw: Any,
) -> BenchRun:
    """Build `model` on each backend in each precision and benchmark them (no accuracy evaluation).

    INT8 variants are calibrated on `calib_size` images from `data` (default: $INT8EVAL_DATA or the cached
    sample); without images they are calibrated on seeded noise, which is fine for speed and says so.
    Writes `out/bench.json` and `out/bench.md` when `out` is given. `**bench_kw` goes to `benchmark`.

    Example:
        >>> bench_command("efficientnet_lite0", ["onnxruntime", "openvino"], ["fp32", "int8"], out=Path("runs/bench"))
    """
    import json

    workdir = Path(out) / "artifacts" if out else Path(tempfile.mkdtemp(prefix="int8eval-bench-"))
    loaded, variants, not_built, warnings = build_bench_variants(
        model, backends, precisions, workdir=workdir, data=data, calib_size=calib_size, seed=seed,
        checkpoint=checkpoint, weights=weights, keeps=keeps, activation_type=activation_type,
        on_progress=on_progress,
    )
    timed, notes, failed = with_float_baselines(loaded, variants, workdir)
    run = bench_run(timed, loaded.input_shape, on_progress=on_progress, notes=notes, **bench_kw)
    add_build_outcome(run, {**not_built, **failed}, warnings)
    run.settings["model"] = loaded.name
    if out:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench.json").write_text(json.dumps(run.to_dict(), indent=2) + "\n")
        rows = [{"name": n, "bench": d} for n, d in run.variants.items()]
        (out / "bench.md").write_text("\n".join([f"# int8eval bench: {loaded.name}", "", *render_markdown(rows, run.section())]) + "\n")
    return run


def _bench_calibration(loaded, data: Path | None, calib_size: int, seed: int):
    """Calibration images for a speed-only run: real ones when available, else seeded noise (with a note)."""
    from int8eval.backends import CalibrationData
    from int8eval.errors import DatasetError

    try:
        from int8eval.data.decode import decode_samples
        from int8eval.data.fetch import default_data_root
        from int8eval.data.layouts import discover, subsample

        found = discover(data or default_data_root())
        samples = subsample(found.samples, calib_size, seed)
        images, _, ids = decode_samples(samples, loaded.preprocessing, batch_size=32, workers=0)
        calib = CalibrationData(batches=images, image_ids=ids)
        if calib.num_images:
            return calib, None
    except DatasetError:
        if data is not None:
            raise
    noise = make_input(loaded.input_shape, calib_size, seed=seed)
    return CalibrationData(batches=[noise], image_ids=[]), (
        "INT8 variants were calibrated on random noise (no images found): their speed is representative, their accuracy is not"
    )
