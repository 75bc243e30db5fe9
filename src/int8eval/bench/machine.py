"""The machine a benchmark ran on: CPU model and instruction sets, GPU, load, and what the hardware cannot accelerate."""

from __future__ import annotations

import os
import sys

from int8eval.environment import cpu_info


def bf16_hardware() -> bool:
    """Whether this CPU runs BF16 natively (AVX512-BF16 or AMX-BF16), so a BF16 baseline is timed unasked.

    Read from the hardware (`cpu_info`), not from `environment.cpu_capabilities()`: INT8EVAL_CPU may force the INT8
    recipes of another CPU, but what this machine's kernels run at what speed stays this machine's.
    Tests override it by monkeypatching this function."""
    return bool(cpu_info()["bf16_acceleration"])


def gpu_name() -> str | None:
    """The first CUDA device's name, or None (also when CUDA is broken: a CPU benchmark must still run)."""
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:  # noqa: BLE001
        return None


def machine_info(cpuinfo: str | None = None, *, gpu: str | None | bool = True) -> dict:
    """CPU model and instruction sets, GPU model, load, and warnings about what the hardware cannot accelerate.

    Args:
        cpuinfo: /proc/cpuinfo text (default: read it).
        gpu: a GPU name, None for none, or True to ask PyTorch.
    """
    cpu = cpu_info(cpuinfo)
    if gpu is True:
        gpu = gpu_name()
    isa = cpu["isa"]
    warnings = []
    if not cpu["int8_acceleration"]:
        have = "AVX512" if isa.get("avx512f") else "AVX2" if isa.get("avx2") else "no AVX2"
        warnings.append(
            f"this CPU ({cpu['model']}) has no INT8 dot-product instructions (no AVX512-VNNI, AVX-VNNI or AMX-INT8; "
            f"it has {have}): INT8 kernels fall back to {have} and are not expected to be much faster than FP32 here; "
            "the speedups below say nothing about a CPU with VNNI/AMX"
        )
    if not cpu["bf16_acceleration"]:
        warnings.append(
            "no BF16 hardware (AVX512-BF16 or AMX-BF16): no BF16 baseline was timed unasked; a BF16 variant asked for "
            "is emulated in software, slower than FP32, and no fair baseline on this machine"
        )
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "cpu": cpu,
        "gpu": gpu,
        "platform": sys.platform,
        "load_avg_1m": load[0] if load else None,
        "warnings": warnings,
    }


def load_warning(load_before: float | None, load_after: float | None, cores: int | None) -> str | None:
    """A warning when other processes kept the CPU busy while timing (1-minute load average above the cores)."""
    loads = [x for x in (load_before, load_after) if x is not None]
    if not loads or not cores:
        return None
    # Our own benchmark keeps up to `cores` threads busy; more than that means someone else competed for the CPU.
    if max(loads) > cores + 0.5:
        return (
            f"the CPU was shared while timing (1-minute load average up to {max(loads):.1f} on {cores} cores): "
            "numbers are noisy and likely pessimistic; rerun on an idle machine"
        )
    return None
