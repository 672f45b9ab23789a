"""Counterfactual ImageNet (cgn_spec.md §2.5) as a sampler for the generation engine, and class interpolation.

Per sample, everything comes from the sample's seed (``SampleRef.seed``):
  u       = truncated_noise(seed=[seed]): truncation * truncnorm(-2, 2), one vector SHARED by the three
            mechanisms, as in the authors' generation;
  classes = numpy.random.default_rng([seed, CLASS_STREAM]): by ``mode``
            random        three independent uniform ids in [0, n_classes) (shape, texture, background);
            best_classes  one uniform pick from each curated list of class_lists.py (1000-class models only);
            fixed_classes the configured [shape, texture, background] for every sample.

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
import hashlib
import json
import logging
import os
import pickle
import shutil
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from cgn_dist.data.shards import encode_jpeg, encode_png, write_json_atomic
from cgn_dist.generate.class_lists import BEST_BACKGROUND_CLASSES, BEST_SHAPE_CLASSES, BEST_TEXTURE_CLASSES
from cgn_dist.generate.plan import SampleRef, sample_seed

log = logging.getLogger(__name__)

SAMPLER_NAME = "imagenet_counterfactual"
MODES = ("random", "best_classes", "fixed_classes")
MECHANISMS = ("all", "shape", "text", "bg")
NORMALIZE = ("fixed", "minmax")
IMAGE_FORMATS = ("jpg", "png")
DEVICES = ("auto", "cpu", "cuda")
IMAGENET_CLASSES = 1000
CLASS_STREAM = 1  # the class triple's generator: default_rng([seed, CLASS_STREAM]); the noise uses seed alone
MECHANISMS_FILE = "mechanisms.pt"  # what the ImageNet training loop's torch engine saves per checkpoint
DEEPSPEED_MODEL_FILE = "mp_rank_00_model_states.pt"
RANDOM_SOURCES = ("tiny", "random-256")  # BigGAN sources built from a seed, no weights needed
_CACHE_GROUPS = 4
_CLASSES_FILE = "imagenet_classes.txt"

CHECKPOINT_HELP = (
    "pass a training run directory (runs/<name>/, its latest checkpoint), a step directory "
    "(runs/<name>/checkpoints/step_XXXXXXX/), its mechanisms.pt, a file written by `cgn-dist import`, or "
    "the authors' cgn.pth (`cgn-dist weights fetch cgn-imagenet`, or Google Drive id "
    "12yVFHPUjKmUFGnO2D4xVlTSpF8CUj136; then generate.checkpoint=cgn-imagenet)")


class CGNCheckpointError(ValueError):
    """The path given as a CGN-ImageNet checkpoint is not one we can load."""


# --- ImageNet class names (package data) --------------------------------------------------------------------

@lru_cache(maxsize=1)
def imagenet_classes() -> tuple[tuple[str, str], ...]:
    """The 1000 ImageNet classes in index order as (wnid, "name, synonym, ..."), from the package's
    ``imagenet_classes.txt`` (one ``<wnid> <names>`` line per class)."""
    from importlib.resources import files

    text = files("cgn_dist.generate").joinpath(_CLASSES_FILE).read_text(encoding="utf-8")
    rows = tuple(tuple(line.split(" ", 1)) for line in text.splitlines() if line.strip())
    if len(rows) != IMAGENET_CLASSES:
        raise RuntimeError(f"{_CLASSES_FILE} holds {len(rows)} classes, not {IMAGENET_CLASSES}")
    return rows  # type: ignore[return-value]


def class_name(class_id: int) -> str:
    """The short ImageNet name (first synonym) of a class id, e.g. 0 -> "tench". Two names occur twice
    ("crane" 134/517, "maillot" 638/639): the id, not the name, identifies a class. Models with fewer
    classes (tests) use the same ids, hence the same names."""
    return imagenet_classes()[int(class_id)][1].split(",")[0].strip()


# --- checkpoints ------------------------------------------------------------------------------------------

def resolve_cgn_checkpoint(path: str | os.PathLike) -> Path:
    """The weights file behind any accepted kind of path (a run directory resolves to its LATEST completed
    checkpoint at the time of the call: resolve once, in the driver, so all workers load the same one)."""
    p = Path(path).expanduser()
    if not str(path):
        raise CGNCheckpointError(f"no CGN checkpoint given; {CHECKPOINT_HELP}")
    if not p.exists():
        raise FileNotFoundError(f"CGN checkpoint {p} does not exist; {CHECKPOINT_HELP}")
    if p.is_file():
        return p
    if (p / "checkpoints").is_dir() and not (p / "meta.json").is_file():
        from cgn_dist.train.checkpoint import latest_checkpoint

        step = latest_checkpoint(p)
        if step is None:
            raise FileNotFoundError(f"run directory {p} has no completed checkpoint under checkpoints/ (a "
                                    "completed one has meta.json); train longer or pass a checkpoint file")
        p = step
    if (p / "meta.json").is_file():
        engines = json.loads((p / "meta.json").read_text()).get("engines", [])
        if engines and "mechanisms" not in engines:
            hint = " (an MNIST run: set task=mnist)" if "generator" in engines else ""
            raise CGNCheckpointError(f"checkpoint {p} holds engines {engines}, no 'mechanisms'{hint}")
        if (p / MECHANISMS_FILE).is_file():
            return p / MECHANISMS_FILE
        found = sorted((p / "mechanisms").glob(f"**/{DEEPSPEED_MODEL_FILE}"))
        if found:
            return found[0]
        raise CGNCheckpointError(f"checkpoint {p} has no {MECHANISMS_FILE} (torch engine) and no "
                                 f"mechanisms/{DEEPSPEED_MODEL_FILE} (DeepSpeed engine)")
    raise CGNCheckpointError(f"{p} is a directory but neither a run directory (with checkpoints/) nor a "
                             f"checkpoint step directory (with meta.json); {CHECKPOINT_HELP}")


def _torch_load(file: Path) -> Any:
    try:
        # mmap: a torch-engine mechanisms.pt also holds Adam's state (2x the weights), never read here.
        return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001  the plain load below says what is wrong
        pass
    try:  # files in torch's legacy (non-zip) format cannot be memory-mapped
        return torch.load(file, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as err:
        from cgn_dist.weights import unreadable_reason

        raise CGNCheckpointError(f"generate.checkpoint={file} is not a CGN checkpoint: {unreadable_reason(file, err)}; "
                                 f"{CHECKPOINT_HELP}") from err


def _strip(sd: Mapping[str, Any], prefixes: Sequence[str] = ("module.", "_orig_mod.")) -> dict[str, Any]:
    out = dict(sd)
    for prefix in prefixes:
        if out and all(isinstance(k, str) and k.startswith(prefix) for k in out):
            out = {k[len(prefix):]: v for k, v in out.items()}
    return out


def read_cgn_weights(file: str | os.PathLike) -> tuple[str, dict[str, torch.Tensor]]:
    """("mechanisms", state dict of f_shape/f_text/f_bg) for our files, or ("original", the authors' full
    state dict with all five networks) for their cgn.pth."""
    file = Path(file)
    obj = _torch_load(file)
    if not isinstance(obj, Mapping):
        raise CGNCheckpointError(f"{file} holds a {type(obj).__name__}, not a state dict; {CHECKPOINT_HELP}")
    if isinstance(obj.get("module"), Mapping):  # torch engine, DeepSpeed engine, `cgn-dist import`
        if obj.get("kind") == "cgn_mnist":
            raise CGNCheckpointError(f"{file} is an imported CGN-MNIST checkpoint: set task=mnist")
        sd = _strip(obj["module"])
    else:
        sd = _strip(obj["state_dict"] if isinstance(obj.get("state_dict"), Mapping) else obj, ("module.",))
    keys = [str(k) for k in sd]
    if any(k.startswith(("biggan_GT.", "u2net.")) for k in keys):
        return "original", dict(sd)
    if keys and all(k.startswith("mechanisms.") for k in keys):  # a whole CGNImageNet state dict
        sd = {k[len("mechanisms."):]: v for k, v in sd.items() if k.startswith("mechanisms.")}
        keys = list(sd)
    if "label_emb.weight" in sd:
        raise CGNCheckpointError(f"{file} is a CGN-MNIST generator checkpoint: set task=mnist")
    if keys and all(k.startswith(("f_shape.", "f_text.", "f_bg.")) for k in keys):
        return "mechanisms", dict(sd)
    raise CGNCheckpointError(f"{file} is neither a cgn_dist CGN-ImageNet checkpoint (mechanisms f_shape / "
                             f"f_text / f_bg) nor the authors' cgn.pth; its keys start {sorted(keys)[:6]}")


def checkpoint_kind(file: str | os.PathLike) -> str:
    """"mechanisms" or "original" (cheap: the file is memory-mapped, tensors are not read)."""
    return read_cgn_weights(file)[0]


def sha256_of(path: str | os.PathLike) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            sha.update(block)
    return sha.hexdigest()


def _layout_source(biggan: str) -> str:
    # Generation never runs the teacher and takes the mechanisms from the checkpoint: the pretrained
    # BigGAN-deep-256 weights are not needed (nor downloaded), only its layout.
    return "random-256" if biggan == "biggan-deep-256" else biggan


def biggan_num_classes(biggan: str) -> int:
    """Classes of a BigGAN source without building it."""
    from cgn_dist.models.biggan import tiny_biggan_config

    if biggan == "tiny":
        return tiny_biggan_config().num_classes
    if biggan == "random-256" or biggan.startswith("biggan-deep-"):
        return IMAGENET_CLASSES
    config = Path(biggan) / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"BigGAN source {biggan!r} is not 'tiny', 'random-256', a biggan-deep-* name, "
                                "nor a directory with config.json + pytorch_model.bin")
    return int(json.loads(config.read_text())["num_classes"])


def build_generation_model(checkpoint: str = "", biggan: str = "biggan-deep-256", u2net: str = "u2net",
                           cache_dir: str = "", seed: int = 0):
    """A CGNImageNet (eval mode, frozen, on CPU) for generation; returns (model, weights file or None).

    checkpoint "" -> no weights: the mechanisms are copies of the BigGAN source (random init from
    ``seed`` for "tiny" / "random-256": tests and timing only). Ours (mechanisms only): the model is laid
    out after ``biggan`` (not downloaded: only the layout is needed) and U²-Net loads from ``u2net``.
    The authors' cgn.pth holds all five networks: ``u2net`` is not read ("tiny" keeps the small layout).
    """
    from cgn_dist.models.cgn_imagenet import build_cgn_imagenet
    from cgn_dist.models.original_imagenet import load_original_state_dict

    if not checkpoint:
        cgn, file = build_cgn_imagenet(biggan, u2net, cache_dir=cache_dir or None, seed=seed), None
    else:
        file = resolve_cgn_checkpoint(checkpoint)
        kind, state = read_cgn_weights(file)
        if kind == "original":
            cgn = build_cgn_imagenet("tiny" if biggan == "tiny" else _layout_source(biggan),
                                     "tiny" if u2net == "tiny" else "random", cache_dir=cache_dir or None, seed=seed)
            load_original_state_dict(cgn, state)
        else:
            cgn = build_cgn_imagenet(_layout_source(biggan), u2net, cache_dir=cache_dir or None, seed=seed)
            cgn.load_trainable_state_dict({k: v.float() for k, v in state.items()})  # bf16 DeepSpeed files too
        del state
    cgn.eval().requires_grad_(False)
    return cgn, file


# --- image mappings ---------------------------------------------------------------------------------------

def to_uint8(x: torch.Tensor, normalize: str = "fixed") -> np.ndarray:
    """B x 3 x H x W in [-1, 1] -> B x H x W x 3 uint8.

    "fixed": round((clamp(x, -1, 1) + 1) * 127.5), half to even. "minmax": each image stretched to its own
    min..max, exactly as torchvision's ``save_image(normalize=True)`` does (the authors' files)."""
    from cgn_dist.generate.mnist import encode_uint8

    if normalize == "fixed":
        return encode_uint8(x).cpu().numpy()
    if normalize != "minmax":
        raise ValueError(f"normalize must be one of {NORMALIZE}, got {normalize!r}")
    out = []
    for img in x.detach().float().cpu():
        img = img.clone()
        low, high = float(img.min()), float(img.max())  # python floats, as torchvision's make_grid
        img.clamp_(min=low, max=high).sub_(low).div_(max(high - low, 1e-5))
        out.append(img.mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8).permute(1, 2, 0))
    return torch.stack(out).numpy()


def mask_to_uint8(mask: torch.Tensor) -> np.ndarray:
    """B x 1 x H x W in (0, 1) -> B x H x W uint8 = round(m * 255)."""
    return torch.round(mask.detach().float().clamp(0, 1) * 255).to(torch.uint8)[:, 0].cpu().numpy()


# --- the factory ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ImagenetCounterfactualFactory:
    """Builds an ImagenetCounterfactualSampler; frozen and JSON-able (paths and settings only), so it
    pickles to workers and is rebuilt from a generation manifest. Give absolute paths for runs on a cluster."""

    checkpoint: str = ""  # resolved weights file (see resolve_cgn_checkpoint); "" = no weights (random sources)
    biggan: str = "biggan-deep-256"  # layout: biggan-deep-256 (not downloaded), a local dir, "tiny", "random-256"
    u2net: str = "u2net"  # U²-Net weights (ours need it; the authors' cgn.pth brings its own)
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

    def __post_init__(self) -> None:
        from cgn_dist.models.biggan import check_truncation

        # JSON round trips (manifest -> factory) turn tuples into lists: keep plain lists of ints, so the
        # description of a rebuilt factory equals the original's.
        object.__setattr__(self, "classes", [int(c) for c in self.classes])
        object.__setattr__(self, "truncation", check_truncation(self.truncation))
        for name, value, accepted in (("mode", self.mode, MODES), ("image_format", self.image_format, IMAGE_FORMATS),
                                      ("normalize", self.normalize, NORMALIZE), ("device", self.device, DEVICES)):
            if value not in accepted:
                raise ValueError(f"{name} must be one of {accepted}, got {value!r}")
        if self.mode == "fixed_classes" and len(self.classes) != 3:
            raise ValueError(f"fixed_classes mode needs three class ids [shape, texture, background], got "
                             f"{self.classes}")
        if any(c < 0 for c in self.classes):
            raise ValueError(f"class ids must be >= 0, got {self.classes}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must lie in 1..100, got {self.jpeg_quality}")
        if not 0 <= self.png_compress_level <= 9:
            raise ValueError(f"png_compress_level must lie in 0..9, got {self.png_compress_level}")
        if self.forward_batch < 1 or self.num_threads < 0:
            raise ValueError(f"need forward_batch >= 1 and num_threads >= 0, got {self.forward_batch}, "
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
            raise ValueError(f"generate.checkpoint is empty: with BigGAN {self.biggan!r} the mechanisms would be "
                             f"three copies of the pretrained BigGAN, not a trained CGN; {CHECKPOINT_HELP}")
        if kind != "original" and self.u2net not in ("tiny", "random") and not Path(self.u2net).is_file():
            from cgn_dist import weights
            from cgn_dist.models.u2net import U2NET_WEIGHTS_HELP

            if weights.is_name(self.u2net):
                raise weights.WeightsError(weights.missing_message(self.u2net, "imagenet.u2net"))
            raise FileNotFoundError(f"U²-Net weights {self.u2net!r} (imagenet.u2net) not found. {U2NET_WEIGHTS_HELP}")
        check_classes(self.mode, self.classes, self.num_classes(kind))

    def __call__(self) -> "ImagenetCounterfactualSampler":
        return ImagenetCounterfactualSampler(self)


def check_classes(mode: str, classes: Sequence[int], n_classes: int) -> None:
    """ValueError unless the mode's class ids exist in a model of ``n_classes`` classes."""
    if mode == "best_classes" and n_classes != IMAGENET_CLASSES:
        # The curated lists name ImageNet classes; reduced modulo a small model's classes they would pick
        # arbitrary ids while claiming to be the authors' selection.
        raise ValueError(f"best_classes picks from curated ImageNet id lists and needs a {IMAGENET_CLASSES}-class "
                         f"model; this one has {n_classes} classes: use mode random or fixed_classes")
    bad = [c for c in classes if not 0 <= int(c) < n_classes]
    if bad:
        raise ValueError(f"class ids {bad} are out of range for this model ({n_classes} classes: 0..{n_classes - 1})")


