"""The `int8eval` command: parse flags, build a config, call the library. Library errors become one line."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import click
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from int8eval.cli_options import (
    ACTIVATION_TYPE, WEIGHTS_FILE, acceptance_options, decode_cache_options, keep_options, model_source_options,
    ray_options, reject_ignored_flags, weight_options,
)
from int8eval.config import (
    AUTO_COMPILE_IMAGES, Backend, CalibMethod, Objective, OnBadImage, Precision, ReferenceMode, RunConfig, TuneConfig,
)
from int8eval.errors import ConfigError, Int8EvalError
from int8eval.report.format import num, pct
from int8eval.verdict import acceptance_from_flags

console = Console()


def _friendly(fn):
    """Turn library and validation errors into a one-line message (no stack trace) and the exit code: 2 for a usage
    error (a bad flag or option value, an impossible combination: ConfigError or invalid options), 1 for a failure
    (images, labels, a model, a run folder or a backend that cannot be used, a file that cannot be written)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ConfigError as e:
            raise click.UsageError(str(e)) from e  # exit 2, as click's own usage errors
        except Int8EvalError as e:
            raise click.ClickException(str(e)) from e  # exit 1
        except ValidationError as e:
            msgs = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'config'}: {err['msg']}" for err in e.errors())
            raise click.UsageError(f"invalid options: {msgs}") from e
        except OSError as e:  # e.g. a full disk while a backend writes its model file
            raise click.ClickException(str(e)) from e

    return wrapper


@click.group()
@click.version_option(package_name="int8eval")
def main() -> None:
    """What INT8 costs an image classifier in accuracy, and what it buys in speed and size."""


@main.command()
@click.option("--model", "-m", required=True, help="efficientnet_lite0, a torchvision name (resnet50), timm:NAME, tiny_test.")
@click.option("--data", type=click.Path(path_type=Path), help="Image folder. Default: $INT8EVAL_DATA, else the cached sample.")
@click.option("--labels", type=click.Path(path_type=Path), help="Ground truth for a flat val folder (LOC_val_solution.csv or the devkit), or a CSV of image,class (any classes).")
@click.option("--out", "-o", type=click.Path(path_type=Path), default=Path("runs/latest"), show_default=True)
@weight_options
@click.option("--backend", "backends", multiple=True, type=click.Choice([b.value for b in Backend]), help="Repeatable.")
@click.option("--calib", "calibs", multiple=True, type=click.Choice([c.value for c in CalibMethod]), help="Repeatable.")
@click.option("--percentile", default=99.999, show_default=True, help="For --calib percentile.")
@click.option("--per-tensor", is_flag=True, help="Per-tensor weight scales (default: per-channel).")
@click.option("--no-bias-correction", is_flag=True, help="INT8 without bias correction (names end in -nobc).")
@click.option("--channel-alignment", is_flag=True, help="Also each OpenVINO INT8 recipe with NNCF's channel alignment "
              "(cross-layer equalization of Conv -> 1x1 Conv pairs with no activation between; names end in -ca).")
@click.option("--smooth-quant", multiple=True, type=click.FloatRange(0, 1), metavar="ALPHA",
              help="Also each OpenVINO INT8 recipe with NNCF's SmoothQuant at ALPHA (e.g. 0.5; NNCF's is 0.95), for "
              "LayerNorm/attention models (names end in -sqALPHA). Repeatable.")
@click.option("--adaround", is_flag=True, help="Also each ONNX Runtime and OpenVINO INT8 recipe with AdaRound: each "
              "weight rounded down or up as minimises its layer's output error on the calibration images (names end "
              "in -adaround).")
