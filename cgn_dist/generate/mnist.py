"""Counterfactual MNIST data sets as a sampler for the generation engine.

The paper's recipe works per group of ``group_size`` (= 100) labels:
  1. draw y ~ U{0..9} (group_size labels);
  2. one ordinary pass of f_shape on (u, y): keep only the mask;
  3. ``no_cfs`` times: fresh noise for f_text and f_bg, foreground labels y[randperm], background labels
     y[another randperm] (so texture and background classes are permutations of the shape classes within
     the group), both textures shuffled (random cyclic shift, as in training), composed with the FIXED
     mask of step 2;
  4. the label of every image is its shape class y.
The counterfactual passes skip f_shape: its new mask would be discarded anyway.

Plan layout. A shard's samples are consecutive groups of ``group_size * no_cfs`` images. Sample index i of
a shard lies in group ``g = i // (group_size * no_cfs)``, counterfactual round ``r = (i % (group_size *
no_cfs)) // group_size`` and slot ``j = i % group_size`` (round-major, like the original's concatenation).
Every random draw of group g comes from one torch.Generator seeded with ``sample_seed(run_seed, shard_id,
g)`` (the engine's seed derivation applied to the group index), in this order: y; u_shape; then per round:
the texture permutation, the background permutation, u_text, u_bg, the foreground crop offsets, the
background crop offsets. A group is always computed as one forward batch of ``group_size``, whatever the
engine's batch size, and on CPU with a fixed thread count (``num_threads``, default 1), so the same plan
and seed give byte-identical shards for any batch size, worker count or backend (GPU numerics may differ
from CPU ones: do not mix devices within one output folder). A sampler caches the last few groups, so
engine batches that cut a group cost nothing extra. Choose ``shard_size`` as a multiple of
``group_size * no_cfs``; otherwise a shard's last group is computed whole and cut (correct, just wasted).

Each sample stores
  png   the composite as lossless RGB PNG, uint8 = round((clamp(x, -1, 1) + 1) * 127.5) (torch.round:
        half to even); read back with x = u8 / 127.5 - 1 (``decode_uint8``), error <= 1/255;
  json  label (= shape_cls), shape_cls, texture_cls, bg_cls, seed (the group's seed), group, cf_round,
        slot, mask_mean (mean of the fixed mask), checkpoint_sha256;
and with ``save_layers`` also mask.png (the fixed mask, uint8 = round(m * 255)), fg.png and bg.png (the
shuffled foreground and background the composite was made of, encoded as the composite).
"""
from __future__ import annotations

import collections
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from cgn_dist.data.pixels import encode_uint8, mask_to_uint8
from cgn_dist.data.shards import encode_png
from cgn_dist.errors import InputError, InputNotFound, UserError
from cgn_dist.sharding.plan import SampleRef, sample_seed
from cgn_dist.sharding.workers import DEVICES, resolve_device
from cgn_dist.models.cgn_mnist import MASK_MAX, MASK_MIN, CGNMnist, shuffle_texture
from cgn_dist.weights import TORCH_LOAD_ERRORS

SAMPLER_NAME = "mnist_counterfactual"
IMAGE_ENCODING = "png uint8 = round((clamp(x,-1,1)+1)*127.5), half to even; x = u8/127.5-1"
GENERATOR_FILE = "generator.pt"  # what the MNIST training loop's torch engine saves per checkpoint
EMA_FILE = "generator_ema.pt"  # the weights' moving average, saved beside it when mnist.ema_decay > 0
DEEPSPEED_MODEL_FILE = "mp_rank_00_model_states.pt"
_CACHE_GROUPS = 4


class GeneratorCheckpointError(UserError, ValueError):
    """The path given as an MNIST generator checkpoint is not one we can load."""


# --- image encoding ---------------------------------------------------------------------------------------

# --- checkpoints ------------------------------------------------------------------------------------------

