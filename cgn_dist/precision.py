"""Which precision a device runs fastest: ``resolve_precision(requested, device, key)`` -> "fp32" | "bf16".

"auto" means bf16 where the device runs it faster and fp32 everywhere else:
  - CUDA with bf16 support, and a CPU whose oneDNN may use AMX (a bf16 matrix unit): bf16, from the flags;
  - a CPU without AVX-512 BF16 (a laptop, most AMD Zen 2/3): fp32, from the flags (oneDNN emulates bf16
    there: 6-8x slower convolutions);
  - AVX-512 BF16 without AMX: the flags are not enough. A Xeon whose hypervisor hides AMX measured a bf16
    convolution 1.5x *slower* than fp32; an AMD EPYC (Zen 4) measured it 2.0x *faster* (its vdpbf16ps
    does twice fp32's multiply-adds per cycle). There one short timed probe decides (``probe_cpu_conv``:
    a 3x3 convolution forward + backward in both precisions on one thread, interleaved, best of 5 or more, once per process):
    bf16 only when it measures at least BF16_MIN_SPEEDUP times faster.

A timing can answer differently in two processes on a busy machine, and a run's bytes depend on the
answer, so: the margin is wide (the two CPUs measured 0.65x and 2.0x, far either side of 1.25x); the
answer is recorded in the run's config and a generation's provenance, and a resume keeps what was
recorded; the ranks of a DDP or DeepSpeed job take rank 0's (distributed.env.agree_with_rank0, called by
train.run_dir before the run's config is written); generation workers
whose answer differs from the folder's are refused when they start. AMX counts only when oneDNN may use
it: ONEDNN_MAX_CPU_ISA (or the older DNNL_MAX_CPU_ISA), read by oneDNN at its first use, can cap it away
while /proc/cpuinfo still lists amx_bf16.
"""
from __future__ import annotations

import functools
import logging
import os
import time

import torch

log = logging.getLogger(__name__)

BF16_MIN_SPEEDUP = 1.25  # AVX-512 BF16 without AMX: bf16 only when the probe measures it this much faster
CHOICES = ("auto", "fp32", "bf16", "fp16")  # fp16: passed through (CUDA only; checked where it is used)
# oneDNN's ISA names in rising order (its documented ONEDNN_MAX_CPU_ISA values); anything at or above
# AVX512_CORE_BF16 runs bf16 natively, only the AMX ones have the matrix unit
_ISA_ORDER = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI",
              "AVX512_CORE_BF16", "AVX10_1_512", "AVX512_CORE_FP16", "AVX10_1_512_AMX", "AVX512_CORE_AMX",
              "AVX10_1_512_AMX_FP16", "AVX512_CORE_AMX_FP16", "ALL", "DEFAULT")


def onednn_isa_cap() -> str | None:
    """The ISA cap oneDNN reads from the environment (upper-cased), or None when uncapped."""
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")
    cap = (cap or "").strip().upper()
    return None if cap in ("", "ALL", "DEFAULT") else cap


def _cap_allows(cap: str | None, isa: str) -> bool:
    if cap is None:
        return True
    if cap not in _ISA_ORDER:  # an unknown name: oneDNN ignores it and runs uncapped
        return True
    if "AMX" in isa:
        return "AMX" in cap
    return _ISA_ORDER.index(cap) >= _ISA_ORDER.index(isa)


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


def cpu_capabilities(probe: bool = True) -> dict:
    """What this CPU's oneDNN can use: {"amx", "avx512_bf16", "avx2": bool, "isa_cap": str | None,
    "bf16_speedup": float | None}; bf16_speedup (fp32 time / bf16 time of probe_cpu_conv) is measured only
    where the flags leave the choice open (AVX-512 BF16 allowed, AMX not) and ``probe`` asks for it."""
    flags, cap = cpu_flags(), onednn_isa_cap()
    amx = bool(torch.cpu._is_amx_tile_supported()) if hasattr(torch.cpu, "_is_amx_tile_supported") else False
    amx = amx or "amx_bf16" in flags
    caps = {"amx": amx and _cap_allows(cap, "AVX512_CORE_AMX"),
            "avx512_bf16": "avx512_bf16" in flags and _cap_allows(cap, "AVX512_CORE_BF16"),
            "avx2": "avx2" in flags and _cap_allows(cap, "AVX2"),
            "isa_cap": cap, "bf16_speedup": None}
    if probe and caps["avx512_bf16"] and not caps["amx"]:
        t = probe_cpu_conv()
        caps["bf16_speedup"] = round(t["fp32"] / t["bf16"], 3)
    return caps


