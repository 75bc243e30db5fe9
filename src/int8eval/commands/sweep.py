"""`int8eval sweep SPEC.yaml`: models x backends x recipes (and `tune` cells) from one validated YAML file.

Each cell is one model on one backend: a run folder written by `int8eval run` (`commands.run.run`) holding the
backend's FP32 (its parity gate) and every recipe of the spec for that backend, evaluated in one pass beside the
PyTorch FP32 reference; a `tune` cell is a run folder written by `int8eval tune` for one model. Cells live in
OUT/<model>/<backend>/ and OUT/<model>/tune/. A cell whose folder already holds a complete run of the same arguments
is reused (and marked so); `--resume` hands run's own resume to a cell that was killed. A cell that fails is recorded
with its error and the others go on. One comparison report across the cells: OUT/sweep.json (the truth),
sweep.md and sweep.html rendered from it (int8eval.report.sweep).

Example:
    >>> report = run_spec(Path("examples/sweep.yaml"), out=Path("runs/sweep"))
    >>> [cell.error for cell in report.failed]
"""

from __future__ import annotations

import re
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from rich.console import Console

from int8eval import backends
from int8eval.config import (
    Acceptance, Backend, Objective, OnBadImage, Precision, Recipe, ReferenceMode, RunConfig, TuneConfig,
)
from int8eval.errors import ConfigError, DatasetError, RunFolderError
from int8eval.report import Report
from int8eval.report import folder as run_folder
from int8eval.report.sweep import SweepCell, SweepReport, rows_from_report, write_sweep

# The paths of a spec, resolved against the spec file's folder (a spec means the same wherever it is run from).
_SESSION_PATHS = ("data", "labels", "calib_data", "train_data")


class _SpecModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SweepModel(_SpecModel):
    """One model of the sweep: a name as `run -m` takes it, optional weights, and the label its cells are filed under
    (default: the name, with characters other than letters, digits, `.`, `_`, `-` as `-`)."""

    name: str = Field(min_length=1)
    label: str | None = Field(None, pattern=r"^[A-Za-z0-9_-][A-Za-z0-9._-]*$")  # a folder name, never `..`
    # `weights_file:` as run's --weights-file; `checkpoint:`, its older name, still reads.
    checkpoint: Path | None = Field(None, validation_alias=AliasChoices("weights_file", "checkpoint"))
    weights: str | None = None
    # The model's preprocessing, as `run --preset` and `--preprocessing FILE` state it (an ONNX file needs it): a
    # preset, then the keys of a preprocessing file (resize, crop, channel_order, layout, mean, ...) over it.
    preset: str | None = None
    preprocessing: dict[str, Any] | None = None

    @property
    def onnx_file(self) -> bool:
        return self.name.lower().endswith(".onnx")

    @property
    def id(self) -> str:
        return self.label or re.sub(r"[^A-Za-z0-9._-]+", "-", self.name).strip("-.") or "model"


class SweepTune(_SpecModel):
    """A `tune` cell per model (the options of `int8eval tune`); the budget is the spec's `acceptance`."""

    backends: tuple[Backend, ...] | None = None  # default: the sweep's backends
    objective: Objective = Objective.throughput
    tune_size: int = Field(300, gt=0)
    confirm_size: int = Field(400, gt=0)
    max_fp32_layers: int = Field(8, ge=0)
    min_agreement: float | None = Field(None, gt=0, le=100)
    time_budget_min: float | None = Field(None, gt=0)