def resolve_generator_file(path: str | os.PathLike) -> Path:
    """The file holding the generator weights for any accepted kind of path.

    Accepted: a training run directory (its latest completed checkpoint), a checkpoint step directory
    (``step_XXXXXXX/`` with meta.json and generator.pt, or a DeepSpeed ``generator/`` tag folder), a
    ``generator.pt`` file, or the authors' released ``ckp.pth``. A checkpoint trained with an EMA of the
    weights (``generator_ema.pt`` beside ``generator.pt``) gives the EMA; pass ``generator.pt`` itself for
    the live weights.
    """
    p = Path(path)
    if not p.exists():
        raise InputNotFound(f"generator checkpoint {p} does not exist")
    if p.is_file():
        return p
    if (p / "checkpoints").is_dir() and not (p / "meta.json").is_file():
        from cgn_dist.train.checkpoint import latest_checkpoint

        step = latest_checkpoint(p)
        if step is None:
            raise InputNotFound(f"run directory {p} has no completed checkpoint under checkpoints/ "
                                "(a completed one has meta.json); train longer or pass a checkpoint")
        p = step
    if (p / "meta.json").is_file():
        meta = json.loads((p / "meta.json").read_text())
        engines = meta.get("engines", [])
        if engines and "generator" not in engines:
            raise GeneratorCheckpointError(f"checkpoint {p} holds engines {engines}, no 'generator'")
        if (p / EMA_FILE).is_file():
            return p / EMA_FILE
        if (p / GENERATOR_FILE).is_file():
            return p / GENERATOR_FILE
        ds_dir = p / "generator"
        if ds_dir.is_dir():
            found = sorted(ds_dir.glob(f"**/{DEEPSPEED_MODEL_FILE}"))
            if found:
                return found[0]
        raise GeneratorCheckpointError(f"checkpoint {p} has no {GENERATOR_FILE} (torch engine) and no "
                                       f"generator/{DEEPSPEED_MODEL_FILE} (DeepSpeed engine)")
    raise GeneratorCheckpointError(
        f"{p} is a directory but neither a run directory (with checkpoints/) nor a checkpoint step directory "
        f"(with meta.json); pass one of those, a {GENERATOR_FILE}, or the authors' ckp.pth")


def checkpoint_sha256(path: str | os.PathLike) -> str:
    """sha256 of the weights file that ``load_mnist_generator(path)`` loads."""
    sha = hashlib.sha256()
    with open(resolve_generator_file(path), "rb") as f:
        while block := f.read(1 << 20):
            sha.update(block)
    return sha.hexdigest()


def _strip_prefixes(sd: Mapping[str, Any]) -> dict[str, Any]:
    # DDP ("module.") and torch.compile ("_orig_mod.") wrappers prefix every key.
    out = dict(sd)
    for prefix in ("module.", "_orig_mod."):
        if out and all(isinstance(k, str) and k.startswith(prefix) for k in out):
            out = {k[len(prefix):]: v for k, v in out.items()}
    return out


def _build_from_state_dict(sd: Mapping[str, Any], source: Path) -> CGNMnist:
    """A CGNMnist sized from the shapes of one of our state dicts, with the weights loaded (strict)."""
    try:
        n_classes = sd["label_emb.weight"].shape[0]
        in_dim = sd["f_shape.fc.weight"].shape[1]
        fc_out = sd["f_shape.fc.weight"].shape[0]
        ngf = sd["f_shape.conv1.weight"].shape[0]
    except (KeyError, AttributeError, IndexError) as err:
        raise GeneratorCheckpointError(f"{source}: not a CGNMnist state dict ({err!r} missing)") from err
    init_size = int(round((fc_out / (2 * ngf)) ** 0.5))
    model = CGNMnist(n_classes=int(n_classes), latent_dim=int(in_dim - n_classes), ngf=int(ngf),
                     img_size=4 * init_size, init_type=None)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as err:
        raise GeneratorCheckpointError(f"{source}: state dict does not fit CGNMnist: {err}") from err
    return model