def device_capabilities(device: torch.device | str) -> dict:
    """The flags the decision reads, for one device: {"type", "cuda_bf16", "amx", "avx512_bf16", ...}."""
    dev = torch.device(device)
    if dev.type == "cuda":
        ok = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return {"type": "cuda", "cuda_bf16": bool(ok)}
    return {"type": dev.type, "cuda_bf16": False, **cpu_capabilities()}


def decide_precision(requested: str, caps: dict, key: str = "precision") -> tuple[str, str]:
    """(precision, reason) from ``requested`` and device_capabilities()'s flags; touches no hardware."""
    if requested not in CHOICES:
        raise ValueError(f"{key} must be one of {', '.join(CHOICES)}, got {requested!r}")
    if requested != "auto":
        return requested, "as configured"
    if caps.get("type") == "cuda":
        return ("bf16", "CUDA device with bf16 support") if caps.get("cuda_bf16") else \
            ("fp32", "CUDA device without bf16 support")
    if caps.get("amx"):
        return "bf16", "CPU with AMX (bf16 matrix unit)"
    speedup = caps.get("bf16_speedup")
    if caps.get("avx512_bf16") and speedup is not None:
        if speedup >= BF16_MIN_SPEEDUP:
            return "bf16", (f"CPU with AVX-512 BF16 and no AMX: a bf16 convolution measured {speedup:.2f}x "
                            f"faster than fp32 here")
        return "fp32", (f"CPU with AVX-512 BF16 and no AMX: a bf16 convolution measured {speedup:.2f}x "
                        f"fp32's speed here, under the {BF16_MIN_SPEEDUP}x that bf16 needs")
    why = f"oneDNN capped at {caps['isa_cap']}" if caps.get("isa_cap") else \
        ("AVX-512 BF16 without AMX" if caps.get("avx512_bf16") else "no AVX-512 BF16 or AMX")
    return "fp32", f"CPU without AMX ({why}: bf16 convolutions are slower than fp32 there)"


