"""Counterfactual ImageNet as a sampler for the generation engine.

Per sample, everything comes from the sample's seed (``SampleRef.seed``):
  u       = truncated_noise(seed=[seed]): truncation * truncnorm(-2, 2), one vector SHARED by the three
            mechanisms, as in the authors' generation;
  classes = imagenet_labels.draw_classes (by ``mode``: random, best_classes, fixed_classes).

Batch independence. BigGAN's batch norm reads stored statistics and U²-Net runs in eval mode, so a sample
does not depend on its batch mathematically; in floating point it does: on CPU, composing a batch of 4
differs from four batches of 1 by ~1e-7 (matrix kernels sum in another order), and so does the thread
count. Enough to flip a uint8 pixel now and then, hence the JPEG bytes. So the model never sees the
engine's batches: samples ``[k*F, (k+1)*F)`` of a shard (``F = forward_batch``, aligned on the index) always
run as ONE forward batch, on a fixed CPU thread count, whatever the engine's batch size, the worker count,
the backend, or ``regenerate``. The last group of a shard is computed whole even where the shard ends inside
it (a few wasted samples unless shard_size is a multiple of F) so that it never changes. The last few groups
are cached, so engine batches that cut a group cost nothing extra. ``forward_batch``, the device type and the
library versions are part of the sampler's provenance: change them and the bytes may change at the last bit
(the engine refuses to mix such shards in one folder). On CUDA, cuDNN autotuning is off during a forward;
different GPU models or CUDA libraries may still round differently, and the GPU model is not recorded, so
keep one kind of GPU per output folder when bytes must match.

Images. uint8 = round((clamp(x, -1, 1) + 1) * 127.5) ("fixed", the default): invertible
(x = u8 / 127.5 - 1, within 1/255) and the same for every image, so a dark or low-contrast counterfactual
stays dark or low-contrast, as real photos do. The authors saved with torchvision's
``save_image(normalize=True)``, which stretches EACH image to its own min..max: contrast then varies from
image to image with the extreme pixels, and values can no longer be mapped back to the generator's
output. ``normalize="minmax"`` reproduces their mapping bit for bit, for paper parity.
"""
from __future__ import annotations

import collections
import contextlib
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
import torch

from cgn_dist.data.pixels import image_u8 as _image_u8
from cgn_dist.data.pixels import mask_u8 as _mask_u8
from cgn_dist.data.shards import encode_jpeg, encode_png
from cgn_dist.errors import InputError
from cgn_dist.generate.imagenet.labels import check_classes, class_name, draw_classes
from cgn_dist.generate.imagenet.weights import build_generation_model, sha256_of
from cgn_dist.sharding.plan import SampleRef, ShardSpec, sample_seed
from cgn_dist.precision import resolve_precision
from cgn_dist.generate.speed import (check_precision, compile_forward, jpeg_encoder_used, nvjpeg_encode,
                                        prepare_model, to_host)
from cgn_dist.sharding.workers import resolve_device

if TYPE_CHECKING:
    from cgn_dist.generate.imagenet.factory import ImagenetCounterfactualFactory

log = logging.getLogger(__name__)

SAMPLER_NAME = "imagenet_counterfactual"
_CACHE_GROUPS = 4


# --- the sampler ------------------------------------------------------------------------------------------

@dataclass
class _Group:
    composite: np.ndarray  # F x H x W x 3 uint8
    classes: list[tuple[int, int, int]]
    seeds: list[int]
    mask_mean: list[float]
    layers: dict[str, np.ndarray] = field(default_factory=dict)  # mask (F x H x W), fg, bg
    encoded: dict[str, list[bytes]] = field(default_factory=dict)  # nvJPEG bytes: composite, fg, bg


