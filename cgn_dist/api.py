"""A Python API for notebooks: load a CGN, ask for counterfactuals, get images back.

    from cgn_dist.api import ImagenetCGN, MnistCGN
    cgn = ImagenetCGN.from_pretrained("cgn-imagenet")      # the authors' cgn.pth (`cgn-dist weights fetch`)
    cgn = ImagenetCGN.from_pretrained("runs/my_cgn")       # ours: a run directory, checkpoint or imported file
    cgn = ImagenetCGN.from_pretrained("tiny")              # random 32-px model: seconds on a CPU, no weights
    out = cgn.counterfactual(shape=[15, 251], texture=[330, 382], background=[385, 483], seed=0)
    out.images[0]                                          # PIL images; out.masks, out.foregrounds, ...

    mnist = MnistCGN.from_pretrained("cgn-mnist-colored")  # or the authors' ckp.pth, or a run directory
    out = mnist.counterfactual(shape=[0, 1, 2], texture=[3, 4, 5], background=[6, 7, 8], seed=0)

Nothing here is a second implementation: the models are built by the generation engine's sampler factories
(the code `cgn-dist generate` runs), forwards go through the sampler (its device and numerics settings), and
images are converted with the engine's own uint8 mappings. Image ``i`` of an ImageNet call takes its noise
from seed ``seed + i`` (or ``seeds[i]``) exactly as a generated sample whose json says that seed, so a stored
sample is recomputed by passing its classes and seed (bit-exact when forward_batch and num_threads match).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

OUTPUT_TYPES = ("pil", "pt", "np")


@dataclass
class Counterfactuals:
    """What ``counterfactual`` returns: per image its layers, classes and seed.

    output_type "pil": lists of PIL images (masks in mode "L"); "np": uint8 arrays (N x H x W x 3, masks
    N x H x W); "pt": float tensors on the model's device (images in [-1, 1], N x 3 x H x W; masks in (0, 1),
    N x 1 x H x W)."""

    images: Any
    masks: Any
    foregrounds: Any
    backgrounds: Any
    classes: list[tuple[int, int, int]]  # (shape, texture, background)
    seeds: list[int]
    names: list[tuple[str, str, str]] = field(default_factory=list)
    premasks: Any = None  # ImageNet: f_shape's image before U²-Net

    def __len__(self) -> int:
        return len(self.classes)


def _as_list(x: int | Sequence[int] | None, n: int | None = None) -> list[int] | None:
    if x is None:
        return None
    out = [int(x)] if isinstance(x, (int, np.integer)) else [int(v) for v in x]
    return out * n if n and len(out) == 1 else out


def _triples(shape, texture, background) -> list[tuple[int, int, int]]:
    s = _as_list(shape)
    if not s:
        raise ValueError("shape needs at least one class id")
    n = max(len(s), len(_as_list(texture) or []), len(_as_list(background) or []))
    s = _as_list(s, n)
    t = _as_list(texture, n) or s  # a mechanism without a class takes the shape's: no counterfactual there
    b = _as_list(background, n) or s
    if not len(s) == len(t) == len(b) == n:
        raise ValueError(f"shape, texture and background give {len(s)}, {len(t)}, {len(b)} class ids: give one "
                         "id (used for every image) or the same number for each")
    return list(zip(s, t, b))


def _seeds(seed: int | Sequence[int], n: int) -> list[int]:
    if isinstance(seed, (int, np.integer)):
        return [int(seed) + i for i in range(n)]
    seeds = [int(s) for s in seed]
    if len(seeds) != n:
        raise ValueError(f"{len(seeds)} seeds for {n} images")
    return seeds


def _convert(layers: dict[str, torch.Tensor], output_type: str, to_uint8, mask_to_uint8) -> dict[str, Any]:
    if output_type == "pt":
        return layers
    from PIL import Image

    out: dict[str, Any] = {}
    for k, v in layers.items():
        arr = mask_to_uint8(v) if k == "mask" else to_uint8(v)
        out[k] = arr if output_type == "np" else [Image.fromarray(a) for a in arr]
    return out


def _check_output_type(output_type: str) -> None:
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")


# --- ImageNet ------------------------------------------------------------------------------------------------

class ImagenetCGN:
    """A CGN-ImageNet for interactive use: a loaded generation sampler (``self.sampler``) and its model."""

    def __init__(self, sampler: Any):
        self.sampler = sampler
        self.model = sampler.model
        self.n_classes, self.device = sampler.n_classes, sampler.device

    @classmethod
    def from_pretrained(cls, source: str = "cgn-imagenet", *, truncation: float = 0.5, device: str = "auto",
                        biggan: str = "biggan-deep-256", u2net: str = "u2net", seed: int = 0,
                        num_threads: int = 0, **settings: Any) -> "ImagenetCGN":
        """source: "cgn-imagenet" (the authors' cgn.pth in the weights cache), a weights name, the path of the
        authors' cgn.pth, our run directory / checkpoint / `cgn-dist import` file, or "tiny" / "random-256"
        (random init from ``seed``: no weights needed). ``biggan`` / ``u2net`` are only read for our files,
        which hold the three mechanisms alone. Further keyword settings (precision="bf16", normalize,
        forward_batch, channels_last, compile, ...) are the generation sampler's
        (``ImagenetCounterfactualFactory``); num_threads 0 keeps torch's setting. "pt" outputs come in the
        model's precision."""
        from cgn_dist import weights
        from cgn_dist.generate.command import _abs
        from cgn_dist.generate.imagenet.factory import RANDOM_SOURCES, ImagenetCounterfactualFactory
        from cgn_dist.generate.imagenet.weights import resolve_cgn_checkpoint

        if source in RANDOM_SOURCES:
            checkpoint, biggan, u2net = "", source, ("tiny" if source == "tiny" else "random")
        else:
            checkpoint = str(resolve_cgn_checkpoint(weights.resolve(source, "source")))
            u2net = _abs(u2net)
        factory = ImagenetCounterfactualFactory(checkpoint=checkpoint, biggan=biggan, u2net=u2net,
                                                model_seed=seed, truncation=truncation, device=device,
                                                num_threads=num_threads, **settings)
        if checkpoint:
            factory.validate()
        return cls(factory())

    def class_name(self, class_id: int) -> str:
        from cgn_dist.data.imagenet_classes import class_name

        return class_name(class_id)

    @torch.inference_mode()
    def counterfactual(self, shape: int | Sequence[int], texture: int | Sequence[int] | None = None,
                       background: int | Sequence[int] | None = None, seed: int | Sequence[int] = 0,
                       output_type: str = "pil") -> Counterfactuals:
        """Images whose shape, texture and background come from the given ImageNet classes (one id for all
        images, or one per image; a mechanism left out takes the shape's class). One noise vector per image,
        shared by the three mechanisms as in the paper, from ``seed + i`` (or ``seed[i]``), at the truncation
        given to ``from_pretrained``."""
        from cgn_dist.data.pixels import mask_to_uint8, to_uint8
        from cgn_dist.generate.imagenet.labels import check_classes, class_name
        from cgn_dist.models.biggan import class_vector, truncated_noise

        _check_output_type(output_type)
        triples = _triples(shape, texture, background)
        check_classes("fixed_classes", [c for t in triples for c in t], self.n_classes)
        seeds = _seeds(seed, len(triples))
        s = self.sampler
        # the noise and class inputs exactly as the sampler's compute() builds them for a generated sample
        u = truncated_noise(len(seeds), self.model.z_dim, s.cfg.truncation, seed=seeds)
        ys = [class_vector([t[i] for t in triples], self.n_classes) for i in range(3)]
        f = s.cfg.forward_batch
        parts = [s.forward(u[a:a + f], *(y[a:a + f] for y in ys)) for a in range(0, len(seeds), f)]
        cat = {k: torch.cat([p[k] for p in parts]) for k in ("composite", "mask", "foreground", "background",
                                                              "premask")}
        norm = s.cfg.normalize
        conv = _convert(cat, output_type, lambda x: to_uint8(x, norm), mask_to_uint8)
        return Counterfactuals(images=conv["composite"], masks=conv["mask"], foregrounds=conv["foreground"],
                               backgrounds=conv["background"], premasks=conv["premask"], classes=triples,
                               seeds=seeds, names=[tuple(class_name(c) for c in t) for t in triples])

    def close(self) -> None:
        self.sampler.close()


# --- MNIST ---------------------------------------------------------------------------------------------------

class MnistCGN:
    """A CGN-MNIST for interactive use (the generation engine's loader: ours or the authors' ckp.pth)."""

    def __init__(self, model: Any, device: torch.device, sha256: str | None = None):
        self.model, self.device, self.sha256 = model.eval(), device, sha256
        self.n_classes = model.n_classes

    @classmethod
    def from_pretrained(cls, source: str = "cgn-mnist-colored", *, device: str = "cpu",
                        seed: int = 0) -> "MnistCGN":
        """source: a weights name (cgn-mnist-colored / -double-colored / -wildlife), the authors' ckp.pth,
        our MNIST run directory or checkpoint, or "random" (a fresh CGN-MNIST initialised from ``seed``)."""
        from cgn_dist import weights
        from cgn_dist.generate.mnist import MnistCounterfactualFactory, resolve_generator_file

        if source == "random":
            from cgn_dist.models.cgn_mnist import CGNMnist

            model = CGNMnist(init_generator=torch.Generator().manual_seed(seed))
            return cls(model.to(device), torch.device(device))
        checkpoint = str(resolve_generator_file(weights.resolve(source, "source")).resolve())
        sampler = MnistCounterfactualFactory(checkpoint=checkpoint, device=device)()
        return cls(sampler.model, sampler.device, sampler.sha256)

    @torch.inference_mode()
    def counterfactual(self, shape: int | Sequence[int], texture: int | Sequence[int] | None = None,
                       background: int | Sequence[int] | None = None, seed: int | Sequence[int] = 0,
                       shuffle: bool = True, output_type: str = "pil") -> Counterfactuals:
        """Digits with the given shape, texture and background classes (0..9). Each mechanism gets its own
        noise, as in the paper's MNIST counterfactuals; image i draws its noise and texture shifts from a
        generator seeded with ``seed + i`` (or ``seed[i]``), so an image does not depend on its batch."""
        from cgn_dist.data.pixels import encode_uint8, mask_to_uint8
        from cgn_dist.models.cgn_mnist import draw_crop_offsets, tile_and_crop

        _check_output_type(output_type)
        triples = _triples(shape, texture, background)
        bad = [c for t in triples for c in t if not 0 <= c < self.n_classes]
        if bad:
            raise ValueError(f"class ids {bad} are out of range (0..{self.n_classes - 1})")
        seeds = _seeds(seed, len(triples))
        m, size = self.model, self.model.img_size
        noise, fg_off, bg_off = [], [], []
        for s in seeds:
            g = torch.Generator().manual_seed(s)
            noise.append([m.sample_noise(1, g) for _ in range(3)])  # u_shape, u_text, u_bg
            fg_off.append(draw_crop_offsets(1, size, size, g))
            bg_off.append(draw_crop_offsets(1, size, size, g))
        u, u_t, u_b = (torch.cat([n[i] for n in noise]).to(self.device) for i in range(3))
        y = [torch.tensor([t[i] for t in triples], device=self.device) for i in range(3)]
        mask, fg, bg, _ = m(y[0], y[1], y[2], u=u, u_text=u_t, u_bg=u_b, shuffle=False)
        if shuffle:  # the texture shuffler, with each image's own offsets
            fg = tile_and_crop(fg, torch.cat(fg_off).to(self.device))
            bg = tile_and_crop(bg, torch.cat(bg_off).to(self.device))
        layers = {"composite": mask * fg + (1 - mask) * bg, "mask": mask[:, :1], "foreground": fg, "background": bg}
        conv = _convert(layers, output_type, lambda x: encode_uint8(x).cpu().numpy(), mask_to_uint8)
        return Counterfactuals(images=conv["composite"], masks=conv["mask"], foregrounds=conv["foreground"],
                               backgrounds=conv["background"], classes=triples, seeds=seeds,
                               names=[tuple(str(c) for c in t) for t in triples])


__all__ = ["ImagenetCGN", "MnistCGN", "Counterfactuals"]