@click.option("--legacy", is_flag=True, help="Also the seed's torch.ao.quantization path, labelled legacy.")
@click.option("--precision", "precisions", multiple=True, type=click.Choice(["bf16", "fp16"]), help="Extra baselines per backend.")
@click.option("--fp32-only", is_flag=True, help="Only the FP32 reference, no INT8 variants.")
@click.option("--calib-data", type=click.Path(path_type=Path), help="Calibration images (default: a seeded split of --data).")
@click.option("--calib-size", default=100, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--batch-size", default=32, show_default=True)
@click.option("--workers", default=0, show_default=True, help="Decoding worker processes (0: decode in the main process; on 2 cores inference, not decoding, is the bottleneck).")
@click.option("--max-images", type=int, help="Evaluate a seeded subset of this many images.")
@click.option("--on-bad-image", type=click.Choice([o.value for o in OnBadImage]), default="skip", show_default=True)
@click.option("--reference", type=click.Choice([m.value for m in ReferenceMode]), default="auto", show_default=True,
              help="The FP32 reference in the pass: compiled by inductor (checked against eager on a seeded batch, "
              f"the check in the report) or eager; auto compiles from {AUTO_COMPILE_IMAGES} evaluation images on.")
@click.option("--qat-epochs", default=0, show_default=True, help="Also QAT (PT2E) for N epochs, and the same fine-tuning in FP32 as a control.")
@click.option("--train-data", type=click.Path(path_type=Path), help="QAT training images (default: a seeded split of --data, not evaluated).")
@click.option("--train-size", default=300, show_default=True, help="Training images for QAT.")
@click.option("--lr", default=1e-5, show_default=True, help="QAT learning rate.")
@click.option("--tensorrt-on-cpu", is_flag=True, help="Run the ONNX that TensorRT would get with ONNX Runtime (no GPU needed).")
@keep_options()
@ACTIVATION_TYPE
@click.option("--deployed", multiple=True, type=click.Path(path_type=Path), metavar="DIR",
              help="A deployment `int8eval tune` wrote (RUN_DIR/deploy/BACKEND), evaluated with its preprocessing beside "
              "the FP32 reference. Repeatable. Without --backend only the deployments are evaluated.")
@click.option("--bench", is_flag=True, help="Also measure latency and throughput of every variant.")
@click.option("--resume", is_flag=True, help="Go on from where an interrupted run of the same arguments into the same "
              "RUN_DIR stopped evaluating (other arguments or data are refused).")
@ray_options
@acceptance_options
@_friendly
@model_source_options
@decode_cache_options
def run(**kw) -> None:
    """Evaluate FP32 and INT8 variants of a model in one pass and write RUN_DIR/report.{json,md}."""
    from int8eval.commands.run import run as run_command
    from int8eval.data.fetch import default_data_root
    from int8eval.session import expand_recipes, resolve_keep

    reject_ignored_flags(click.get_current_context())

    fp32_only = kw.pop("fp32_only")
    deployed = kw.pop("deployed")
    r = {k: kw.pop(k) for k in ("backends", "calibs", "percentile", "per_tensor", "legacy", "precisions", "qat_epochs",
                                 "lr", "tensorrt_on_cpu", "keeps", "sensitivity", "no_bias_correction", "activation_type",
                                 "channel_alignment", "smooth_quant", "adaround")}
    recipes = () if fp32_only or (deployed and not r["backends"]) else expand_recipes(
        r["backends"], r["calibs"], percentile=r["percentile"], per_channel=not r["per_tensor"], legacy=r["legacy"],
        precisions=r["precisions"], qat_epochs=r["qat_epochs"], lr=r["lr"], tensorrt_on_cpu=r["tensorrt_on_cpu"],
        keeps=resolve_keep(r["keeps"], r["sensitivity"], kw["out"]), bias_correction=not r["no_bias_correction"],
        activation_type=r["activation_type"], channel_alignment=r["channel_alignment"], smooth_quant=r["smooth_quant"],
        adaround=r["adaround"], onnx_file=kw["model"].lower().endswith(".onnx"),
    )
    acceptance = acceptance_from_flags(kw.pop("max_drop"), kw.pop("drop"), kw.pop("mlperf"), kw.pop("min_agreement"))
    if kw["data"] is None:
        kw["data"] = default_data_root()
    if deployed:  # before any work: each manifest checked, and built from the model given
        from int8eval.deploy import deployment_recipes

        more, kw["preprocessing"] = deployment_recipes(deployed, kw["model"], kw["checkpoint"])
        recipes = (*recipes, *more)
    config = RunConfig(**kw, recipes=recipes, acceptance=acceptance)
    report = run_command(config, console=Console(stderr=True))
    _print_summary(report, config.out)


def _print_summary(report, out: Path) -> None:
    # Names, errors and reasons are text, never rich markup: an error may hold "[red]" or a path with brackets.
    table = Table(title=f"{escape(report.model.name)}: {report.data.num_images} images, {report.data.num_skipped} skipped")
    table.add_column("variant", overflow="fold")  # names carry the recipe: never cut them
    for col in ("status", "top-1 %", "top-5 %", "agreement %", "size MB"):
        table.add_column(col)
    for v in report.variants:
        table.add_row(escape(v.name), v.status.value, pct(v.top1), pct(v.top5), pct(v.agreement_top1), num(v.size_mb))
    console.print(table)
    for v in report.variants:
        if v.error:
            console.print(f"[red]{escape(v.name)}[/red]: {escape(v.error)}")
    if report.data.num_skipped:
        console.print(f"[yellow]{report.data.num_skipped} images or folders skipped[/yellow] (reasons in report.md)")
    for v in report.variants:
        if v.verdict:
            console.print(f"{escape(v.name)}: [bold]{v.verdict.verdict.value}[/bold] ({escape(v.verdict.reason)})")
    if report.preprocessing_check is not None and report.preprocessing_check.warning:
        console.print(f"[bold yellow]warning[/bold yellow]: {escape(report.preprocessing_check.warning)}")
    console.print(f"report: {escape(str(out / 'report.json'))} (rendered: report.md, report.html)")


@main.command()
def models() -> None:
    """List the models int8eval knows and where their weights come from."""
    from int8eval.models import list_models

    table = Table()
    for col in ("model", "family", "weights"):
        table.add_column(col)
    for m in list_models():
        table.add_row(m.name, m.family, escape(m.weights))
    console.print(table)
    console.print("Any torchvision classification model name also works; --weights-file PATH loads your own weights.")


@main.command(name="backends")
def backends_cmd() -> None:
    """List backends and whether each is installed (nothing is imported)."""
    from int8eval.backends import BACKENDS

    table = Table()
    for col in ("backend", "installed", "needs", "install with"):
        table.add_column(col)
    for info in BACKENDS.values():
        table.add_row(
            info.backend.value, "yes" if info.installed else "no", ", ".join(info.requires), escape(f"pip install 'int8eval[{info.extra}]'")
        )
    console.print(table)


@main.group()
def data() -> None:
    """Get and prepare ImageNet data."""


@data.command("fetch-sample")
@click.option("--dest", type=click.Path(path_type=Path), help="Default: the int8eval cache.")
@_friendly
def fetch_sample_cmd(dest: Path | None) -> None:
    """Download the public 1000-image ImageNet sample (one image per class)."""
    from int8eval.data.fetch import fetch_sample

    console.print(f"sample in {fetch_sample(dest)}")


@data.command("prepare")
@click.argument("source", type=click.Path(path_type=Path))
@click.option("--labels", required=True, type=click.Path(path_type=Path), help="LOC_val_solution.csv or the devkit (folder/tar).")
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path))
@click.option("--copy", is_flag=True, help="Copy files instead of symlinking them.")
@_friendly
def prepare_cmd(source: Path, labels: Path, out: Path, copy: bool) -> None:
    """Sort the flat val folder (or ILSVRC2012_img_val.tar) into folders per synset."""
    from int8eval.data.fetch import prepare

    console.print(f"{prepare(source, labels, out, copy=copy)} images sorted into {out}")