class ImagenetCounterfactualSampler:
    """Overlap (``overlap=True``): every forward runs on ONE compute thread, in submission order; while the
    engine encodes and writes the samples of group k, that thread already computes group k+1 of the same shard
    (known from ``begin_shard``). Encoding runs on ``encode_threads`` threads (Pillow releases the GIL). The
    arithmetic of each group is the same as on the sequential path, so are the bytes."""

    coverage_keys = ("shape_cls", "texture_cls", "bg_cls")

    def __init__(self, cfg: ImagenetCounterfactualFactory):
        from cgn_dist import __version__

        self.cfg = cfg
        self.device = torch.device(resolve_device(cfg.device))  # here, in the worker: not on the driver
        # auto resolved here, for this worker's device; the provenance records the answer, so a folder made
        # in bf16 on one machine is not continued in fp32 on another (the engine refuses the mix)
        self.precision = resolve_precision(cfg.precision, self.device, "generate.precision")
        self.dtype = check_precision(self.precision, self.device.type)
        if cfg.jpeg_encoder == "nvjpeg" and self.device.type != "cuda":
            raise InputError("generate.jpeg_encoder=nvjpeg encodes on the GPU: this worker runs on "
                             f"{self.device.type}; use jpeg_encoder=pil")
        # The encoder that will really run (the setting alone is not proof: on CPU tensors torchvision's
        # "GPU" encoder silently runs libjpeg): probed on an image made as every image is.
        self.jpeg_encoder = cfg.jpeg_encoder
        if cfg.jpeg_encoder == "nvjpeg":
            self.jpeg_encoder = jpeg_encoder_used(_image_u8(torch.zeros(1, 3, 2, 2, device=self.device),
                                                            cfg.normalize))
        with self._threads():
            self.model, self.weights_file = build_generation_model(cfg.checkpoint, cfg.biggan, cfg.u2net,
                                                                   cfg.cache_dir, cfg.model_seed,
                                                                   cfg.u2net_align_corners)
            # auto: fused, unless with_recorded pinned a folder's package blocks
            self.blocks = "fused" if cfg.blocks == "auto" else cfg.blocks
            prepare_model(self.model, self.device, self.precision, cfg.channels_last, fused=self.blocks == "fused")
        self.model.requires_grad_(False)
        self.n_classes = self.model.n_classes
        check_classes(cfg.mode, cfg.classes, self.n_classes)
        self.sha256 = sha256_of(self.weights_file) if self.weights_file is not None else None
        self.version = __version__
        self._cache: collections.OrderedDict[tuple[int, int, int], Future] = collections.OrderedDict()
        self._shard_n: dict[tuple[int, int], int] = {}
        self._compute_pool = ThreadPoolExecutor(1, thread_name_prefix="cgn-forward") if cfg.overlap else None
        self._encode_pool = (ThreadPoolExecutor(cfg.encode_threads, thread_name_prefix="cgn-encode")
                             if cfg.encode_threads > 1 else None)
        self._generate, self.forward_kind = compile_forward(self.model.generate, self._warmup, cfg.compile)
        if self.weights_file is None:
            log.warning("no CGN checkpoint: the mechanisms are %s BigGAN copies (seed %d): for tests and timing",
                        cfg.biggan, cfg.model_seed)

    def info(self) -> dict[str, Any]:
        import PIL

        c = self.cfg
        weights = str(self.weights_file) if self.weights_file else f"random init {c.biggan} seed {c.model_seed}"
        return {"sampler": SAMPLER_NAME, "checkpoint_sha256": self.sha256, "weights": weights,
                "mode": c.mode, "classes": c.classes, "truncation": c.truncation, "n_classes": self.n_classes,
                "image_size": self.model.image_size, "image_format": c.image_format,
                "jpeg_quality": c.jpeg_quality if c.image_format == "jpg" else None,
                "normalize": c.normalize, "save_layers": c.save_layers, "forward_batch": c.forward_batch,
                "num_threads": c.num_threads, "device": self.device.type, "torch": torch.__version__,
                "pillow": PIL.__version__, "cgn_dist": self.version, "precision": self.precision,
                "channels_last": c.channels_last, "forward": self.forward_kind,
                "jpeg_encoder": self.jpeg_encoder if c.image_format == "jpg" else None,
                **({"blocks": "fused"} if self.blocks == "fused" else {}),  # absent: the package's blocks
                # only when not the default, so folders written before the option existed stay resumable
                **({} if c.u2net_align_corners else {"u2net_align_corners": False})}

    # --- numerics -----------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _threads(self) -> Iterator[None]:
        old = torch.get_num_threads()
        if self.cfg.num_threads:
            torch.set_num_threads(self.cfg.num_threads)
        try:
            yield
        finally:
            torch.set_num_threads(old)

    @contextlib.contextmanager
    def _numerics(self) -> Iterator[None]:
        """Fixed CPU threads; on CUDA no autotuning (it may pick other kernels in another process)."""
        cudnn = torch.backends.cudnn
        saved = (cudnn.benchmark, cudnn.deterministic)
        cudnn.benchmark, cudnn.deterministic = False, True
        try:
            with self._threads():
                yield
        finally:
            cudnn.benchmark, cudnn.deterministic = saved

    def _call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` where forwards run: the compute thread with overlap, else here."""
        return self._compute_pool.submit(fn).result() if self._compute_pool is not None else fn()

    @torch.inference_mode()
    def _forward(self, fn: Callable[..., Any], u: torch.Tensor, y_shape: torch.Tensor, y_text: torch.Tensor,
                 y_bg: torch.Tensor) -> dict[str, torch.Tensor]:
        d, dt = self.device, self.dtype
        with self._numerics():
            return fn(u.to(d, dt), y_shape.to(d, dt), y_text.to(d, dt), y_bg.to(d, dt),
                      truncation=self.cfg.truncation, return_layers=True)

    def _warmup(self, fn: Callable[..., Any]) -> None:
        from cgn_dist.models.biggan import class_vector

        f = self.cfg.forward_batch
        y = class_vector([0] * f, self.n_classes)
        self._call(lambda: self._forward(fn, torch.zeros(f, self.model.z_dim), y, y, y))

    def forward(self, u: torch.Tensor, y_shape: torch.Tensor, y_text: torch.Tensor, y_bg: torch.Tensor
                ) -> dict[str, torch.Tensor]:
        """One forward batch (premask, mask, foreground, background, composite), on the sampler's device, in
        its precision."""
        return self._call(lambda: self._forward(self._generate, u, y_shape, y_text, y_bg))

    def compute(self, seeds: Sequence[int]) -> _Group:
        """The samples of these seeds as ONE forward batch (bytes depend on the batch: see the docstring)."""
        return self._call(lambda: self._compute(seeds))

    def _compute(self, seeds: Sequence[int]) -> _Group:
        from cgn_dist.models.biggan import class_vector, truncated_noise

        triples = [draw_classes(self.cfg.mode, s, self.n_classes, self.cfg.classes) for s in seeds]
        norm = self.cfg.normalize
        # Every torch op under the fixed thread count: in a worker process torch would otherwise start one
        # thread per core for the conversions, and several workers' spinning threads slow each other down.
        with self._numerics():
            u = truncated_noise(len(seeds), self.model.z_dim, self.cfg.truncation, seed=[int(s) for s in seeds])
            ys = [class_vector([t[i] for t in triples], self.n_classes) for i in range(3)]
            out = self._forward(self._generate, u, *ys)
            u8 = {"composite": _image_u8(out["composite"], norm)}
            if self.cfg.save_layers:
                u8.update(mask=_mask_u8(out["mask"]), fg=_image_u8(out["foreground"], norm),
                          bg=_image_u8(out["background"], norm))
            encoded = {}
            if self.cfg.jpeg_encoder == "nvjpeg" and self.cfg.image_format == "jpg":
                for k in ("composite", "fg", "bg"):
                    if k in u8:
                        encoded[k], used = nvjpeg_encode(u8[k], self.cfg.jpeg_quality)
                        if used != self.jpeg_encoder:  # bytes of another encoder than the provenance says
                            raise RuntimeError(f"{k} was JPEG-encoded by {used}, the provenance says "
                                               f"{self.jpeg_encoder}")
            *arrays, mean = to_host([*u8.values(), out["mask"].float().mean(dim=(1, 2, 3))])
        host = dict(zip(u8, arrays))
        return _Group(composite=host.pop("composite"), classes=triples, seeds=[int(s) for s in seeds],
                      mask_mean=[round(float(m), 6) for m in mean], layers=host, encoded=encoded)

    def _submit(self, key: tuple[int, int, int]) -> Future:
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        run_seed, shard_id, g = key
        f = self.cfg.forward_batch
        seeds = [sample_seed(run_seed, shard_id, i) for i in range(g * f, (g + 1) * f)]
        if self._compute_pool is not None:
            fut = self._compute_pool.submit(self._compute, seeds)
        else:
            fut = Future()
            fut.set_result(self._compute(seeds))  # an error raises here and caches nothing
        self._cache[key] = fut
        while len(self._cache) > _CACHE_GROUPS:
            self._cache.popitem(last=False)
        return fut

    def _group(self, run_seed: int, shard_id: int, g: int) -> _Group:
        key = (run_seed, shard_id, g)
        fut = self._submit(key)
        try:
            return fut.result()
        except BaseException:
            if self._cache.get(key) is fut:  # a failed group is computed afresh on the retry
                del self._cache[key]
            raise

    def begin_shard(self, spec: ShardSpec) -> None:
        """Called by the engine before it asks for a shard's samples: the overlap prefetches within it."""
        self._shard_n[(spec.seed, spec.shard_id)] = spec.n

    def clear_cache(self) -> None:
        self._cache.clear()

    # --- encoding ---------------------------------------------------------------------------------------
    def _encode(self, image: np.ndarray, group: _Group | None = None, layer: str = "", pos: int = 0) -> bytes:
        if group is not None and layer in group.encoded:
            return group.encoded[layer][pos]
        if self.cfg.image_format == "png":
            return encode_png(image, compress_level=self.cfg.png_compress_level)
        return encode_jpeg(image, quality=self.cfg.jpeg_quality)

    def _sample_dict(self, group: _Group, pos: int) -> dict[str, Any]:
        s, t, b = group.classes[pos]
        fmt = self.cfg.image_format
        sample: dict[str, Any] = {
            fmt: self._encode(group.composite[pos], group, "composite", pos),
            "json": {"shape_cls": s, "texture_cls": t, "bg_cls": b, "shape_name": class_name(s),
                     "texture_name": class_name(t), "bg_name": class_name(b), "mode": self.cfg.mode,
                     "truncation": self.cfg.truncation, "seed": group.seeds[pos],
                     "mask_mean": group.mask_mean[pos], "checkpoint_sha256": self.sha256,
                     "cgn_dist_version": self.version},
        }
        if group.layers:
            sample["mask.png"] = encode_png(group.layers["mask"][pos], compress_level=self.cfg.png_compress_level)
            sample[f"fg.{fmt}"] = self._encode(group.layers["fg"][pos], group, "fg", pos)
            sample[f"bg.{fmt}"] = self._encode(group.layers["bg"][pos], group, "bg", pos)
        return sample

    def sample(self, refs: list[SampleRef]) -> list[dict[str, Any]]:
        f = self.cfg.forward_batch
        keys = [(ref.run_seed, ref.shard_id, ref.index // f) for ref in refs]
        for key in dict.fromkeys(keys):
            self._submit(key)
        if refs and self._compute_pool is not None:  # the next group of this shard, computed while we encode
            run_seed, shard_id, g = keys[-1]
            n = self._shard_n.get((run_seed, shard_id))
            if n is not None and (g + 1) * f < n:
                self._submit((run_seed, shard_id, g + 1))
        groups = {key: self._group(*key) for key in dict.fromkeys(keys)}
        items = [(groups[key], ref.index % f) for key, ref in zip(keys, refs)]
        if self._encode_pool is not None and len(items) > 1:
            return list(self._encode_pool.map(lambda item: self._sample_dict(*item), items))
        return [self._sample_dict(*item) for item in items]

    def sample_as_batch(self, refs: list[SampleRef]) -> list[dict[str, Any]]:
        """These refs as one forward batch, uncached: what a dry run times. Same schema and sizes as
        ``sample``, but bytes may differ at the last bit unless refs is exactly one forward group."""
        group = self.compute([r.seed for r in refs])
        return [self._sample_dict(group, i) for i in range(len(refs))]

    # --- interpolation ----------------------------------------------------------------------------------
    def interpolate(self, start: Sequence[int], target: int, mechanism: str = "all", midpoints: int = 6,
                    u: torch.Tensor | None = None, seed: int = 0) -> dict[str, Any]:
        """Class interpolation (see imagenet_interp.interpolate)."""
        from cgn_dist.generate.imagenet.interp import interpolate

        return interpolate(self, start, target, mechanism, midpoints, u, seed)

    def close(self) -> None:
        for pool in (self._compute_pool, self._encode_pool):
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
        self._compute_pool = self._encode_pool = None
        self._cache.clear()
        self.model = None

