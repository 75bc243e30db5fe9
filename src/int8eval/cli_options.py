"""Click options that several `int8eval` commands share: the model's weights, the acceptance budget, --keep-fp32,
--activation-type, the decoded-image cache and the Ray cluster; and the check that refuses a flag another one would
silently ignore."""

from __future__ import annotations

import functools
from pathlib import Path

import click
from rich.console import Console

from int8eval.config import ActivationType, Backend
from int8eval.errors import ConfigError


def decode_cache_options(fn):
    """`--cache DIR` / `--no-cache` for a command that decodes images, passed on to it as `decode_cache` (the folder,
    or None). The command runs with that cache active (int8eval.data.cache) and, when it succeeds, says on stderr the
    cache's location and size and what it read and added; a folder that cannot be written stops it before any work.
    Apply it under `_friendly`, which turns its errors into messages."""

    @click.option("--cache", "cache_dir", type=click.Path(path_type=Path), help="Decoded images kept between runs "
                  "(default: $INT8EVAL_CACHE/decoded, else ~/.cache/int8eval/decoded).")
    @click.option("--no-cache", is_flag=True, help="Decode every image; read and write no decoded-image cache.")
    @functools.wraps(fn)
    def wrapper(*args, cache_dir: Path | None, no_cache: bool, **kw):
        from int8eval.data.cache import default_root, using  # lazily, as cli.py imports the library

        if cache_dir is not None and no_cache:
            raise ConfigError("--cache has no effect with --no-cache: it reads and writes no cache; drop one of the two")
        root = None if no_cache else Path(cache_dir or default_root()).expanduser().absolute()  # as recorded
        say = functools.partial(Console(stderr=True).print, markup=False, highlight=False, soft_wrap=True)
        with using(root, say=say):
            return fn(*args, decode_cache=root, **kw)

    return wrapper


# `--checkpoint` stays as the flag's older name; the value reaches the library as `checkpoint`.
WEIGHTS_FILE = click.option(
    "--weights-file", "--checkpoint", "checkpoint", type=click.Path(path_type=Path), metavar="PATH",
    help="The model's weights as a local file (a state dict saved with torch.save, or .safetensors), loaded with "
    "weights_only; no download. Without it, weights come from the torch hub / Hugging Face caches (TORCH_HOME, "
    "HF_HOME), else the internet.",
)
WEIGHTS = click.option(
    "--weights", metavar="NAME", help="torchvision weights name (e.g. IMAGENET1K_V1) or timm tag; default: the "
    "architecture's default. 'random': seeded random weights (structure and parity only, accuracy meaningless).",
)


def weight_options(fn):
    """`--weights-file PATH` (alias `--checkpoint`, as `checkpoint`) and `--weights NAME`."""
    return WEIGHTS_FILE(WEIGHTS(fn))


ACTIVATION_TYPE = click.option(
    "--activation-type", type=click.Choice([a.value for a in ActivationType]),
    help="ONNX Runtime INT8 activations: uint8 (U8S8) or int8 (S8S8). Default: the CPU's (uint8 on x86, int8 "
    "elsewhere); set, variant names end in -u8s8 / -s8s8.",
)

_ACCEPTANCE = (
    click.option("--max-drop", type=float, help="Accuracy budget: the most top-1 an INT8 variant may lose (points)."),
    click.option("--drop", type=click.Choice(["absolute", "relative"]), help="--max-drop in points (absolute, default) or percent of FP32."),
    click.option("--mlperf", is_flag=True, help="MLPerf's budget: INT8 top-1 >= 99% of FP32's."),
    click.option("--min-agreement", type=click.FloatRange(0, 100, min_open=True), metavar="PERCENT",
                 help="A budget on top-1 agreement with FP32 (percent) instead of accuracy, as images without labels "
                 "are judged (run, report; tune: alone the budget, else also required on both sets)."),
)


def acceptance_options(fn):
    for option in reversed(_ACCEPTANCE):
        fn = option(fn)
    return fn


_KEEP_HELP = ("Leave layers in FP32 in every INT8 recipe: 'a,b' (module paths), 'topN' (from --sensitivity), or "
              "'none'. Repeatable: one variant per value (add 'none' to also get the fully quantized one).")


