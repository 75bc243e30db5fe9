"""The evaluation pass sharded over a Ray cluster (`int8eval run --ray`), with the predictions one machine would make.

Design. The driver opens the session and builds the variants as a single-machine run does: its artifacts are the run
folder's, its variants answer for the report (sizes, provenance, --bench). Each Ray worker (an actor, one per node by
default) opens the same session and builds the same recipes once, from the picklable config, with the same stages
(`session.open_session`, `session.build_variants`, `session.fast_reference`), into a temporary folder of its own;
it then evaluates the shards it is handed with `evaluate.evaluate`, and the driver concatenates the shards' per-image
predictions in image order. `sweep --ray` shards each run cell so; `tune --ray` spreads whole ladders instead
(`map_tasks`, `commands.tune._climb_on_ray`).

Why each worker builds rather than receiving the driver's artifacts: not every variant has an artifact that loads on
its own (PyTorch FP32 and the legacy torch.ao INT8 are state dicts of the model's code; QAT is a trained module), while
every variant can be built again by the stage that built it. Calibration is deterministic for the same images, batches,
libraries and CPU, so the rebuilt models are the driver's; but that is checked, never trusted: a node with other
libraries or another CPU (the INT8 recipe follows VNNI/AMX, `int8eval.environment`) would build another model. As
`run --resume` does for a rebuilt model, every worker first predicts the driver's first batch and compares top-5, KL
and cosine with the driver's own, bit for bit. A variant that differs (or fails to build) on a worker is an error in
the report, never merged; the FP32 reference differing stops the run (QAT recipes fine-tune again on every worker,
with the same seed: the check says whether that gave the driver's model). Workers run torch with the driver's number of
threads: PyTorch's compiled INT8 kernels split their sums by it, and another count gives other last bits (measured: the
KL divergence of torch's INT8 with 1 thread against 2); so give each worker a node like the driver's (the default, one
worker per node, on nodes of one kind).

Shards are runs of whole batches of the single-machine pass (a multiple of the batch size, starting at a multiple), so
every batch a backend sees is the batch it sees on one machine: bit-identical predictions where the backend is
deterministic. Shards are handed out one at a time as workers finish (a slow node takes fewer). A worker that dies is
restarted by Ray (`max_restarts`), builds and checks again, and its shard is retried (`max_task_retries`).

Images are read by path on each node: the data (and --labels, --checkpoint) must be on storage every node sees at
the same path, and the decoded-image cache writable at its path; workers start in the driver's working directory, so
relative paths mean the same. Each node needs int8eval, its backends and the model's weights installed.

Example (any caller of `evaluate` shards its pass with one line):
    >>> with ray_evaluator(config, config.recipes, address="auto") as evaluator:
    ...     measured = measure(session, plan, built, engine=evaluator)
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from int8eval.backends import Variant
from int8eval.config import OnBadImage, Preprocessing, Recipe, SessionSpec
from int8eval.data.cache import using
from int8eval.data.decode import batches
from int8eval.data.layouts import Sample
from int8eval.errors import BackendUnavailable, ConfigError, DatasetError, Int8EvalError
from int8eval.evaluate import NUM_CLASSES, EvalOutcome, Predictions, evaluate
from int8eval.resume import environment_key
from int8eval.session import build_variants, fast_reference, open_session

MAX_SHARD_IMAGES = 1000  # a worker lost mid-shard costs at most this much evaluation again
RESTARTS = 2  # a worker (and each of its shards) is retried this many times after it dies


def import_ray():
    """Ray, or a BackendUnavailable naming the extra: it is imported only when --ray is used."""
    try:
        import ray
    except ImportError:
        raise BackendUnavailable("--ray needs Ray, which is not installed: pip install 'int8eval[ray]'") from None
    return ray


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker needs to rebuild the driver's variants and evaluate as it does; picklable."""

    session: SessionSpec  # e.g. the RunConfig: the same model, images, splits and decoded-image cache
    recipes: tuple[Recipe, ...]  # given to open_session (they decide the splits)
    build: tuple[Recipe, ...]  # the recipes the driver built, in its order
    reference_name: str | None  # the FP32 reference variant's
    preprocessing: Preprocessing
    batch_size: int
    workers: int  # decoding processes per worker
    on_bad_image: OnBadImage
    cwd: str  # the driver's working directory: relative paths mean the same on every node
    threads: int  # the driver's torch threads: inductor's INT8 kernels split their sums by it (other bits otherwise)
    num_classes: int | None  # the classes every variant's logits must score (None: the first variant's)


