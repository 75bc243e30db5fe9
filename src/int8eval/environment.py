"""The machine and software a run used: library versions, CPU model and its INT8/BF16 instruction sets, and the
one capability check (`cpu_capabilities`) from which every backend picks its INT8 recipe."""

from __future__ import annotations

import functools
import importlib.metadata
import os
import platform
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from int8eval.errors import ConfigError

LIBRARIES = ("int8eval", "torch", "torchvision", "torchao", "timm", "numpy", "onnx", "onnxruntime", "openvino", "nncf", "tensorrt")
ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")
INT8_DOT_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})  # int8 dot products without int16 saturation
BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
_X86_MACHINES = ("x86_64", "amd64", "x86", "i386", "i686")
_ARM_MACHINES = ("aarch64", "arm64")
CPU_OVERRIDE_VAR = "INT8EVAL_CPU"


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
        elif key.strip() in ("flags", "Features"):  # "Features" on Arm
            flags = set(value.split())
    return {
        "model": model,
        "logical_cores": os.cpu_count(),
        "isa": {f: f in flags for f in ISA_FLAGS},
        "int8_acceleration": bool(flags & INT8_DOT_FLAGS),
        "bf16_acceleration": bool(flags & BF16_FLAGS),
    }


class CpuArch(str, Enum):
    x86 = "x86"
    arm = "arm"
    other = "other"


class CpuCapabilities(BaseModel):
    """What the CPU's INT8 and BF16 kernels can do: the one fact every backend's INT8 recipe is chosen from."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    arch: CpuArch
    # int8 dot products that do not saturate: x86 with AVX512-VNNI, AVX-VNNI or AMX-INT8; Arm (its int8 dot products
    # and widening multiplies accumulate in 32 bits). Without them x86 u8 x s8 kernels (oneDNN, ONNX Runtime) add
    # pairs of products in saturating int16 (vpmaddubsw: 255 * 127 * 2 > 32767): measured on an AVX2-only EPYC,
    # EfficientNet-Lite0 INT8 lost 5 to 9 points of top-1 agreement with FP32. Backends then pick exact kernels,
    # 7-bit activations or 7-bit weights.
    exact_int8: bool
    bf16: bool  # BF16 hardware: avx512_bf16 / amx_bf16 (x86), bf16 (Arm)
    amx: bool  # AMX-INT8 tiles
    isa: tuple[str, ...] = ()  # the instruction sets of note behind it, for the description
    forced: str | None = None  # the INT8EVAL_CPU value that set this, None when detected

    @property
    def int8_saturates(self) -> bool:
        """x86 without VNNI/AMX: u8 x s8 int16 pair sums saturate."""
        return self.arch is CpuArch.x86 and not self.exact_int8

    def describe(self) -> str:
        """E.g. "x86 with AVX512-VNNI", "x86 without VNNI/AMX (INT8EVAL_CPU=avx2)": the reason a recipe cites."""
        if self.arch is CpuArch.x86:
            found = [f for f in ("amx_int8", "avx512_vnni", "avx_vnni") if f in self.isa]
            text = f"x86 with {_ISA_NAMES[found[0]]}" if found else "x86 without VNNI/AMX"
        else:
            text = "Arm" if self.arch is CpuArch.arm else f"a {platform.machine() or 'non-x86'} CPU"
        return text + (f" ({CPU_OVERRIDE_VAR}={self.forced})" if self.forced else "")


_ISA_NAMES = {"amx_int8": "AMX-INT8", "avx512_vnni": "AVX512-VNNI", "avx_vnni": "AVX-VNNI"}

# INT8EVAL_CPU: force each path (tests; a user reproducing another machine's recipe). It decides the INT8 recipes
# only; what the hardware runs, and so speed and BF16 availability, stays the machine's.
CPU_OVERRIDES: dict[str, CpuCapabilities] = {
    "avx2": CpuCapabilities(arch=CpuArch.x86, exact_int8=False, bf16=False, amx=False, isa=("avx2",)),
    "vnni": CpuCapabilities(arch=CpuArch.x86, exact_int8=True, bf16=False, amx=False, isa=("avx2", "avx512_vnni")),
    "amx": CpuCapabilities(
        arch=CpuArch.x86, exact_int8=True, bf16=True, amx=True,
        isa=("avx2", "avx512_vnni", "avx512_bf16", "amx_int8", "amx_bf16"),
    ),
    "arm": CpuCapabilities(arch=CpuArch.arm, exact_int8=True, bf16=False, amx=False),
}


def cpu_capabilities() -> CpuCapabilities:
    """This CPU's INT8/BF16 capabilities, or those `INT8EVAL_CPU` (avx2, vnni, amx, arm) forces.

    Raises ConfigError for any other value of `INT8EVAL_CPU`."""
    forced = os.environ.get(CPU_OVERRIDE_VAR, "").strip().lower()
    if not forced:
        return _detected()
    if forced not in CPU_OVERRIDES:
        raise ConfigError(
            f"{CPU_OVERRIDE_VAR}={forced!r} is not one of {', '.join(CPU_OVERRIDES)}; "
            f"unset it to detect the CPU"
        )
    return CPU_OVERRIDES[forced].model_copy(update={"forced": forced})


@functools.cache
def _detected() -> CpuCapabilities:
    return capabilities_from(platform.machine(), _isa_flags())


def capabilities_from(machine: str, flags: set[str] | frozenset[str]) -> CpuCapabilities:
    """The capabilities of a CPU from its machine name (`platform.machine()`) and feature flags (/proc/cpuinfo)."""
    machine = machine.lower()
    if machine in _X86_MACHINES:
        # Flags unknown (no /proc/cpuinfo, no torch): saturating assumed; exact kernels are correct everywhere.
        return CpuCapabilities(
            arch=CpuArch.x86, exact_int8=bool(flags & INT8_DOT_FLAGS), bf16=bool(flags & BF16_FLAGS),
            amx="amx_int8" in flags, isa=tuple(f for f in ISA_FLAGS if f in flags),
        )
    arch = CpuArch.arm if machine in _ARM_MACHINES else CpuArch.other
    return CpuCapabilities(arch=arch, exact_int8=True, bf16="bf16" in flags, amx=False)


def _isa_flags() -> set[str]:
    """The CPU's feature flags: /proc/cpuinfo on Linux, else PyTorch's cpuinfo (same names for the x86 flags)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    try:
        import torch

        return {k for k, on in torch.cpu.get_capabilities().items() if on is True}
    except Exception:  # noqa: BLE001 - an old torch without it: cannot tell
        return set()


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run PyTorch with `threads` intra-op threads inside the block, restored after it (no-op when None)."""
    if threads is None:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def environment() -> dict:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    try:  # what the INT8 recipes were chosen for (detected, or forced by INT8EVAL_CPU)
        int8_cpu = {**cpu_capabilities().model_dump(mode="json"), "description": cpu_capabilities().describe()}
    except ConfigError as e:
        int8_cpu = {"error": str(e)}
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "libraries": library_versions(),
        "cpu": cpu_info(),
        "int8_cpu": int8_cpu,
        "gpu": gpu,
        "torch_threads": torch.get_num_threads(),
    }