def draw_classes(mode: str, seed: int, n_classes: int, fixed: Sequence[int] = ()) -> tuple[int, int, int]:
    """The (shape, texture, background) class triple of the sample with this seed."""
    if mode == "fixed_classes":
        return int(fixed[0]), int(fixed[1]), int(fixed[2])
    rng = np.random.default_rng([int(seed), CLASS_STREAM])
    if mode == "random":
        s, t, b = rng.integers(0, n_classes, 3)
        return int(s), int(t), int(b)
    if mode == "best_classes":
        return tuple(int(lst[rng.integers(len(lst))]) for lst in  # type: ignore[return-value]
                     (BEST_SHAPE_CLASSES, BEST_TEXTURE_CLASSES, BEST_BACKGROUND_CLASSES))
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


# --- the sampler ------------------------------------------------------------------------------------------

@dataclass
class _Group:
    composite: np.ndarray  # F x H x W x 3 uint8
    classes: list[tuple[int, int, int]]
    seeds: list[int]
    mask_mean: list[float]
    layers: dict[str, np.ndarray] = field(default_factory=dict)  # mask (F x H x W), fg, bg


class ImagenetCounterfactualSampler:
    coverage_keys = ("shape_cls", "texture_cls", "bg_cls")

    def __init__(self, cfg: ImagenetCounterfactualFactory):
        from cgn_dist import __version__

        self.cfg = cfg
        dev = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        if dev == "cuda" and not torch.cuda.is_available():
            raise ValueError("device 'cuda' requested but this worker has no GPU")
        self.device = torch.device(dev)
        with self._threads():
            self.model, self.weights_file = build_generation_model(cfg.checkpoint, cfg.biggan, cfg.u2net,
                                                                   cfg.cache_dir, cfg.model_seed)
        self.model.to(self.device)
        self.n_classes = self.model.n_classes
        check_classes(cfg.mode, cfg.classes, self.n_classes)
        self.sha256 = sha256_of(self.weights_file) if self.weights_file is not None else None
        self.version = __version__
        self._cache: collections.OrderedDict[tuple[int, int, int], _Group] = collections.OrderedDict()
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
                "pillow": PIL.__version__, "cgn_dist": self.version}

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

    @torch.inference_mode()
    def forward(self, u: torch.Tensor, y_shape: torch.Tensor, y_text: torch.Tensor, y_bg: torch.Tensor
                ) -> dict[str, torch.Tensor]:
        """One forward batch (premask, mask, foreground, background, composite), on the sampler's device."""
        d = self.device
        with self._numerics():
            return self.model.generate(u.to(d), y_shape.to(d), y_text.to(d), y_bg.to(d),
                                       truncation=self.cfg.truncation, return_layers=True)

    def compute(self, seeds: Sequence[int]) -> _Group:
        """The samples of these seeds as ONE forward batch (bytes depend on the batch: see the docstring)."""
        from cgn_dist.models.biggan import class_vector, truncated_noise

        triples = [draw_classes(self.cfg.mode, s, self.n_classes, self.cfg.classes) for s in seeds]
        norm = self.cfg.normalize
        # Every torch op under the fixed thread count: in a worker process torch would otherwise start one
        # thread per core for the conversions, and several workers' spinning threads slow each other down.
        with self._numerics():
            u = truncated_noise(len(seeds), self.model.z_dim, self.cfg.truncation, seed=[int(s) for s in seeds])
            ys = [class_vector([t[i] for t in triples], self.n_classes) for i in range(3)]
            out = self.forward(u, *ys)
            group = _Group(composite=to_uint8(out["composite"], norm), classes=triples,
                           seeds=[int(s) for s in seeds],
                           mask_mean=[round(float(m), 6) for m in out["mask"].float().mean(dim=(1, 2, 3)).cpu()])
            if self.cfg.save_layers:
                group.layers = {"mask": mask_to_uint8(out["mask"]), "fg": to_uint8(out["foreground"], norm),
                                "bg": to_uint8(out["background"], norm)}
        return group

    def _group(self, run_seed: int, shard_id: int, g: int) -> _Group:
        key = (run_seed, shard_id, g)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        f = self.cfg.forward_batch
        group = self.compute([sample_seed(run_seed, shard_id, i) for i in range(g * f, (g + 1) * f)])
        self._cache[key] = group
        while len(self._cache) > _CACHE_GROUPS:
            self._cache.popitem(last=False)
        return group

    def clear_cache(self) -> None:
        self._cache.clear()

    # --- encoding ---------------------------------------------------------------------------------------
    def _encode(self, image: np.ndarray) -> bytes:
        if self.cfg.image_format == "png":
            return encode_png(image, compress_level=self.cfg.png_compress_level)
        return encode_jpeg(image, quality=self.cfg.jpeg_quality)

    def _sample_dict(self, group: _Group, pos: int) -> dict[str, Any]:
        s, t, b = group.classes[pos]
        fmt = self.cfg.image_format
        sample: dict[str, Any] = {
            fmt: self._encode(group.composite[pos]),
            "json": {"shape_cls": s, "texture_cls": t, "bg_cls": b, "shape_name": class_name(s),
                     "texture_name": class_name(t), "bg_name": class_name(b), "mode": self.cfg.mode,
                     "truncation": self.cfg.truncation, "seed": group.seeds[pos],
                     "mask_mean": group.mask_mean[pos], "checkpoint_sha256": self.sha256,
                     "cgn_dist_version": self.version},
        }
        if group.layers:
            sample["mask.png"] = encode_png(group.layers["mask"][pos], compress_level=self.cfg.png_compress_level)
            sample[f"fg.{fmt}"] = self._encode(group.layers["fg"][pos])
            sample[f"bg.{fmt}"] = self._encode(group.layers["bg"][pos])
        return sample

    def sample(self, refs: list[SampleRef]) -> list[dict[str, Any]]:
        f = self.cfg.forward_batch
        out = []
        for ref in refs:
            g, pos = divmod(ref.index, f)
            out.append(self._sample_dict(self._group(ref.run_seed, ref.shard_id, g), pos))
        return out

    def sample_as_batch(self, refs: list[SampleRef]) -> list[dict[str, Any]]:
        """These refs as one forward batch, uncached: what a dry run times. Same schema and sizes as
        ``sample``, but bytes may differ at the last bit unless refs is exactly one forward group."""
        group = self.compute([r.seed for r in refs])
        return [self._sample_dict(group, i) for i in range(len(refs))]

    # --- interpolation ----------------------------------------------------------------------------------
    def interpolate(self, start: Sequence[int], target: int, mechanism: str = "all", midpoints: int = 6,
                    u: torch.Tensor | None = None, seed: int = 0) -> dict[str, Any]:
        """cgn_spec.md §2.5 interpolation: the one-hot class input of the chosen mechanism(s) moves linearly
        from its start class to ``target`` in ``midpoints + 2`` steps (ends included); the other mechanisms
        keep their start class; the noise ``u`` (1 x z_dim, used as given) is the same in every frame.
        Without ``u`` it is drawn from ``seed``. Returns uint8 frames: composite, mask, fg, bg (steps first)."""
        from cgn_dist.models.biggan import class_vector, interpolate_class_vectors, truncated_noise

        if mechanism not in MECHANISMS:
            raise ValueError(f"mechanism must be one of {MECHANISMS}, got {mechanism!r}")
        if midpoints < 0:
            raise ValueError(f"midpoints must be >= 0, got {midpoints}")
        if len(start) != 3:
            raise ValueError(f"start needs three class ids [shape, texture, background], got {list(start)}")
        check_classes("fixed_classes", [*start, target], self.n_classes)
        steps = midpoints + 2
        if u is None:
            u = truncated_noise(1, self.model.z_dim, self.cfg.truncation, seed=[int(seed)])
        u = torch.as_tensor(u, dtype=torch.float32).reshape(1, -1)
        if u.shape[1] != self.model.z_dim:
            raise ValueError(f"interpolation noise must hold {self.model.z_dim} values, got {u.shape[1]}")
        moving = {"all": (0, 1, 2), "shape": (0,), "text": (1,), "bg": (2,)}[mechanism]
        ys = [interpolate_class_vectors(int(start[i]), int(target), steps, self.n_classes) if i in moving
              else class_vector([int(start[i])] * steps, self.n_classes) for i in range(3)]
        parts = []
        for a in range(0, steps, self.cfg.forward_batch):
            b = min(a + self.cfg.forward_batch, steps)
            parts.append(self.forward(u.expand(b - a, -1), *(y[a:b] for y in ys)))
        cat = {k: torch.cat([p[k] for p in parts]) for k in ("composite", "mask", "foreground", "background")}
        norm = self.cfg.normalize
        return {"composite": to_uint8(cat["composite"], norm), "mask": mask_to_uint8(cat["mask"]),
                "fg": to_uint8(cat["foreground"], norm), "bg": to_uint8(cat["background"], norm),
                "start": [int(c) for c in start], "target": int(target), "mechanism": mechanism, "steps": steps,
                "alphas": [round(float(x), 6) for x in torch.linspace(0.0, 1.0, steps)]}

    def close(self) -> None:
        self._cache.clear()
        self.model = None


