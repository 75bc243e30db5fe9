"""Typed, validated specs for a run. Choices are string enums that round-trip through CLI, YAML and JSON."""

from __future__ import annotations

from enum import Enum
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class Backend(str, Enum):
    torch = "torch"
    onnxruntime = "onnxruntime"
    openvino = "openvino"
    tensorrt = "tensorrt"


class Precision(str, Enum):
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"
    int8 = "int8"


class CalibMethod(str, Enum):
    minmax = "minmax"
    percentile = "percentile"
    entropy = "entropy"
    mse = "mse"


class ActivationType(str, Enum):
    """INT8 activations of ONNX Runtime's QDQ model: uint8 (U8S8 kernels) or int8 (S8S8)."""

    uint8 = "uint8"
    int8 = "int8"


class OnBadImage(str, Enum):
    skip = "skip"
    fail = "fail"


# `ReferenceMode.auto` compiles from this many evaluation images on. Measured on EfficientNet-Lite0, batch 32, 2 cores
# (AVX2 EPYC): compiling costs 5 s (inductor's on-disk cache warm) to ~35 s (cold, on a busy machine) and saves ~36 ms
# an image (eager 19, compiled 60 images/s), so it repays itself within ~1,000 images.
AUTO_COMPILE_IMAGES = 1000


class ReferenceMode(str, Enum):
    """How the PyTorch FP32 reference runs in the evaluation pass (`torch_backend.speed_up_reference`)."""

    auto = "auto"  # compiled when the evaluation set is large enough to repay the compile time, else eager
    compiled = "compiled"  # inductor, kept only when it gives eager's answers on a seeded check batch
    eager = "eager"


class Interpolation(str, Enum):
    nearest = "nearest"
    bilinear = "bilinear"
    bicubic = "bicubic"


class ChannelOrder(str, Enum):
    rgb = "rgb"
    bgr = "bgr"  # Caffe and OpenCV models


class Layout(str, Enum):
    nchw = "nchw"
    nhwc = "nhwc"  # TensorFlow and Keras exports


class ValueRange(str, Enum):
    """The pixel scale before mean and std: 0-1 (torchvision's ToTensor) or 0-255 (Caffe)."""

    unit = "0-1"
    byte = "0-255"


class ResizeMode(str, Enum):
    short_side = "short-side"  # torchvision's Resize(int): the short side to `resize`, aspect kept
    square = "square"  # Caffe's: both sides to `resize`, aspect not kept


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_enum_values=False)


