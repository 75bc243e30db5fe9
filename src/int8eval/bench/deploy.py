"""What gets timed: each variant as a deployment runs it, and the float baselines its speed is compared with.

The accuracy pass runs every model with a dynamic batch dimension, so one artifact serves every batch. A deployment
fixes the input shape, and runtimes are faster for it (OpenVINO's `benchmark_app -shape` on a reshaped IR ran
8-20% faster than the dynamic-batch model). So each timed batch size gets its own static form:

- OpenVINO: the IR read back, reshaped to [B, C, H, W] and compiled with the variant's own properties.
- ONNX Runtime: a session per batch size on the model with its batch dimension fixed, the variant's options reused.
- PyTorch: compiled by inductor with static shapes (`dynamic=False`, one graph per batch size, frozen weights), as
  the PT2E INT8 variant is; FP32/BF16 variants, eager in the accuracy pass, get a compiled twin here so that
  INT8 x FP32 compares like with like, and their eager speed is kept as an extra row.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from int8eval.config import Backend, Precision, Recipe

# Backends with a fast reduced-precision float path, used as a baseline without being asked: BF16 on CPUs with
# BF16 hardware (AVX512-BF16, AMX-BF16), FP16 on a GPU. INT8 must beat these, not only FP32.
BF16_BACKENDS = (Backend.torch, Backend.openvino)
GPU_FP16_BACKENDS = (Backend.tensorrt,)
EAGER_SUFFIX = "-eager"  # the extra row for a PyTorch FP32/BF16 variant's eager speed

# OpenVINO properties a static form is compiled with, copied from the variant's compiled model (same precision,
# same streams and threads), so only the input shape differs.
_OV_PROPERTIES = ("INFERENCE_PRECISION_HINT", "PERFORMANCE_HINT", "NUM_STREAMS", "INFERENCE_NUM_THREADS")


@dataclass
class TimedCall:
    """The zero-argument call that is timed for one batch size, and how it runs."""

    fn: Callable[[], object]
    kind: str  # "static", "native" (the variant's bench_call hook) or "predict"
    execution: str  # in words, for the report
    threads: int | None = None  # the runtime's thread count for this form, when it is a new one
    form: object = None  # the static form itself (OpenVINO CompiledModel, ORT InferenceSession), for inspection


def backend_of(variant) -> str:
    b = getattr(getattr(variant, "recipe", None), "backend", None)
    return getattr(b, "value", b) or "unknown"


def precision_of(variant) -> str:
    p = getattr(getattr(variant, "recipe", None), "precision", None)
    return getattr(p, "value", p) or "unknown"


def timed_call(variant, x: np.ndarray, *, static: bool = True) -> TimedCall:
    """The call to time for input `x` (a prepared [B, C, H, W] batch): the variant's static-shape form for B when
    `static` and its runtime has one, else its native `bench_call(x)` hook, else `predict(x)`."""
    emulated = bool(getattr(getattr(variant, "recipe", None), "emulate", False))
    if static and not emulated:
        artifact = getattr(variant, "artifact", None)
        suffix = Path(artifact).suffix if artifact is not None else ""
        if hasattr(getattr(variant, "compiled", None), "get_property") and suffix == ".xml":
            return _openvino_static(variant, x)
        if hasattr(getattr(variant, "session", None), "get_session_options") and suffix == ".onnx":
            return _onnxruntime_static(variant, x)
        if getattr(variant, "module", None) is not None:
            return _torch(variant, x)
    hook = getattr(variant, "bench_call", None)
    if callable(hook):
        return TimedCall(hook(x), "native", "native hook")
    return TimedCall(lambda: variant.predict(x), "predict", "dynamic batch, as in the accuracy pass")


def _openvino_static(variant, x: np.ndarray) -> TimedCall:
    import openvino as ov

    core = ov.Core()
    model = core.read_model(str(variant.artifact))
    model.reshape(list(x.shape))  # what `benchmark_app -shape [B,C,H,W]` does
    config = {}
    for key in _OV_PROPERTIES:
        try:
            config[key] = variant.compiled.get_property(key)
        except Exception:  # noqa: BLE001 - a property this OpenVINO version or device lacks
            continue
    compiled = core.compile_model(model, "CPU", config)
    request = compiled.create_infer_request()
    # The input is set once, as benchmark_app's sync API does: only the inference is timed.
    request.set_input_tensor(ov.Tensor(np.ascontiguousarray(x, dtype=np.float32), shared_memory=True))
    threads = int(compiled.get_property("INFERENCE_NUM_THREADS")) or None
    return TimedCall(request.infer, "static", "static input shape, reshaped and compiled per batch size", threads, compiled)


def _onnxruntime_static(variant, x: np.ndarray) -> TimedCall:
    import onnx
    import onnxruntime as ort

    session = variant.session
    model = onnx.load(str(variant.artifact))
    batch_dims = {i.type.tensor_type.shape.dim[0].dim_param for i in model.graph.input} - {""}
    # The same as SessionOptions.add_free_dimension_override_by_name, written into the model: the options object is
    # then the variant's own or a fresh one like it (ORT offers no way to copy one, and an override added would stay).
    for value in (*model.graph.input, *model.graph.output, *model.graph.value_info):
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in batch_dims:
                dim.dim_value = len(x)
    # As deployed: ORT's defaults (threads spinning between calls), not the evaluation pass's options.
    fresh = getattr(variant, "session_options", None)
    options = fresh(spinning=True) if fresh else session.get_session_options()
    static = ort.InferenceSession(model.SerializeToString(), options, providers=session.get_providers())
    name = static.get_inputs()[0].name
    feed = {name: np.ascontiguousarray(x, dtype=getattr(variant, "input_dtype", np.float32))}
    return TimedCall(lambda: static.run(None, feed), "static", "static input shape, one session per batch size", form=static)


def is_compiled(module) -> bool:
    """Whether `module` is a torch.compile'd module (`backends.torch_backend.is_compiled`)."""
    from int8eval.backends.torch_backend import is_compiled as compiled

    return compiled(module)


