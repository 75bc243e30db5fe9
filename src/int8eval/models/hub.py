"""torchvision and timm models with their weights' own transforms. Weights come from a local file (--weights-file),
the torch hub or Hugging Face cache (`int8eval.models.weights`), or a download; offline and not cached, the error
comes within about a second and says where it looked and what to do."""

from __future__ import annotations

import math
from pathlib import Path
from urllib.parse import urlsplit

from int8eval.config import Interpolation, Preprocessing
from int8eval.errors import ConfigError, ModelLoadError
from int8eval.models import weights as weights_mod

TIMM_PREFIX = "timm:"
# Shown by `int8eval models`; any other torchvision classification name works too.
FEATURED_TORCHVISION = ("resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0", "convnext_tiny")


def infos():
    from int8eval.models import ModelInfo

    rows = [ModelInfo(n, "torchvision", "torchvision (--weights NAME|random, default DEFAULT; TORCH_HOME cache)") for n in FEATURED_TORCHVISION]
    rows.append(ModelInfo("timm:NAME", "timm", "timm via the Hugging Face hub or HF_HOME cache (e.g. timm:vit_tiny_patch16_224)"))
    return rows


def _torchvision_names() -> list[str]:
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)


def handles(name: str) -> bool:
    if name.startswith(TIMM_PREFIX) or name in _torchvision_names():
        return True
    import difflib

    from int8eval.models import list_models

    known = [m.name for m in list_models()] + _torchvision_names()
    close = difflib.get_close_matches(name, known, n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise ModelLoadError(
        f"unknown model {name!r}.{hint} See `int8eval models`; timm models are named timm:NAME."
    )


RANDOM = "random"  # --weights random: the architecture with seeded random weights (structure and parity tests)


def load(name: str, *, checkpoint: Path | None = None, weights: str | None = None):
    if checkpoint is not None and weights == RANDOM:
        raise ConfigError("--weights random has no effect with --weights-file: drop one of the two")
    if name.startswith(TIMM_PREFIX):
        return _load_timm(name.removeprefix(TIMM_PREFIX), checkpoint, weights)
    return _load_torchvision(name, checkpoint, weights)


def _offline_message(what: str, err: Exception, where: str) -> str:
    return f"could not download {what} ({type(err).__name__}: {err}). Offline? {where}, or pass --weights-file PATH."


def _random_source() -> str:
    import torch

    torch.manual_seed(0)  # the same random model in every process, so parity and reruns compare like with like
    return "random initialisation, seed 0 (--weights random: accuracy is meaningless, structure and parity are not)"


def published_top1(weights) -> float | None:
    """Top-1 (%) torchvision publishes for `weights` on ImageNet-1K's validation set, or None."""
    metrics = (weights.meta.get("_metrics") or {}).get("ImageNet-1K") or {}
    value = metrics.get("acc@1")
    return float(value) if isinstance(value, (int, float)) else None


def is_published_file(path: Path, url: str) -> bool:
    """Whether `path` is the very file at `url`: torchvision names its files `<name>-<first hex of sha256>.pth`."""
    import hashlib
    import re

    m = re.search(r"-([a-f0-9]{6,})\.", Path(url).name)
    if m is None:
        return False
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest().startswith(m.group(1))


def _load_torchvision(name: str, checkpoint: Path | None, weights: str | None):
    import torchvision

    from int8eval.models import LoadedModel, load_state_dict_file

    enum = torchvision.models.get_model_weights(name)
    try:
        w = enum.DEFAULT if weights in (None, RANDOM) else enum[weights]
    except KeyError:
        raise ModelLoadError(
            f"{name} has no weights {weights!r}; choose one of {', '.join(m.name for m in enum)} or {RANDOM}"
        ) from None
    t = w.transforms()
    pre = Preprocessing(
        resize=t.resize_size[0],
        crop=t.crop_size[0],
        interpolation=Interpolation(t.interpolation.value),
        mean=tuple(t.mean),
        std=tuple(t.std),
    )
    published = None
    if weights == RANDOM:
        source = _random_source()
        module = torchvision.models.get_model(name, weights=None)
    elif checkpoint is not None:
        module = torchvision.models.get_model(name, weights=None)
        load_state_dict_file(module, checkpoint)
        source = f"{checkpoint} (preprocessing of {w})"
        if is_published_file(checkpoint, w.url):  # torchvision's own file: its published accuracy holds
            published, source = published_top1(w), f"{checkpoint} (torchvision {w}, sha256 matches {Path(w.url).name})"
    else:
        target = weights_mod.torch_hub_file(w.url)
        if not target.exists() and not weights_mod.reachable(w.url):
            raise weights_mod.offline_error(
                f"{name} ({w})", f"the torch hub cache ({target}; TORCH_HOME moves it)", w.url,
                why=f"{urlsplit(w.url).hostname} does not answer (a {weights_mod.PROBE_TIMEOUT_S:g} s connection probe)",
            )
        try:  # from the cache when the file is there (torch.hub checks it first), else downloaded into it
            module = torchvision.models.get_model(name, weights=w)
        except Exception as e:  # noqa: BLE001 - URLError, HTTPError, OSError, RuntimeError from hub
            raise ModelLoadError(_offline_message(w.url, e, f"Put the file at {target}")) from e
        source = f"torchvision {w} ({target if target.exists() else w.url})"
        published = published_top1(w)
    return LoadedModel(name, module.eval(), pre, source, published_top1=published,
                       published_source=f"torchvision {w} metadata (ImageNet-1K acc@1)" if published else None)


def _timm_pretrained_file(tag: str, cfg) -> str | None:
    """A local file with `tag`'s pretrained weights (the HF or torch hub cache), None when a download may be tried,
    or a ModelLoadError within about a second when neither is possible (offline)."""
    hf_id = cfg.hf_hub_id if cfg is not None else None
    url = cfg.url if cfg is not None else None
    looked = []
    if hf_id:
        cached = weights_mod.hf_cached_file(hf_id, (cfg.hf_hub_filename,) if cfg.hf_hub_filename else weights_mod.HF_WEIGHT_FILES)
        if cached is not None:
            return str(cached)
        looked.append(f"the Hugging Face cache ({weights_mod.hf_cache_dir()}; HF_HOME moves it)")
    if url:
        target = weights_mod.torch_hub_file(url)
        if target.exists():
            return str(target)
        looked.append(f"the torch hub cache ({target}; TORCH_HOME moves it)")
    if hf_id:
        from huggingface_hub import constants

        if weights_mod.hf_offline():
            why = "HF_HUB_OFFLINE is set"
        elif not weights_mod.reachable(constants.ENDPOINT):
            why = f"{urlsplit(constants.ENDPOINT).hostname} does not answer (a {weights_mod.PROBE_TIMEOUT_S:g} s probe)"
        else:
            return None
        repo, _, revision = hf_id.partition("@")
        file_url = f"{constants.ENDPOINT}/{repo}/resolve/{revision or 'main'}/{cfg.hf_hub_filename or 'model.safetensors'}"
        raise weights_mod.offline_error(f"timm:{tag}", " or ".join(looked), file_url, why=why)
    if url and not weights_mod.reachable(url):
        raise weights_mod.offline_error(f"timm:{tag}", " or ".join(looked), url,
                                        why=f"{urlsplit(url).hostname} does not answer")
    return None


def _load_timm(name: str, checkpoint: Path | None, weights: str | None):
    try:
        import timm
        from timm.data import resolve_data_config
    except ImportError as e:
        raise ModelLoadError("timm models need timm: pip install timm") from e
    from int8eval.models import LoadedModel, load_state_dict_file

    if name not in timm.list_models(pretrained=checkpoint is None) and name not in timm.list_models():
        raise ModelLoadError(f"timm has no model {name!r}; see timm.list_models()")
    tag = f"{name}.{weights}" if weights and weights != RANDOM else name
    if weights == RANDOM:
        source = _random_source()
        module = timm.create_model(tag, pretrained=False)
    elif checkpoint is not None:
        module = timm.create_model(tag, pretrained=False)
        load_state_dict_file(module, checkpoint)
        source = str(checkpoint)
    else:
        local = _timm_pretrained_file(tag, timm.models.get_pretrained_cfg(tag))
        overlay = {"file": local} if local else None  # timm then reads the file and skips the hub
        try:
            module = timm.create_model(tag, pretrained=True, pretrained_cfg_overlay=overlay)
        except Exception as e:  # noqa: BLE001 - hub errors vary by version
            raise ModelLoadError(
                _offline_message(f"timm weights for {tag}", e, "Put them in the Hugging Face cache (HF_HOME)")
            ) from e
        source = f"timm {module.pretrained_cfg.get('hf_hub_id') or tag}" + (f" ({local})" if local else "")
    cfg = resolve_data_config({}, model=module)
    crop = cfg["input_size"][-1]
    pre = Preprocessing(
        resize=math.floor(crop / cfg["crop_pct"]),
        crop=crop,
        interpolation=Interpolation(cfg["interpolation"]) if cfg["interpolation"] in Interpolation._value2member_map_ else Interpolation.bicubic,
        mean=tuple(cfg["mean"]),
        std=tuple(cfg["std"]),
    )
    # No published accuracy: timm 1.0.31's pretrained configs carry none (its results tables live in its repository).
    return LoadedModel(f"timm:{name}", module.eval(), pre, source)