def load_mnist_generator(path: str | os.PathLike, device: str | torch.device = "cpu") -> CGNMnist:
    """A CGNMnist in eval mode with frozen weights, from any accepted checkpoint path.

    Accepted: a training run directory (``runs/<name>/``: latest checkpoint), a step directory
    (``checkpoints/step_XXXXXXX/``), its ``generator.pt`` (``{"module": state_dict, "optimizer": ...}``),
    a bare CGNMnist state dict, or the authors' released ``ckp.pth`` (via the key-mapping importer).
    Model sizes (classes, latent, width, image size) are read off the tensor shapes.
    """
    file = resolve_generator_file(path)
    try:
        obj = torch.load(file, map_location="cpu", weights_only=True)
    except TORCH_LOAD_ERRORS as err:
        from cgn_dist.weights import unreadable_reason

        raise GeneratorCheckpointError(f"{file} is not a CGN-MNIST checkpoint: {unreadable_reason(file, err)}; the "
                                       "authors' files: `cgn-dist weights fetch cgn-mnist-colored` (or "
                                       "-double-colored, -wildlife)") from err
    if not isinstance(obj, Mapping):
        raise GeneratorCheckpointError(f"{file} holds a {type(obj).__name__}, not a state dict")
    if "module" in obj and isinstance(obj["module"], Mapping):
        model = _build_from_state_dict(_strip_prefixes(obj["module"]), file)
    else:
        sd = _strip_prefixes(obj)
        if "f_text1.0.weight" in sd:
            from cgn_dist.models.original_mnist import load_original_mnist_checkpoint

            model = load_original_mnist_checkpoint(file)
        elif "f_shape.fc.weight" in sd:
            model = _build_from_state_dict(sd, file)
        else:
            keys = sorted(str(k) for k in sd)[:8]
            raise GeneratorCheckpointError(
                f"{file} is neither a cgn_dist generator checkpoint ({{'module': state_dict, ...}}) nor the "
                f"authors' CGN-MNIST ckp.pth (keys f_shape.0.*, f_text1.*, f_text2.*); its keys start {keys}")
    model = model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


# --- the sampler ------------------------------------------------------------------------------------------

def group_seed(run_seed: int, shard_id: int, group: int) -> int:
    """The seed of every random draw of one group (the engine's derivation, on the group index)."""
    return sample_seed(run_seed, shard_id, group)


@dataclass(frozen=True)
class MnistCounterfactualFactory:
    """Builds an MnistCounterfactualSampler: frozen and JSON-able, so it pickles to workers and is rebuilt
    from a generation manifest."""

    checkpoint: str  # run dir, step dir, generator.pt, or the authors' ckp.pth
    no_cfs: int = 10  # counterfactual redraws of texture and background per mask
    group_size: int = 100  # labels per group (the original's internal batch)
    device: str = "cpu"  # cpu, cuda, or auto: resolved where the sampler is built (the worker), not here
    png_compress_level: int = 6
    # Threads used while computing a group (restored afterwards): a fixed count keeps CPU numerics, hence
    # the bytes, the same in the driver and in worker processes. 0 = leave torch's setting.
    num_threads: int = 1
    save_layers: bool = False  # also store mask.png, fg.png, bg.png

    def __post_init__(self) -> None:
        if self.no_cfs < 1 or self.group_size < 1:
            raise InputError(f"no_cfs and group_size must be >= 1, got {self.no_cfs}, {self.group_size}")
        if self.device not in DEVICES:
            raise InputError(f"generate.device must be one of {DEVICES}, got {self.device!r}")
        if self.num_threads < 0:
            raise InputError(f"num_threads must be >= 0 (0 = torch's setting), got {self.num_threads}")
        if not 0 <= self.png_compress_level <= 9:
            raise InputError(f"png_compress_level must lie in 0..9, got {self.png_compress_level}")

    @property
    def group_len(self) -> int:
        """Images per group: group_size * no_cfs (choose shard_size as a multiple of it)."""
        return self.group_size * self.no_cfs

    def __call__(self) -> "MnistCounterfactualSampler":
        return MnistCounterfactualSampler(self)


@dataclass
class _Group:
    images: np.ndarray  # group_len x H x W x 3 uint8
    shape_cls: np.ndarray
    texture_cls: np.ndarray
    bg_cls: np.ndarray
    mask_mean: np.ndarray  # per image (the fixed mask of its slot)
    seed: int
    layers: dict[str, np.ndarray] | None = None  # mask (group_len x H x W), fg, bg (group_len x H x W x 3)


