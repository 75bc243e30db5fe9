"""`int8eval tune`: per backend, climb a ladder of INT8 recipes until one keeps the accuracy budget on the tuning
images and is confirmed on images nothing else used; price every candidate in accuracy, speed and size; hand back
the one model to ship for the objective.

The stages are the session's (int8eval.session): one session (calibration split), then three disjoint image sets
(calibration, tuning, confirmation), each candidate built through the one registry and evaluated in one pass
against the PyTorch FP32 reference, and a final pass of the chosen models on the confirmation images whose paired
verdicts are the report's variants.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from rich.console import Console

from int8eval.backends import BuildContext, Variant
from int8eval.bench import bench_run
from int8eval.commands import write_run
from int8eval.config import Backend, Precision, Recipe, TuneConfig
from int8eval.data.cache import using
from int8eval.data.decode import Batch
from int8eval.data.layouts import Sample, discover, split_tuning, subsample
from int8eval.errors import ConfigError, Int8EvalError
from int8eval.evaluate import EvalOutcome, Remembered, decode_set, evaluate
from int8eval.parity import plan_recipes, reference_for
from int8eval.report import Report
from int8eval.report.sections import Status, TuneBackend, TuneCandidate, TuneRanking, TuneSets
from int8eval.session import Built, Session, build_variants, check_recipes, expand_recipes, measure, new_report
from int8eval.session import open_session, qat_recipes
from int8eval.tune import cache as tune_cache
from int8eval.tune.cache import TuneCache
from int8eval.tune.choice import objective_key, pareto, tune_section
from int8eval.tune.ladder import Step, ladder
from int8eval.tune.rule import judge
from int8eval.verdict import add_paired_stats, check_judgeable, paired_for

# A short timing per candidate: enough to rank recipes whose speeds differ by tens of percent, not a benchmark.
TIMING = dict(batch_sizes=(1, 16), warmup=1, min_runs=5, throughput_warmup=1, throughput_min_runs=2, min_seconds=0,
              max_seconds=3.0)


def tune(config: TuneConfig, *, console: Console | None = None) -> Report:
    """Find, per backend, the INT8 model that keeps `config.acceptance` and is best for `config.objective`; write the
    run folder (report.json with its `tune` section, the chosen models' confirmation pass, artifacts).

    Example:
        >>> tune(TuneConfig(model="efficientnet_lite0", data=Path("imagenet-sample"), out=Path("runs/tune"),
        ...                 acceptance=Acceptance(max_drop=1.0)))
    """
    console = console or Console(stderr=True)
    onnx_file = reference_for(config.model).backend is Backend.onnxruntime
    defaults = expand_recipes(config.backends, onnx_file=onnx_file)  # one default INT8 recipe per backend: the first rung
    if config.qat_epochs and Backend.torch not in {r.backend for r in defaults}:
        raise ConfigError("--qat-epochs is a step of the torch ladder: add --backend torch or drop --qat-epochs")
    check_recipes(plan_recipes(defaults, reference_for(config.model)))
    if config.ray is not None:  # before any work: Ray is an extra
        from int8eval.distributed import import_ray

        import_ray()
    start = time.perf_counter()

    def say(msg: str) -> None:
        console.log(msg, markup=False)

    with using(config.decode_cache):
        report = write_run(config.out, lambda staging: _tune_into(staging, config, defaults, say, start))
    tune_cache.remove(config.out)  # the run is committed: its report is the record of every candidate
    return report


@dataclasses.dataclass
class _Climb:
    """One backend's climb: its candidates (in order), the variants built, the chosen one and why it stopped."""

    backend: TuneBackend
    candidates: list[TuneCandidate]
    variants: dict[str, Variant]
    recipes: dict[str, Recipe]
    chosen: str | None = None


@dataclasses.dataclass
class _Setup:
    """What every ladder climbs with: the session, the three image sets, the cache of finished work, the build
    context, the FP32 reference and its evaluator, and the sensitivity ranking (None for an ONNX file)."""

    session: Session
    tuning: list[Sample]
    confirmation: list[Sample]
    confirm_source: str
    cache: TuneCache
    context: BuildContext
    evaluator: _Evaluator
    ranking: _Ranking | None


def _set_up(config: TuneConfig, defaults: Sequence[Recipe], out: Path, say) -> _Setup:
    """Open the session, split the images, open the cache and build the FP32 reference: the same on the driver and
    on a Ray worker (`_climb_task`), so both climb with the same images and reference."""
    extra = qat_recipes(config.qat_epochs, config.lr, control=False) if config.qat_epochs else []
    session = open_session(config, [*defaults, *extra], say=say)
    check_judgeable(config.acceptance, session.labels_free)
    tuning, confirmation, confirm_source = _tuning_sets(session, config)
    say(f"{session.calib.num_images} calibration, {len(tuning)} tuning, {len(confirmation)} confirmation images")
    cache = _open_cache(config, session, tuning, confirmation, say)
    context = session.context(out / "artifacts")
    ref = session.reference
    reference = build_variants(session, [ref], out / "artifacts", required=[ref], context=context).variants[0]
    # An ONNX file has no PyTorch module to rank layers in (diagnose) or to keep layers of in FP32 by name.
    ranking = _Ranking(session, tuning, say, cache) if session.loaded.module is not None else None
    return _Setup(session, tuning, confirmation, confirm_source, cache, context, _Evaluator(session, reference), ranking)


def _tune_into(out: Path, config: TuneConfig, defaults: Sequence[Recipe], say, start: float) -> Report:
    setup = _set_up(config, defaults, out, say)
    session, tuning, confirmation, cache = setup.session, setup.tuning, setup.confirmation, setup.cache
    ref, reference = session.reference, setup.evaluator.fp32
    # With --ray the ladders climb on the cluster's workers and their finished work fills this run's cache: the
    # climbs below then replay them from it (as a resumed run does) and build only the chosen models again.
    earlier = set(cache.records())  # finished by a run cut short: what the report calls reused
    nodes = _climb_on_ray(config, defaults, cache, say, start) if config.ray else {}
    climbs = []
    for default in defaults:
        if _spent(config, start) and cache.fp32(default.backend.value) is None:
            fp32 = Recipe(backend=default.backend, precision=Precision.fp32)
            climbs.append(_Climb(TuneBackend(backend=default.backend.value, fp32=fp32.name,
                                             stopped="the time budget ran out before this backend's ladder started"),
                                 [], {}, {}))
            continue
        climbs.append(_climb(setup, default, config, say, start))
        climbs[-1].backend.node = nodes.get(default.backend.value)
        for c in climbs[-1].candidates:  # a worker's measurement is this run's, not a reuse
            c.reused = c.reused and tune_cache.candidate_file(c.backend, c.name) in earlier

    # The chosen models (and each backend's FP32, its parity gate) on the confirmation images: the report's variants.
    chosen = [c.recipes[c.chosen] for c in climbs if c.chosen]
    plan = plan_recipes(chosen, ref) + [Recipe(backend=Backend(c.backend.backend), precision=Precision.fp32) for c in climbs]
    plan = list(dict.fromkeys(plan))
    for c in climbs:  # what reused records skipped building, built again for the final pass and deploy/
        _build_again(session, setup.context, c, [n for n in (c.chosen, c.backend.fp32) if n in c.recipes], say)
    variants = {ref.name: reference, **{n: v for c in climbs for n, v in c.variants.items()}}
    built = Built([variants[r.name] for r in plan if r.name in variants],
                  {r.name: "not built" for r in plan if r.name not in variants})
    say(f"final pass of the chosen models on the {len(confirmation)} confirmation images")
    measured = measure(dataclasses.replace(session, eval_samples=confirmation), plan, built)
    measured.predictions.save(out / "predictions.npz")
    report = new_report(
        session, [measured.results[r.name] for r in plan], num_images=len(measured.predictions.labels),
        skipped=measured.skipped, config={"command": "tune", **config.model_dump(mode="json")},
        timing={"total_s": time.perf_counter() - start, "eval_s": measured.eval_s},
    )
    add_paired_stats(report, measured.predictions, config.acceptance)
    for climb in climbs:
        if climb.chosen:
            _deploy(out, climb, report, session, config)
    sets = TuneSets(calibration=session.calib.num_images, tuning=len(tuning), confirmation=len(confirmation),
                    confirmation_source=setup.confirm_source, tuning_ids=[s.id for s in tuning],
                    confirmation_ids=[s.id for s in confirmation])
    report.tune = tune_section(config, sets, [c for climb in climbs for c in climb.candidates],
                               [climb.backend for climb in climbs])
    report.tune.ranking = setup.ranking.record() if setup.ranking is not None else None
    return report


def _climb_on_ray(config: TuneConfig, defaults: Sequence[Recipe], cache: TuneCache, say, start: float) -> dict[str, str]:
    """Each backend's ladder climbed by a Ray task (`_climb_task`), as many at once as `config.ray_workers` (default:
    one per node); every record they finish is written into this run's `cache`. Returns where each ladder climbed.

    Ladders are independent, so they are what is spread: a step's candidates build on the best of the step before,
    and a candidate's pass over a few hundred tuning images costs seconds beside its build."""
    from int8eval.distributed import map_tasks, torch_threads

    if cache.folder is None:
        raise Int8EvalError(f"--ray hands the workers' finished ladders to the tune cache in {config.out}, which "
                            "cannot be written here: give an --out that can be")
    started = time.time() - (time.perf_counter() - start)  # the time budget counts from here on every node
    threads = torch_threads()
    nodes: dict[str, str] = {}

    def done(i: int, result: dict) -> None:
        cache.absorb(result["records"])
        nodes[defaults[i].backend.value] = result["node"]
        say(f"{defaults[i].backend.value}: its ladder climbed on the Ray worker at {result['node']} in "
            f"{result['seconds']:.0f} s: {result['stopped']}")

    say(f"climbing the ladders of {', '.join(d.backend.value for d in defaults)} on the Ray cluster")
    calls = [(config, tuple(defaults), d, cache.key, cache.records(), started, threads, os.getcwd()) for d in defaults]
    map_tasks(_climb_task, calls, address=config.ray, workers=config.ray_workers, on_result=done)
    return nodes


def _climb_task(config: TuneConfig, defaults: tuple[Recipe, ...], default: Recipe, key: dict, records: dict[str, str],
                started: float, threads: int, cwd: str) -> dict:
    """A Ray task: `default`'s backend's ladder, climbed with the driver's stages, images and reference in a temporary
    run folder seeded with the driver's finished `records`. Returns the records it finished, its node and how long
    it took. A node whose cache key (libraries, CPU) is not the driver's `key` would tune another model: refused."""
    import ray

    from int8eval.distributed import like_the_driver
    from int8eval.resume import differences

    like_the_driver(threads, cwd)  # the driver's models, bit for bit, from the same relative paths
    node, t0 = ray.util.get_node_ip_address(), time.perf_counter()

    def say(msg: str) -> None:
        print(f"{default.backend.value} ladder on {node}: {msg}", flush=True)

    with tempfile.TemporaryDirectory(prefix="int8eval-tune-") as tmp, using(config.decode_cache):
        local = config.model_copy(update={"out": Path(tmp), "ray": None, "ray_workers": None})
        setup = _set_up(local, defaults, Path(tmp), say)
        if setup.cache.key != key:
            raise Int8EvalError(f"the Ray worker at {node} differs from the driver ({differences(key, setup.cache.key)}): "
                                "its ladder would tune another model; run tune without --ray, or on nodes like this one")
        setup.cache.absorb(records)
        climb = _climb(setup, default, local, say, time.perf_counter() - (time.time() - started))
        return {"records": setup.cache.records(), "node": node, "seconds": time.perf_counter() - t0,
                "stopped": climb.backend.stopped}


def _deploy(out: Path, climb: _Climb, report: Report, session: Session, config: TuneConfig) -> None:
    """RUN_DIR/deploy/<backend>: the chosen model's artifact and a manifest with what it measured, which
    `int8eval run --deployed` evaluates again on other data."""
    from int8eval.deploy import write_deployment

    c = next(c for c in climb.candidates if c.name == climb.chosen)
    final = report.variant(c.name)
    measured = {
        "confirmation": c.confirmation.model_dump(mode="json"), "confirmation_verdict": c.confirmation_verdict.model_dump(mode="json"),
        "tuning": c.tuning.model_dump(mode="json"), "final_verdict": final.verdict.model_dump(mode="json") if final.verdict else None,
        "throughput_ips": c.throughput_ips, "latency_ms_p50": c.latency_ms, "size_mb": c.size_mb,
        "speedup_vs_fp32": c.speedup_vs_fp32, "size_vs_fp32": c.size_vs_fp32, "objective": config.objective.value,
        "budget": config.acceptance.describe(),
    }
    dest = out / "deploy" / climb.backend.backend
    try:
        write_deployment(dest, climb.variants[c.name], session.loaded, measured=measured, checkpoint=config.checkpoint)
        climb.backend.deploy = str(dest)
    except Int8EvalError as e:  # e.g. a legacy torch model, a state_dict that needs the model's code
        climb.backend.stopped += f"; not written to deploy/: {e}"


def _open_cache(config: TuneConfig, session: Session, tuning: list[Sample], confirmation: list[Sample],
                say) -> TuneCache:
    """OUT/.tune-cache of these arguments, model, images and libraries: what a run cut short finished."""
    calib_root = Path(config.calib_data or config.data)
    key = tune_cache.key(
        config, calibration=[(i, calib_root / i) for i in (session.calib.image_ids if session.calib else [])],
        tuning=[(s.id, s.path) for s in tuning], confirmation=[(s.id, s.path) for s in confirmation],
        training=[(s.id, s.path) for s in session.train],
    )
    return TuneCache.open(config.out, key, say)


def _build_again(session: Session, context: BuildContext, climb: _Climb, names: Sequence[str], say) -> None:
    """Build the variants of `names` that reused records skipped building: builds are seeded, so these are the
    models that were measured."""
    missing = [climb.recipes[n] for n in names if n not in climb.variants]
    if missing:
        say(f"building {', '.join(r.name for r in missing)} again (measured by the run that was cut short)")
        built = build_variants(session, missing, context.workdir, context=context)
        climb.variants.update({v.name: v for v in built.variants})


def _tuning_sets(session: Session, config: TuneConfig) -> tuple[list[Sample], list[Sample], str]:
    """(tuning, confirmation, where confirmation images come from): disjoint from each other and from the
    calibration and training images."""
    if config.confirm_data is None:
        tuning, confirmation = split_tuning(session.pool, config.tune_size, config.confirm_size, config.seed)
        return tuning, confirmation, f"seeded split of {config.data}"
    used = {s.path.resolve() for s in session.pool} | {s.path.resolve() for s in session.train}
    pool = [s for s in discover(config.confirm_data).samples if s.path.resolve() not in used]
    confirmation = subsample(pool, config.confirm_size, config.seed)
    tuning = subsample(session.pool, config.tune_size, config.seed)
    if not confirmation:
        raise ConfigError(f"--confirm-data {config.confirm_data} holds no images outside --data: give another folder")
    return tuning, confirmation, str(config.confirm_data)


class _Ranking:
    """The layers by INT8 sensitivity (most first): int8eval.diagnose.fast_ranking on FAST_IMAGES tuning images,
    computed once, when a ladder first needs it."""

    def __init__(self, session: Session, tuning: list[Sample], say, cache: TuneCache) -> None:
        self.session, self.tuning, self.say, self.cache, self.layers = session, tuning, say, cache, None
        self.images, self.seconds = 0, 0.0

    def __call__(self) -> list[str]:
        if self.layers is None and (record := self.cache.ranking()) is not None:
            self.say("reused the sensitivity ranking of the run that was cut short")
            self.layers, self.images, self.seconds = record["layers"], record["images"], record["seconds"]
        if self.layers is None:
            from int8eval.data.decode import decode_samples
            from int8eval.diagnose import FAST_IMAGES, FakeQuantSpec, fast_ranking

            s, t0 = self.session, time.perf_counter()
            samples = self.tuning[:FAST_IMAGES]
            self.say(f"ranking layers by sensitivity (fast ranking) on {len(samples)} tuning images")
            images, _, _ = decode_samples(samples, s.loaded.preprocessing, batch_size=s.spec.batch_size,
                                          workers=s.spec.workers)
            self.layers = fast_ranking(s.loaded.module, FakeQuantSpec(), s.calib.batches, np.concatenate(images),
                                       batch_size=s.spec.batch_size)
            self.images, self.seconds = len(samples), time.perf_counter() - t0
            self.cache.save_ranking({"layers": self.layers, "images": self.images, "seconds": self.seconds})
        return self.layers

    def record(self) -> TuneRanking | None:
        if self.layers is None:
            return None
        return TuneRanking(method="fast ranking: mean KL to FP32 with only this layer fake INT8 (diagnose --fast)",
                           images=self.images, seconds=self.seconds, layers=self.layers)


def _floor(config: TuneConfig) -> float | None:
    return None if config.min_agreement is None else config.min_agreement / 100.0


def _spent(config: TuneConfig, start: float) -> bool:
    return config.time_budget_s is not None and time.perf_counter() - start > config.time_budget_s


class _Evaluator:
    """One pass of `variants` and the FP32 reference over the tuning or confirmation images. Each set is decoded
    once and the reference's logits on it computed once (`Remembered`): a ladder evaluates the same images many
    times, and the same reference logits make the same statistics."""

    def __init__(self, session: Session, reference: Variant) -> None:
        self.session, self.fp32, self.reference = session, reference, Remembered(reference)
        self._decoded: dict[int, tuple[list[Sample], list[Batch]]] = {}

    def __call__(self, samples: list[Sample], variants: Sequence[Variant]) -> EvalOutcome:
        s = self.session
        if id(samples) not in self._decoded:  # the samples list is kept with its batches, so its id stays its own
            self._decoded[id(samples)] = (samples, decode_set(samples, s.loaded.preprocessing,
                                                              batch_size=s.spec.batch_size, workers=s.spec.workers))
        return evaluate(samples, s.loaded.preprocessing, [self.reference, *variants], reference=s.reference.name,
                        num_classes=s.loaded.num_classes,
                        batch_size=s.spec.batch_size, workers=s.spec.workers, decoded=self._decoded[id(samples)][1])


def _speed(variant: Variant, input_shape) -> tuple[float | None, float | None, str | None]:
    """(throughput img/s, batch-1 latency ms p50, error) of a short timing of `variant` as deployed."""
    row = bench_run([variant], input_shape, **TIMING).variants.get(variant.name, {})
    return row.get("throughput_ips"), row.get("latency_ms_p50"), row.get("error")


def _climb(setup: _Setup, default: Recipe, config: TuneConfig, say, start: float) -> _Climb:
    session, evaluator, tuning, confirmation = setup.session, setup.evaluator, setup.tuning, setup.confirmation
    context, ranking, cache = setup.context, setup.ranking, setup.cache
    backend = default.backend
    fp32_recipe = Recipe(backend=backend, precision=Precision.fp32)
    variants = {fp32_recipe.name: evaluator.fp32} if fp32_recipe == session.reference else {}
    timed = cache.fp32(backend.value)
    if timed is not None and timed.get("name") == fp32_recipe.name:  # built again only for the final pass
        say(f"{backend.value}: reused the timing of {fp32_recipe.name}")
        fp32_ips, fp32_size = timed.get("throughput_ips"), timed.get("size_mb")
    else:
        fp32 = variants.get(fp32_recipe.name) or build_variants(
            session, [fp32_recipe], context.workdir, required=[fp32_recipe], context=context).variants[0]
        variants[fp32.name] = fp32
        (fp32_ips, _, _), fp32_size = _speed(fp32, session.loaded.input_shape), fp32.size_mb
        cache.save_fp32(backend.value, {"name": fp32.name, "throughput_ips": fp32_ips, "size_mb": fp32_size})
    climb = _Climb(TuneBackend(backend=backend.value, fp32=fp32_recipe.name, fp32_throughput_ips=fp32_ips,
                               fp32_size_mb=fp32_size, stopped=""), [], variants, {fp32_recipe.name: fp32_recipe})
    qat = (lambda base: qat_recipes(config.qat_epochs, config.lr, control=False)) if config.qat_epochs else None
    steps = [Step("default", lambda base: [default]),
             *ladder(backend, ranking=ranking, max_fp32_layers=config.max_fp32_layers, qat=qat,
                     loaded=session.loaded, context=context)]
    best: TuneCandidate | None = None  # lowest mean KL on the tuning images: what later steps build on
    for step in steps:
        if _spent(config, start) and not _finished(cache, step, climb, best, default):
            climb.backend.stopped = "the time budget ran out before the ladder did"
            break
        recipes = [r for r in step.candidates(climb.recipes[best.name] if best else default) if r.name not in climb.recipes]
        if not recipes:
            continue
        reused = {r.name: c for r in recipes if (c := cache.candidate(r)) is not None}
        fresh = [r for r in recipes if r.name not in reused]
        if reused:
            say(f"{backend.value}: step '{step.name}': reused {', '.join(reused)}")
        if fresh:
            say(f"{backend.value}: step '{step.name}': {', '.join(r.name for r in fresh)}")
        measured = {c.name: c for c in _try(session, step.name, fresh, evaluator, tuning, context, config, climb,
                                            cache)}
        tried = [reused[r.name] if r.name in reused else measured[r.name] for r in recipes]
        climb.recipes.update({r.name: r for r in recipes})
        climb.candidates += tried
        ok = [c for c in tried if c.status is Status.ok and c.tuning is not None and c.tuning.kl_mean is not None]
        best = min([*([best] if best else []), *ok], key=lambda c: c.tuning.kl_mean, default=best)
        accepted = sorted((c for c in tried if c.accepted), key=objective_key(config.objective))
        if accepted and accepted[0].confirmed is None:
            _build_again(session, context, climb, [accepted[0].name], say)
            _confirm(accepted[0], evaluator, climb.variants.get(accepted[0].name), confirmation, config, say)
            cache.save_candidate(accepted[0])
        elif accepted:
            say(f"reused the confirmation of {accepted[0].name}")
        if accepted and accepted[0].confirmed:
            climb.chosen = accepted[0].name
            how = "a paired CI within the budget" if accepted[0].confirmation_verdict.verdict == "pass" else \
                "agreement of at least 1 - budget"
            climb.backend.stopped = (f"{accepted[0].name} (step '{step.name}') keeps the budget on the tuning images "
                                     f"and was confirmed by {how} on the confirmation images")
            break
    else:
        climb.backend.stopped = "the ladder ran out: no candidate kept the budget on both the tuning and the confirmation images"
    climb.backend.chosen = climb.chosen
    climb.backend.pareto = pareto(climb.candidates)
    return climb


def _finished(cache: TuneCache, step: Step, climb: _Climb, best: TuneCandidate | None, default: Recipe) -> bool:
    """Whether every candidate of `step` is in the cache (finished by a run cut short, or by a Ray worker): replaying
    it costs no time, so a spent time budget does not stop it. The FP32-layers step is not asked for its candidates
    (that would rank the layers): it counts as unfinished."""
    if step.name == "FP32 layers" and cache.ranking() is None:
        return False
    recipes = step.candidates(climb.recipes[best.name] if best else default)
    return all(r.name in climb.recipes or cache.candidate(r) is not None for r in recipes)


def _try(session: Session, step: str, recipes: list[Recipe], evaluator: _Evaluator, tuning, context: BuildContext,
         config: TuneConfig, climb: _Climb, cache: TuneCache) -> list[TuneCandidate]:
    """Build `recipes`, evaluate them in one pass on the tuning images, judge and time each: their candidates, each
    written to the cache as soon as it is known."""
    if not recipes:
        return []
    t0 = time.perf_counter()
    built = build_variants(session, recipes, context.workdir, context=context)
    build_s = (time.perf_counter() - t0) / max(len(recipes), 1)
    outcome = evaluator(tuning, built.variants)
    eval_s = (time.perf_counter() - t0) / max(len(recipes), 1) - build_s
    tried = []
    for recipe in recipes:
        t1 = time.perf_counter()
        variant = built.variant(recipe.name)
        error = built.failures.get(recipe.name) or outcome.errors.get(recipe.name)
        c = TuneCandidate(backend=recipe.backend.value, step=step, name=recipe.name, recipe=recipe.model_dump(mode="json"),
                          status=Status.error if error else Status.ok, error=error, build_s=build_s)
        if variant is not None and not error:
            c.tuning = paired_for(outcome.predictions, recipe.name, session.reference.name,
                                  labels_free=session.labels_free)
            j = judge(c.tuning, config.acceptance, _floor(config))
            c.tuning_verdict, c.accepted, c.accepted_by = j.verdict, j.accepted, j.by
            ips, latency, timing_error = _speed(variant, session.loaded.input_shape)
            c.throughput_ips, c.latency_ms = ips, latency
            c.speedup_vs_fp32 = ips / climb.backend.fp32_throughput_ips if ips and climb.backend.fp32_throughput_ips else None
            c.size_mb, fp32_mb = variant.size_mb, climb.backend.fp32_size_mb
            c.size_vs_fp32 = variant.size_mb / fp32_mb if variant.size_mb and fp32_mb else None
            if timing_error:
                c.error = f"timing: {timing_error}"
            climb.variants[recipe.name] = variant
        c.time_s = build_s + eval_s + (time.perf_counter() - t1)
        cache.save_candidate(c)
        tried.append(c)
    return tried


def _confirm(c: TuneCandidate, evaluator: _Evaluator, variant: Variant | None, confirmation, config: TuneConfig,
             say) -> bool:
    """Evaluate candidate `c` on the confirmation images and judge it by the same rule; records the outcome on `c`."""
    if variant is None:  # a reused candidate whose build failed this time
        c.confirmed, c.error = False, f"{c.name} could not be built again for its confirmation"
        return False
    say(f"confirming {c.name} on {len(confirmation)} images")
    outcome = evaluator(confirmation, [variant])
    if c.name in outcome.errors:
        c.confirmed, c.error = False, outcome.errors[c.name]
        return False
    c.confirmation = paired_for(outcome.predictions, c.name, evaluator.session.reference.name,
                                labels_free=evaluator.session.labels_free)
    j = judge(c.confirmation, config.acceptance, _floor(config))
    c.confirmation_verdict, c.confirmed = j.verdict, j.accepted
    return j.accepted
