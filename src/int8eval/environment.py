"""The machine and software a run used: library versions, CPU model and its INT8/BF16 instruction sets."""

from __future__ import annotations

import functools
import importlib.metadata
import platform
import sys
from pathlib import Path

LIBRARIES = ("int8eval", "torch", "torchvision", "torchao", "timm", "numpy", "onnx", "onnxruntime", "openvino", "nncf", "tensorrt")
ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")
INT8_DOT_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})  # int8 dot products without int16 saturation
_X86_MACHINES = ("x86_64", "amd64", "x86", "i386", "i686")


def library_versions() -> dict[str, str]:
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def cpu_info(cpuinfo: str | None = None) -> dict:
    """CPU model and the instruction sets that matter for INT8/BF16 (from /proc/cpuinfo on Linux)."""
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        cpuinfo = path.read_text() if path.exists() else ""
    model, flags = platform.processor() or platform.machine(), set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            model = value.strip()
        elif key.strip() == "flags":
            flags = set(value.split())
    import os

    return {
        "model": model,
        "logical_cores": os.cpu_count(),
        "isa": {f: f in flags for f in ISA_FLAGS},
        "int8_acceleration": bool(flags & INT8_DOT_FLAGS),
        "bf16_acceleration": bool(flags & {"avx512_bf16", "amx_bf16"}),
    }


@functools.cache
def int8_dot_saturates() -> bool:
    """True on an x86 CPU without VNNI/AMX int8 instructions (or when that cannot be told).

    There u8 x s8 kernels (oneDNN, ONNX Runtime's default) multiply with vpmaddubsw, whose int16 pair sums
    saturate: measured on an AVX2-only EPYC, EfficientNet-Lite0 INT8 lost 5 to 9 points of top-1 agreement with
    FP32. Backends then pick exact kernels or 7-bit weights. ARM's int8 dot products do not saturate.
    """
    if platform.machine().lower() not in _X86_MACHINES:
        return False
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True  # cannot tell: exact kernels / 7-bit weights are correct everywhere, only slower or less precise
    return not cpu_info(cpuinfo)["int8_acceleration"]


def environment() -> dict:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "libraries": library_versions(),
        "cpu": cpu_info(),
        "gpu": gpu,
        "torch_threads": torch.get_num_threads(),
    }
