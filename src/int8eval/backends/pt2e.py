"""What the PyTorch builders share around torch.export and PT2E (torchao): giving each call of a reused module its
own copy, exporting with a dynamic batch, feeding calibration batches, saving the program, and dropping the FP32
tensors `convert_pt2e` leaves behind. Used by `torch_backend` (PTQ) and `qat` (QAT)."""

from __future__ import annotations

import copy
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from torch import nn

from int8eval.backends.base import CalibrationData


def untie_reused_modules(model: nn.Module) -> nn.Module:
    """Give every call of a module that `forward` calls more than once its own copy; outputs are identical.

    PT2E's X86InductorQuantizer groups graph nodes by the module they came from, so a module used at several
    places (torchvision's Bottleneck calls `self.relu` three times) becomes one partition with several outputs
    and `prepare_pt2e` fails with "Input partition has more than one output node". Returns `model` itself when
    nothing is reused, else an FX GraphModule over a deep copy (the caller's model is not touched). Modules with
    parameters are copied too (tied weights become separate, equal tensors). Models that torch.fx cannot trace
    are returned unchanged.
    """
    try:
        gm = torch.fx.symbolic_trace(copy.deepcopy(model))
    except Exception:  # noqa: BLE001 - FX raises many types for untraceable Python; export may still work
        return model
    uses = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    if not any(count > 1 for count in uses.values()):
        return model
    existing = {name for name, _ in gm.named_modules()}
    seen: Counter[str] = Counter()
    for node in gm.graph.nodes:
        if node.op != "call_module" or uses[node.target] < 2:
            continue
        seen[node.target] += 1
        if seen[node.target] == 1:  # the first use keeps the original module
            continue
        k = seen[node.target] - 1
        while f"{node.target}_use{k}" in existing:
            k += 1
        name = f"{node.target}_use{k}"
        existing.add(name)
        gm.add_submodule(name, copy.deepcopy(gm.get_submodule(node.target)))
        # torch.export takes the module path of each call from this metadata (the tracer recorded the old one).
        stack = node.meta.get("nn_module_stack")
        if stack:
            node.meta["nn_module_stack"] = type(stack)(
                (name, (name, cls)) if fqn == node.target else (key, (fqn, cls)) for key, (fqn, cls) in stack.items()
            )
        node.target = name
    gm.recompile()
    return gm



def calibrate(prepared, calib: CalibrationData) -> None:
    """Feed every calibration batch through a model with observers."""
    with torch.no_grad():
        for batch in calib:
            prepared(torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)))



def export_program(module: nn.Module, example: torch.Tensor):
    """`torch.export` of `module` with a dynamic batch dimension (`example`: a batch of at least 2)."""
    batch = torch.export.Dim("batch")
    return torch.export.export(module, (example,), dynamic_shapes=({0: batch},))


def save_program(module: nn.Module, example: torch.Tensor, path: Path) -> Path:
    """Export `module` (dynamic batch) and save the program to `path` (a .pt2), without the example inputs."""
    program = export_program(module, example)
    program.example_inputs = None  # else the .pt2 carries the example images too
    torch.export.save(program, path)
    return path



def drop_unused_tensors(gm: torch.fx.GraphModule) -> None:
    """convert_pt2e leaves the FP32 weights on the module beside their INT8 copies; drop what the graph no
    longer reads, so the saved model holds INT8 weights only."""
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name, _ in [*gm.named_parameters(), *gm.named_buffers()]:
        if name not in used:
            owner, _, leaf = name.rpartition(".")
            delattr(gm.get_submodule(owner) if owner else gm, leaf)
    gm.delete_all_unused_submodules()