@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path, exists=True, file_okay=False))
@acceptance_options
@_friendly
def report(run_dir: Path, max_drop: float | None, drop: str | None, mlperf: bool, min_agreement: float | None) -> None:
    """Re-render RUN_DIR's report from its report.json, without re-running; with a budget, re-judge the verdicts."""
    from int8eval.commands.report import report as report_command

    paths = report_command(run_dir, acceptance_from_flags(max_drop, drop, mlperf, min_agreement))
    for path in paths:
        console.print(f"wrote {escape(str(path))}")  # a folder name is not rich markup


@main.command()
@click.option("--model", "-m", required=True)
@click.option("--backend", "backends", multiple=True, type=click.Choice([b.value for b in Backend]), help="Repeatable; default: every installed one.")
@click.option("--precision", "precisions", multiple=True, type=click.Choice([p.value for p in Precision]), help="Repeatable; default: fp32 int8.")
@click.option("--data", type=click.Path(path_type=Path), help="Calibration images for INT8 (default: $INT8EVAL_DATA or the sample; else noise).")
@click.option("--out", "-o", type=click.Path(path_type=Path), default=Path("runs/bench"), show_default=True)
@weight_options
@keep_options("As for `run`: 'a,b', 'topN' or 'none'; repeatable.")
@click.option("--threads", type=click.IntRange(min=1), help="PyTorch intra-op threads while timing (default: PyTorch's).")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=2), help="Batch size for throughput (latency is batch 1).")
@ACTIVATION_TYPE
@_friendly
@decode_cache_options
def bench(model, backends, precisions, data, out, checkpoint, weights, keeps, sensitivity, threads, batch_size,
          activation_type, decode_cache) -> None:
    """Speed and size of a model per backend and precision (no accuracy pass): writes OUT/report.{json,md,html}."""
    from int8eval.commands.bench import bench as bench_command
    from int8eval.report.bench import bench_markdown
    from int8eval.session import resolve_keep

    reject_ignored_flags(click.get_current_context())

    report = bench_command(
        model, backends, precisions or ("fp32", "int8"), out=out, data=data, checkpoint=checkpoint, weights=weights,
        keeps=resolve_keep(keeps, sensitivity, out), threads=threads, activation_type=activation_type,
        batch_sizes=(1, batch_size), on_progress=lambda msg: console.log(escape(msg)), decode_cache=decode_cache,
    )
    console.print(escape("\n".join(bench_markdown(report.variants, report.bench))))  # its warnings included
    console.print(f"report: {escape(str(out / 'report.json'))} (rendered: report.md, report.html)")