# --- interpolation output ----------------------------------------------------------------------------------

def interpolation_sheet(frames: Mapping[str, np.ndarray], pad: int = 2) -> np.ndarray:
    """One uint8 image: rows mask | foreground | background | composite, one column per step."""
    rows = [np.repeat(frames["mask"][..., None], 3, axis=-1), frames["fg"], frames["bg"], frames["composite"]]
    steps, h, w, _ = frames["composite"].shape
    sheet = np.full((len(rows) * (h + pad) + pad, steps * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for r, row in enumerate(rows):
        for c in range(steps):
            y, x = pad + r * (h + pad), pad + c * (w + pad)
            sheet[y:y + h, x:x + w] = row[c]
    return sheet


def write_interpolation(out_dir: str | os.PathLike, result: Mapping[str, Any], image_format: str = "png",
                        jpeg_quality: int = 95, meta: Mapping[str, Any] | None = None) -> Path:
    """Write ``out_dir/interpolation/``: sheet.png, frame_XXX.<fmt> (composites), interpolation.json.

    The folder is built under a temporary name and swapped in whole, so readers never see a partial set
    (a previous interpolation there is replaced)."""
    out_dir = Path(out_dir)
    final = out_dir / "interpolation"
    tmp = out_dir / f".tmp-interpolation-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        (tmp / "sheet.png").write_bytes(encode_png(interpolation_sheet(result)))
        frames = []
        for i, frame in enumerate(result["composite"]):
            name = f"frame_{i:03d}.{image_format}"
            data = encode_png(frame) if image_format == "png" else encode_jpeg(frame, quality=jpeg_quality)
            (tmp / name).write_bytes(data)
            frames.append(name)
        doc = {k: result[k] for k in ("start", "target", "mechanism", "steps", "alphas")}
        doc.update(start_names=[class_name(c) for c in result["start"]], target_name=class_name(result["target"]),
                   frames=frames, sheet="sheet.png", sheet_rows=["mask", "foreground", "background", "composite"])
        doc.update(meta or {})
        write_json_atomic(tmp / "interpolation.json", doc)
        old = None
        if final.exists():
            old = out_dir / f".old-interpolation-{uuid.uuid4().hex[:8]}"
            final.rename(old)
        tmp.rename(final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def load_noise(path: str | os.PathLike) -> torch.Tensor:
    """A fixed noise vector file (1 x z_dim tensor, e.g. the authors' u_fixed.pth), used as stored."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"noise file {p} not found (generate.interp_noise)")
    u = torch.load(p, map_location="cpu", weights_only=True)
    if not isinstance(u, torch.Tensor):
        raise ValueError(f"{p} holds a {type(u).__name__}, not a noise tensor")
    return u.float().reshape(1, -1)


__all__ = ["ImagenetCounterfactualFactory", "ImagenetCounterfactualSampler", "CGNCheckpointError",
           "build_generation_model", "resolve_cgn_checkpoint", "read_cgn_weights", "checkpoint_kind",
           "check_classes", "draw_classes", "class_name", "imagenet_classes", "to_uint8", "mask_to_uint8",
           "interpolation_sheet", "write_interpolation", "load_noise", "biggan_num_classes"]