class MnistCounterfactualSampler:
    coverage_keys = ("shape_cls", "texture_cls", "bg_cls")

    def __init__(self, cfg: MnistCounterfactualFactory):
        self.cfg = cfg
        self.device = torch.device(resolve_device(cfg.device))  # in the worker: its own GPU, or none
        self.model = load_mnist_generator(cfg.checkpoint, self.device)
        self.sha256 = checkpoint_sha256(cfg.checkpoint)
        self._cache: collections.OrderedDict[tuple[int, int, int], _Group] = collections.OrderedDict()

    def info(self) -> dict[str, Any]:
        m = self.model
        return {"sampler": SAMPLER_NAME, "checkpoint_sha256": self.sha256, "no_cfs": self.cfg.no_cfs,
                "group_size": self.cfg.group_size, "n_classes": m.n_classes, "latent_dim": m.latent_dim,
                "img_size": m.img_size, "image_encoding": IMAGE_ENCODING, "device": self.device.type,
                **({"save_layers": True} if self.cfg.save_layers else {})}

    @torch.inference_mode()
    def compute_group(self, run_seed: int, shard_id: int, group: int) -> _Group:
        """All group_size * no_cfs images of one group, round-major (see the module docstring)."""
        m, n, cfs = self.model, self.cfg.group_size, self.cfg.no_cfs
        seed = group_seed(run_seed, shard_id, group)
        gen = torch.Generator(device="cpu").manual_seed(seed)
        y = torch.randint(0, m.n_classes, (n,), generator=gen)
        u_shape = m.sample_noise(n, gen)
        y_dev = y.to(self.device)
        mask = m.f_shape(m.mechanism_input(y_dev, u_shape)).clamp(MASK_MIN, MASK_MAX)
        images, y_text, y_bg, fgs, bgs = [], [], [], [], []
        for _ in range(cfs):
            yt = y[torch.randperm(n, generator=gen)]
            yb = y[torch.randperm(n, generator=gen)]
            u_text, u_bg = m.sample_noise(n, gen), m.sample_noise(n, gen)
            fg = m.f_text(m.mechanism_input(yt.to(self.device), u_text))
            bg = m.f_bg(m.mechanism_input(yb.to(self.device), u_bg))
            fg = shuffle_texture(fg, gen)
            bg = shuffle_texture(bg, gen)
            images.append(encode_uint8(mask * fg + (1 - mask) * bg).cpu())
            if self.cfg.save_layers:
                fgs.append(encode_uint8(fg).cpu())
                bgs.append(encode_uint8(bg).cpu())
            y_text.append(yt)
            y_bg.append(yb)
        mask_mean = mask.float().mean(dim=(1, 2, 3)).cpu().numpy().astype(np.float64)
        layers = None
        if self.cfg.save_layers:

            m8 = mask_to_uint8(mask[:, :1])
            layers = {"mask": np.concatenate([m8] * cfs), "fg": torch.cat(fgs).numpy(), "bg": torch.cat(bgs).numpy()}
        return _Group(images=torch.cat(images).numpy(), shape_cls=y.repeat(cfs).numpy(),
                      texture_cls=torch.cat(y_text).numpy(), bg_cls=torch.cat(y_bg).numpy(),
                      mask_mean=np.tile(mask_mean, cfs), seed=seed, layers=layers)

    def _group(self, run_seed: int, shard_id: int, group: int) -> _Group:
        key = (run_seed, shard_id, group)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        old_threads = torch.get_num_threads()
        if self.cfg.num_threads:
            torch.set_num_threads(self.cfg.num_threads)
        try:
            grp = self.compute_group(run_seed, shard_id, group)
        finally:
            torch.set_num_threads(old_threads)
        self._cache[key] = grp
        while len(self._cache) > _CACHE_GROUPS:
            self._cache.popitem(last=False)
        return grp

    def sample(self, refs: list[SampleRef]) -> list[dict[str, Any]]:
        out = []
        for ref in refs:
            group, pos = divmod(ref.index, self.cfg.group_len)
            grp = self._group(ref.run_seed, ref.shard_id, group)
            cf_round, slot = divmod(pos, self.cfg.group_size)
            shape_cls = int(grp.shape_cls[pos])
            level = self.cfg.png_compress_level
            layers = {} if grp.layers is None else {f"{k}.png": encode_png(grp.layers[k][pos], compress_level=level)
                                                    for k in ("mask", "fg", "bg")}
            out.append({
                "png": encode_png(grp.images[pos], compress_level=self.cfg.png_compress_level),
                "json": {"label": shape_cls, "shape_cls": shape_cls, "texture_cls": int(grp.texture_cls[pos]),
                         "bg_cls": int(grp.bg_cls[pos]), "seed": grp.seed, "group": group,
                         "cf_round": cf_round, "slot": slot, "mask_mean": round(float(grp.mask_mean[pos]), 6),
                         "checkpoint_sha256": self.sha256},
                **layers,
            })
        return out

    def close(self) -> None:
        self._cache.clear()
        self.model = None


__all__ = ["MnistCounterfactualFactory", "MnistCounterfactualSampler", "load_mnist_generator",
           "resolve_generator_file", "checkpoint_sha256", "group_seed",
           "GeneratorCheckpointError", "IMAGE_ENCODING"]