def _torch(variant, x: np.ndarray) -> TimedCall:
    if not is_compiled(variant.module):
        return TimedCall(lambda: variant.predict(x), "predict", "eager")
    variant.predict(x)  # compiles the graph for this static shape now, so no warm-up setting can time it
    return TimedCall(lambda: variant.predict(x), "static", "inductor, static shapes (compiled per batch size)")


def compile_module(module):
    """torch.compile for static shapes: one graph per batch size, as the PT2E INT8 variants are compiled."""
    import torch

    return torch.compile(module, dynamic=False)


def compiled_twin(variant):
    """A PyTorch FP32/BF16 variant compiled by inductor (static shapes, frozen weights) as its INT8 is; None for any
    other variant. Same recipe, name and artifact: it is the variant as a deployment would run it."""
    from int8eval.backends.torch_backend import TorchVariant

    if not isinstance(variant, TorchVariant) or precision_of(variant) not in ("fp32", "bf16") or is_compiled(variant.module):
        return None
    twin = TorchVariant(variant.recipe, compile_module(variant.module), variant.artifact, variant.autocast, freezing=True)
    twin.details = {**(variant.details or {}), "compiled": "inductor, static shapes, frozen weights"}
    return twin


def float_baseline_recipes(variants: Sequence, *, bf16: bool, gpu: bool) -> list[Recipe]:
    """The BF16 (CPU with BF16 hardware) and FP16 (GPU) variants missing from `variants` on their backends."""
    have = {(backend_of(v), precision_of(v)) for v in variants}
    backends = [Backend(b) for b in dict.fromkeys(backend_of(v) for v in variants) if b in Backend.__members__]
    wanted = []
    for b in backends:
        if bf16 and b in BF16_BACKENDS:
            wanted.append(Recipe(backend=b, precision=Precision.bf16))
        if gpu and b in GPU_FP16_BACKENDS:
            wanted.append(Recipe(backend=b, precision=Precision.fp16))
    return [r for r in wanted if (r.backend.value, r.precision.value) not in have]


def build_float_baselines(
    loaded, variants: Sequence, workdir: Path, *, bf16: bool, gpu: bool
) -> tuple[list, dict[str, str]]:
    """Build the float baselines `float_baseline_recipes` names; returns (built variants, {name: why not built})."""
    from int8eval import backends as registry

    built, failed = [], {}
    for recipe in float_baseline_recipes(variants, bf16=bf16, gpu=gpu):
        try:
            registry.check_recipe(recipe)
            built.append(registry.build_variant(loaded, recipe, None, Path(workdir)))
        except Exception as e:  # noqa: BLE001 - a baseline that cannot be built must not stop the benchmark
            failed[recipe.name] = f"{type(e).__name__}: {e}"
    return built, failed


def deployment_forms(variants: Iterable, *, compile_torch: bool = True) -> list[tuple[str, object, str | None]]:
    """(row name, variant to time, note) per timed row: each variant as deployed; a PyTorch FP32/BF16 variant as its
    compiled twin under its own name plus its eager self as `<name>-eager` (a row that is no baseline)."""
    rows = []
    for v in variants:
        twin = compiled_twin(v) if compile_torch else None
        if twin is None:
            rows.append((v.name, v, None))
        else:
            rows.append((v.name, twin, None))
            rows.append((v.name + EAGER_SUFFIX, v, "eager PyTorch, as the accuracy pass ran it"))
    return rows