@dataclass
class Probe:
    """The driver's predictions of its first readable batch, which every worker's variants must reproduce."""

    samples: list[Sample]
    predictions: Predictions
    environment: dict = field(default_factory=dict)  # the driver's libraries and CPU, to say why a worker differs


def _differing(ours: Predictions, theirs: Predictions) -> list[str]:
    """Names of `theirs`'s variants that `ours` lacks or predicts otherwise (top-5, KL, cosine), bit for bit."""
    tables = ("top5", "kl_to_ref", "cos_to_ref")
    return [name for name in theirs.top5 if name not in ours.top5 or ours.image_ids != theirs.image_ids or any(
        not np.array_equal(getattr(ours, t).get(name), getattr(theirs, t).get(name)) for t in tables)]


def _outcome(samples: list[Sample], preprocessing: Preprocessing, variants: list[Variant], *, reference: str | None,
             batch_size: int, workers: int, on_bad_image: OnBadImage, num_classes: int | None) -> EvalOutcome:
    """`evaluate` on one shard; a shard none of whose images can be read is empty, not an error (others may be)."""
    try:
        return evaluate(samples, preprocessing, variants, reference=reference, batch_size=batch_size, workers=workers,
                        on_bad_image=on_bad_image, num_classes=num_classes)
    except DatasetError:
        if on_bad_image is OnBadImage.fail:
            raise
    skipped = [{"path": samples[i].id, "reason": why}
               for b in batches(samples, preprocessing, batch_size=batch_size, workers=0) for i, why in b.bad]
    empty = Predictions([], np.zeros(0, np.int64), {})
    return EvalOutcome(empty, skipped, {}, 0.0, {})


class ShardWorker:
    """A Ray actor: the session opened and the variants built and checked once, then shards evaluated on request."""

    def __init__(self, spec: WorkerSpec, probe: Probe) -> None:
        import ray

        like_the_driver(spec.threads, spec.cwd)  # before any build: inductor compiles kernels for this many threads
        self.spec, self.node = spec, ray.util.get_node_ip_address()
        start = time.perf_counter()
        self.errors: dict[str, str] = {}  # variants not merged from this worker, with why
        self.failure: Exception | None = None  # raised on every call: the actor stays up to say it
        self._workdir = tempfile.TemporaryDirectory(prefix="int8eval-ray-")
        try:
            self.variants = self._build(probe)
        except Exception as e:  # noqa: BLE001 - sent to the driver when it asks for anything
            self.failure, self.variants = e, []
        self.build_s = time.perf_counter() - start

    def ready(self) -> dict:
        """Where this worker runs and how long it took to build and check its variants."""
        if self.failure is not None:
            raise _on(self.node, self.failure)
        return {"node": self.node, "build_s": self.build_s}

    def close(self) -> None:
        self._workdir.cleanup()  # a killed worker cannot: its temporary folder would stay behind

    def _build(self, probe: Probe) -> list[Variant]:
        spec, where = self.spec, f"on the Ray worker at {self.node}"
        with using(spec.session.decode_cache):
            session = open_session(spec.session, spec.recipes)
            required = [r for r in spec.build if r.name == spec.reference_name]
            built = build_variants(session, spec.build, Path(self._workdir.name), required=required)
            fast_reference(session, built)  # as `session.measure` does on the driver: the same reference
            self.errors |= {name: f"failed to build {where}: {why}" for name, why in built.failures.items()}
            ours = evaluate(probe.samples, spec.preprocessing, built.variants, reference=spec.reference_name,
                            batch_size=spec.batch_size, workers=0, on_bad_image=OnBadImage.skip,
                            num_classes=spec.num_classes).predictions
        other = " (its libraries or CPU differ from the driver's)" if environment_key() != probe.environment else ""
        for name in _differing(ours, probe.predictions):
            if name == spec.reference_name:
                raise Int8EvalError(f"the FP32 reference {name} predicts the first images otherwise than on the "
                                    f"driver{other}: the shards would not be one model's; run without --ray")
            self.errors.setdefault(name, f"built otherwise {where}: it predicts the first images otherwise than on "
                                         f"the driver{other}, so its shards are not merged")
        return [v for v in built.variants if v.name not in self.errors]

    def evaluate(self, samples: list[Sample]) -> tuple[EvalOutcome, dict[str, str]]:
        """One shard's outcome, and the variants this worker does not answer for (built otherwise or not at all)."""
        spec = self.spec
        try:
            if self.failure is not None:
                raise self.failure
            with using(spec.session.decode_cache):
                outcome = _outcome(samples, spec.preprocessing, self.variants, reference=spec.reference_name,
                                   batch_size=spec.batch_size, workers=spec.workers, on_bad_image=spec.on_bad_image,
                                   num_classes=spec.num_classes)
        except Int8EvalError as e:  # e.g. an unreadable image with --on-bad-image fail
            raise _on(self.node, e) from None
        return outcome, self.errors


