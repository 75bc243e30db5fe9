"""A model's preprocessing stated once: a preset, a YAML file, flags, each overriding the one before.

The presets are the common conventions, each with the numbers and where they come from. mean and std are in the
value range's units and the model's channel order (Caffe's mean is BGR on 0-255), as the model's authors state them.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from int8eval.config import ChannelOrder, Interpolation, Layout, Preprocessing, ResizeMode, ValueRange
from int8eval.errors import ConfigError

PRESETS: dict[str, dict] = {
    # torchvision's ImageNet weights (e.g. ResNet50_Weights.IMAGENET1K_V1.transforms(): ImageClassification with
    # resize 256, crop 224, bilinear, ImageNet mean and std on 0-1 RGB).
    "torchvision": dict(resize=256, crop=224, interpolation="bilinear", resize_mode="short-side", channel_order="rgb",
                        value_range="0-1", mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
    # TF-slim / Keras Inception (inception_preprocessing.preprocess_for_eval: central crop of 87.5%, bilinear resize
    # to 299; keras.applications.inception_v3.preprocess_input scales to [-1, 1], i.e. mean = std = 0.5 on 0-1).
    "inception": dict(resize=342, crop=299, interpolation="bilinear", resize_mode="short-side", channel_order="rgb",
                      value_range="0-1", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
    # Caffe's BVLC ImageNet models and Yahoo's open_nsfw (classify_nsfw.py: resize to 256x256, crop 224, channels
    # swapped to BGR, raw scale 255, mean pixel [104, 117, 123] subtracted in BGR order, no std).
    "caffe-bgr": dict(resize=256, crop=224, interpolation="bilinear", resize_mode="square", channel_order="bgr",
                      value_range="0-255", mean=(104.0, 117.0, 123.0), std=(1.0, 1.0, 1.0)),
}


class PreprocessingFile(BaseModel):
    """What a --preprocessing YAML file (and the flags) may state; every key optional, no other key."""

    model_config = ConfigDict(extra="forbid")

    preset: str | None = None
    resize: int | None = None
    crop: int | None = None
    interpolation: Interpolation | None = None
    resize_mode: ResizeMode | None = None
    channel_order: ChannelOrder | None = None
    value_range: ValueRange | None = None
    layout: Layout | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None


def preset(name: str) -> Preprocessing:
    """The preset `name` as a Preprocessing (layout left to the model)."""
    if name not in PRESETS:
        raise ConfigError(f"--preset {name!r} is not one of {', '.join(PRESETS)}")
    return Preprocessing(**PRESETS[name])


def read_file(path: Path) -> dict:
    """The keys a --preprocessing YAML file states, checked."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeError, yaml.YAMLError) as e:
        raise ConfigError(f"cannot read --preprocessing {path}: {type(e).__name__}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--preprocessing {path} must map keys to values (resize: 256, crop: 224, ...)")
    try:
        return PreprocessingFile(**data).model_dump(exclude_none=True)
    except ValidationError as e:
        msgs = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        raise ConfigError(f"--preprocessing {path}: {msgs} (keys: {', '.join(PreprocessingFile.model_fields)})") from None


def resolve(preset_name: str | None = None, file: Path | None = None, **flags) -> Preprocessing | None:
    """The preprocessing a preset, a YAML file and flags state together (later ones override; None values are not
    stated), or None when none states anything. Without a preset, resize defaults to crop, mean to 0 and std to 1."""
    stated = read_file(file) if file is not None else {}
    stated.update({k: v for k, v in flags.items() if v is not None})
    name = stated.pop("preset", None) if preset_name is None else preset_name
    if name is None and not stated:
        return None
    if name is not None:
        base = preset(name).model_dump(exclude={"layout"})
    else:
        if "crop" not in stated:
            raise ConfigError("the preprocessing needs at least --crop SIZE (or --preset torchvision|inception|caffe-bgr)")
        base = {"resize": stated["crop"], "mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}
    try:
        return Preprocessing(**{**base, **stated})
    except ValidationError as e:
        msgs = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'preprocessing'}: {err['msg']}" for err in e.errors())
        raise ConfigError(f"invalid preprocessing: {msgs}") from None


def triple(option: str, value: str | None) -> tuple[float, float, float] | None:
    """'104,117,123' (or one number for all three channels) as three floats."""
    if value is None:
        return None
    try:
        numbers = tuple(float(v) for v in value.split(","))
    except ValueError:
        numbers = ()
    if len(numbers) not in (1, 3):
        raise ConfigError(f"{option} {value!r}: give three numbers in the model's channel order, e.g. 104,117,123")
    return numbers * 3 if len(numbers) == 1 else numbers