def keep_options(keep_help: str = _KEEP_HELP):
    """`--keep-fp32 LAYERS` (repeatable, as `keeps`) and `--sensitivity FILE`; resolve them with `resolve_keep`."""
    options = (
        click.option("--keep-fp32", "keeps", multiple=True, metavar="LAYERS", help=keep_help),
        click.option("--sensitivity", type=click.Path(path_type=Path),
                     help="sensitivity.json for --keep-fp32 topN (default: OUT/sensitivity.json)."),
    )

    def decorate(fn):
        for option in reversed(options):
            fn = option(fn)
        return fn

    return decorate


_MODEL_SOURCE = (
    click.option("--preset", type=click.Choice(["torchvision", "inception", "caffe-bgr"]),
                 help="The preprocessing convention of an ONNX file (numbers and sources: int8eval.models.preprocessing)."),
    click.option("--preprocessing", "preprocessing_file", type=click.Path(path_type=Path),
                 help="YAML file of preprocessing keys (preset, resize, crop, interpolation, resize_mode, channel_order, "
                 "layout, value_range, mean, std); flags override it."),
    click.option("--resize", type=click.IntRange(min=1), help="Resize target (the short side, or both with --resize-mode square)."),
    click.option("--crop", type=click.IntRange(min=1), help="Centre crop size (the model's input size)."),
    click.option("--interpolation", type=click.Choice(["nearest", "bilinear", "bicubic"])),
    click.option("--resize-mode", type=click.Choice(["short-side", "square"])),
    click.option("--channel-order", type=click.Choice(["rgb", "bgr"])),
    click.option("--layout", type=click.Choice(["nchw", "nhwc"]), help="Input layout (default: an ONNX file's input shape)."),
    click.option("--value-range", type=click.Choice(["0-1", "0-255"]), help="Pixel scale before mean and std."),
    click.option("--mean", help="Three numbers (or one) in the value range's units and the model's channel order, e.g. 104,117,123."),
    click.option("--std", help="Three numbers (or one); default 1 unless a preset says otherwise."),
    click.option("--class-names", type=click.Path(path_type=Path), help="The model's classes, one name a line (line i: "
                 "class i), for a label space other than ImageNet's; --labels may then be a CSV of image,class."),
    click.option("--labels-free", is_flag=True, help="Ignore labels: agreement, flips, KL and cosine to FP32, no accuracy "
                 "(automatic for a flat folder of images without --labels)."),
)


def model_source_options(fn):
    """The preprocessing of a model stated once (`models.preprocessing.resolve`: --preset, then --preprocessing FILE,
    then the flags), passed on as `preprocessing` (left out when nothing is stated), and --labels-free as `labels_free`.
    Apply it under `_friendly`."""

    @functools.wraps(fn)
    def wrapper(*args, **kw):
        from int8eval.models.preprocessing import resolve, triple

        names = ("resize", "crop", "interpolation", "resize_mode", "channel_order", "layout", "value_range")
        flags = {name: kw.pop(name) for name in names}
        flags.update(mean=triple("--mean", kw.pop("mean")), std=triple("--std", kw.pop("std")))
        pre = resolve(kw.pop("preset"), kw.pop("preprocessing_file"), **flags)
        if pre is not None:
            kw["preprocessing"] = pre
        return fn(*args, **kw)

    for option in reversed(_MODEL_SOURCE):
        wrapper = option(wrapper)
    return wrapper


# Flags that --fp32-only leaves without effect: it builds only the FP32 reference.
_INT8_FLAGS = (
    "backends", "calibs", "percentile", "per_tensor", "no_bias_correction", "legacy", "precisions", "calib_data",
    "calib_size", "keeps", "sensitivity", "qat_epochs", "train_data", "train_size", "lr", "tensorrt_on_cpu",
    "activation_type", "max_drop", "drop", "mlperf", "deployed", "channel_alignment", "smooth_quant", "adaround",
)
# Flags that shape the fresh recipes, which --deployed without --backend does not build.
_RECIPE_FLAGS = (
    "calibs", "percentile", "per_tensor", "no_bias_correction", "legacy", "precisions", "keeps", "sensitivity",
    "qat_epochs", "tensorrt_on_cpu", "activation_type", "channel_alignment", "smooth_quant", "adaround",
)


