"""The ImageNet counterfactual sampler's factory: every setting of a generation run, validated before any
model is built."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cgn_dist.errors import InputError, InputNotFound
from cgn_dist.generate.imagenet.labels import IMAGENET_CLASSES, MODES, check_classes
from cgn_dist.data.pixels import NORMALIZE
from cgn_dist.generate.speed import JPEG_ENCODERS, PRECISIONS, check_precision
from cgn_dist.generate.imagenet.weights import (CHECKPOINT_HELP, biggan_num_classes, checkpoint_kind,
                                                resolve_cgn_checkpoint)

if TYPE_CHECKING:
    from cgn_dist.generate.imagenet.sampler import ImagenetCounterfactualSampler

IMAGE_FORMATS = ("jpg", "png")
DEVICES = ("auto", "cpu", "cuda")
log = logging.getLogger(__name__)
RANDOM_SOURCES = ("tiny", "random-256")  # BigGAN sources built from a seed, no weights needed


BLOCKS = ("auto", "fused", "package")

@dataclass(frozen=True)
class ImagenetCounterfactualFactory:
    """Builds an ImagenetCounterfactualSampler; frozen and JSON-able (paths and settings only), so it
    pickles to workers and is rebuilt from a generation manifest. Give absolute paths for runs on a cluster."""

    checkpoint: str = ""  # resolved weights file (see resolve_cgn_checkpoint); "" = no weights (random sources)
    biggan: str = "biggan-deep-256"  # layout: biggan-deep-256 (not downloaded), a local dir, "tiny", "random-256"
    u2net: str = "u2net"  # U²-Net weights (ours need it; the authors' cgn.pth brings its own)
    u2net_align_corners: bool = True  # U²-Net upsampling: True = the CGN authors' copy, False = upstream's
    cache_dir: str = ""  # pytorch-pretrained-biggan cache, for other named BigGANs
    model_seed: int = 0  # random init of random sources (the model itself when there is no checkpoint)
    mode: str = "random"  # random | best_classes | fixed_classes
    classes: list[int] = field(default_factory=list)  # fixed_classes: [shape, texture, background]
    truncation: float = 0.5
    image_format: str = "jpg"  # jpg | png
    jpeg_quality: int = 95
    normalize: str = "fixed"  # fixed | minmax (see the module docstring)
    save_layers: bool = False  # also store mask.png, fg.<fmt>, bg.<fmt>
    forward_batch: int = 16  # samples [k*F, (k+1)*F) of a shard run as one forward batch (fixes the bytes)
    device: str = "auto"  # auto = cuda when this worker has a GPU
    num_threads: int = 1  # CPU threads during a forward (CPU bytes depend on it); 0 = torch's setting
    png_compress_level: int = 6
    precision: str = "auto"  # auto | fp32 | bf16 | fp16 (CUDA only): weights cast once, frozen parts included
    channels_last: bool = True  # convolution weights (hence activations) in channels-last layout
    # auto | fused | package: BigGAN blocks for inference (cgn_dist.models.biggan_inference). Described only when
    # set, so a folder made before the option existed is the same run and continues with its package blocks
    blocks: str = field(default="auto", metadata={"omit_default": True})
    compile: bool = False  # torch.compile the forward (warm-up at start; eager with a warning if it fails)
    overlap: bool = True  # compute the next forward group while this one is encoded and written (same bytes)
    encode_threads: int = 2  # threads encoding images (same bytes); <= 1 = in the caller's thread
    jpeg_encoder: str = "pil"  # pil | nvjpeg (CUDA; other bytes than Pillow's, recorded in the provenance)

    @property
    def worker_gb(self) -> float:
        """About what one worker process holds (three BigGAN-deep-256, U²-Net, a forward batch's activations):
        bounds num_workers=0 by the free memory."""
        return 0.5 if self.biggan == "tiny" else 3.0 + 0.1 * self.forward_batch

    def with_recorded(self, provenance: dict[str, Any]) -> "ImagenetCounterfactualFactory":
        """This factory with ``auto`` settings pinned to what a run's committed shards recorded (their
        sampler provenance): continuing or regenerating that run elsewhere gives its bytes."""
        out = self
        recorded = provenance.get("precision")
        if self.precision == "auto" and recorded in PRECISIONS:
            log.info("generate.precision=auto: %s, as this run's committed shards were made", recorded)
            out = replace(out, precision=recorded)
        if self.blocks == "auto" and provenance:
            # shards made before the fused blocks existed record none: they were made with the package's
            blocks = provenance.get("blocks", "package")
            if blocks in BLOCKS[1:]:
                log.info("generate.blocks=auto: %s, as this run's committed shards were made", blocks)
                out = replace(out, blocks=blocks)
        return out

    def __post_init__(self) -> None:
        from cgn_dist.models.biggan import check_truncation

        # JSON round trips (manifest -> factory) turn tuples into lists: keep plain lists of ints, so the
        # description of a rebuilt factory equals the original's.
        object.__setattr__(self, "classes", [int(c) for c in self.classes])
        object.__setattr__(self, "truncation", check_truncation(self.truncation))
        for name, value, accepted in (("mode", self.mode, MODES), ("image_format", self.image_format, IMAGE_FORMATS),
                                      ("normalize", self.normalize, NORMALIZE), ("device", self.device, DEVICES),
                                      ("precision", self.precision, ("auto", *PRECISIONS)),
                                      ("blocks", self.blocks, BLOCKS),
                                      ("jpeg_encoder", self.jpeg_encoder, JPEG_ENCODERS)):
            if value not in accepted:
                raise InputError(f"{name} must be one of {accepted}, got {value!r}")
        if self.mode == "fixed_classes" and len(self.classes) != 3:
            raise InputError(f"fixed_classes mode needs three class ids [shape, texture, background], got "
                             f"{self.classes}")
        if any(c < 0 for c in self.classes):
            raise InputError(f"class ids must be >= 0, got {self.classes}")
        if not 1 <= self.jpeg_quality <= 100:
            raise InputError(f"jpeg_quality must lie in 1..100, got {self.jpeg_quality}")
        if not 0 <= self.png_compress_level <= 9:
            raise InputError(f"png_compress_level must lie in 0..9, got {self.png_compress_level}")
        if self.precision == "fp16" and self.device == "cpu":
            check_precision(self.precision, "cpu")  # raises, naming the config key
        if self.jpeg_encoder == "nvjpeg" and self.device == "cpu":
            raise InputError("generate.jpeg_encoder=nvjpeg encodes on the GPU; with device=cpu use pil")
        if self.encode_threads < 0:
            raise InputError(f"encode_threads must be >= 0, got {self.encode_threads}")
        if self.forward_batch < 1 or self.num_threads < 0:
            raise InputError(f"need forward_batch >= 1 and num_threads >= 0, got {self.forward_batch}, "
                             f"{self.num_threads}")

    def checkpoint_kind(self) -> str | None:
        return checkpoint_kind(resolve_cgn_checkpoint(self.checkpoint)) if self.checkpoint else None

    def num_classes(self, kind: str | None = None) -> int:
        """Classes of the model this factory builds, without building it."""
        if kind == "original" and self.biggan != "tiny":
            return IMAGENET_CLASSES  # the authors' file is BigGAN-deep-256
        return biggan_num_classes(self.biggan)

    def validate(self) -> None:
        """Every check possible without building the model (files exist, class ids fit the model), so a
        mistake stops the run before any worker starts."""
        kind = self.checkpoint_kind()
        if kind is None and self.biggan not in RANDOM_SOURCES and not Path(self.biggan).is_dir():
            raise InputError(f"generate.checkpoint is empty: with BigGAN {self.biggan!r} the mechanisms would be "
                             f"three copies of the pretrained BigGAN, not a trained CGN; {CHECKPOINT_HELP}")
        if kind != "original" and self.u2net not in ("tiny", "random") and not Path(self.u2net).is_file():
            from cgn_dist import weights
            from cgn_dist.models.u2net import U2NET_WEIGHTS_HELP

            if weights.is_name(self.u2net):
                raise weights.WeightsError(weights.missing_message(self.u2net, "imagenet.u2net"))

            raise InputNotFound(f"U²-Net weights {self.u2net!r} (imagenet.u2net) not found. {U2NET_WEIGHTS_HELP}")
        check_classes(self.mode, self.classes, self.num_classes(kind))

    def __call__(self) -> "ImagenetCounterfactualSampler":
        from cgn_dist.generate.imagenet.sampler import ImagenetCounterfactualSampler

        return ImagenetCounterfactualSampler(self)

