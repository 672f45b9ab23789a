"""What this machine's processors can do fast: the CPU's matrix units and CUDA's bf16, as plain dicts.

The bottom layer (imports torch and the standard library only), so the doctor and any precision choice
can ask the same question the same way. ``ONEDNN_MAX_CPU_ISA`` caps the instructions oneDNN may use
(``AVX512_CORE_BF16`` or ``AVX2`` turn AMX off even on a Sapphire Rapids): a unit above the cap counts as
absent, because bf16 matmuls would not run on it.
"""
from __future__ import annotations

import os
from pathlib import Path

ISA_CAP_ENV = "ONEDNN_MAX_CPU_ISA"


def cpu_flags(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> set[str]:
    """The first processor's feature flags (empty where /proc/cpuinfo does not exist, e.g. macOS)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


def isa_allows(unit: str, cap: str | None) -> bool:
    """Whether oneDNN under ``ONEDNN_MAX_CPU_ISA=cap`` may use ``unit`` ("amx", "avx512_bf16", "avx2").
    oneDNN's ISA names grow with the unit they add (AVX2 < AVX512_CORE < AVX512_CORE_BF16 < AVX512_CORE_AMX;
    AVX10_1_512 = AVX512_CORE_FP16, which includes bf16)."""
    cap = (cap or "").strip().upper()
    if cap in ("", "ALL", "DEFAULT"):
        return True
    if unit == "amx":
        return "AMX" in cap
    if unit == "avx512_bf16":
        return "AMX" in cap or "BF16" in cap or "FP16" in cap or cap.startswith("AVX10")
    if unit == "avx2":
        return cap not in ("SSE41", "AVX")
    raise ValueError(f"unknown unit {unit!r}")


def cpu_matrix_units(flags: set[str] | None = None, cap: str | None = None) -> dict:
    """{"amx", "avx512_bf16", "avx2": usable by oneDNN here (present and under the cap), "isa_cap": the cap
    or None, "torch_isa": the vector ISA torch's own kernels picked (torch.backends.cpu)}."""
    import torch

    flags = cpu_flags() if flags is None else flags
    cap = os.environ.get(ISA_CAP_ENV) if cap is None else cap
    try:
        amx_hw = bool(torch.cpu._is_amx_tile_supported())  # asks the CPU and the kernel (XFEATURE permission)
    except (AttributeError, RuntimeError):
        amx_hw = "amx_tile" in flags
    present = {"amx": amx_hw,
               "avx512_bf16": "avx512_bf16" in flags,
               "avx2": "avx2" in flags or torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")}
    out = {unit: bool(have and isa_allows(unit, cap)) for unit, have in present.items()}
    out.update(isa_cap=cap or None, torch_isa=torch.backends.cpu.get_cpu_capability())
    return out


def cuda_bf16() -> bool:
    """bf16 at full speed on the first visible GPU (compute capability 8.0+: A100, H100, ...)."""
    import torch

    if not torch.cuda.is_available():
        return False
    major, _ = torch.cuda.get_device_capability(0)
    return major >= 8


def device_capabilities() -> dict:
    """cpu_matrix_units() plus "cuda_bf16" and "cuda_devices" (GPUs torch sees)."""
    import torch

    out = cpu_matrix_units()
    out.update(cuda_bf16=cuda_bf16(), cuda_devices=torch.cuda.device_count() if torch.cuda.is_available() else 0)
    return out


def preferred_precision(caps: dict, device: str) -> str:
    """bf16 where the device multiplies bf16 in hardware (a GPU of compute capability 8+, a CPU with AMX:
    ~3x fp32 measured on AMX); fp32 elsewhere (AVX-512 BF16 alone converts, but gains little)."""
    if device == "cuda":
        return "bf16" if caps.get("cuda_bf16") else "fp32"
    return "bf16" if caps.get("amx") else "fp32"
