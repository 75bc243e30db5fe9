"""TensorRT on an NVIDIA GPU: FP32, FP16 and INT8 engines; INT8 by explicit quantization, the path TensorRT supports.

Explicit quantization: the FP32 ONNX export gets QuantizeLinear/DequantizeLinear nodes placed the way TensorRT
fuses them (signed INT8, symmetric activations with zero-point 0, per-channel weights, float biases) and is built
as a strongly typed engine, with a timing cache shared by every build in the work folder. FP16 is a strongly
typed build of the half-precision export (TensorRT 11 removed `BuilderFlag.FP16`; the types must be in the graph).

Legacy (the seed's method, `recipe.legacy`): implicit INT8 with `IInt8EntropyCalibrator2` (or the MinMax
calibrator) fed from the calibration split, its cache beside the engine. Deprecated since TensorRT 10.1 and
removed from TensorRT 11, so offered only where TensorRT <= 10 is installed.

Without TensorRT or a GPU, the same Q/DQ ONNX still runs under ONNX Runtime on the CPU (`tensorrt_on_cpu`, the
builder of `recipe.emulate`), so its accuracy is measured wherever int8eval runs.

Nothing here imports tensorrt at module level; engines are fed with PyTorch CUDA tensors (no pycuda).
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np

from int8eval.backends.base import BuildContext, CalibrationData, Variant, require_calibration
from int8eval.config import Backend, CalibMethod, Precision, Recipe
from int8eval.errors import BackendUnavailable, ConfigError, Int8EvalError

OPT_BATCH = 32  # the batch the engine is tuned for (the pipeline's default batch size)
MAX_BATCH = 64  # larger prediction batches are split
TIMING_CACHE = "tensorrt.timing-cache"
LEGACY_CALIBRATORS = (CalibMethod.entropy, CalibMethod.minmax)


# --------------------------------------------------------------------------------------------- availability


def _tensorrt():
    try:
        import tensorrt
    except ImportError as e:
        raise BackendUnavailable(
            "backend tensorrt needs TensorRT and an NVIDIA GPU: pip install 'int8eval[tensorrt]'; without them, "
            "the TensorRT-bound Q/DQ ONNX can still be evaluated with ONNX Runtime on the CPU"
        ) from e
    return tensorrt


def trt_major(trt=None) -> int:
    """Major version of the installed TensorRT (raises BackendUnavailable when it is not installed)."""
    trt = trt or _tensorrt()
    return int(trt.__version__.split(".")[0])


def _require_cuda() -> None:
    import torch

    if not torch.cuda.is_available():
        raise BackendUnavailable(
            "backend tensorrt needs an NVIDIA GPU with CUDA, and PyTorch sees none; run the TensorRT-bound Q/DQ "
            "ONNX with ONNX Runtime on the CPU instead"
        )


def check_recipe(recipe: Recipe) -> None:
    """Reject what this backend cannot build here, before any work: unsupported recipes (ConfigError), no TensorRT
    or no GPU (BackendUnavailable), the legacy calibrator on TensorRT >= 11 (ConfigError)."""
    check_recipe_options(recipe)
    trt = _tensorrt()
    _require_cuda()
    if recipe.legacy and trt_major(trt) >= 11:
        raise ConfigError(
            f"TensorRT {trt.__version__} removed implicit INT8 calibration (IInt8EntropyCalibrator2, "
            "BuilderFlag.INT8); drop legacy to use explicit Q/DQ quantization, or install TensorRT 10"
        )


def check_recipe_options(recipe: Recipe) -> None:
    """What no TensorRT path can do (on the GPU or run by ONNX Runtime on the CPU): ConfigError."""
    if recipe.backend is not Backend.tensorrt:
        raise ConfigError(f"recipe {recipe.name} is for backend {recipe.backend.value}, not tensorrt")
    if recipe.precision is Precision.bf16:
        raise ConfigError("int8eval builds TensorRT engines in fp32, fp16 or int8, not bf16; use --precision fp16")
    if recipe.legacy and recipe.precision is not Precision.int8:
        raise ConfigError(f"legacy for tensorrt is the implicit INT8 calibrator; it means nothing for {recipe.precision.value}")
    if recipe.legacy and recipe.calib not in LEGACY_CALIBRATORS:
        raise ConfigError(
            f"TensorRT's implicit calibrators are entropy (IInt8EntropyCalibrator2) and minmax, not {recipe.calib.value}"
        )
    if recipe.precision is Precision.int8 and not recipe.per_channel:
        raise ConfigError("TensorRT explicit quantization here uses per-channel weights; drop --per-tensor")
    if recipe.legacy and recipe.keep_fp32:
        raise ConfigError("keep_fp32 needs explicit Q/DQ quantization; the legacy implicit calibrator cannot keep layers in FP32")


# --------------------------------------------------------------------------------------------- Q/DQ ONNX

TRT_ACTIVATIONS = "TensorRT's explicit quantization: signed symmetric int8 activations (S8S8)"


def build_trt_qdq_onnx(
    fp32_onnx: Path,
    calib,
    out_path: Path,
    *,
    method: CalibMethod = CalibMethod.entropy,
    percentile: float = 99.999,
    nodes_to_exclude: list[str] | tuple[str, ...] = (),
    bias_shifts=None,
    op_types: tuple[str, ...] | None = None,
) -> Path:
    """Quantize `fp32_onnx` into the Q/DQ ONNX that TensorRT's explicit quantization wants, at `out_path`.

    Signed INT8 activations with zero-point 0 (symmetric), per-channel symmetric INT8 weights stored as INT8 with a
    DequantizeLinear, and float biases: ONNX Runtime quantizes biases to INT32, which TensorRT does not take in a
    DequantizeLinear, so they are dequantized back into float constants (TensorRT adds them in the fused kernel).

    Args:
        fp32_onnx: the FP32 model as written by `export_onnx`.
        calib: CalibrationData or ActivationStats collected from `fp32_onnx` (see `onnx_qdq`).
        method, percentile: how activation ranges are chosen (entropy is TensorRT's own calibrator's method).
        nodes_to_exclude: nodes left without Q/DQ, which a strongly typed engine then runs in FP32.
        bias_shifts: bias correction, as in `onnx_qdq.quantize_qdq`.
        op_types: the only op types given Q/DQ (None: every type ONNX Runtime quantizes), as in `quantize_qdq`.
    """
    import onnx

    from int8eval.backends.onnx_qdq import quantize_qdq

    out_path = Path(out_path)
    quantize_qdq(
        fp32_onnx,
        calib,
        out_path,
        method=method,
        percentile=percentile,
        per_channel=True,
        symmetric_activations=True,
        activation_type="int8",
        nodes_to_exclude=nodes_to_exclude,
        bias_shifts=bias_shifts,
        op_types=op_types,
    )
    model = onnx.load(str(out_path))
    float_biases(model)
    onnx.save(model, str(out_path))
    return out_path


def float_biases(model) -> int:
    """Replace every DequantizeLinear of an INT32 constant (a quantized bias) by its float value, in place.
    Returns how many were replaced."""
    import onnx
    from onnx import numpy_helper

    from int8eval.backends.onnx_qdq import dequantize_constant, drop_unused_initializers

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    outputs = {o.name for o in graph.output}
    replaced = []
    for node in graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in inits or node.output[0] in outputs:
            continue
        q = inits[node.input[0]]
        if q.data_type != onnx.TensorProto.INT32 or len(q.dims) != 1:
            continue  # a bias is 1-D, its scale a scalar or one per channel
        value = dequantize_constant(node, inits)
        if value is not None:
            graph.initializer.append(numpy_helper.from_array(value.astype(np.float32), node.output[0]))
            replaced.append(node)
    for node in replaced:
        graph.node.remove(node)
    drop_unused_initializers(model)
    return len(replaced)


def qdq_problems(model) -> list[str]:
    """What in a Q/DQ ONNX would keep TensorRT from running a Conv/Gemm in INT8, or is not signed symmetric INT8.

    Every Conv/Gemm data input must come through a QuantizeLinear->DequantizeLinear pair, every weight through a
    per-channel INT8 DequantizeLinear (or Q/DQ pair), and every QuantizeLinear must produce INT8 with zero-point 0.
    An empty list means the graph is what TensorRT's explicit quantization expects.
    """
    import onnx
    from onnx import numpy_helper

    from int8eval.backends.onnx_export import quantized_inputs

    model = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))
    problems = []
    for q in quantized_inputs(model, ("Conv", "Gemm")):
        if q.index == 0 and q.kind != "qdq":
            problems.append(f"{q.op_type} {q.node}: input {q.tensor} is {q.kind}, not a Q/DQ pair")
        elif q.index == 1:
            if q.kind == "float":
                problems.append(f"{q.op_type} {q.node}: weight {q.tensor} is not quantized")
            elif q.dtype != "int8":
                problems.append(f"{q.op_type} {q.node}: weight {q.tensor} is {q.dtype}, not int8")
            elif not q.scale_shape or q.scale_shape == (1,):
                problems.append(f"{q.op_type} {q.node}: weight {q.tensor} has one scale, not one per channel")
        elif q.index == 2 and q.kind != "float":
            problems.append(f"{q.op_type} {q.node}: bias {q.tensor} is quantized ({q.dtype}); TensorRT wants it float")
    inits = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type != "QuantizeLinear":
            continue
        zp = inits.get(node.input[2]) if len(node.input) > 2 else None
        if zp is None:
            problems.append(f"QuantizeLinear {node.name}: no zero-point constant (defaults to uint8)")
            continue
        if zp.data_type != onnx.TensorProto.INT8:
            problems.append(f"QuantizeLinear {node.name}: {onnx.helper.tensor_dtype_to_np_dtype(zp.data_type)}, not int8")
        elif np.any(numpy_helper.to_array(zp) != 0):
            problems.append(f"QuantizeLinear {node.name}: zero-point is not 0 (asymmetric)")
    return problems


# --------------------------------------------------------------------------------------------- engines


def _parse(trt, builder, onnx_path: Path, *, strongly_typed: bool):
    flags = 0
    if strongly_typed and trt_major(trt) < 11:  # TensorRT 11: always strongly typed, the flag is deprecated
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, builder.logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise Int8EvalError(f"TensorRT could not parse {onnx_path.name}: {errors}")
    return network, parser


def build_engine(
    onnx_path: Path,
    engine_path: Path,
    *,
    timing_cache: Path | None = None,
    calibrator=None,
    max_batch: int = MAX_BATCH,
    opt_batch: int = OPT_BATCH,
    allow_tf32: bool = False,
) -> Path:
    """Build a TensorRT engine from `onnx_path` and write it to `engine_path`.

    Strongly typed (the precision is the ONNX graph's: FP32, FP16 or Q/DQ INT8) unless `calibrator` is given,
    which selects the legacy implicit INT8 mode (weakly typed, `BuilderFlag.INT8`, TensorRT <= 10 only).
    The batch dimension is dynamic, tuned for `opt_batch`, up to `max_batch`. `timing_cache` is read if it
    exists and written back after the build, so later builds skip the kernels already timed.
    TF32 is off unless `allow_tf32`, so an FP32 engine computes in FP32 (it is the parity baseline).
    """
    trt = _tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network, _parser = _parse(trt, builder, Path(onnx_path), strongly_typed=calibrator is None)
    config = builder.create_builder_config()
    if not allow_tf32 and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)

    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        chw = tuple(tensor.shape)[1:]
        if any(d < 0 for d in chw):
            raise Int8EvalError(f"input {tensor.name} has dynamic dimensions besides the batch: {tuple(tensor.shape)}")
        profile.set_shape(tensor.name, (1, *chw), (min(opt_batch, max_batch), *chw), (max_batch, *chw))
    config.add_optimization_profile(profile)

    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache and timing_cache.exists() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)

    if calibrator is not None:
        if trt_major(trt) >= 11:
            raise ConfigError(f"TensorRT {trt.__version__} has no implicit INT8 calibration; use Q/DQ (drop legacy)")
        config.set_flag(trt.BuilderFlag.INT8)
        config.int8_calibrator = calibrator
        config.set_calibration_profile(profile)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise Int8EvalError(f"TensorRT could not build an engine from {Path(onnx_path).name} (see its log above)")
    engine_path = Path(engine_path)
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    engine_path.write_bytes(memoryview(serialized))
    if timing_cache is not None:
        timing_cache.write_bytes(memoryview(config.get_timing_cache().serialize()))
    return engine_path


def _torch_dtype(trt, dtype):
    import torch

    table = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16, trt.DataType.INT8: torch.int8,
             trt.DataType.INT32: torch.int32, trt.DataType.BOOL: torch.bool}
    if hasattr(trt.DataType, "BF16"):
        table[trt.DataType.BF16] = torch.bfloat16
    if dtype not in table:
        raise Int8EvalError(f"engine I/O tensor type {dtype} is not supported by int8eval")
    return table[dtype]


class TensorRTVariant(Variant):
    """A deserialized TensorRT engine run through `execute_async_v3`, its I/O held in PyTorch CUDA tensors."""

    def __init__(self, recipe: Recipe, engine_path: Path) -> None:
        super().__init__(recipe)
        trt = _tensorrt()
        self.artifact = Path(engine_path)
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self._runtime.deserialize_cuda_engine(self.artifact.read_bytes())
        if self.engine is None:
            raise Int8EvalError(f"TensorRT could not load the engine {self.artifact}")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1 or len(outputs) != 1:
            raise Int8EvalError(f"expected one input and one output, the engine has {inputs} and {outputs}")
        self.input, self.output = inputs[0], outputs[0]
        self.input_dtype = _torch_dtype(trt, self.engine.get_tensor_dtype(self.input))
        self.output_dtype = _torch_dtype(trt, self.engine.get_tensor_dtype(self.output))
        self.max_batch = int(self.engine.get_tensor_profile_shape(self.input, 0)[2][0])

    def predict(self, images: np.ndarray) -> np.ndarray:
        import torch

        stream = torch.cuda.current_stream()
        out = []
        for start in range(0, len(images), self.max_batch):
            x = torch.from_numpy(np.ascontiguousarray(images[start : start + self.max_batch], dtype=np.float32))
            x = x.to("cuda", dtype=self.input_dtype).contiguous()
            self.context.set_input_shape(self.input, tuple(x.shape))
            y = torch.empty(tuple(self.context.get_tensor_shape(self.output)), dtype=self.output_dtype, device="cuda")
            self.context.set_tensor_address(self.input, x.data_ptr())
            self.context.set_tensor_address(self.output, y.data_ptr())
            if not self.context.execute_async_v3(stream.cuda_stream):
                raise Int8EvalError(f"TensorRT failed to run {self.artifact.name}")
            stream.synchronize()
            out.append(y.float().cpu().numpy())
        return np.concatenate(out)


def _calibration_key(calib: CalibrationData, recipe: Recipe) -> str:
    ids = "\n".join(calib.image_ids) or str(calib.num_images)
    return hashlib.sha256(f"{recipe.calib.value}\n{ids}".encode()).hexdigest()[:12]


def legacy_calibrator(calib: CalibrationData, cache: Path, *, method: CalibMethod = CalibMethod.entropy, batch_size: int = 32):
    """TensorRT's implicit INT8 calibrator (IInt8EntropyCalibrator2 or IInt8MinMaxCalibrator) over `calib`, with its
    calibration cache at `cache` (reused when present: name it after the calibration set). TensorRT <= 10."""
    import torch

    trt = _tensorrt()
    base = trt.IInt8EntropyCalibrator2 if method is CalibMethod.entropy else trt.IInt8MinMaxCalibrator
    images = np.concatenate([np.asarray(b, dtype=np.float32) for b in calib.batches])
    batch_size = max(1, min(batch_size, len(images)))
    # TensorRT asks for fixed-size batches: the last len(images) % batch_size images are left out.
    chunks = [images[i : i + batch_size] for i in range(0, len(images) - batch_size + 1, batch_size)]

    class _Calibrator(base):
        def __init__(self) -> None:
            base.__init__(self)
            self._next = 0
            self._device_batch = None  # kept alive until TensorRT asks for the next batch

        def get_batch_size(self) -> int:
            return batch_size

        def get_batch(self, names):
            if self._next >= len(chunks):
                return None
            self._device_batch = torch.from_numpy(chunks[self._next]).to("cuda").contiguous()
            self._next += 1
            return [int(self._device_batch.data_ptr())] * len(names)

        def read_calibration_cache(self):
            return cache.read_bytes() if cache.exists() else None

        def write_calibration_cache(self, data) -> None:
            cache.write_bytes(bytes(data))

    return _Calibrator()


def recipe_onnx(
    loaded, recipe: Recipe, calib: CalibrationData | None, workdir: Path, context: BuildContext
) -> tuple[Path, float]:
    """The ONNX TensorRT is given for `recipe` and the seconds it cost: the FP16 export, the FP32 export (FP32 and the
    legacy calibrator), or the explicit-quantization Q/DQ model. The FP32 export and the activation statistics are
    shared with the other recipes of the model through `context` (as onnxruntime's) and counted in full here."""
    from int8eval.backends.onnx_export import QUANTIZED_OP_TYPES, export_onnx_fp16, keep_fp32_nodes
    from int8eval.backends.onnx_qdq import activation_stats, fp32_export, module_bias_shifts

    if recipe.precision is Precision.fp16:
        start = time.perf_counter()
        path = export_onnx_fp16(loaded, workdir / f"{loaded.name}.fp16.onnx")
        return path, time.perf_counter() - start
    prepared = fp32_export(loaded, context)
    if recipe.precision is not Precision.int8 or recipe.legacy:
        return prepared.fp32, prepared.export_s
    stats = activation_stats(prepared, calib, context)
    start = time.perf_counter()
    qdq = build_trt_qdq_onnx(
        prepared.fp32, stats, workdir / f"{recipe.name}.qdq.onnx", method=recipe.calib, percentile=recipe.percentile,
        nodes_to_exclude=keep_fp32_nodes(prepared.fp32, loaded.module, recipe.keep_fp32),
        bias_shifts=module_bias_shifts(loaded.module, stats.model, calib) if recipe.bias_correction else None,
        # A transformer's LayerNormalization, Softmax, Add... get no Q/DQ, so TensorRT runs them in float; attention's
        # MatMuls keep theirs (TensorRT's INT8 attention fusions look for them). Unchecked on a GPU here.
        op_types=QUANTIZED_OP_TYPES if loaded.is_transformer else None,
    )
    return qdq, prepared.export_s + stats.collect_s + (time.perf_counter() - start)


def build(
    loaded, recipe: Recipe, calib: CalibrationData | None, workdir: Path, context: BuildContext | None = None
) -> Variant:
    """Build and load the TensorRT engine `recipe` describes (needs TensorRT and a GPU); the FP32 export and the
    activation statistics are shared through `context` (None: a fresh one)."""
    import torch

    check_recipe(recipe)
    require_calibration(recipe, calib)
    workdir = Path(workdir)
    context = context if context is not None else BuildContext(workdir=workdir)
    timing_cache = workdir / TIMING_CACHE
    engine = workdir / f"{recipe.name}.engine"
    onnx_path, onnx_s = recipe_onnx(loaded, recipe, calib, workdir, context)
    start = time.perf_counter()
    calibrator = None
    if recipe.legacy:  # int8 only (check_recipe): TensorRT's implicit calibrator on the FP32 export
        cache = workdir / f"{recipe.name}.{_calibration_key(calib, recipe)}.calib-cache"
        calibrator = legacy_calibrator(calib, cache, method=recipe.calib)
    build_engine(onnx_path, engine, timing_cache=timing_cache, calibrator=calibrator)
    torch.cuda.synchronize()
    variant = TensorRTVariant(recipe, engine)
    variant.prepare_s = onnx_s + (time.perf_counter() - start)
    variant.details = {"tensorrt": _tensorrt().__version__, "mode": "implicit (legacy calibrator)" if recipe.legacy
                       else "strongly typed", "gpu": torch.cuda.get_device_name()}
    if recipe.precision is Precision.int8:
        variant.details["calibration"] = calibration_phrase(recipe)
    if recipe.legacy:
        variant.details["legacy"] = "TensorRT's implicit INT8 calibration (BuilderFlag.INT8 and a calibrator)"
    if recipe.precision is Precision.int8 and not recipe.legacy:
        variant.details.update(activation_type="int8", why=TRT_ACTIVATIONS)
    return variant


def calibration_phrase(recipe: Recipe) -> str:
    """What set an INT8 TensorRT recipe's activation ranges (`details["calibration"]`); `legacy` here means
    TensorRT's implicit calibrator, not PyTorch's torch.ao API."""
    from int8eval.backends.onnx_calibration import calibration_phrase as qdq_phrase

    if recipe.legacy:
        name = "IInt8EntropyCalibrator2" if recipe.calib is CalibMethod.entropy else "IInt8MinMaxCalibrator"
        return f"TensorRT's implicit {name} (legacy)"
    return qdq_phrase(recipe.calib, recipe.percentile)