def _on(node: str, e: Exception) -> Exception:
    """`e` saying which worker it happened on; an int8eval error keeps its type (the CLI's exit code follows it)."""
    return type(e)(f"on the Ray worker at {node}: {e}") if isinstance(e, Int8EvalError) else e


def merge(parts: list[tuple[EvalOutcome, dict[str, str]]], seconds: float) -> EvalOutcome:
    """The shards' outcomes (in image order) as the one outcome of a single pass: predictions concatenated, a variant
    that failed in any shard (or on any worker) failed, with the first reason in image order; predict() times summed."""
    errors: dict[str, str] = {}
    for outcome, not_merged in parts:
        for name, why in {**outcome.errors, **not_merged}.items():
            errors.setdefault(name, why)
    filled = [o.predictions for o, _ in parts if o.predictions.image_ids]
    if not filled:
        skipped = [s for o, _ in parts for s in o.skipped]
        raise DatasetError(f"none of the images could be read (first: {skipped[0]['reason'] if skipped else '-'})")
    names = [n for n in filled[0].top5 if n not in errors and all(n in p.top5 for p in filled)]
    errors |= {n: "missing from a shard's predictions" for n in filled[0].top5 if n not in names and n not in errors}

    def joined(table: str) -> dict[str, np.ndarray]:
        first = getattr(filled[0], table)
        return {n: np.concatenate([getattr(p, table)[n] for p in filled]) for n in names if n in first}

    predictions = Predictions(
        image_ids=[i for p in filled for i in p.image_ids], labels=np.concatenate([p.labels for p in filled]),
        top5=joined("top5"), kl_to_ref=joined("kl_to_ref"), cos_to_ref=joined("cos_to_ref"),
    )
    predict_s: dict[str, float] = {}
    for outcome, _ in parts:
        for name, s in outcome.predict_s.items():
            predict_s[name] = predict_s.get(name, 0.0) + s
    return EvalOutcome(predictions, [s for o, _ in parts for s in o.skipped], errors, seconds, predict_s,
                       wait_s=sum(o.wait_s for o, _ in parts))


