"""Which precision runs fastest here: ``choose_precision(device, requested)`` -> (dtype name, reason).

"auto" picks bf16 on a CUDA device with bf16 support and on a CPU whose oneDNN uses AMX, else fp32. The
CPU flag alone is not enough: ONEDNN_MAX_CPU_ISA (read by oneDNN at first use) can cap AMX away while
/proc/cpuinfo still lists amx_bf16, and without AMX a bf16 convolution is slower than fp32 (1.5x on
AVX-512 BF16, 6x on AVX2). So where the flag says AMX, a short timed probe (one small channels-last conv,
fp32 vs bf16, a few reps, once per process) decides. An explicit bf16 that measured slower runs, with one
warning saying by how much.
"""
from __future__ import annotations

import functools
import logging
import time

import torch

log = logging.getLogger(__name__)

CHOICES = ("auto", "fp32", "bf16")


def cpu_flags() -> set[str]:
    """The CPU feature flags the kernel reports (empty where /proc/cpuinfo is missing)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@functools.lru_cache(maxsize=1)
def probe_cpu_conv(reps: int = 5) -> dict[str, float]:
    """Best-of-``reps`` seconds of one 3x3 conv, 16x64x32x32 channels-last, forward, in fp32 and in bf16.

    Cached per process: oneDNN's ISA is fixed at its first use, so the answer cannot change later."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 64, 32, 32, generator=g).contiguous(memory_format=torch.channels_last)
    w = torch.randn(64, 64, 3, 3, generator=g).contiguous(memory_format=torch.channels_last)
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        xd, wd = x.to(dtype), w.to(dtype)
        with torch.no_grad():
            torch.nn.functional.conv2d(xd, wd, padding=1)  # warm-up: oneDNN builds its kernel here
            best = float("inf")
            for _ in range(reps):
                t0 = time.perf_counter()
                torch.nn.functional.conv2d(xd, wd, padding=1)
                best = min(best, time.perf_counter() - t0)
        out[name] = best
    return out


def decide_precision(requested: str, device_type: str, cuda_bf16: bool = False, cpu_amx: bool = False,
                     probe: dict[str, float] | None = None) -> tuple[str, str, float | None]:
    """(precision, reason, bf16/fp32 time ratio or None) from capabilities alone; no hardware is touched.

    ``probe`` is probe_cpu_conv()'s timings where the CPU flags say AMX (None: not measured)."""
    if requested not in CHOICES:
        raise ValueError(f"precision must be one of {CHOICES}, got {requested!r}")
    ratio = probe["bf16"] / probe["fp32"] if probe else None
    if device_type == "cuda":
        if requested == "auto":
            return ("bf16", "CUDA device with bf16 support", None) if cuda_bf16 else \
                ("fp32", "CUDA device without bf16 support", None)
        return requested, "as configured", None
    if requested != "auto":
        return requested, "as configured", ratio
    if not cpu_amx:
        return "fp32", "CPU without AMX (bf16 convolutions are slower than fp32 there)", None
    if ratio is None:
        return "bf16", "CPU with AMX", None
    if ratio < 1.0:
        return "bf16", f"CPU with AMX: bf16 conv measured {1 / ratio:.1f}x faster than fp32", ratio
    return "fp32", (f"CPU lists AMX but bf16 conv measured {ratio:.1f}x slower than fp32 "
                    "(ONEDNN_MAX_CPU_ISA caps it?)"), ratio


_logged: set[tuple[str, str]] = set()


def choose_precision(device: torch.device | str, requested: str = "auto", what: str = "precision",
                     ) -> tuple[str, str]:
    """(dtype name, reason) for ``requested`` on ``device``; logged once per (what, choice) per process.

    ``what`` names the config key in the log line and in the slower-bf16 warning."""
    dev = torch.device(device)
    cuda_bf16 = dev.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    amx = dev.type == "cpu" and "amx_bf16" in cpu_flags()
    # measured only where it can change the answer: auto on an AMX CPU, or an explicit bf16 on a CPU
    measure = dev.type == "cpu" and ((requested == "auto" and amx) or requested == "bf16")
    name, reason, ratio = decide_precision(requested, dev.type, cuda_bf16, amx,
                                           probe_cpu_conv() if measure else None)
    key = (what, name)
    if key not in _logged:
        _logged.add(key)
        log.info("%s: %s (%s)", what, name, reason)
        if requested == "bf16" and ratio is not None and ratio > 1.0:
            log.warning("%s=bf16 on this CPU: a bf16 convolution measured %.1fx slower than fp32; set %s=auto "
                        "(or fp32) to run faster", what, ratio, what)
    return name, reason


__all__ = ["CHOICES", "choose_precision", "decide_precision", "probe_cpu_conv", "cpu_flags"]
