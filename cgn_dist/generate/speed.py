"""Generation at the hardware's speed: precision, memory layout, torch.compile with a fallback, host copies.

- ``prepare_model``: spectral norm folded into plain weights (computed once in fp32: the hooks otherwise
  recompute every normalised weight on every forward, and in bf16 would do so in bf16), the BigGAN blocks
  optionally fused for inference (generate.blocks; cgn_dist.models.biggan_inference) and U²-Net's BatchNorms
  folded into its convolutions (cgn_dist.models.u2net.fold_batchnorm), then weights and
  buffers cast ONCE to the precision (frozen parts included: teacher-free generation runs the three
  mechanisms and U²-Net only) and convolution weights put in channels-last.
- ``compile_forward``: torch.compile of the forward, warmed up at once (outside any timed region); when
  compiling or the warm-up fails, the eager forward is used and a warning says why and how to silence it.
- ``to_host``: device tensors to numpy through pinned buffers with non-blocking copies and ONE
  synchronisation (CUDA); on CPU a plain view.

The bytes of a sample depend on (precision, compile, channels_last, forward batch, device kind, threads):
the sampler records them all in its provenance, and the engine refuses to mix shards made otherwise.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from cgn_dist.errors import InputError

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16", "fp16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
JPEG_ENCODERS = ("pil", "nvjpeg")

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, from the vendors' data sheets; matched on the
# device name, most specific first. MFU = achieved model FLOP/s / this peak.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200 NVL", 835.0),    # the PCIe card: listed before "H200", which it also contains
    ("H200", 989.0),        # SXM
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),        # SXM
    ("A100", 312.0),        # SXM and PCIe
)


def check_precision(precision: str, device_type: str) -> torch.dtype:
    """The torch dtype of ``precision`` on this device kind; ValueError naming the config key otherwise."""
    if precision not in PRECISIONS:
        raise InputError(f"generate.precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "fp16" and device_type != "cuda":
        raise InputError("generate.precision=fp16 runs on CUDA only (CPU fp16 kernels are slow and partly "
                         "missing); use bf16 on CPU")
    return DTYPES[precision]


def fold_spectral_norm(model: nn.Module) -> int:
    """Replace every spectral-norm hook by its current normalised weight (exactly what the hook computes in
    eval mode: no power iteration). Generation only: the model can no longer be trained. Returns the count."""
    from torch.nn.utils.spectral_norm import SpectralNorm

    found = [(m, h.name) for m in model.modules() for h in list(m._forward_pre_hooks.values())
             if isinstance(h, SpectralNorm)]
    with torch.no_grad():
        for module, name in found:
            torch.nn.utils.remove_spectral_norm(module, name)
    return len(found)


def prepare_model(model: nn.Module, device: torch.device, precision: str = "fp32",
                  channels_last: bool = True, fused: bool = False) -> nn.Module:
    """Fold spectral norm, (fused) convert the BigGAN blocks for inference (cgn_dist.models.biggan_inference,
    before the cast: phase kernels are summed in fp32), then move to ``device`` in ``precision`` (weights cast
    once) and channels-last."""
    dtype = check_precision(precision, device.type)
    fold_spectral_norm(model)
    if fused:
        from cgn_dist.models.biggan_inference import to_inference_blocks
        from cgn_dist.models.u2net import fold_batchnorm

        to_inference_blocks(model)
        fold_batchnorm(model)
    model.to(device=device, dtype=dtype)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def compile_forward(fn: Callable[..., Any], warmup: Callable[[Callable[..., Any]], Any], enabled: bool,
                    ) -> tuple[Callable[..., Any], str]:
    """(forward to use, status): status "compiled", "eager" (not asked) or "eager (compile failed: ...)".

    ``warmup(f)`` runs ``f`` once on inputs of the shapes that will follow, so compilation happens here and
    not inside the first timed or written batch."""
    if not enabled:
        return fn, "eager"
    try:
        compiled = torch.compile(fn, dynamic=False)
        warmup(compiled)
        return compiled, "compiled"
    except Exception as err:  # noqa: BLE001  any compiler failure: fall back, loudly
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        log.warning("generate.compile=true but torch.compile failed (%s: %s); generating with the eager forward "
                    "(its bytes differ from compiled ones at the last bit; the manifest records which). Set "
                    "generate.compile=false to silence this.", type(err).__name__, first)
        try:
            from torch import _dynamo
            _dynamo.reset()
        except Exception:  # noqa: BLE001
            pass
        return fn, f"eager (compile failed: {type(err).__name__})"


def to_host(tensors: Sequence[torch.Tensor]) -> list[np.ndarray]:
    """numpy arrays of these tensors. CUDA: copies into pinned host memory, non-blocking, one stream sync
    for all of them (torch's caching host allocator reuses the pinned blocks)."""
    cuda = [t for t in tensors if t.is_cuda]
    if not cuda:
        return [t.detach().numpy() for t in tensors]
    out = []
    for t in tensors:
        if t.is_cuda:
            buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            buf.copy_(t.detach(), non_blocking=True)
            out.append(buf)
        else:
            out.append(t.detach())
    torch.cuda.current_stream(cuda[0].device).synchronize()
    return [t.numpy() for t in out]


def jpeg_encoder_used(images: torch.Tensor) -> str:
    """The encoder torchvision's encode_jpeg really runs on these images: nvJPEG only for CUDA tensors; CPU
    tensors go to its libjpeg, silently (so provenance must come from here, not from the setting)."""
    return "nvjpeg" if images.is_cuda else "torchvision-cpu"


def nvjpeg_encode(images: torch.Tensor, quality: int) -> tuple[list[bytes], str]:
    """(JPEG bytes, encoder used) of B x H x W x 3 uint8 images with torchvision.io.encode_jpeg: nvJPEG
    for CUDA images (see jpeg_encoder_used).

    Deterministic for one GPU model, driver and nvJPEG version as far as NVIDIA documents it, but NOT the same
    bytes as Pillow's libjpeg (other quantisation rounding and chroma subsampling): the sampler records the
    encoder in its provenance, so the two never mix in one folder."""
    from torchvision.io import encode_jpeg as tv_encode_jpeg

    chw = [img.permute(2, 0, 1).contiguous() for img in images]
    if images.is_cuda:
        # torchvision encodes on its own CUDA stream without waiting for ours: without this wait it may read
        # images whose kernels (the forward, the uint8 conversion, the permutes above) have not finished.
        torch.cuda.current_stream(images.device).synchronize()
    encoded = tv_encode_jpeg(chw, quality=quality)
    return [bytes(e.cpu().numpy().tobytes()) for e in encoded], jpeg_encoder_used(images)


def peak_bf16_tflops(device_name: str) -> float | None:
    """Dense bf16 peak of a known GPU (by name), or None."""
    for key, peak in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return peak
    return None


def count_flops(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> int:
    """FLOPs of one call of ``fn`` as torch counts them (torch.utils.flop_counter: matmuls and convolutions,
    2 per multiply-add; elementwise ops are not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn(*args, **kwargs)
    return int(counter.get_total_flops())