@main.command()
@click.option("--model", "-m", required=True)
@click.option("--data", type=click.Path(path_type=Path), help="Default: $INT8EVAL_DATA, else the cached sample.")
@click.option("--labels", type=click.Path(path_type=Path))
@click.option("--out", "-o", type=click.Path(path_type=Path), default=Path("runs/latest"), show_default=True,
              help="A run's folder adds a sensitivity section to its report.")
@weight_options
@click.option("--calib", type=click.Choice(["minmax", "percentile"]), default="minmax", show_default=True)
@click.option("--percentile", default=99.999, show_default=True)
@click.option("--per-tensor", is_flag=True, help="Per-tensor weight scales (default: per-channel).")
@click.option("--symmetric-activations", is_flag=True, help="Signed symmetric activations, as TensorRT wants.")
@click.option("--no-bias-correction", is_flag=True, help="Rank without bias correction (as run --no-bias-correction).")
@click.option("--calib-size", default=100, show_default=True)
@click.option("--max-images", type=int, help="Images for the per-layer sweep  [default: 64; 32 with --fast]")
@click.option("--confirm-images", type=int, help="Re-check the top-k kept in FP32 on this many other images.")
@click.option("--top-k", default=5, show_default=True)
@click.option("--rank-by", type=click.Choice(["kl", "agreement", "all_but_agreement", "all_but_kl"]), default="kl", show_default=True)
@click.option("--no-split-effects", is_flag=True, help="Skip the weight-only / activation-only runs (faster).")
@click.option("--fast", is_flag=True, help="Only the ranking (by KL, only-this-layer runs; what `tune` ranks with): "
              "no all-but, split-effect, SQNR or ONNX-name results; several times cheaper.")
