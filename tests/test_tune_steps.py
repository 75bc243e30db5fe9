"""The backends' own cross-layer equalization and SmoothQuant (issue 14): NNCF's channel alignment and SmoothQuant
as OpenVINO recipe options (`Recipe.channel_alignment`, `Recipe.smooth_quant`), refused elsewhere, offered by the
tune ladder only where they can change the model, and built so that ranges and bias correction follow them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from int8eval.config import Backend, CalibMethod, Precision, Preprocessing, Recipe
from int8eval.errors import ConfigError
from int8eval.models import LoadedModel
from int8eval.models.tiny import seed_batchnorm
from int8eval.tune.ladder import SMOOTH_QUANT_ALPHAS, ladder, transformer_like


class LinearBottleneck(nn.Module):
    """A MobileNetV2-style linear bottleneck: conv2 (BN, no activation) feeds the 1x1 conv3, the pair NNCF's
    channel alignment changes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.conv2 = nn.Sequential(nn.Conv2d(16, 24, 1, bias=False), nn.BatchNorm2d(24))
        self.conv3 = nn.Sequential(nn.Conv2d(24, 32, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv3(self.conv2(self.conv1(x))).mean((2, 3)))


class TinyTransformer(nn.Module):
    """Patches -> LayerNorm -> MLP (Linear, GELU, Linear) with a residual -> LayerNorm -> head: SmoothQuant's kind."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, 32, 8, stride=8)
        self.norm1, self.norm2 = nn.LayerNorm(32), nn.LayerNorm(32)
        self.fc1, self.fc2, self.head = nn.Linear(32, 64), nn.Linear(64, 32), nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = x + self.fc2(nn.functional.gelu(self.fc1(self.norm1(x))))
        return self.head(self.norm2(x).mean(1))


def _loaded(module: nn.Module, name: str) -> LoadedModel:
    torch.manual_seed(0)
    module = module.eval()
    seed_batchnorm(module)
    return LoadedModel(name, module, Preprocessing(resize=32, crop=32), "random, seeded (test)")


@pytest.fixture(scope="module")
def bottleneck() -> LoadedModel:
    return _loaded(LinearBottleneck(), "bottleneck_test")


@pytest.fixture(scope="module")
def transformer() -> LoadedModel:
    return _loaded(TinyTransformer(), "transformer_test")


# --- recipes ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", [Backend.torch, Backend.onnxruntime, Backend.tensorrt])
@pytest.mark.parametrize("option", [dict(channel_alignment=True), dict(smooth_quant=0.5)])
def test_the_options_are_refused_where_the_backend_has_none(backend, option):
    with pytest.raises(ValueError, match=rf"{next(iter(option))} applies to openvino INT8 post-training recipes .* "
                                         rf"not to backend {backend.value}"):
        Recipe(backend=backend, **option)


def test_the_options_need_openvino_int8_ptq_and_name_their_variants(tmp_path):
    for kw, what in [(dict(precision=Precision.fp32), "openvino fp32"), (dict(qat_epochs=1), "openvino int8 QAT")]:
        with pytest.raises(ValueError, match=f"not to {what}"):
            Recipe(backend=Backend.openvino, channel_alignment=True, **kw)
    with pytest.raises(ValueError, match="channel_alignment cannot change it"):
        Recipe(backend=Backend.openvino, deployed=tmp_path, channel_alignment=True)
    with pytest.raises(ValueError, match="less than or equal to 1"):
        Recipe(backend=Backend.openvino, smooth_quant=1.5)
    plain = Recipe(backend=Backend.openvino, calib=CalibMethod.percentile)
    assert Recipe(backend=Backend.openvino, calib=CalibMethod.percentile, channel_alignment=True).name == plain.name + "-ca"
    assert Recipe(backend=Backend.openvino, smooth_quant=0.5, channel_alignment=True).name == "openvino-int8-minmax-sq0.5-ca"


def test_run_flags_add_the_variants_beside_the_plain_ones_and_only_for_openvino(tmp_path):
    from click.testing import CliRunner

    from int8eval.cli import main
    from int8eval.session import expand_recipes

    names = [r.name for r in expand_recipes(["openvino", "torch"], channel_alignment=True, smooth_quant=(0.5, 0.95))]
    assert names == ["openvino-int8-percentile99.999", "openvino-int8-percentile99.999-ca",
                     "openvino-int8-percentile99.999-sq0.5", "openvino-int8-percentile99.999-sq0.95", "torch-int8-mse"]
    with pytest.raises(ConfigError, match="add --backend openvino"):
        expand_recipes(["torch"], channel_alignment=True)
    help_text = CliRunner().invoke(main, ["run", "--help"]).output
    assert "--channel-alignment" in help_text and "--smooth-quant ALPHA" in help_text
    result = CliRunner().invoke(main, ["run", "-m", "tiny_test", "--data", str(tmp_path), "--fp32-only",
                                       "--channel-alignment"])
    assert result.exit_code == 2 and "--channel-alignment has no effect with --fp32-only" in result.output


# --- the ladder -------------------------------------------------------------------------------------------------------

def _names(steps) -> list[str]:
    return [s.name for s in steps]


def test_only_openvino_has_the_steps_and_smooth_quant_only_for_transformers(tiny, transformer):
    from conftest import require_package

    require_package("openvino", "nncf", extra="openvino")
    assert not transformer_like(tiny.module) and transformer_like(transformer.module)
    for backend in (Backend.torch, Backend.onnxruntime):
        steps = _names(ladder(backend, loaded=transformer, ranking=lambda: ["a"]))
        assert "channel alignment" not in steps and "SmoothQuant" not in steps
    assert _names(ladder(Backend.openvino, loaded=tiny, ranking=lambda: ["a"])) == [
        "calibration", "activation type", "bias correction off", "channel alignment", "AdaRound", "FP32 layers"]
    steps = {s.name: s for s in ladder(Backend.openvino, loaded=transformer, ranking=lambda: ["a"])}
    assert list(steps)[3:5] == ["channel alignment", "SmoothQuant"]
    base = Recipe(backend=Backend.openvino)
    assert [r.smooth_quant for r in steps["SmoothQuant"].candidates(base)] == list(SMOOTH_QUANT_ALPHAS)
    assert steps["SmoothQuant"].candidates(Recipe(backend=Backend.openvino, smooth_quant=0.5)) == []


def test_channel_alignment_is_offered_only_where_it_changes_a_layer(tiny, bottleneck):
    from conftest import require_package

    require_package("openvino", "nncf", extra="openvino")
    base = Recipe(backend=Backend.openvino)

    def offered(loaded) -> list[Recipe]:
        step = next(s for s in ladder(Backend.openvino, loaded=loaded) if s.name == "channel alignment")
        return step.candidates(base)

    assert offered(tiny) == []  # every convolution is followed by a ReLU: no pair
    assert [r.name for r in offered(bottleneck)] == ["openvino-int8-minmax-ca"]


# --- builds -----------------------------------------------------------------------------------------------------------

def _calib(n: int = 16):
    from conftest import varied_images

    from int8eval.backends import CalibrationData

    return CalibrationData([varied_images(8, 20 + i) for i in range(n // 8)])


def _logits(variant, x: np.ndarray) -> np.ndarray:
    return variant.predict(x)


def test_channel_alignment_changes_the_pair_and_keeps_the_model_close_to_fp32(bottleneck, tmp_path):
    from conftest import require_package, varied_images

    require_package("openvino", "nncf", extra="openvino")
    from int8eval.backends import BuildContext, openvino_backend as ob

    calib, x = _calib(), varied_images(16, 40)
    context = BuildContext(workdir=tmp_path)
    ref = bottleneck.module(torch.from_numpy(x)).detach().numpy()
    plain = ob.build(bottleneck, Recipe(backend=Backend.openvino, calib=CalibMethod.percentile), calib, tmp_path, context)
    aligned = ob.build(bottleneck, Recipe(backend=Backend.openvino, calib=CalibMethod.percentile, channel_alignment=True),
                       calib, tmp_path, context)
    # The two layers of the pair (conv2 -> conv3) changed; the plain recipe's details say nothing about it.
    assert aligned.details["nncf"]["channel_alignment"].startswith("2 layers changed")
    assert "channel_alignment" not in plain.details["nncf"]
    assert aligned.artifact.with_suffix(".bin").read_bytes() != plain.artifact.with_suffix(".bin").read_bytes()
    # Bias correction measured the aligned layers (a mismatch would move the outputs far from FP32).
    err = {v.name: np.abs(_logits(v, x) - ref).mean() for v in (plain, aligned)}
    assert err[aligned.name] < 2 * err[plain.name] + 1e-3, err


def test_channel_alignment_on_the_tiny_model_changes_nothing_and_says_so(tiny, tmp_path):
    from conftest import require_package

    require_package("openvino", "nncf", extra="openvino")
    from int8eval.backends import BuildContext, openvino_backend as ob

    calib, context = _calib(), BuildContext(workdir=tmp_path)
    plain = ob.build(tiny, Recipe(backend=Backend.openvino), calib, tmp_path, context)
    aligned = ob.build(tiny, Recipe(backend=Backend.openvino, channel_alignment=True), calib, tmp_path, context)
    assert aligned.details["nncf"]["channel_alignment"].endswith("nothing changed")
    assert aligned.artifact.with_suffix(".bin").read_bytes() == plain.artifact.with_suffix(".bin").read_bytes()


def test_the_transformed_module_computes_what_the_fp32_module_does(bottleneck, transformer):
    """What bias correction measures for an aligned/smoothed model: the same function, other layer weights."""
    from conftest import require_package, varied_images

    require_package("openvino", "nncf", extra="openvino")
    from int8eval.backends import openvino_backend as ob
    from int8eval.backends.openvino_nncf import align_and_smooth, transformed_module

    x = torch.from_numpy(varied_images(8, 41))
    images = [b[i:i + 1] for b in _calib().batches for i in range(len(b))]
    for loaded, recipe in [(bottleneck, Recipe(backend=Backend.openvino, channel_alignment=True)),
                           (transformer, Recipe(backend=Backend.openvino, smooth_quant=0.5))]:
        converted = ob.conversion(loaded)
        fp32, changes = align_and_smooth(converted.model, recipe, images)
        assert changes and "nothing changed" not in " ".join(map(str, changes.values())), changes
        module = transformed_module(converted.folded, fp32, ob._module_ops(fp32))
        with torch.no_grad():
            torch.testing.assert_close(module(x), converted.folded(x), rtol=1e-4, atol=1e-4)
        moved = [n for n, p in module.named_parameters() if not torch.equal(p, dict(converted.folded.named_parameters())[n])]
        assert moved, recipe.name


def test_smooth_quant_builds_on_a_tiny_transformer(transformer, tmp_path):
    from conftest import require_package, varied_images

    require_package("openvino", "nncf", extra="openvino")
    from int8eval.backends import BuildContext, openvino_backend as ob

    calib, x = _calib(), varied_images(16, 42)
    context = BuildContext(workdir=tmp_path)
    ref = transformer.module(torch.from_numpy(x)).detach().numpy()
    smoothed = ob.build(transformer, Recipe(backend=Backend.openvino, smooth_quant=0.5), calib, tmp_path, context)
    nncf = smoothed.details["nncf"]
    assert nncf["model_type"] == "transformer" and "MatMul input(s) smoothed" in nncf["smooth_quant"], nncf
    assert smoothed.details["bias_corrected_layers"] > 0
    agree = (smoothed.predict(x).argmax(1) == ref.argmax(1)).mean()
    assert agree >= 0.75, agree