def reject_ignored_flags(ctx: click.Context) -> None:
    """A ConfigError naming both flags when a flag given on the command line would be silently ignored because of
    another (e.g. --keep-fp32 with --fp32-only): the run would otherwise look as if it had honoured it."""
    import re

    from click.core import ParameterSource

    from int8eval.backends import BACKENDS, default_calib

    params = {p.name: p for p in ctx.command.params}
    v = ctx.params

    def given(name: str) -> bool:
        return name in params and ctx.get_parameter_source(name) not in (None, ParameterSource.DEFAULT)

    def flag(name: str) -> str:
        return max(params[name].opts, key=len) if name in params else f"--{name.replace('_', '-')}"

    def clash(name: str, other: str, why: str, fix: str = "drop one of the two") -> None:
        raise ConfigError(f"{flag(name)} has no effect with {other}: {why}; {fix}")

    topn = any(re.fullmatch(r"top\d+", k.strip()) for k in v.get("keeps") or ())
    if given("sensitivity") and not topn:
        clash("sensitivity", "--keep-fp32 without topN", "only --keep-fp32 topN reads it")
    if v.get("check"):  # reproduce --check only lists what the recipe needs
        for name in ("labels", "out", "max_images", "calib_size", "train_size", "workers"):
            if given(name):
                clash(name, "--check", "--check only lists what the recipe needs and runs nothing", f"drop {flag(name)}")
    if v.get("fast"):  # diagnose --fast
        for name in ("rank_by", "no_split_effects"):
            if given(name):
                clash(name, "--fast", "the fast ranking ranks by the KL when only each layer is INT8 and runs no "
                      "weight-only or activation-only runs")
    if v.get("fp32_only"):
        for name in _INT8_FLAGS:
            if given(name):
                clash(name, "--fp32-only", "--fp32-only builds only the FP32 reference")
        return
    if v.get("deployed") and not v.get("backends"):
        for name in _RECIPE_FLAGS:
            if given(name):
                clash(name, "--deployed without --backend", "only the deployments are evaluated",
                      f"add --backend B to also build fresh recipes, or drop {flag(name)}")
    if "qat_epochs" in params and not v.get("qat_epochs"):
        for name in ("train_data", "train_size", "lr"):
            if given(name):
                clash(name, "--qat-epochs 0", "it sets up QAT fine-tuning", f"add --qat-epochs N or drop {flag(name)}")
    if "backends" in params:  # run: which backends and calibrations the recipes will use
        chosen = list(v.get("backends") or ()) or [b.value for b, i in BACKENDS.items() if i.installed and i.default]
        calibs = set(v.get("calibs") or ()) or {default_calib(Backend(b)).value for b in chosen}
        if given("percentile") and "percentile" not in calibs:
            clash("percentile", f"--calib {', '.join(sorted(calibs))}", "it sets the percentile of --calib percentile")
        if given("tensorrt_on_cpu") and "tensorrt" not in chosen:
            clash("tensorrt_on_cpu", f"--backend {', '.join(chosen)}", "it applies to --backend tensorrt")
        if given("legacy") and "torch" not in chosen and not v.get("qat_epochs"):
            clash("legacy", f"--backend {', '.join(chosen)}", "it applies to --backend torch (and --qat-epochs)")
    if given("percentile") and "calib" in params and v.get("calib") != "percentile":  # diagnose
        clash("percentile", f"--calib {v.get('calib')}", "it sets the percentile of --calib percentile")
    if "calibs" not in params and given("precisions") and "int8" not in v["precisions"]:  # bench
        for name in ("keeps", "data"):  # both only matter for its INT8 models
            if given(name):
                clash(name, f"--precision {', '.join(v['precisions'])}", "it applies to the INT8 models",
                      f"add --precision int8 or drop {flag(name)}")


def ray_options(fn):
    """`--ray [auto|ADDRESS]` and `--ray-workers N`, passed on as `ray` and `ray_workers` (int8eval.distributed)."""
    fn = click.option("--ray-workers", type=click.IntRange(min=1), help="Ray workers (default: one per node of the "
                      "cluster); run: each builds the variants once and evaluates shards of the images; tune: each "
                      "climbs one backend's ladder.")(fn)
    return click.option(
        "--ray", is_flag=False, flag_value="auto", metavar="[auto|local|ADDRESS]",
        help="Spread the work over a Ray cluster (run, sweep: the evaluation images in shards; tune: one backend's "
        "ladder per worker): 'auto' (the default value: the cluster `ray start` began, or $RAY_ADDRESS), 'local' (a "
        "new one on this machine) or HOST:PORT. Needs pip install 'int8eval[ray]'; the images must be at the same "
        "path on every node.")(fn)