class SweepSpec(_SpecModel):
    """The YAML file of `int8eval sweep`. `recipes` are Recipe fields (config.Recipe: calib, percentile, per_channel,
    bias_correction, activation_type, adaround, keep_fp32, precision, ...) applied on every backend, or on those a
    recipe's own `backends:` lists; `{}` is each backend's default INT8 recipe, and `recipes: []` runs tune cells only.
    The session options (data, calib_size, max_images, ...) are `int8eval run`'s and apply to every cell."""

    models: tuple[SweepModel, ...] = Field(min_length=1)
    backends: tuple[Backend, ...] = ()  # default: every installed default backend
    recipes: tuple[dict[str, Any], ...] = ({},)
    tune: SweepTune | None = None
    acceptance: Acceptance | Literal["mlperf"] | None = None  # the budget of the verdicts (and of tune)
    bench: bool = False
    out: Path | None = None
    data: Path | None = None  # default: $INT8EVAL_DATA, else the cached sample
    labels: Path | None = None
    calib_data: Path | None = None
    calib_size: int | None = None
    seed: int | None = None
    batch_size: int | None = None
    workers: int | None = None
    max_images: int | None = None
    on_bad_image: OnBadImage | None = None
    train_data: Path | None = None
    train_size: int | None = None
    reference: ReferenceMode | None = None  # how the FP32 reference runs in each pass (run --reference)
    labels_free: bool | None = None  # judge on agreement with FP32 (run --labels-free; automatic without labels)

    @field_validator("models", mode="before")
    @classmethod
    def _names_alone(cls, value):
        # `- efficientnet_lite0` is short for `- name: efficientnet_lite0`
        return [{"name": m} if isinstance(m, str) else m for m in value] if isinstance(value, list) else value

    @model_validator(mode="after")
    def _distinct_labels(self) -> SweepSpec:
        ids = [m.id for m in self.models]
        twice = sorted({i for i in ids if ids.count(i) > 1})
        if twice:
            raise ValueError(f"two models are filed under {', '.join(twice)}: give each a distinct `label:`")
        return self

    @field_validator("backends")
    @classmethod
    def _backends_once(cls, value: tuple[Backend, ...]) -> tuple[Backend, ...]:
        twice = sorted({b.value for b in value if value.count(b) > 1})
        if twice:
            raise ValueError(f"{', '.join(twice)} listed twice: list each backend once")
        return value

    @model_validator(mode="after")
    def _tune_has_a_budget(self) -> SweepSpec:
        if self.tune is not None and self.acceptance is None:
            raise ValueError("tune needs a budget: add `acceptance: {max_drop: 1}` (points of top-1) or "
                             "`acceptance: mlperf`")
        return self

    @property
    def budget(self) -> Acceptance | None:
        return Acceptance.mlperf() if self.acceptance == "mlperf" else self.acceptance

    def session(self) -> dict[str, Any]:
        """The session options that were given (the others keep `int8eval run`'s defaults)."""
        names = ("labels", "calib_data", "calib_size", "seed", "batch_size", "workers", "max_images", "on_bad_image",
                 "train_data", "train_size", "reference",
                 "labels_free")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}


def _keys(loc: tuple, recipe: bool) -> str:
    """The keys allowed where an unknown key `loc` was found."""
    if recipe:
        names = [n for n in Recipe.model_fields if n not in ("backend", "deployed")] + ["backends"]
    else:
        model = {"models": SweepModel, "tune": SweepTune}.get(loc[0], SweepSpec) if len(loc) > 1 else SweepSpec
        names = list(model.model_fields)
    return ", ".join(names)


def _message(e: ValidationError, *, recipe: bool = False) -> str:
    """Each error as `key.path: what is wrong (got VALUE)`; an unknown key is named with the keys allowed there."""
    locs = [err["loc"] for err in e.errors()]
    # An error of a list whose item is wrong too (e.g. "at least 1 item" when the only model has a typo) says nothing.
    errors = [err for err in e.errors() if not any(len(o) > len(err["loc"]) and o[:len(err["loc"])] == err["loc"]
                                                   for o in locs)]
    parts = []
    for err in errors[:4]:
        loc = ".".join(map(str, err["loc"]))
        if err["type"] == "extra_forbidden":
            parts.append(f"{loc}: unknown key (a typo? the keys are: {_keys(err['loc'], recipe)})")
            continue
        got = repr(err.get("input"))
        got = got if len(got) <= 60 else got[:57] + "..."
        msg = err["msg"].removeprefix("Value error, ")
        said = msg + ("" if err["type"] in ("value_error", "missing") else f" (got {got})")
        parts.append(f"{loc}: {said}" if loc else said)
    more = len(errors) - 4
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


def load_spec(path: Path) -> SweepSpec:
    """Read and validate SPEC.yaml; relative paths in it are taken from the spec file's folder. A ConfigError
    names the bad key and value."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read the sweep spec {path}: {e}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"the sweep spec {path} is not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"the sweep spec {path} must be a mapping with at least `models:` (see examples/sweep.yaml)")
    try:
        spec = SweepSpec.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(f"sweep spec {path}: {_message(e)}") from None
    base = path.resolve().parent
    paths = {n: base / getattr(spec, n) for n in (*_SESSION_PATHS, "out") if getattr(spec, n) is not None}
    models = tuple(m.model_copy(update={"checkpoint": base / m.checkpoint}) if m.checkpoint else m for m in spec.models)
    return spec.model_copy(update={**paths, "models": models})


# --------------------------------------------------------------------------------------------------------------
# Cells


@dataclass(frozen=True)
class Cell:
    """One run folder of the sweep: a model on one backend (kind "run"), or a model's tune run (kind "tune")."""

    model: SweepModel
    kind: Literal["run", "tune"]
    backend: Backend | None
    config: RunConfig | TuneConfig

    @property
    def folder(self) -> str:
        return f"{self.model.id}/{self.backend.value if self.backend else 'tune'}"