class Preprocessing(_Strict):
    """The weights' own input pipeline: resize, centre-crop, order the channels, scale to the value range, normalise
    ((x - mean) / std, both in the value range's units and the model's channel order), lay out as the model reads.

    The defaults are torchvision's (RGB, 0-1, NCHW); an ONNX file states its own (`models.preprocessing`)."""

    resize: int = Field(gt=0)
    crop: int = Field(gt=0)
    interpolation: Interpolation = Interpolation.bilinear
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    resize_mode: ResizeMode = ResizeMode.short_side
    channel_order: ChannelOrder = ChannelOrder.rgb
    value_range: ValueRange = ValueRange.unit
    layout: Layout | None = None  # None: NCHW for a PyTorch model; an ONNX file's is read from its input shape

    @field_validator("std")
    @classmethod
    def _std_positive(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(s <= 0 for s in v):
            raise ValueError(f"std must be positive, got {v}")
        return v

    @model_validator(mode="after")
    def _crop_fits(self) -> Preprocessing:
        if self.crop > self.resize:
            raise ValueError(f"crop {self.crop} is larger than resize {self.resize}")
        return self


class DropKind(str, Enum):
    absolute = "absolute"  # points of top-1: FP32 76.1% -> INT8 75.3% is a 0.8-point drop
    relative = "relative"  # percent of FP32's top-1: the same is a 1.05% relative drop


class Acceptance(_Strict):
    """How much top-1 a variant may lose against the FP32 reference (`int8eval.verdict.decide` judges it).

    `max_drop` is in points when `drop` is absolute, in percent of the reference's top-1 when relative.
    MLPerf's rule (INT8 >= 99% of FP32) is `Acceptance.mlperf()`, i.e. a 1% relative drop.
    """

    max_drop: float = Field(ge=0.0, le=100.0)
    drop: DropKind = DropKind.absolute
    label: str | None = None  # e.g. "mlperf", shown in the report; "agreement": judged on agreement, not accuracy

    @classmethod
    def mlperf(cls) -> Acceptance:
        return cls(max_drop=1.0, drop=DropKind.relative, label="mlperf")

    @classmethod
    def agreement(cls, min_agreement: float) -> Acceptance:
        """Top-1 agreement with FP32 of at least `min_agreement` percent: what images without labels can be judged on
        (the verdict is on the share of changed answers, `max_drop` = 100 - min_agreement points)."""
        return cls(max_drop=100.0 - min_agreement, label="agreement")

    def budget(self, ref_top1: float) -> float:
        """The largest allowed drop, as a fraction of images (the reference's measured top-1 fixes a relative one)."""
        if self.drop is DropKind.absolute:
            return self.max_drop / 100.0
        return ref_top1 * self.max_drop / 100.0

    def describe(self) -> str:
        if self.label == "mlperf":
            return "MLPerf: top-1 at least 99% of FP32's (a 1% relative drop)"
        if self.label == "agreement":
            return f"top-1 agreement with FP32 of at least {100 - self.max_drop:g}%"
        if self.drop is DropKind.absolute:
            return f"top-1 drop of at most {self.max_drop:g} point{'' if self.max_drop == 1 else 's'}"
        return f"top-1 drop of at most {self.max_drop:g}% of FP32's top-1"


def _is_ptq(precision, legacy, qat_epochs) -> bool:
    """Whether a recipe is INT8 post-training quantization by a current (not legacy) API."""
    return precision in (Precision.int8, Precision.int8.value) and not legacy and not qat_epochs


class Recipe(_Strict):
    """How one variant is built: the backend, its precision and, for INT8, the calibration recipe.

    A Recipe states everything it does: `calib` is minmax unless given. `session.expand_recipes` (what the CLI uses)
    gives each backend its own default calibration (`backends.default_calib`)."""

    backend: Backend
    precision: Precision = Precision.int8
    # Each backend has its own code for a method (PyTorch's and NNCF's observers, int8eval's `backends.ranges`): the
    # variant's details["calibration"] names it. PT2E QAT's ranges are the X86 HistogramObserver's, recorded as mse.
    calib: CalibMethod = CalibMethod.minmax
    percentile: float = Field(99.999, gt=50.0, le=100.0)
    per_channel: bool = True
    # Three things, by where it applies (the variant's details["legacy"] says which ran): torch PTQ, torch.ao FX
    # prepare_fx/convert_fx; QAT (qat_epochs), torch.ao eager prepare_qat/convert; TensorRT, the implicit calibrator.
    legacy: bool = False
    qat_epochs: int = Field(0, ge=0)  # > 0: fine-tune first (INT8: QAT; FP32: the same schedule without quantization)
    lr: float = Field(1e-5, gt=0)  # fine-tuning learning rate
    emulate: bool = False  # TensorRT only: run the ONNX TensorRT would get with ONNX Runtime on the CPU
    # INT8 only: Conv/Linear layers (PyTorch module paths) left in FP32, e.g. the top of `int8eval diagnose`
    keep_fp32: tuple[str, ...] = ()
    # INT8 post-training quantization only (not legacy, not QAT): subtract from each layer's bias the mean shift
    # that its INT8 weights add to its output (`backends.bias_correction`). Left out, it is on wherever it applies.
    bias_correction: bool = False
    # ONNX Runtime INT8 only: None picks the CPU's fastest exact choice when the variant is built
    # (`onnxruntime_backend.activation_choice`); set, the variant name ends in -u8s8 / -s8s8.
    activation_type: ActivationType | None = None
    # OpenVINO INT8 post-training quantization only, NNCF's own float algorithms run before quantizing (the variant's
    # details["nncf"] say what each changed): channel_alignment, NNCF's ChannelAlignment (cross-layer equalization of
    # Conv/MatMul -> 1x1 Conv pairs with no activation between; name ends in -ca); smooth_quant, NNCF's SmoothQuant of
    # MatMul inputs at this alpha, in NNCF's transformer mode (name ends in -sq<alpha>).
    channel_alignment: bool = False
    smooth_quant: float | None = Field(None, ge=0.0, le=1.0)
    # ONNX Runtime and OpenVINO INT8 post-training quantization only: int8eval's AdaRound (`backends.adaround`) learns
    # whether to round each weight down or up to minimise its layer's output error on the calibration images, and
    # writes those integers as the model's INT8 weights (the Q/DQ model's, on ONNX Runtime's scales; NNCF's int8
    # constants, on its scales and integer range; before bias correction). Name ends in -adaround.
    adaround: bool = False
    # A deployment folder (`int8eval.deploy`): the variant is its copied artifact, run by the backend's runtime; what
    # built it is in its manifest, so the build options above stay at their defaults. Named <backend>-deployed-<label>.
    deployed: Path | None = None

    @model_validator(mode="before")
    @classmethod
    def _bias_correction_where_it_applies(cls, data):
        if isinstance(data, dict) and data.get("bias_correction") is None:
            ptq = _is_ptq(data.get("precision", Precision.int8), data.get("legacy"), data.get("qat_epochs"))
            ptq = ptq and data.get("deployed") is None  # a deployment is built already
            data = {**data, "bias_correction": ptq}
        return data

    @field_validator("keep_fp32")
    @classmethod
    def _layer_names(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        names = tuple(n.strip() for n in v)
        if any(not n for n in names):
            raise ValueError(f"keep_fp32 has an empty layer name: {list(v)}")
        if len(set(names)) != len(names):
            raise ValueError(f"keep_fp32 names a layer twice: {list(v)}")
        return names

    @model_validator(mode="after")
    def _keep_needs_int8(self) -> Recipe:
        if self.keep_fp32 and self.precision is not Precision.int8:
            raise ValueError(f"keep_fp32 applies to int8 recipes, not {self.precision.value}")
        return self

    @model_validator(mode="after")
    def _activation_type_is_onnxruntime_int8(self) -> Recipe:
        if self.activation_type is not None and not (
            self.backend is Backend.onnxruntime and self.precision is Precision.int8
        ):
            raise ValueError(
                f"activation_type applies to onnxruntime int8 recipes, not {self.backend.value} "
                f"{self.precision.value} (TensorRT always takes int8; PyTorch's and OpenVINO's quantizers choose "
                "their own); leave it out"
            )
        return self

    @model_validator(mode="after")
    def _nncf_algorithms_are_openvino_ptq(self) -> Recipe:
        asked = [f for f in ("channel_alignment", "smooth_quant") if getattr(self, f) not in (False, None)]
        if asked and not (self.backend is Backend.openvino and self._ptq and not self.emulate):
            what = f"backend {self.backend.value}" if self.backend is not Backend.openvino else \
                f"openvino {self.precision.value}" + (" QAT" if self.qat_epochs else "") + (" legacy" * self.legacy)
            raise ValueError(
                f"{' and '.join(asked)} applies to openvino INT8 post-training recipes (NNCF's algorithms), not to "
                f"{what}: PyTorch's PT2E, ONNX Runtime's and TensorRT's quantizers offer neither; leave it out or "
                "use --backend openvino"
            )
        return self

    @model_validator(mode="after")
    def _adaround_is_onnxruntime_or_openvino_ptq(self) -> Recipe:
        if self.adaround and not (self.backend in (Backend.onnxruntime, Backend.openvino) and self._ptq):
            kind = f"{self.backend.value} {self.precision.value}" + " legacy" * self.legacy + " QAT" * bool(self.qat_epochs)
            raise ValueError(
                f"adaround applies to onnxruntime and openvino INT8 post-training recipes (it rewrites the INT8 "
                f"weights of ONNX Runtime's Q/DQ model or NNCF's OpenVINO model), not to {kind}; leave it out (it "
                "needs --backend onnxruntime or openvino, INT8, no QAT)"
            )
        return self

    @model_validator(mode="after")
    def _bias_correction_needs_ptq(self) -> Recipe:
        if self.bias_correction and not self._ptq:
            raise ValueError(
                f"bias_correction applies to INT8 post-training quantization, not to {self._base_name} "
                "(legacy, QAT and non-INT8 recipes have none); leave it out"
            )
        return self

    @model_validator(mode="after")
    def _deployed_is_built_already(self) -> Recipe:
        if self.deployed is None:
            return self
        built = ("calib", "percentile", "per_channel", "legacy", "qat_epochs", "lr", "keep_fp32", "bias_correction",
                 "activation_type", "channel_alignment", "smooth_quant", "adaround")
        changed = [f for f in built if getattr(self, f) != type(self).model_fields[f].default]
        if changed:
            raise ValueError(
                f"a deployed recipe runs the artifact in {self.deployed} as its manifest says; {', '.join(changed)} "
                "cannot change it: leave them out"
            )
        return self

    @property
    def name(self) -> str:
        if self.deployed is not None:
            return f"{self.backend.value}-deployed-{self._deployed_label}" + ("@onnxruntime" if self.emulate else "")
        keep = f"-keep{len(self.keep_fp32)}" if self.keep_fp32 else ""
        no_bc = "-nobc" if self._ptq and not self.bias_correction else ""
        return self._base_name + keep + no_bc + ("@onnxruntime" if self.emulate else "")

    @property
    def _deployed_label(self) -> str:
        # The folder's name, or for RUN_DIR/deploy/<backend>/ (as `int8eval tune` writes it) the run folder's, so the
        # deployments of one backend from two tune runs get different names.
        folder = Path(self.deployed).resolve()
        if folder.name == self.backend.value and folder.parent.name == "deploy" and folder.parent.parent.name:
            return folder.parent.parent.name
        return folder.name

    @property
    def _ptq(self) -> bool:
        return _is_ptq(self.precision, self.legacy, self.qat_epochs)

    @property
    def _base_name(self) -> str:
        if self.qat_epochs:
            if self.precision is not Precision.int8:
                return f"{self.backend.value}-{self.precision.value}-finetuned"
            return f"{self.backend.value}-int8-qat" + ("-legacy" if self.legacy else "")
        if self.precision is not Precision.int8:
            return f"{self.backend.value}-{self.precision.value}"
        parts = [self.backend.value, "int8"]
        if self.legacy:
            parts.append("legacy")
        parts.append(f"{self.calib.value}{self.percentile:g}" if self.calib is CalibMethod.percentile else self.calib.value)
        if not self.per_channel:
            parts.append("pertensor")
        if self.activation_type is not None:  # only when asked for: default names do not change
            parts.append({ActivationType.uint8: "u8s8", ActivationType.int8: "s8s8"}[self.activation_type])
        if self.smooth_quant is not None:
            parts.append(f"sq{self.smooth_quant:g}")
        if self.channel_alignment:
            parts.append("ca")
        if self.adaround:
            parts.append("adaround")
        return "-".join(parts)


class SessionSpec(_Strict):
    """What every command opens before building anything (`session.open_session`): the model, the images, and how
    they are split into training, calibration and evaluation images. Paths are checked when they are loaded."""

    model: str
    checkpoint: Path | None = None
    weights: str | None = None
    preprocessing: Preprocessing | None = None  # None: the weights' own
    data: Path
    labels: Path | None = None
    # Images without labels (or labels ignored): agreement, flips, KL and cosine to FP32, never accuracy. A flat folder
    # of images with no --labels is read so without it (data.layouts.discover).
    labels_free: bool = False
    # A label space of its own: one class name a line (line i: the model's class i), e.g. for an image,class CSV.
    class_names: Path | None = None
    calib_data: Path | None = None
    calib_size: int = Field(100, gt=0)
    seed: int = 0
    batch_size: int = Field(32, gt=0)
    workers: int = Field(0, ge=0)  # decoding processes; 0 decodes in this process
    max_images: int | None = Field(None, gt=0)
    on_bad_image: OnBadImage = OnBadImage.skip
    train_data: Path | None = None  # QAT training images (default: a seeded split of --data, then not evaluated)
    train_size: int = Field(300, gt=0)
    train_batch_size: int = Field(32, gt=0)
    # Where decoded images are kept between runs (int8eval.data.cache; the CLI's --cache, default under the user cache
    # directory); None: every image is decoded. The commands decode through it; it never changes a number.
    decode_cache: Path | None = None
    reference: ReferenceMode = ReferenceMode.auto  # how the FP32 reference runs in the pass


class RayOptions(_Strict):
    """Where a command spreads its work: the Ray cluster at `ray` ("auto", "local", HOST:PORT; int8eval.distributed)
    with `ray_workers` workers (None: one per node); None: this machine."""

    ray: str | None = None
    ray_workers: int | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _ray_workers(self) -> RayOptions:
        if self.ray_workers is not None and self.ray is None:
            raise ValueError("--ray-workers has no effect without --ray; add --ray [auto|ADDRESS]")
        return self


class RunConfig(RayOptions, SessionSpec):
    """Everything `int8eval run` needs: the session, the recipes, the budget, and where the run folder goes. With
    `ray`, the evaluation images are sharded over the cluster."""

    out: Path
    recipes: tuple[Recipe, ...] = ()
    acceptance: Acceptance | None = None
    bench: bool = False  # also time every variant (latency, throughput) after the accuracy pass
    # Go on from the evaluation checkpoint an interrupted run of the same arguments left in OUT (int8eval.resume).
    resume: bool = False

    @model_validator(mode="after")
    def _unique_variants(self) -> RunConfig:
        names = [r.name for r in self.recipes]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"the same variant is asked for twice: {', '.join(dupes)}")
        return self

    @model_validator(mode="after")
    def _ray(self) -> RunConfig:
        if self.ray is not None and self.resume:
            raise ValueError("--resume goes on from a checkpoint of a single-machine pass, which --ray does not write; "
                             "drop one of the two")
        return self

    @property
    def needs_calibration(self) -> bool:
        return any(r.precision is Precision.int8 and r.deployed is None for r in self.recipes)

    @property
    def needs_training(self) -> bool:
        return any(r.qat_epochs for r in self.recipes)


class Objective(str, Enum):
    """What `int8eval tune` optimises among the models that keep the budget."""

    throughput = "throughput"
    latency = "latency"
    size = "size"


class TuneConfig(RayOptions, SessionSpec):
    """Everything `int8eval tune` needs: the session (its calibration split), the backends, the budget, the tuning and
    confirmation set sizes, the objective, and where the run folder goes. With `ray`, each backend's ladder climbs
    on a worker of the cluster."""

    out: Path
    backends: tuple[Backend, ...] = ()  # default: every installed default backend
    acceptance: Acceptance
    objective: Objective = Objective.throughput
    tune_size: int = Field(300, gt=0)  # images candidates are ranked and chosen on
    confirm_size: int = Field(400, gt=0)  # images only the chosen models' final verdicts use
    confirm_data: Path | None = None  # a folder of confirmation images instead of a seeded split of `data`
    max_fp32_layers: int = Field(8, ge=0)  # the most layers the FP32-fallback steps may keep in FP32
    min_agreement: float | None = Field(None, gt=0, le=100)  # percent: a floor on top-1 agreement with FP32
    qat_epochs: int = Field(0, ge=0)  # > 0: QAT as the last step (torch), trained on `train_data`
    lr: float = Field(1e-5, gt=0)
    time_budget_s: float | None = Field(None, gt=0)  # stop climbing when spent; the best found is reported