@click.option("--seed", default=0, show_default=True)
@_friendly
@decode_cache_options
def diagnose(**kw) -> None:
    """Which layers cost the accuracy: per-layer sensitivity of a fake-quantized model (written to sensitivity.json)."""
    from int8eval.data.fetch import default_data_root
    from int8eval.commands.diagnose import run_diagnose
    from int8eval.diagnose import FAST_IMAGES, FakeQuantSpec

    reject_ignored_flags(click.get_current_context())
    if kw["max_images"] is None:
        kw["max_images"] = FAST_IMAGES if kw["fast"] else 64

    spec = FakeQuantSpec(
        per_channel=not kw.pop("per_tensor"), calib=kw.pop("calib"), percentile=kw.pop("percentile"),
        symmetric_activations=kw.pop("symmetric_activations"), bias_correction=not kw.pop("no_bias_correction"),
    )
    data = kw.pop("data") or default_data_root()
    model, out = kw.pop("model"), kw.pop("out")
    result = run_diagnose(
        model, data, out, spec=spec, split_effects=not kw.pop("no_split_effects"),
        console=Console(stderr=True), **kw,
    )
    onnx = {entry["module"]: entry.get("onnx_node") or "" for entry in result["layers"]}
    table = Table(title=f"most sensitive layers, by {result['rank_by']}")
    for col in ("layer", "ONNX node"):
        table.add_column(col)
    for name in result["top_k"]:
        table.add_row(name, onnx.get(name, ""))
    console.print(table)
    keep, whole = result["keep_fp32"], result["all_quantized"]
    console.print(
        f"agreement with FP32: all INT8 {pct(whole['agreement'])}%, top {len(result['top_k'])} kept in FP32 "
        f"{pct(keep['agreement'])}% ({result['num_images']} images); details in sensitivity.json"
    )
    console.print(
        f"to measure the real INT8 models with them in FP32: int8eval run -m {model} --data {data} --out {out} "
        f"--keep-fp32 none --keep-fp32 top{len(result['top_k'])}"
    )


@main.command()
@click.option("--model", "-m", required=True, help="As for `run`.")
@click.option("--data", type=click.Path(path_type=Path), help="Default: $INT8EVAL_DATA, else the cached sample.")
@click.option("--labels", type=click.Path(path_type=Path))
@click.option("--out", "-o", type=click.Path(path_type=Path), default=Path("runs/tune"), show_default=True)
@weight_options
@click.option("--backend", "backends", multiple=True, type=click.Choice([b.value for b in Backend]), help="Repeatable; default: every installed one.")
@click.option("--objective", type=click.Choice([o.value for o in Objective]), default="throughput", show_default=True)
@click.option("--calib-size", default=100, show_default=True)
@click.option("--tune-size", default=300, show_default=True, help="Images candidates are ranked and chosen on.")
@click.option("--confirm-size", default=400, show_default=True, help="Images that only confirm the chosen models.")
@click.option("--confirm-data", type=click.Path(path_type=Path), help="Confirmation images (default: a seeded split of --data).")
@click.option("--max-fp32-layers", default=8, show_default=True, help="Most layers the FP32-fallback step may keep in FP32.")
@click.option("--qat-epochs", default=0, show_default=True, help="QAT as the torch ladder's last step (needs training images).")
@click.option("--train-data", type=click.Path(path_type=Path), help="QAT training images (default: a seeded split of --data).")
@click.option("--train-size", default=300, show_default=True)
@click.option("--time-budget", type=float, help="Minutes; the ladders stop when spent and the best found is reported.")
@click.option("--seed", default=0, show_default=True)
@click.option("--batch-size", default=32, show_default=True)
@acceptance_options
@ray_options
@_friendly
@model_source_options
@decode_cache_options
def tune(**kw) -> None:
    """Find per backend the fastest INT8 model that keeps the accuracy budget, confirmed on images it was not chosen
    on: writes RUN_DIR/report.{json,md,html} with the ladder of every backend."""
    from int8eval.commands.tune import tune as tune_command
    from int8eval.data.fetch import default_data_root

    reject_ignored_flags(click.get_current_context())
    acceptance = acceptance_from_flags(kw.pop("max_drop"), kw.pop("drop"), kw.pop("mlperf"))
    if acceptance is None and kw["min_agreement"] is not None:  # the budget on agreement alone (images without labels)
        acceptance = acceptance_from_flags(None, None, False, kw["min_agreement"])
    if acceptance is None:
        raise ConfigError("tune needs a budget: --max-drop PTS (with --drop relative for % of FP32), --mlperf or --min-agreement")
    minutes = kw.pop("time_budget")
    kw["data"] = kw["data"] or default_data_root()
    config = TuneConfig(**kw, acceptance=acceptance, time_budget_s=minutes * 60 if minutes is not None else None)
    report = tune_command(config, console=Console(stderr=True))
    _print_summary(report, config.out)
    console.print(f"choice: {escape(report.tune.choice or 'none')}: {escape(report.tune.choice_reason)}")