def shards(num_images: int, batch_size: int, num_workers: int, shard_images: int | None = None) -> list[range]:
    """Consecutive image ranges, each a whole number of batches (the single-machine pass's batches, unchanged): about
    four per worker, so a slow or restarted worker delays little, and at most MAX_SHARD_IMAGES each."""
    size = shard_images or min(MAX_SHARD_IMAGES, -(-num_images // (4 * num_workers)))
    size = -(-max(size, 1) // batch_size) * batch_size
    return [range(a, min(a + size, num_images)) for a in range(0, num_images, size)]


def _probe(samples: list[Sample], preprocessing: Preprocessing, variants: list[Variant], *, reference: str | None,
           batch_size: int, num_classes: int | None) -> Probe:
    """The driver's predictions of the first batch with a readable image."""
    for a in range(0, len(samples), batch_size):
        first = samples[a:a + batch_size]
        outcome = _outcome(first, preprocessing, variants, reference=reference, batch_size=batch_size, workers=0,
                           on_bad_image=OnBadImage.skip, num_classes=num_classes)
        if outcome.predictions.image_ids:
            return Probe(first, outcome.predictions, environment_key())
    raise DatasetError(f"none of the {len(samples)} images could be read")


def torch_threads() -> int:
    """The driver's torch threads, which a worker must use (`like_the_driver`)."""
    import torch

    return torch.get_num_threads()


def like_the_driver(threads: int, cwd: str) -> None:
    """Make this worker process run as the driver does: its torch threads (PyTorch's compiled INT8 kernels split
    their sums by them, so another count gives other last bits) and its working directory (relative paths mean the
    same; absolute ones still work where that folder is missing)."""
    import torch

    torch.set_num_threads(threads)
    with contextlib.suppress(OSError):
        os.chdir(cwd)


class RayEvaluator:
    """`evaluate` with the images sharded over the connected Ray cluster; called as `evaluate` is (`session.measure`'s
    engine). Workers are started for each call and stopped after it."""

    def __init__(self, spec: SessionSpec, recipes: Iterable[Recipe], *, workers: int | None = None,
                 shard_images: int | None = None, actor: type = ShardWorker) -> None:
        self.spec, self.recipes, self.num_workers, self.shard_images = spec, tuple(recipes), workers, shard_images
        self.actor = actor  # a subclass may inject faults (the tests kill a worker with it)
        self.described: dict = {}  # the last pass: workers, nodes, shards, seconds to start and build

    def __call__(self, samples: list[Sample], preprocessing: Preprocessing, variants: list[Variant], *,
                 reference: str | None = None, batch_size: int = 32, workers: int = 0,
                 on_bad_image: OnBadImage = OnBadImage.skip, progress=None, decoded=None, checkpoint=None,
                 num_classes: int | None = NUM_CLASSES) -> EvalOutcome:
        if decoded is not None or checkpoint is not None:
            raise ValueError("a pass sharded over Ray decodes on its workers and is not checkpointed")
        if not samples:
            raise DatasetError("no images to evaluate: every image found was used for calibration or training")
        ray = import_ray()
        start = time.perf_counter()
        probe = _probe(samples, preprocessing, variants, reference=reference, batch_size=batch_size,
                       num_classes=num_classes)
        spec = WorkerSpec(self.spec, self.recipes, tuple(v.recipe for v in variants), reference, preprocessing,
                          batch_size, workers, on_bad_image, os.getcwd(), torch_threads(), num_classes)
        count, cpus = placement(ray, self.num_workers)
        remote = ray.remote(self.actor).options(num_cpus=cpus, max_restarts=RESTARTS, max_task_retries=RESTARTS,
                                                scheduling_strategy="SPREAD")
        actors = [remote.remote(spec, probe) for _ in range(count)]  # by value: kept with the actor for its restarts
        try:
            task = progress.add_task(f"starting {count} Ray workers (each builds the variants)", total=count) \
                if progress is not None else None
            started = []
            for a in actors:  # a worker that cannot build stops the run here, before any shard
                started.append(_get(ray, a.ready.remote()))
                if progress is not None:
                    progress.update(task, advance=1)
            self.described = {"workers": count, "cpus_per_worker": cpus, "nodes": sorted({w["node"] for w in started}),
                              "setup_s": time.perf_counter() - start, "build_s": [w["build_s"] for w in started]}
            return self._pass(ray, actors, samples, batch_size, progress)
        finally:  # each worker removes its temporary folder (a killed one cannot), then is stopped
            closing = [a.close.remote() for a in actors]
            ray.wait(closing, num_returns=len(closing), timeout=10)
            for a in actors:
                ray.kill(a, no_restart=True)

    def _pass(self, ray, actors: list, samples: list[Sample], batch_size: int, progress) -> EvalOutcome:
        start = time.perf_counter()
        plan = shards(len(samples), batch_size, len(actors), self.shard_images)
        task = progress.add_task(f"evaluating on {len(actors)} Ray workers", total=len(samples)) if progress else None
        results: dict[int, tuple[EvalOutcome, dict[str, str]]] = {}
        todo, running = list(range(len(plan))), {}

        def hand(actor) -> None:  # the next shard to a free worker
            if todo:
                i = todo.pop(0)
                running[actor.evaluate.remote(samples[plan[i].start:plan[i].stop])] = (i, actor)

        for actor in actors:
            hand(actor)
        while running:
            [ready], _ = ray.wait(list(running), num_returns=1)
            i, actor = running.pop(ready)
            results[i] = _get(ray, ready)
            if progress is not None:
                progress.update(task, advance=len(plan[i]))
            hand(actor)
        self.described |= {"shards": len(plan), "shard_images": len(plan[0])}
        outcome = merge([results[i] for i in range(len(plan))], time.perf_counter() - start)
        outcome.wait_s /= len(actors)  # the time a worker waited for decoded images, on average
        return outcome


def _get(ray, ref):
    """ray.get, a worker's int8eval error raised as itself (one line for the CLI), a lost worker said plainly."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, Int8EvalError):
            raise cause from None  # one line, which says the worker; not Ray's traceback
        raise
    except ray.exceptions.RayActorError as e:
        raise Int8EvalError(f"a Ray worker died {RESTARTS + 1} times (or its node was lost): {e}") from None


def placement(ray, workers: int | None) -> tuple[int, int]:
    """(workers, CPUs each) on the connected cluster: one worker per node by default; every node fits its share, so
    none waits forever."""
    nodes = [n["Resources"]["CPU"] for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU")]
    if not nodes:
        raise Int8EvalError("the Ray cluster has no node with a CPU: start one with `ray start`")
    count = workers or len(nodes)
    if count > sum(nodes):
        raise ConfigError(f"--ray-workers {count}: the Ray cluster has {int(sum(nodes))} CPUs; ask for fewer")
    per_node = -(-count // len(nodes))
    return count, max(1, int(min(nodes) // per_node))


@contextlib.contextmanager
def connected(address: str = "auto"):
    """Ray, connected to the cluster at `address` ("auto": the one `ray start` began, or $RAY_ADDRESS; "local": a
    new one on this machine; HOST:PORT or ray://HOST:PORT) unless already connected; disconnected at the end if this
    connected it."""
    ray = import_ray()
    connecting = not ray.is_initialized()
    if connecting:
        try:
            ray.init(address=address, logging_level=logging.WARNING)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise Int8EvalError(f"--ray {address}: no Ray cluster there ({type(e).__name__}: {e}); start one with "
                                "`ray start --head`, or use --ray local for one on this machine") from None
    try:
        yield ray
    finally:
        if connecting:
            ray.shutdown()


@contextlib.contextmanager
def ray_evaluator(spec: SessionSpec, recipes: Iterable[Recipe], *, address: str = "auto", workers: int | None = None,
                  shard_images: int | None = None, actor: type = ShardWorker) -> Iterator[RayEvaluator]:
    """A RayEvaluator of `spec` (the session's) and `recipes` (those it was opened with) on the cluster at `address`
    (as `connected`)."""
    with connected(address):
        yield RayEvaluator(spec, recipes, workers=workers, shard_images=shard_images, actor=actor)


def map_tasks(fn: Callable, calls: Sequence[tuple], *, address: str = "auto", workers: int | None = None,
              on_result: Callable[[int, Any], None] | None = None) -> list:
    """`fn(*call)` for every call, as Ray tasks on the cluster at `address`, `workers` at a time (default: one per
    node, each with the node's CPUs); results in the order of `calls`. `on_result(i, result)` runs on the driver as
    each finishes (the first error stops the rest); a task whose worker dies is retried RESTARTS times."""
    with connected(address) as ray:
        _, cpus = placement(ray, workers)
        remote = ray.remote(fn).options(num_cpus=cpus, max_retries=RESTARTS, scheduling_strategy="SPREAD")
        pending = {remote.remote(*call): i for i, call in enumerate(calls)}
        results: dict[int, Any] = {}
        try:
            while pending:
                [ready], _ = ray.wait(list(pending), num_returns=1)
                i = pending.pop(ready)
                results[i] = _get(ray, ready)
                if on_result is not None:
                    on_result(i, results[i])
        finally:
            for ref in pending:
                ray.cancel(ref, force=True)
        return [results[i] for i in range(len(calls))]
