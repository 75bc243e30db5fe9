"""torchvision and timm models with their weights' own transforms. Downloads need the internet; offline, the
error says where to put the file."""

from __future__ import annotations

import math
from pathlib import Path

from int8eval.config import Interpolation, Preprocessing
from int8eval.errors import ModelLoadError

TIMM_PREFIX = "timm:"
# Shown by `int8eval models`; any other torchvision classification name works too.
FEATURED_TORCHVISION = ("resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0", "convnext_tiny")


def infos():
    from int8eval.models import ModelInfo

    rows = [ModelInfo(n, "torchvision", "torchvision download (--weights NAME, default DEFAULT)") for n in FEATURED_TORCHVISION]
    rows.append(ModelInfo("timm:NAME", "timm", "Hugging Face hub download via timm (e.g. timm:tf_efficientnet_lite0)"))
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


def load(name: str, *, checkpoint: Path | None = None, weights: str | None = None):
    if name.startswith(TIMM_PREFIX):
        return _load_timm(name.removeprefix(TIMM_PREFIX), checkpoint, weights)
    return _load_torchvision(name, checkpoint, weights)


def _offline_message(what: str, err: Exception, where: str) -> str:
    return f"could not download {what} ({type(err).__name__}: {err}). Offline? {where}, or pass --checkpoint PATH."


def _load_torchvision(name: str, checkpoint: Path | None, weights: str | None):
    import torch
    import torchvision

    from int8eval.models import LoadedModel, load_state_dict_file

    enum = torchvision.models.get_model_weights(name)
    try:
        w = enum[weights] if weights else enum.DEFAULT
    except KeyError:
        raise ModelLoadError(
            f"{name} has no weights {weights!r}; choose one of {', '.join(m.name for m in enum)}"
        ) from None
    t = w.transforms()
    pre = Preprocessing(
        resize=t.resize_size[0],
        crop=t.crop_size[0],
        interpolation=Interpolation(t.interpolation.value),
        mean=tuple(t.mean),
        std=tuple(t.std),
    )
    if checkpoint is not None:
        module = torchvision.models.get_model(name, weights=None)
        load_state_dict_file(module, checkpoint)
        source = f"{checkpoint} (preprocessing of {w})"
    else:
        try:
            module = torchvision.models.get_model(name, weights=w)
        except Exception as e:  # noqa: BLE001 - URLError, HTTPError, OSError, RuntimeError from hub
            target = Path(torch.hub.get_dir()) / "checkpoints" / Path(w.url).name
            raise ModelLoadError(_offline_message(w.url, e, f"Put the file at {target}")) from e
        source = f"torchvision {w} ({w.url})"
    return LoadedModel(name, module.eval(), pre, source)


def _load_timm(name: str, checkpoint: Path | None, weights: str | None):
    try:
        import timm
        from timm.data import resolve_data_config
    except ImportError as e:
        raise ModelLoadError("timm models need timm: pip install timm") from e
    from int8eval.models import LoadedModel, load_state_dict_file

    if name not in timm.list_models(pretrained=checkpoint is None) and name not in timm.list_models():
        raise ModelLoadError(f"timm has no model {name!r}; see timm.list_models()")
    tag = f"{name}.{weights}" if weights else name
    if checkpoint is not None:
        module = timm.create_model(tag, pretrained=False)
        load_state_dict_file(module, checkpoint)
        source = str(checkpoint)
    else:
        try:
            module = timm.create_model(tag, pretrained=True)
        except Exception as e:  # noqa: BLE001 - hub errors vary by version
            raise ModelLoadError(
                _offline_message(f"timm weights for {tag}", e, "Put them in the Hugging Face cache (HF_HOME)")
            ) from e
        source = f"timm {module.pretrained_cfg.get('hf_hub_id') or tag}"
    cfg = resolve_data_config({}, model=module)
    crop = cfg["input_size"][-1]
    pre = Preprocessing(
        resize=math.floor(crop / cfg["crop_pct"]),
        crop=crop,
        interpolation=Interpolation(cfg["interpolation"]) if cfg["interpolation"] in Interpolation._value2member_map_ else Interpolation.bicubic,
        mean=tuple(cfg["mean"]),
        std=tuple(cfg["std"]),
    )
    return LoadedModel(f"timm:{name}", module.eval(), pre, source)
