"""QAT (PT2E and the seed's eager API) and its FP32 control, on the tiny model and generated images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import require_package, torch_logits
from torch import nn

from int8eval import backends
from int8eval.backends import BuildContext, CalibrationData
from int8eval.backends.qat import (
    FinetunedVariant,
    FinetuneSpec,
    build_finetuned_variant,
    finetune_spec,
    finetune_summary,
    qat_finetune,
    training_loader,
    variant_name,
)
from int8eval.backends.qat_pt2e import float_graph
from int8eval.config import Backend, CalibMethod, Precision, Preprocessing, Recipe
from int8eval.data import discover
from int8eval.data.layouts import split_training
from int8eval.errors import ConfigError, DatasetError
from int8eval.models import LoadedModel, load_model

require_package("torchao", extra="pt2e")

# A learning rate this small leaves the weights where they were: the outputs must then match the original model.
STILL = FinetuneSpec(epochs=1, lr=1e-12, batch_size=4)


@pytest.fixture
def tiny():
    return load_model("tiny_test")


@pytest.fixture
def images(tiny) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((6, *tiny.input_shape)).astype(np.float32)


def _cosine(a, b):
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_names_separate_qat_from_the_fp32_control():
    assert variant_name(quantize=True) == "torch-int8-qat"
    assert variant_name(quantize=True, legacy=True) == "torch-int8-qat-legacy"
    assert variant_name(quantize=False) == "torch-fp32-finetuned"


@pytest.mark.parametrize(
    "kwargs, word", [({"epochs": 0}, "epochs"), ({"lr": 0}, "learning rate"), ({"engine": "arm"}, "engine")]
)
def test_bad_schedules_are_refused(kwargs, word):
    with pytest.raises(ConfigError, match=word):
        FinetuneSpec(**kwargs)


def test_training_split_is_seeded_and_disjoint(image_folder):
    samples = discover(image_folder).samples
    train, rest = split_training(samples, size=5, seed=1)
    assert len(train) == 5 and len(rest) == len(samples) - 5
    assert not {s.id for s in train} & {s.id for s in rest}
    assert [s.id for s in split_training(samples, size=5, seed=1)[0]] == [s.id for s in train]
    with pytest.raises(DatasetError, match="leaves none to evaluate"):
        split_training(samples, size=len(samples), seed=0)


def test_a_separate_training_folder_never_contributes_evaluated_images(image_folder):
    samples = discover(image_folder).samples
    train, rest = split_training(samples[:4], size=100, seed=0, train_root=image_folder)
    assert rest == samples[:4]
    assert len(train) == len(samples) - 4 and not {s.path for s in train} & {s.path for s in rest}


def test_qat_and_its_control_see_the_same_augmented_batches(image_folder, tiny):
    samples = discover(image_folder).samples
    spec = FinetuneSpec(batch_size=4, seed=3)

    def first_batch():
        torch.manual_seed(spec.seed)  # as _train does before each run
        return next(iter(training_loader(samples, tiny.preprocessing, spec)))

    b1, b2 = first_batch(), first_batch()
    x1, y1, x2, y2 = (torch.from_numpy(a) for a in (b1.images, b1.labels, b2.images, b2.labels))
    assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_pt2e_qat_gives_an_int8_model_close_to_the_original(image_folder, tiny, images, tmp_path):
    samples = discover(image_folder).samples
    variant = build_finetuned_variant(tiny, samples, tmp_path, spec=STILL, quantize=True, compile=False)
    assert variant.name == "torch-int8-qat" and variant.recipe.precision.value == "int8"
    out = variant.predict(images)
    assert out.shape == (6, 1000) and np.isfinite(out).all()
    assert _cosine(out, torch_logits(tiny, images)).min() > 0.99
    # The converted graph really quantizes, and holds INT8 weights rather than the float ones.
    targets = {str(n.target) for n in variant.module.graph.nodes}
    assert any("quantize_per_tensor" in t for t in targets)
    assert any(b.dtype == torch.int8 for b in variant.module.buffers())
    assert not any(True for _ in variant.module.parameters() if _.dtype == torch.float32 and _.dim() == 4)
    assert variant.artifact.suffix == ".pt2" and variant.size_mb > 0
    summary = finetune_summary(variant.result)
    assert summary["method"] == "pt2e" and summary["train_images"] == len(samples) and summary["freeze_bn"]
    # No calibration images: torchao's QAT default; the recipe records what was built
    assert summary["calibration"] == "torchao X86 QAT config: moving-average min/max fake quantizers"
    assert variant.recipe.qat_epochs == STILL.epochs and variant.recipe.calib is CalibMethod.mse


def test_the_fp32_control_starts_from_the_original_model(image_folder, tiny, images, tmp_path):
    samples = discover(image_folder).samples
    variant = build_finetuned_variant(tiny, samples, tmp_path, spec=STILL, quantize=False)
    assert variant.name == "torch-fp32-finetuned" and variant.recipe.precision.value == "fp32"
    # BatchNorm folded, trained with a negligible step: the same function as the original model.
    np.testing.assert_allclose(variant.predict(images), torch_logits(tiny, images), atol=1e-4)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in variant.module.modules())


def test_training_moves_the_weights_and_leaves_the_given_model_alone(image_folder, tiny):
    samples = discover(image_folder).samples
    before = {k: v.clone() for k, v in tiny.module.state_dict().items()}
    result = qat_finetune(tiny, samples, epochs=2, lr=0.05, batch_size=4, quantize=False)
    assert len(result.losses) == 2 and all(np.isfinite(result.losses))
    moved = dict(result.module.named_parameters())["fc.weight"].detach()
    assert not torch.allclose(moved, before["fc.weight"])
    assert all(torch.equal(v, tiny.module.state_dict()[k]) for k, v in before.items())


def test_untrainable_inputs_are_reported(tmp_path, tiny):
    with pytest.raises(DatasetError, match="training images"):
        qat_finetune(tiny, [], quantize=True)


def test_a_reused_module_is_untied_so_pt2e_can_prepare_it(image_folder, tmp_path):
    class Reuse(nn.Module):  # one ReLU called twice, like torchvision's Bottleneck
        def __init__(self):
            super().__init__()
            self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
            self.relu = nn.ReLU()
            self.fc = nn.Linear(8, 1000)

        def forward(self, x):
            x = self.relu(self.conv1(x))
            x = self.relu(self.conv2(x) + x)
            return self.fc(x.mean((2, 3)))

    loaded = LoadedModel("reuse", Reuse().eval(), Preprocessing(resize=40, crop=32), "random")
    gm = float_graph(loaded, freeze_bn=STILL.freeze_bn)
    calls = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert len(calls) == len(set(calls))
    variant = build_finetuned_variant(loaded, discover(image_folder).samples, tmp_path, spec=STILL, quantize=True, compile=False)
    assert variant.predict(np.zeros((2, 3, 32, 32), np.float32)).shape == (2, 1000)


def test_training_bn_with_a_non_default_eps_is_refused(image_folder, tiny):
    for m in tiny.module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eps = 1e-3
    with pytest.raises(ConfigError, match="eps"):
        qat_finetune(tiny, discover(image_folder).samples, spec=FinetuneSpec(freeze_bn=False, batch_size=4))


def test_legacy_eager_qat_needs_a_torchvision_quantizable_twin(image_folder, tiny):
    with pytest.raises(ConfigError, match="quantizable twin"):
        qat_finetune(tiny, discover(image_folder).samples, quantize=True, legacy=True, spec=STILL)


def test_legacy_eager_qat_runs_the_seed_api_on_resnet18(image_folder, tmp_path):
    torchvision = pytest.importorskip("torchvision")
    if not hasattr(torch.ao.quantization, "prepare_qat"):
        pytest.skip("this PyTorch no longer has the eager QAT API")
    torch.manual_seed(0)
    loaded = LoadedModel("resnet18", torchvision.models.resnet18().eval(), Preprocessing(resize=40, crop=32), "random")
    spec = FinetuneSpec(epochs=1, lr=1e-12, batch_size=6, engine="fbgemm")
    variant = build_finetuned_variant(loaded, discover(image_folder).samples, tmp_path, spec=spec, quantize=True, legacy=True)
    assert variant.name == "torch-int8-qat-legacy" and variant.recipe.legacy
    assert variant.details["calibration"].startswith("torch.ao default QAT qconfig (fbgemm)")
    assert "eager" in variant.details["legacy"] and variant.recipe.calib is CalibMethod.minmax
    assert type(variant.module.conv1).__module__.startswith("torch.ao.nn.intrinsic.quantized")
    images = np.random.default_rng(1).standard_normal((4, 3, 32, 32)).astype(np.float32)
    out = variant.predict(images)
    assert out.shape == (4, 1000) and np.isfinite(out).all()
    assert _cosine(out, torch_logits(loaded, images)).min() > 0.9
    assert variant.size_mb < 0.5 * 46.8  # int8 weights: ResNet18 is 46.8 MB in FP32


@pytest.mark.slow
def test_qat_on_lite0_and_the_shared_sample(shared_sample, tmp_path):
    """A few real images and one short epoch: the QAT model still agrees with the FP32 model on held-out images."""
    from int8eval.data.decode import batches

    loaded = load_model("efficientnet_lite0")
    train, rest = split_training(discover(shared_sample).samples, size=16, seed=0)
    spec = FinetuneSpec(epochs=1, lr=1e-5, batch_size=8)
    variant = build_finetuned_variant(loaded, train, tmp_path, spec=spec, quantize=True, compile=False)
    batch = next(iter(batches(rest[:32], loaded.preprocessing, batch_size=32, workers=0)))
    agree = np.mean(variant.predict(batch.images).argmax(1) == torch_logits(loaded, batch.images).argmax(1))
    assert agree > 0.85, agree


@pytest.mark.parametrize(
    "kw, word",
    [
        ({"backend": "onnxruntime"}, "PyTorch"),
        ({"backend": "torch", "precision": "bf16"}, "bf16"),
        ({"backend": "torch", "precision": "fp32", "legacy": True}, "legacy"),
        ({"backend": "torch", "calib": "percentile"}, "HistogramObserver"),
    ],
)
def test_impossible_fine_tuning_recipes_fail_before_any_work(kw, word):
    from int8eval.backends.qat import check_recipe

    with pytest.raises(ConfigError, match=word):
        check_recipe(Recipe(**kw, qat_epochs=1))
    with pytest.raises(ConfigError, match=word):
        backends.check_recipe(Recipe(**kw, qat_epochs=1))  # the registry sends every fine-tuning recipe there


def test_qat_starts_from_ptq_calibrated_activation_ranges(image_folder, tiny, images):
    from int8eval.backends.base import CalibrationData

    samples = discover(image_folder).samples
    calib = CalibrationData([images], [f"x{i}" for i in range(len(images))])
    calibrated = qat_finetune(tiny, samples, quantize=True, spec=STILL, calib=calib)
    assert calibrated.fixed_ranges == 4  # the input and the three conv outputs of tiny_test
    assert finetune_summary(calibrated)["activation_ranges"].startswith("PTQ-calibrated")
    assert finetune_summary(calibrated)["calibration"].startswith("torchao HistogramObserver (X86 PTQ config")
    moving = qat_finetune(tiny, samples, quantize=True, spec=STILL)
    assert moving.fixed_ranges == 0
    x = torch.from_numpy(images)
    with torch.no_grad():
        out = calibrated.module(x).numpy()
    assert _cosine(out, torch_logits(tiny, images)).min() > 0.99


def test_training_workers_are_spawned_not_forked(image_folder):
    # By the time QAT trains, ONNX Runtime / OpenVINO / inductor thread pools exist; a forked worker can crash.
    samples, pre = discover(image_folder).samples, load_model("tiny_test").preprocessing
    assert training_loader(samples, pre, FinetuneSpec(batch_size=4, workers=1)).multiprocessing_context.get_start_method() == "spawn"
    assert training_loader(samples, pre, FinetuneSpec(batch_size=4)).num_workers == 0


def test_fine_tuning_recipes_go_through_the_registry(image_folder, tiny, images, tmp_path):
    """QAT and its control are built by `backends.build_variant` like any recipe: the schedule from the recipe
    (epochs, lr) and the context (training images, batch size, seed, workers)."""
    samples = discover(image_folder).samples
    context = BuildContext(workdir=tmp_path, train=samples, train_batch_size=4, seed=3, workers=0)
    qat = Recipe(backend=Backend.torch, qat_epochs=1, lr=1e-12, calib=CalibMethod.mse)
    control = Recipe(backend=Backend.torch, qat_epochs=1, lr=1e-12, precision=Precision.fp32)
    assert backends.builder_key(qat) == backends.builder_key(control) == "finetune"
    spec = finetune_spec(qat, context)
    assert (spec.epochs, spec.lr, spec.batch_size, spec.seed, spec.workers) == (1, 1e-12, 4, 3, 0)
    calib = CalibrationData([images])
    built = {r.name: backends.build_variant(tiny, r, calib, tmp_path, context) for r in (qat, control)}
    assert list(built) == ["torch-int8-qat", "torch-fp32-finetuned"]
    for recipe in (qat, control):
        variant = built[recipe.name]
        assert isinstance(variant, FinetunedVariant) and variant.recipe == recipe and variant.name == recipe.name
        assert variant.details["batch_size"] == 4 and variant.details["seed"] == 3
        assert variant.predict(images).shape == (len(images), 1000)
    assert built[qat.name].details["calibration"].startswith("torchao HistogramObserver")
    assert "calibration" not in built[control.name].details  # FP32: nothing calibrated



def test_qat_recipes_record_the_observer_that_sets_their_ranges():
    """PT2E QAT calibrates with the X86 HistogramObserver (torch's mse), the legacy eager path with moving-average
    min/max: the recorded recipe says so, and the variant names do not change."""
    from int8eval.session import qat_recipes

    pt2e, control, legacy = qat_recipes(1, 1e-5, legacy=True)
    assert (pt2e.calib, legacy.calib) == (CalibMethod.mse, CalibMethod.minmax)
    assert [r.name for r in (pt2e, control, legacy)] == ["torch-int8-qat", "torch-fp32-finetuned", "torch-int8-qat-legacy"]
