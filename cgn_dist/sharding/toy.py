"""A model-free sampler: random images from each sample's seed, in milliseconds.

It exercises the whole engine (tests, smoke runs, dry runs, benchmarks of the writing path) without a
checkpoint. Its fault injection (``crash_on_key``) lets one check on a real cluster that a worker dying
mid-shard costs nothing but a retry.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cgn_dist.data.shards import encode_jpeg, encode_png
from cgn_dist.sharding.plan import SampleRef


@dataclass(frozen=True)
class ToySamplerFactory:
    """Builds a ToySampler; a frozen dataclass so it pickles to workers and rebuilds from a manifest."""

    image_size: int = 16
    num_classes: int = 10
    image_format: str = "png"  # "png" or "jpg"
    with_mask: bool = True  # also store "mask.png", as a counterfactual sampler may
    sleep_s: float = 0.0  # per sample: makes shards slow enough to interrupt
    crash_on_key: str = ""  # the worker process exits abruptly the first time it reaches this key...
    crash_marker: str = ""  # ...and records that in this file, so the retry goes through
    # The first sampler built creates this file and reports another provenance (as a worker whose
    # torch.compile failed would): checks that such a worker is caught when it starts.
    odd_info_marker: str = ""

    def __call__(self) -> "ToySampler":
        return ToySampler(self)


class ToySampler:
    def __init__(self, cfg: ToySamplerFactory):
        if cfg.image_format not in ("png", "jpg"):
            raise ValueError(f"image_format must be 'png' or 'jpg', got {cfg.image_format!r}")
        if cfg.crash_on_key and not cfg.crash_marker:
            raise ValueError("crash_on_key needs crash_marker (a file recording the crash, so a retry succeeds)")
        self.cfg = cfg
        self.odd = False
        if cfg.odd_info_marker:
            try:
                with open(cfg.odd_info_marker, "x") as f:  # exclusive: exactly one sampler is the odd one
                    f.write(f"odd provenance in pid {os.getpid()}\n")
                self.odd = True
            except FileExistsError:
                pass

    def info(self) -> dict[str, Any]:
        return {"sampler": "toy", "image_size": self.cfg.image_size, "num_classes": self.cfg.num_classes,
                "image_format": self.cfg.image_format, **({"forward": "eager (compile failed)"} if self.odd else {})}

    def _maybe_crash(self, key: str) -> None:
        marker = Path(self.cfg.crash_marker)
        if key == self.cfg.crash_on_key and not marker.exists():
            marker.write_text(f"crashed at {key} in pid {os.getpid()}\n")
            os._exit(17)  # no cleanup, no exception: as if the process were killed

    def sample(self, refs: list[SampleRef]) -> list[dict[str, Any]]:
        out = []
        s = self.cfg.image_size
        for ref in refs:
            if self.cfg.crash_on_key:
                self._maybe_crash(ref.key)
            if self.cfg.sleep_s:
                time.sleep(self.cfg.sleep_s)
            rng = np.random.default_rng(ref.seed)
            shape_cls, texture_cls, bg_cls = (int(c) for c in rng.integers(0, self.cfg.num_classes, 3))
            image = rng.integers(0, 256, size=(s, s, 3), dtype=np.uint8)
            mask = (rng.random((s, s)) > 0.5).astype(np.uint8) * 255
            sample: dict[str, Any] = {
                self.cfg.image_format: encode_png(image) if self.cfg.image_format == "png" else encode_jpeg(image),
                "json": {"key": ref.key, "seed": ref.seed, "shape_cls": shape_cls, "texture_cls": texture_cls,
                         "bg_cls": bg_cls, "mask_mean": float(mask.mean() / 255.0)},
            }
            if self.cfg.with_mask:
                sample["mask.png"] = encode_png(mask)
            out.append(sample)
        return out