@main.command()
@click.argument("spec_file", metavar="SPEC.yaml", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option("--out", "-o", type=click.Path(path_type=Path), help="Default: the spec's `out`, else runs/sweep.")
@click.option("--resume", is_flag=True, help="Go on with a killed cell from its evaluation checkpoint (run --resume).")
@ray_options
@_friendly
@decode_cache_options
def sweep(spec_file: Path, out: Path | None, resume: bool, decode_cache, ray, ray_workers) -> None:
    """Models x backends x recipes (and tune cells) from one YAML file, a run folder per cell (finished ones reused):
    OUT/sweep.{json,md,html} compares them. Exit 1 when a cell failed (the others still ran)."""
    from int8eval.commands.sweep import run_spec

    report = run_spec(spec_file, out=out, resume=resume, decode_cache=decode_cache, ray=ray, ray_workers=ray_workers,
                      console=Console(stderr=True))
    console.print(f"{len(report.cells)} cells, {len(report.failed)} failed; sweep: "
                  f"{escape(str(Path(report.out) / 'sweep.json'))} (rendered: sweep.md, sweep.html)")
    if report.failed:
        click.get_current_context().exit(1)


@main.command()
@click.argument("name", default="seed")
@click.option("--data", type=click.Path(path_type=Path), help="ImageNet val images (default: $INT8EVAL_DATA, else the cached sample).")
@click.option("--labels", type=click.Path(path_type=Path))
@click.option("--train-data", type=click.Path(path_type=Path), help="Training images for the QAT rows.")
@click.option("--out", "-o", type=click.Path(path_type=Path), default=Path("runs/seed"), show_default=True)
@WEIGHTS_FILE
@click.option("--max-images", type=int)
@click.option("--calib-size", type=int)
@click.option("--train-size", type=int)
@click.option("--workers", default=0, show_default=True)
@click.option("--check", is_flag=True, help="Only list what the recipe needs and whether it is here.")
@_friendly
@decode_cache_options
def reproduce(name, data, labels, train_data, out, checkpoint, max_images, calib_size, train_size, workers, check,
              decode_cache) -> None:
    """Reproduce a published pipeline as a recipe (NAME: seed, or a YAML file): OUT/report.json (.md, .html) and its
    table, OUT/seed_table.md (.json)."""
    from int8eval.commands.reproduce import reproduce as run_recipe
    from int8eval.data.fetch import default_data_root
    from int8eval.recipes.reproduce import load_recipe, requirements

    reject_ignored_flags(click.get_current_context())
    recipe = load_recipe(name)
    if check:
        for need in requirements(recipe, data=data, train_data=train_data, checkpoint=checkpoint):
            console.print(escape(str(need)))
        return
    run_recipe(
        recipe, data=data or default_data_root(), out=out, train_data=train_data, labels=labels,
        checkpoint=checkpoint, max_images=max_images, calib_size=calib_size, train_size=train_size, workers=workers,
        decode_cache=decode_cache,
    )
    console.print(escape((out / "seed_table.md").read_text()))


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
