"""The one CPU capability check the INT8 recipes are chosen from: detection from the CPU's flags, and the
INT8EVAL_CPU override that forces each path (the backends' tests use it to exercise every path on any machine)."""

from __future__ import annotations

import pytest

from int8eval import environment
from int8eval.environment import CPU_OVERRIDES, CpuArch, capabilities_from, cpu_capabilities
from int8eval.errors import ConfigError

# (machine, flags) -> (arch, int8 sums saturate, BF16 hardware, AMX, description): written out by hand, not derived
# from the code under test.
CPUS = {
    "EPYC Rome (AVX2)": (("x86_64", {"avx2", "fma"}), (CpuArch.x86, True, False, False, "x86 without VNNI/AMX")),
    "Cascade Lake": (("x86_64", {"avx2", "avx512f", "avx512_vnni"}), (CpuArch.x86, False, False, False, "x86 with AVX512-VNNI")),
    "Alder Lake": (("x86_64", {"avx2", "avx_vnni"}), (CpuArch.x86, False, False, False, "x86 with AVX-VNNI")),
    "Sapphire Rapids": (
        ("x86_64", {"avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16"}),
        (CpuArch.x86, False, True, True, "x86 with AMX-INT8"),
    ),
    "Graviton3": (("aarch64", {"asimd", "asimddp", "bf16", "i8mm"}), (CpuArch.arm, False, True, False, "Arm")),
    "Apple M1": (("arm64", set()), (CpuArch.arm, False, False, False, "Arm")),
    "x86, flags unknown": (("AMD64", set()), (CpuArch.x86, True, False, False, "x86 without VNNI/AMX")),
}


@pytest.mark.parametrize("cpu", CPUS)
def test_capabilities_from_the_cpu_flags(cpu):
    (machine, flags), (arch, saturates, bf16, amx, text) = CPUS[cpu]
    caps = capabilities_from(machine, flags)
    assert (caps.arch, caps.int8_saturates, caps.bf16, caps.amx) == (arch, saturates, bf16, amx)
    assert caps.describe() == text and caps.forced is None


# INT8EVAL_CPU value -> (arch, int8 sums saturate, BF16 hardware, AMX)
FORCED = {
    "avx2": (CpuArch.x86, True, False, False),
    "vnni": (CpuArch.x86, False, False, False),
    "amx": (CpuArch.x86, False, True, True),
    "arm": (CpuArch.arm, False, False, False),
}


@pytest.mark.parametrize("value", FORCED)
def test_the_override_forces_each_path(value, monkeypatch):
    monkeypatch.setenv("INT8EVAL_CPU", value.upper())  # case does not matter
    caps = cpu_capabilities()
    assert (caps.arch, caps.int8_saturates, caps.bf16, caps.amx) == FORCED[value]
    assert caps.forced == value and caps.describe().endswith(f"(INT8EVAL_CPU={value})")
    assert set(CPU_OVERRIDES) == set(FORCED)  # a new path needs its row here


def test_without_the_override_the_cpu_is_detected(monkeypatch):
    monkeypatch.setenv("INT8EVAL_CPU", "")
    assert cpu_capabilities() == environment._detected() and cpu_capabilities().forced is None


def test_a_bad_override_names_the_value_and_the_choices(monkeypatch):
    monkeypatch.setenv("INT8EVAL_CPU", "sse2")
    with pytest.raises(ConfigError, match=r"INT8EVAL_CPU='sse2' is not one of avx2, vnni, amx, arm"):
        cpu_capabilities()
    assert "INT8EVAL_CPU='sse2'" in environment.environment()["int8_cpu"]["error"]  # a run's record says so too


def test_the_run_environment_records_the_path(monkeypatch):
    monkeypatch.setenv("INT8EVAL_CPU", "amx")
    recorded = environment.environment()["int8_cpu"]
    assert recorded["forced"] == "amx" and recorded["description"] == "x86 with AMX-INT8 (INT8EVAL_CPU=amx)"
