"""Vision transformers: detection from the module, where each backend's transformer recipe puts Q/DQ, and a run on
every installed backend. No ViT weights can be downloaded here, so the models are random (`tiny_vit_test`, a timm
ViT of patch 32, depth 2, width 64 at 224x224 and 1000 classes): their accuracy means nothing, so only structure
and FP32 parity are tested."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from click.testing import CliRunner
from torch import nn

from int8eval.backends import BACKENDS, CalibrationData
from int8eval.config import Backend, Recipe
from int8eval.models import LoadedModel, load_model
from int8eval.models.tiny import VIT_NAME

pytest.importorskip("timm")


@pytest.fixture(scope="module")
def vit() -> LoadedModel:
    return load_model(VIT_NAME)


@pytest.fixture(scope="module")
def vit_calib() -> CalibrationData:
    rng = np.random.default_rng(0)
    return CalibrationData([rng.standard_normal((4, 3, 224, 224)).astype(np.float32)])


def test_transformers_are_recognised_from_the_module_not_the_name(vit, tiny):
    import torchvision

    assert vit.is_transformer and not tiny.is_transformer
    tv_vit = torchvision.models.vit_b_32(weights=None, num_classes=10)  # nn.MultiheadAttention + LayerNorm
    assert LoadedModel("anything", tv_vit, tiny.preprocessing, "test").is_transformer
    renamed = LoadedModel("vit_base_patch16_224", tiny.module, tiny.preprocessing, "test")  # a name is not enough
    assert not renamed.is_transformer
    norm_only = nn.Sequential(nn.Conv2d(3, 8, 3), nn.LayerNorm(8))  # ConvNeXt-like: LayerNorm without attention
    assert not LoadedModel("convnext_like", norm_only, tiny.preprocessing, "test").is_transformer


def test_onnxruntime_quantizes_linear_weights_per_channel_and_leaves_layernorm_softmax_in_float(vit, vit_calib, tmp_path):
    pytest.importorskip("onnxruntime")
    import onnx

    from int8eval.backends import onnxruntime_backend
    from int8eval.backends.onnx_export import activation_matmuls, quantized_inputs

    variant = onnxruntime_backend.build(vit, Recipe(backend=Backend.onnxruntime), vit_calib, tmp_path)
    assert "LayerNorm" in variant.details["transformer"]
    model = onnx.load(str(variant.artifact))
    attention = set(activation_matmuls(model))
    assert len(attention) == 4  # Q x K^T and softmax x V in each of the two blocks
    inputs = quantized_inputs(model, ("Conv", "Gemm", "MatMul", "LayerNormalization", "Softmax"))
    weights = [i for i in inputs if i.op_type in ("Conv", "Gemm", "MatMul") and i.index == 1 and i.node not in attention]
    assert len(weights) == 2 * 4 + 2  # qkv, proj, fc1, fc2 per block; the patch embedding and the head
    assert all(i.kind == "dq" and i.dtype == "int8" for i in weights)
    assert all(len(i.scale_shape) == 1 and i.scale_shape[0] > 1 for i in weights)  # one scale per output channel
    data = [i for i in inputs if i.op_type in ("Conv", "Gemm", "MatMul") and i.index == 0 and i.node not in attention]
    assert all(i.kind == "qdq" for i in data)
    kept = [i for i in inputs if i.op_type in ("LayerNormalization", "Softmax") or i.node in attention]
    assert kept and all(i.kind == "float" for i in kept)  # no DequantizeLinear feeds them
    producer = {o: n for n in model.graph.node for o in n.output}
    consumers = Counter(n.op_type for n in model.graph.node for t in n.input
                        if t in producer and producer[t].op_type == "Softmax")
    assert "QuantizeLinear" not in consumers  # Softmax's output stays float: no QLinearSoftmax fusion


def test_tensorrts_qdq_onnx_leaves_layernorm_in_float(vit, vit_calib, tmp_path):
    pytest.importorskip("onnxruntime")
    import onnx

    from int8eval.backends import tensorrt_on_cpu
    from int8eval.backends.onnx_export import quantized_inputs

    variant = tensorrt_on_cpu.build(vit, Recipe(backend=Backend.tensorrt, emulate=True), vit_calib, tmp_path)
    inputs = quantized_inputs(onnx.load(str(variant.artifact)), ("Conv", "Gemm", "MatMul", "LayerNormalization"))
    assert all(i.kind == "float" for i in inputs if i.op_type == "LayerNormalization")
    weights = [i for i in inputs if i.op_type != "LayerNormalization" and i.index == 1 and i.kind == "dq"]
    assert len(weights) == 2 * 4 + 2 and all(i.dtype == "int8" for i in weights)


def test_openvino_uses_nncf_transformer_model_type(vit, vit_calib, tiny, varied_calib, tmp_path):
    pytest.importorskip("nncf")
    import openvino as ov

    from int8eval.backends import openvino_backend

    variant = openvino_backend.build(vit, Recipe(backend=Backend.openvino), vit_calib, tmp_path / "vit")
    assert variant.details["nncf"]["model_type"] == "transformer"
    model = ov.Core().read_model(str(variant.artifact))
    def source(op) -> list:
        return [i.get_source_output().get_node() for i in op.inputs()]

    ops = model.get_ordered_ops()
    matmuls = [op for op in ops if op.get_type_name() == "MatMul"]
    assert len(matmuls) == 9  # qkv, proj, fc1, fc2 per block, and the head: attention is one SDPA op

    def int8_weight(node) -> bool:  # Multiply(Convert(i8 Constant), scale): NNCF's compressed INT8 weight
        while node.get_type_name() in ("Multiply", "Subtract", "Convert"):
            node = node.input(0).get_source_output().get_node()
        return node.get_type_name() == "Constant" and node.get_element_type() == ov.Type.i8

    assert all(int8_weight(source(m)[1]) for m in matmuls)
    norms = [op for op in ops if op.get_type_name() == "MVN"]  # LayerNorm, as OpenVINO converts it
    assert len(norms) == 5 and all(s.get_type_name() != "FakeQuantize" for op in norms for s in source(op))
    # NNCF's transformer patterns quantize attention's Q and K (an INT8 Q x K^T) and leave V and the softmax float.
    attention = [op for op in ops if op.get_type_name() == "ScaledDotProductAttention"]
    assert len(attention) == 2
    assert all([s.get_type_name() == "FakeQuantize" for s in source(op)[:3]] == [True, True, False] for op in attention)
    cnn = openvino_backend.build(tiny, Recipe(backend=Backend.openvino), varied_calib, tmp_path / "cnn")
    assert cnn.details["nncf"]["model_type"] is None  # a CNN keeps NNCF's default patterns


def test_pt2e_quantizes_linear_and_leaves_layernorm_and_attention_in_float(vit, vit_calib, tmp_path):
    pytest.importorskip("torchao")
    from int8eval.backends import torch_backend

    variant = torch_backend.build(vit, Recipe(backend=Backend.torch), vit_calib, tmp_path, compile=False)
    assert "LayerNorm" in variant.details["transformer"]
    graph = variant.module.graph
    dequantized = {n for n in graph.nodes if "dequantize" in str(n.target)}
    fed = Counter(str(n.target) for n in graph.nodes if n.op == "call_function" and
                  any(a in dequantized for a in n.all_input_nodes) and "quantize" not in str(n.target))
    assert fed["aten.linear.default"] == 9 and fed["aten.conv2d.default"] == 1
    assert not any("layer_norm" in t or "scaled_dot_product" in t or "softmax" in t for t in fed)


def test_tune_climbs_smoothquant_for_a_vit_on_openvino(vit, tiny):
    from int8eval.tune.ladder import ladder

    names = lambda loaded: [s.name for s in ladder(Backend.openvino, loaded=loaded)]  # noqa: E731
    assert "SmoothQuant" in names(vit) and "SmoothQuant" not in names(tiny)


@pytest.mark.slow  # about a minute: three backends build and compile the ViT
def test_a_vit_runs_on_every_installed_backend_with_fp32_parity(image_folder, tmp_path):
    from int8eval.cli import main

    installed = [b.value for b, info in BACKENDS.items() if info.installed and info.default]
    out = tmp_path / "run"
    args = ["run", "-m", VIT_NAME, "--data", str(image_folder), "--out", str(out), "--calib-size", "4",
            "--batch-size", "4", "--no-cache"]
    for b in installed:
        args += ["--backend", b]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    variants = {v["name"]: v for v in json.loads((out / "report.json").read_text())["variants"]}
    for b in installed:
        assert variants[f"{b}-fp32"]["status"] == "ok"
        if b != "torch":  # the reference itself; every other FP32 passes the parity gate
            assert variants[f"{b}-fp32"]["agreement_top1"] >= 0.999
        (int8,) = [v for v in variants.values() if v["backend"] == b and v["precision"] == "int8"]
        assert int8["status"] == "ok", int8.get("error")
        assert "transformer" in int8["details"] or int8["details"]["nncf"]["model_type"] == "transformer"
