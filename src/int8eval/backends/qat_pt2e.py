"""PT2E QAT's model surgery: the float model as a traced FX graph (BatchNorm folded, reused modules untied), its
preparation with torchao's X86 quantizer in QAT mode, the activation ranges calibrated the PTQ way and fixed in the
fake quantizers, and the conversion to INT8. The training loop that uses them is `qat`'s."""

from __future__ import annotations

import copy

import torch
from torch import nn

from int8eval.backends.base import CalibrationData
from int8eval.backends.pt2e import calibrate, drop_unused_tensors, export_program, untie_reused_modules
from int8eval.errors import BackendUnavailable, ConfigError
from int8eval.models import fold_batchnorm

_TORCHAO_BN_EPS = 1e-5  # what torchao's QAT conv-bn pattern and train/eval rewrite assume


def trace(module: nn.Module) -> torch.fx.GraphModule:
    """`torch.fx.symbolic_trace`, with a usable error for models that cannot be traced."""
    try:
        return torch.fx.symbolic_trace(module)
    except Exception as e:  # noqa: BLE001 - tracing raises many types
        raise ConfigError(
            f"fine-tuning needs a model torch.fx can trace; {type(module).__name__} cannot be: {type(e).__name__}: {e}"
        ) from e


def fold_batchnorm_for_training(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """`models.fold_batchnorm` of an (eval-mode) traced graph, with every weight trainable again."""
    folded, _ = fold_batchnorm(gm.eval())
    for p in folded.parameters():  # fuse() creates the folded biases without gradients
        p.requires_grad_(True)
    return folded


def float_graph(loaded, *, freeze_bn: bool) -> torch.fx.GraphModule:
    """The float model as an FX graph (what PT2E QAT and the FP32 control train): BatchNorm folded (when frozen),
    each reused module untied."""
    gm = trace(copy.deepcopy(loaded.module).eval())
    if freeze_bn:
        gm = fold_batchnorm_for_training(gm)
    # Trace again after untying: retargeted nodes keep the nn_module_stack recorded for the shared module, and
    # torch.export reuses it, so the X86 quantizer would still see one partition with several outputs.
    return torch.fx.symbolic_trace(untie_reused_modules(gm))


def check_bn_eps(module: nn.Module) -> None:
    """Refuse BatchNorm eps other than torchao's QAT assumption (only reached with unfrozen BatchNorm)."""
    odd = sorted({m.eps for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)} - {_TORCHAO_BN_EPS})
    if odd:
        raise ConfigError(
            f"this model's BatchNorm uses eps {odd}; torchao's QAT conv-bn fusion assumes eps=1e-5 and would change "
            "the model. Keep BatchNorm frozen (freeze_bn=True, the default), which folds it before training"
        )


def prepare(gm: torch.fx.GraphModule, example: torch.Tensor) -> torch.fx.GraphModule:
    """`gm` exported and prepared for QAT with the X86 quantizer's QAT config (fake quantizers with moving-average
    min/max observers)."""
    try:
        from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e
        from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
            X86InductorQuantizer,
            get_default_x86_inductor_quantization_config,
        )
    except ImportError as e:
        raise BackendUnavailable("PT2E QAT needs torchao: pip install 'int8eval[pt2e]'") from e
    quantizer = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config(is_qat=True))
    return prepare_qat_pt2e(export_program(gm, example).module(), quantizer)


def ptq_activation_qparams(gm: torch.fx.GraphModule, example: torch.Tensor, calib: CalibrationData) -> dict:
    """{observer name: (scale, zero_point)} of every activation, calibrated the PTQ way (X86 default config)."""
    from torchao.quantization.pt2e import ObserverBase
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    quantizer = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(export_program(gm, example).module(), quantizer)
    calibrate(prepared, calib)
    return {
        name: obs.calculate_qparams()
        for name, obs in prepared.named_modules()
        if isinstance(obs, ObserverBase) and obs.qscheme == torch.per_tensor_affine
    }


def fix_activation_ranges(model: nn.Module, qparams: dict) -> int:
    """Load PTQ activation qparams into the QAT fake quantizers of the same names and stop their observers.

    BatchNorm is folded before both graphs are prepared, so prepare_pt2e and prepare_qat_pt2e annotate the same
    graph and name their observers alike. The observer's min/max are set to the grid's ends too, because
    convert_pt2e reads the qparams from the observer, not from the fake quantizer."""
    from torchao.quantization.pt2e import FakeQuantizeBase

    done = 0
    for name, fq in model.named_modules():
        if not isinstance(fq, FakeQuantizeBase) or name not in qparams:
            continue
        scale, zero_point = (t.detach().reshape(-1) for t in qparams[name])
        fq.scale.resize_(scale.shape).copy_(scale)
        fq.zero_point.resize_(zero_point.shape).copy_(zero_point)
        obs = fq.activation_post_process
        obs.min_val = ((obs.quant_min - zero_point) * scale).reshape(obs.min_val.shape or ()).to(obs.min_val)
        obs.max_val = ((obs.quant_max - zero_point) * scale).reshape(obs.max_val.shape or ()).to(obs.max_val)
        fq.disable_observer()
        done += 1
    return done


def set_mode(model: nn.Module, *, train: bool, exported: bool) -> None:
    """model.train(train), or torchao's rewrite of dropout/BatchNorm ops for exported graphs, which refuse it."""
    if exported:  # exported graphs refuse .train()/.eval(); torchao rewrites their dropout/BN ops instead
        from torchao.quantization.pt2e import move_exported_model_to_eval, move_exported_model_to_train

        (move_exported_model_to_train if train else move_exported_model_to_eval)(model)
    else:
        model.train(train)


def finish(loaded, model: nn.Module, *, freeze_bn: bool, example: torch.Tensor, device: str) -> tuple[nn.Module, nn.Module]:
    """(the INT8 model `convert_pt2e` makes of the trained `model`, the trained weights as a plain float graph),
    on the CPU."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if device != "cpu":
        # Exported graphs may hold device-specific constants: rebuild the prepared graph on the CPU and load the
        # trained weights and quantizer states into it, rather than moving the GPU graph back.
        model = prepare(float_graph(loaded, freeze_bn=freeze_bn), example)
        model.load_state_dict(state)
    set_mode(model, train=False, exported=True)
    float_model = float_graph(loaded, freeze_bn=freeze_bn)
    # The prepared graph keeps the float module's parameter names: the QAT-trained float weights load back.
    float_model.load_state_dict({k: v for k, v in state.items() if k in float_model.state_dict()}, strict=True)
    converted = convert_pt2e(model)
    drop_unused_tensors(converted)
    return converted, float_model.eval()