def _backend_recipes(spec: SweepSpec, chosen: list[Backend], *, onnx_file: bool = False,
                     ) -> dict[Backend, tuple[Recipe, ...]]:
    """The recipes of each backend; a recipe its backend cannot do is a ConfigError naming it. For an ONNX file, bias
    correction is off unless a recipe asks for it (it measures layer inputs in PyTorch; `run` does the same)."""
    out: dict[Backend, list[Recipe]] = {b: [] for b in chosen}
    for i, entry in enumerate(spec.recipes):
        fields = dict(entry)
        only = fields.pop("backends", None)
        only = [only] if isinstance(only, str) else only
        for key in ("backend", "deployed"):
            if key in fields:
                fix = "list them in `backends:`" if key == "backend" else "evaluate a deployment with `int8eval run --deployed`"
                raise ConfigError(f"recipes[{i}]: {key} is not a recipe key of a sweep; {fix}")
        if only is not None and (not isinstance(only, list) or any(b not in [c.value for c in chosen] for b in only)):
            raise ConfigError(f"recipes[{i}].backends: {only!r} must list backends of the sweep "
                              f"({', '.join(b.value for b in chosen)})")
        for backend in chosen:
            if only is not None and backend.value not in only:
                continue
            given = dict(fields)
            if onnx_file:
                given.setdefault("bias_correction", False)
            if given.get("precision", Precision.int8.value) in (Precision.int8, Precision.int8.value):
                given.setdefault("calib", backends.default_calib(backend))  # `{}` is the backend's default recipe
            try:
                out[backend].append(Recipe(backend=backend, **given))
            except ValidationError as e:
                hint = (" (to give a recipe to some backends only, add `backends: [...]` to it)"
                        if only is None and len(chosen) > 1 else "")
                raise ConfigError(f"recipes[{i}] on {backend.value}: {_message(e, recipe=True)}{hint}") from None
            name = out[backend][-1].name
            if [r.name for r in out[backend]].count(name) > 1:
                raise ConfigError(f"recipes[{i}] on {backend.value} is {name}, as an earlier recipe is (`{{}}` is the "
                                  "backend's default recipe): drop one of them")
    return {b: tuple(rs) for b, rs in out.items()}


def plan_cells(spec: SweepSpec, *, out: Path, resume: bool = False, decode_cache: Path | None = None,
               ray: str | None = None, ray_workers: int | None = None) -> list[Cell]:
    """Every cell of `spec`, its config built and checked (a ConfigError before anything runs): per model, one run
    cell per backend with recipes, then its tune cell."""
    from int8eval.data.fetch import default_data_root
    from int8eval.models.preprocessing import resolve

    chosen = list(spec.backends) or [b for b, info in backends.BACKENDS.items() if info.installed and info.default]
    if spec.data is not None and not spec.data.exists():
        raise ConfigError(f"data: {spec.data} does not exist: give the image folder (relative to the spec file)")
    recipes = _backend_recipes(spec, chosen)
    try:
        data = spec.data or default_data_root()
    except DatasetError:
        raise ConfigError("the spec gives no `data:` (the image folder, relative to the spec file), INT8EVAL_DATA is "
                          "not set and no sample is cached: add `data: DIR` to the spec") from None
    session = {**spec.session(), "data": data, "decode_cache": decode_cache}
    cells = []
    for model in spec.models:
        common = dict(model=model.name, checkpoint=model.checkpoint, weights=model.weights, **session)
        pre = resolve(model.preset, None, **(model.preprocessing or {})) if model.preset or model.preprocessing else None
        if pre is not None:
            common["preprocessing"] = pre
        # An ONNX file goes to the backends that read one, unless `backends:` names others (their cells then fail
        # with the reason, as `run` would).
        model_backends = [b for b in chosen if spec.backends or not model.onnx_file or backends.takes_onnx(b)]
        model_recipes = _backend_recipes(spec, chosen, onnx_file=True) if model.onnx_file else recipes
        try:
            for backend in model_backends:
                if model_recipes[backend]:
                    config = RunConfig(**common, out=Path(out) / model.id / backend.value, recipes=model_recipes[backend],
                                       acceptance=spec.budget, bench=spec.bench, resume=resume, ray=ray,
                                       ray_workers=ray_workers)
                    cells.append(Cell(model, "run", backend, config))
            if spec.tune is not None:
                t = spec.tune.model_dump(exclude={"time_budget_min"})
                t["backends"] = t["backends"] if t["backends"] is not None else tuple(model_backends)
                minutes = spec.tune.time_budget_min
                config = TuneConfig(**common, **t, out=Path(out) / model.id / "tune", acceptance=spec.budget,
                                    time_budget_s=minutes * 60 if minutes else None, ray=ray, ray_workers=ray_workers)
                cells.append(Cell(model, "tune", None, config))
        except ValidationError as e:
            raise ConfigError(f"model {model.id}: {_message(e)}") from None
    if not cells:
        raise ConfigError("the spec asks for no cell: give `recipes:` (e.g. `[{}]`, each backend's default) or `tune:`")
    return cells


