"""Backends turn (model, recipe, calibration data) into a Variant. Each is imported only when used; every way to
build one (the four backends, TensorRT-on-CPU, QAT) is registered in `registry`."""

from int8eval.backends.base import BuildContext, CalibrationData, Variant
from int8eval.backends.registry import (
    BACKENDS,
    BUILDERS,
    BackendInfo,
    backend_info,
    build_variant,
    builder_key,
    check_model,
    check_recipe,
    default_calib,
    require,
    takes_onnx,
)

__all__ = [
    "BACKENDS",
    "BUILDERS",
    "BackendInfo",
    "BuildContext",
    "CalibrationData",
    "Variant",
    "backend_info",
    "build_variant",
    "builder_key",
    "check_model",
    "check_recipe",
    "default_calib",
    "require",
    "takes_onnx",
]