@functools.lru_cache(maxsize=1)
def probe_cpu_conv(reps: int = 5, max_rounds: int = 4) -> dict[str, float]:
    """Best seconds of one 3x3 convolution forward + backward (16x64x32x32, channels-last, the shape class
    of CGN-MNIST's and BigGAN's layers) in fp32 and in bf16, the two interleaved rep by rep so a load that
    comes and goes hits both alike (~0.3 s a round of ``reps`` on an AVX-512 core). Minima are kept
    over rounds; another round runs (up to ``max_rounds``) while the ratio is near the margin: on a busy
    machine one round in eight measured 1.09x where quiet ones measure 1.8-2.5x (an EPYC Zen 4 running
    the test suite on both cores, the probe on 2 threads); on one thread, 12 of 12 under that load
    measured 1.83-2.50x. oneDNN's
    ISA is fixed at its first use, so once per process is enough."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 64, 32, 32, generator=g).contiguous(memory_format=torch.channels_last)
    w = torch.randn(64, 64, 3, 3, generator=g).contiguous(memory_format=torch.channels_last)
    pairs = {name: (x.to(dtype).requires_grad_(), w.to(dtype).requires_grad_())
             for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}

    def step(name: str) -> float:
        xd, wd = pairs[name]
        t0 = time.perf_counter()
        y = torch.nn.functional.conv2d(xd, wd, padding=1)
        y.backward(torch.ones_like(y))
        return time.perf_counter() - t0

    # One thread: a multi-threaded kernel waits at its barrier for any thread the OS parked, which on a busy
    # machine adds the same delay to both precisions and pulls the ratio towards 1; the per-core ratio is
    # the machine's (1.93x at 1 thread, 1.92x at 2, on the Zen 4).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name in pairs:  # warm-up: oneDNN builds its kernels here
            step(name)
        best = {name: float("inf") for name in pairs}
        for _ in range(max_rounds):
            for _ in range(reps):
                for name in pairs:
                    best[name] = min(best[name], step(name))
            if not 0.8 <= best["fp32"] / best["bf16"] <= 1.6:  # clearly one side of BF16_MIN_SPEEDUP
                break
    finally:
        torch.set_num_threads(threads)
    return best


def decide_channels_last(caps: dict, precision: str) -> bool:
    """Whether a convolutional network's weights and batches go channels-last (NHWC) on this device, from
    device_capabilities()'s flags alone (the layout changes a convolution's rounding, so it must not
    depend on a timing). CUDA: yes (cuDNN's tensor-core kernels are NHWC; NCHW costs a transpose around
    each one). A CPU whose oneDNN has AVX-512 BF16 but no AMX: yes;
    benchmarks/bench_classifier_step.py (ResNet-50 update, 4 + 4 images at 224 px, 2 threads, an AMD EPYC
    Zen 4) measured channels-last 1.18x and 1.27x faster in fp32, 1.22x and 1.12x in bf16 (uncapped, and
    under ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16). AMX: no until measured (rerun that benchmark on such a CPU).
    AVX2: no; on an AVX2-only EPYC it measured 0.97x and 0.93x in fp32 (no gain) in two runs."""
    if caps.get("type") == "cuda":
        return True
    return bool(caps.get("avx512_bf16") and not caps.get("amx"))


def use_channels_last(device: torch.device | str, precision: str) -> bool:
    """decide_channels_last for ``device`` (``precision``: the resolved one, fp32 or bf16); from the flags, so
    nothing is timed for it."""
    dev = torch.device(device)
    caps = {"type": "cuda"} if dev.type == "cuda" else {"type": dev.type, **cpu_capabilities(probe=False)}
    return decide_channels_last(caps, precision)


LAYOUTS = ("channels_last", "nchw")


def resolve_layout(requested: str, device: torch.device | str, precision: str, recorded: str | None = None) -> str:
    """``invariant.layout``: auto -> what the run being resumed recorded, else use_channels_last's answer for
    ``device`` (flags only); an explicit layout is kept. Logged once per answer."""
    if requested != "auto":
        name, reason = requested, "set"
    elif recorded in LAYOUTS:
        name, reason = recorded, "recorded by the run being resumed"
    else:
        name = "channels_last" if use_channels_last(device, precision) else "nchw"
        reason = (f"auto on {torch.device(device).type}: channels-last where it measured faster (CUDA, AVX-512 BF16 "
                  "without AMX), NCHW elsewhere")
    if ("invariant.layout", "chose", name) not in _said:
        _said.add(("invariant.layout", "chose", name))
        log.info("invariant.layout: %s (%s)", name, reason)
    return name


_said: set[tuple[str, str, str]] = set()


def resolve_precision(requested: str, device: torch.device | str, key: str,
                      recorded: str | None = None) -> str:
    """The concrete precision for config key ``key`` on ``device``; logged once per (key, answer).

    ``recorded``: what an earlier part of the same run resolved to (a resume, possibly on another machine):
    auto keeps it, so the run's bytes do not depend on where each part ran."""
    if requested == "auto" and recorded in ("fp32", "bf16"):
        name, reason = recorded, "recorded by the run being resumed"
    else:
        caps = device_capabilities(device)
        name, reason = decide_precision(requested, caps, key)
        if requested == "bf16" and caps["type"] == "cpu" and not caps.get("amx"):
            speedup = caps.get("bf16_speedup")
            if speedup is None:
                t = probe_cpu_conv()
                speedup = t["fp32"] / t["bf16"]
            if speedup < 1.0 and (key, "slow", name) not in _said:
                _said.add((key, "slow", name))
                log.warning("%s=bf16 on a CPU without AMX: a bf16 convolution measured %.1fx slower than fp32 "
                            "here; %s=auto (or fp32) runs faster", key, 1.0 / speedup, key)
    if (key, "chose", name) not in _said:
        _said.add((key, "chose", name))
        log.info("%s: %s (%s)", key, name, reason)
    return name


__all__ = ["BF16_MIN_SPEEDUP", "CHOICES", "LAYOUTS", "cpu_capabilities", "cpu_flags", "decide_channels_last", "decide_precision",
           "device_capabilities", "onednn_isa_cap", "probe_cpu_conv", "resolve_layout", "resolve_precision", "use_channels_last"]