# --------------------------------------------------------------------------------------------------------------
# Running


# What does not change a cell's numbers: where it is written, whether it resumed, where decoded images are cached,
# whether its images were sharded over Ray (the driver merges a single machine's predictions).
_NOT_ARGUMENTS = {"out", "resume", "decode_cache", "command", "ray", "ray_workers"}


def _arguments(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in _NOT_ARGUMENTS}


def finished(cell: Cell) -> Report | None:
    """The cell's complete run of the same arguments, when its folder holds one (its files checked), else None."""
    folder = Path(cell.config.out)
    if not (folder / run_folder.REPORT).is_file():
        return None
    try:
        report = Report.read(folder / run_folder.REPORT)
        run_folder.verify(folder, report)
    except RunFolderError:
        return None
    same_kind = (report.config.get("command") == "tune") == (cell.kind == "tune")
    wanted = cell.config.model_dump(mode="json")
    return report if same_kind and _arguments(report.config) == _arguments(wanted) else None


def _run_cell(cell: Cell, console: Console) -> tuple[Report | None, bool, str | None]:
    """(report, reused, error) of one cell; any failure is caught and said, so the next cell goes on."""
    report = finished(cell)
    if report is not None:
        return report, True, None
    try:
        if cell.kind == "tune":
            from int8eval.commands.tune import tune

            return tune(cell.config, console=console), False, None
        from int8eval.commands.run import run

        return run(cell.config, console=console), False, None
    except Exception as e:  # noqa: BLE001 - a sweep survives a failing cell, as a run survives a failing variant
        return None, False, f"{type(e).__name__}: {e}"


def sweep(cells: list[Cell], *, out: Path, spec: SweepSpec, spec_file: Path | None = None,
          console: Console | None = None) -> SweepReport:
    """Run (or reuse) every cell in order and write OUT/sweep.json, sweep.md and sweep.html. A failing cell is
    recorded with its error (`SweepReport.failed`) and the others go on."""
    from int8eval.environment import environment

    console = console or Console(stderr=True)
    out = run_folder.check_out(Path(out))
    records = []
    for i, cell in enumerate(cells, 1):
        console.rule(f"cell {i}/{len(cells)}: {cell.folder}", style="dim")
        start = time.perf_counter()
        report, reused, error = _run_cell(cell, console)
        record = SweepCell(
            model=cell.model.id, model_name=cell.model.name, kind=cell.kind,
            backend=cell.backend.value if cell.backend else None, folder=cell.folder,
            status="failed" if error else "ok", reused=reused, error=error,
            seconds=None if reused else time.perf_counter() - start,
            run_id=report.run_id if report else None,
            num_images=report.data.num_images if report else None,
            rows=rows_from_report(report) if report else [],
            tune_choice=report.tune.choice if report and report.tune else None,
        )
        records.append(record)
        said = "reused" if reused else ("failed: " + error if error else "done")
        console.print(f"{cell.folder}: {said}", markup=False, highlight=False)
    result = SweepReport(
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"), command=sys.argv,
        spec_file=str(spec_file) if spec_file else None, out=str(out), spec=spec.model_dump(mode="json"),
        cells=records, environment=environment(),
    )
    write_sweep(result, out)
    return result


def run_spec(spec_file: Path, *, out: Path | None = None, resume: bool = False, decode_cache: Path | None = None,
             ray: str | None = None, ray_workers: int | None = None, console: Console | None = None) -> SweepReport:
    """`int8eval sweep SPEC.yaml`: validate the spec and plan every cell (a ConfigError before anything runs), then
    run them into OUT (`--out`, else the spec's `out`, else runs/sweep). `ray` (and `ray_workers`) shard each run
    cell's evaluation images over a Ray cluster, as `run --ray` does, and climb each tune cell's ladders on it."""
    spec = load_spec(spec_file)
    out = Path(out or spec.out or "runs/sweep")
    try:
        cells = plan_cells(spec, out=out, resume=resume, decode_cache=decode_cache, ray=ray, ray_workers=ray_workers)
    except ConfigError as e:
        raise ConfigError(f"sweep spec {spec_file}: {e}") from None
    return sweep(cells, out=out, spec=spec, spec_file=Path(spec_file), console=console)
