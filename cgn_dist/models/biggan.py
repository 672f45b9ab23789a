"""BigGAN-deep generator (wraps `pytorch-pretrained-biggan`), noise and class inputs.

CGN-ImageNet uses four copies of BigGAN-deep-256: a frozen teacher and three trainable
mechanisms. This module builds them (pretrained by name, from a local directory, or
randomly initialised for tests) and draws their inputs reproducibly.

BigGAN facts that matter here:
- the class input is a dense (one-hot or soft) vector through a Linear embedding, so
  classes can be mixed and interpolated;
- batch norm never uses batch statistics: it reads 51 stored rows indexed by truncation,
  so a sample does not depend on the rest of its batch and batch size 1 works.
"""
from __future__ import annotations

import copy
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.utils.spectral_norm import SpectralNorm

from pytorch_pretrained_biggan import BigGAN, BigGANConfig
from pytorch_pretrained_biggan.model import (
    CONFIG_NAME,
    PRETRAINED_CONFIG_ARCHIVE_MAP,
    PRETRAINED_MODEL_ARCHIVE_MAP,
    WEIGHTS_NAME,
)

from cgn_dist.errors import DownloadError, InputError, InputNotFound
from cgn_dist.models.u2net import check_state_dict

__all__ = [
    "BigGAN",
    "BigGANConfig",
    "BIGGAN_DEEP_256_LAYERS",
    "TINY_BIGGAN_LAYERS",
    "biggan_deep_256_config",
    "tiny_biggan_config",
    "build_biggan",
    "load_biggan_dir",
    "load_biggan_files",
    "save_biggan_dir",
    "clone_biggan",
    "refresh_spectral_weights",
    "count_parameters",
    "truncated_noise",
    "class_vector",
    "soft_class_vector",
    "interpolate_class_vectors",
    "check_truncation",
    "check_state_dict",
]

# (upsample, in x channel_width, out x channel_width) of the 12 GenBlocks of BigGAN-deep-256.
# The package's default BigGANConfig() is the 128-px layout; this list gives exactly the
# 602 keys of each mechanism in the released CGN checkpoint.
BIGGAN_DEEP_256_LAYERS = [
    (False, 16, 16), (True, 16, 16),
    (False, 16, 16), (True, 16, 8),
    (False, 8, 8), (True, 8, 8),
    (False, 8, 8), (True, 8, 4),
    (False, 4, 4), (True, 4, 2),
    (False, 2, 2), (True, 2, 1),
]

# 32 px, 10 classes, 171k parameters: channels only halve or stay, start at x16, end at x1.
TINY_BIGGAN_LAYERS = [(False, 16, 16), (True, 16, 8), (True, 8, 4), (True, 4, 2), (False, 2, 1)]

WEIGHTS_HELP = (
    "Run `cgn-dist weights fetch biggan-deep-256` once (with internet access; imagenet.biggan=biggan-deep-256 "
    "then loads from the weights cache, offline too), or set imagenet.biggan=DIR, a local directory holding "
    "'config.json' and 'pytorch_model.bin' (the files behind " + PRETRAINED_MODEL_ARCHIVE_MAP["biggan-deep-256"]
    + " and its '-config.json')."
)


def biggan_deep_256_config() -> BigGANConfig:
    """Config of BigGAN-deep-256 (z 128, 1000 classes, attention at 64x64)."""
    return BigGANConfig(
        output_dim=256,
        z_dim=128,
        class_embed_dim=128,
        channel_width=128,
        num_classes=1000,
        layers=list(BIGGAN_DEEP_256_LAYERS),
        attention_layer_position=8,
        eps=1e-4,
        n_stats=51,
    )


def tiny_biggan_config() -> BigGANConfig:
    """32-px BigGAN-deep layout for tests and smoke runs (10 classes, z 16)."""
    return BigGANConfig(
        output_dim=32,
        z_dim=16,
        class_embed_dim=16,
        channel_width=8,
        num_classes=10,
        layers=list(TINY_BIGGAN_LAYERS),
        attention_layer_position=3,
        eps=1e-4,
        n_stats=51,
    )


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


# --- spectral norm --------------------------------------------------------------------------

def _spectral_norm_hooks(model: nn.Module):
    for module in model.modules():
        for hook in module._forward_pre_hooks.values():
            if isinstance(hook, SpectralNorm):
                yield module, hook


@torch.no_grad()
def refresh_spectral_weights(model: nn.Module, power_iterations: int = 0) -> None:
    """Run `power_iterations` spectral-norm power iterations (updating the u/v buffers)
    and recompute each normalised `weight` attribute as a plain detached tensor.

    Random init needs the iterations: the package's spectral norm does none in eval
    mode, and with random u/v the estimated sigma is tiny, which blows up activations
    to inf/NaN. The detached weight also makes the module safe to deepcopy (a weight
    left over from a forward with autograd is a non-leaf tensor, which deepcopy refuses).
    """
    for module, hook in _spectral_norm_hooks(model):
        for _ in range(power_iterations):
            hook.compute_weight(module, do_power_iteration=True)
        setattr(module, hook.name, hook.compute_weight(module, do_power_iteration=False).detach())


def clone_biggan(model: BigGAN) -> BigGAN:
    """Independent copy (parameters, buffers and config) of a BigGAN."""
    refresh_spectral_weights(model)
    return copy.deepcopy(model)


# --- building and loading -----------------------------------------------------------------

def _random_biggan(config: BigGANConfig, seed: int, device: str | torch.device = "cpu") -> BigGAN:
    with torch.random.fork_rng(devices=[]):  # deterministic init, global RNG untouched
        torch.manual_seed(seed)
        with torch.device(device):
            model = BigGAN(config)
            # The final unconditional BN's affine parameters are left as uninitialised
            # memory (`torch.Tensor(n)`) by the package: set them to the identity.
            nn.init.ones_(model.generator.bn.weight)
            nn.init.zeros_(model.generator.bn.bias)
        # Meta tensors hold no values: power iterations there would only cost time.
        refresh_spectral_weights(model, power_iterations=0 if torch.device(device).type == "meta" else 10)
    return model.eval()


def load_biggan_dir(directory: str | Path, map_location: str | torch.device = "cpu") -> BigGAN:
    """Load a BigGAN from a directory with 'config.json' + 'pytorch_model.bin', checking
    every key and shape (the package's own `from_pretrained` loads with strict=False and
    would silently leave missing weights random)."""
    directory = Path(directory)
    return load_biggan_files(directory / CONFIG_NAME, directory / WEIGHTS_NAME, map_location)


def load_biggan_files(
    config_file: str | Path, weights_file: str | Path, map_location: str | torch.device = "cpu"
) -> BigGAN:
    """Load a BigGAN from a config json and a state-dict file; every key and shape checked."""
    config_file, weights_file = Path(config_file), Path(weights_file)
    for f in (config_file, weights_file):
        if not f.is_file():
            raise InputNotFound(f"BigGAN file '{f}' not found. {WEIGHTS_HELP}")
    try:
        config = BigGANConfig.from_json_file(str(config_file))
        config.layers = [tuple(layer) for layer in config.layers]
    except (ValueError, TypeError, AttributeError) as e:
        raise InputError(f"'{config_file}' is not a BigGAN config json ({e}). {WEIGHTS_HELP}") from e
    try:
        state = torch.load(weights_file, map_location=map_location, weights_only=True)
    except Exception as e:
        from cgn_dist.weights import unreadable_reason

        raise InputError(f"'{weights_file}' is not BigGAN weights: {unreadable_reason(weights_file, e)}. "
                         f"{WEIGHTS_HELP}") from e
    if not isinstance(state, Mapping):
        raise InputError(f"'{weights_file}' does not hold a state dict. {WEIGHTS_HELP}")
    model = BigGAN(config)
    check_state_dict(model, state, f"BigGAN weights '{weights_file}'")
    model.load_state_dict(state)
    refresh_spectral_weights(model)
    return model.eval()


def save_biggan_dir(model: BigGAN, directory: str | Path) -> Path:
    """Write 'config.json' + 'pytorch_model.bin' (the layout `load_biggan_dir` and the
    package's `from_pretrained` read)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_NAME).write_text(json.dumps(model.config.to_dict(), indent=2, sort_keys=True))
    torch.save(model.state_dict(), directory / WEIGHTS_NAME)
    return directory


def _download_pretrained(name: str, cache_dir: str | Path | None) -> BigGAN:
    from pytorch_pretrained_biggan.file_utils import cached_path

    from cgn_dist import weights

    if weights.is_name(name) and weights.path_of(name).is_file():  # fetched by `cgn-dist weights fetch`
        return load_biggan_dir(weights.path_of(name).parent)
    try:
        # The package's cache sends an HTTP HEAD before looking in its cache, so a named
        # model never loads offline, even when cached.
        weights = cached_path(PRETRAINED_MODEL_ARCHIVE_MAP[name], cache_dir=cache_dir)
        config = cached_path(PRETRAINED_CONFIG_ARCHIVE_MAP[name], cache_dir=cache_dir)
    except (OSError, ValueError) as e:  # requests' errors derive from OSError
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        if len(reason) > 120:  # requests' messages spell out the whole connection pool
            reason = type(e).__name__
        how = f"offline, set imagenet.biggan to a local directory with '{CONFIG_NAME}' + '{WEIGHTS_NAME}'"
        if weights.is_name(name):
            how = f"{weights.missing_message(name, 'imagenet.biggan')}; or {how[9:]}"
        raise DownloadError(f"cannot download BigGAN {name!r} ({reason}); {how}") from e
    return load_biggan_files(config, weights)


def build_biggan(
    source: str | Path = "biggan-deep-256",
    cache_dir: str | Path | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> BigGAN:
    """Build a BigGAN generator, returned in eval mode.

    source:
      "biggan-deep-128" / "biggan-deep-256" / "biggan-deep-512": pretrained weights
          fetched (and cached under `cache_dir`) by the package; needs internet access;
      a directory with 'config.json' + 'pytorch_model.bin': loaded with every key checked;
      "tiny": random 32-px model (`tiny_biggan_config`), deterministic from `seed`;
      "random-256": random BigGAN-deep-256 layout, for shape / parameter-count checks
          (`device="meta"` builds it without memory).
    """
    src = str(source)
    if src == "tiny":
        return _random_biggan(tiny_biggan_config(), seed, device)
    if src == "random-256":
        return _random_biggan(biggan_deep_256_config(), seed, device)
    if src in PRETRAINED_MODEL_ARCHIVE_MAP:
        return _download_pretrained(src, cache_dir)
    path = Path(source)
    if path.is_dir():
        return load_biggan_dir(path)
    raise InputNotFound(
        f"Unknown BigGAN source '{src}': not a model name "
        f"({', '.join(PRETRAINED_MODEL_ARCHIVE_MAP)}), 'tiny', 'random-256', nor an existing "
        f"directory. {WEIGHTS_HELP}"
    )


# --- inputs -------------------------------------------------------------------------------

def check_truncation(truncation: float) -> float:
    """Return `truncation` as a float; ValueError unless 0 < truncation <= 1 (BigGAN's
    batch-norm statistics exist only for that range)."""
    try:
        t = float(truncation)
    except (TypeError, ValueError) as e:
        raise InputError(f"truncation must be a number in (0, 1], got {truncation!r}") from e
    if not (0.0 < t <= 1.0):  # also rejects NaN
        raise InputError(f"truncation must be in (0, 1], got {truncation!r}")
    return t


def _truncated_normal(rng: np.random.Generator, dim: int, bound: float = 2.0) -> np.ndarray:
    # Rejection sampling of N(0,1) restricted to [-bound, bound]: exact, and depends only
    # on numpy's Generator stream (stable across numpy versions), not on scipy internals.
    x = rng.standard_normal(dim)
    out = np.abs(x) > bound
    while out.any():
        x[out] = rng.standard_normal(int(out.sum()))
        out = np.abs(x) > bound
    return x


def truncated_noise(
    batch: int,
    dim: int,
    truncation: float,
    seed: int | Sequence[int | Sequence[int]] | None = None,
) -> torch.Tensor:
    """BigGAN noise u = truncation * truncnorm(-2, 2), shape batch x dim, float32.

    seed: None -> fresh OS entropy; an int -> sample i is drawn from the seed sequence
    (seed, i); a list of `batch` seeds (each an int or a tuple of ints such as
    (run_seed, shard, index)) -> one numpy Generator per sample. In every case a sample's
    noise depends only on its own seed, never on the batch it is drawn in.
    """
    t = check_truncation(truncation)
    if batch < 0 or dim <= 0:
        raise ValueError(f"need batch >= 0 and dim > 0, got batch={batch}, dim={dim}")
    if seed is None:
        rngs = [np.random.default_rng() for _ in range(batch)]
    elif isinstance(seed, (int, np.integer)):
        rngs = [np.random.default_rng([int(seed), i]) for i in range(batch)]
    else:
        seeds = list(seed)
        if len(seeds) != batch:
            raise ValueError(f"got {len(seeds)} seeds for a batch of {batch}")
        rngs = [np.random.default_rng(s) for s in seeds]
    if batch == 0:
        return torch.zeros(0, dim)
    u = np.stack([_truncated_normal(rng, dim) for rng in rngs]) * t
    return torch.from_numpy(u).float()


def _as_class_ids(classes, n_classes: int) -> torch.Tensor:
    ids = torch.as_tensor(classes).reshape(-1)
    if ids.is_floating_point() or ids.dtype == torch.bool:
        if ids.is_floating_point() and not torch.equal(ids, ids.round()):
            raise ValueError(f"class ids must be integers, got {classes!r}")
        ids = ids.long()
    bad = (ids < 0) | (ids >= n_classes)
    if bad.any():
        raise ValueError(f"class ids {ids[bad].tolist()} out of range [0, {n_classes})")
    return ids.long()


def class_vector(classes, n_classes: int = 1000) -> torch.Tensor:
    """One-hot float class vectors, len(classes) x n_classes, for BigGAN's Linear embedding."""
    ids = _as_class_ids(classes, n_classes)
    return torch.nn.functional.one_hot(ids, n_classes).float()


def soft_class_vector(
    mixture: Mapping[int, float] | Sequence[tuple[int, float]], n_classes: int = 1000
) -> torch.Tensor:
    """A 1 x n_classes vector with the given weight per class, e.g. {207: 0.5, 250: 0.5}.
    Weights are used as given (BigGAN's embedding is linear, so they need not sum to 1)."""
    items = list(mixture.items()) if isinstance(mixture, Mapping) else list(mixture)
    if not items:
        raise ValueError("soft_class_vector needs at least one (class, weight) pair")
    ids = _as_class_ids([c for c, _ in items], n_classes)
    vec = torch.zeros(1, n_classes)
    for c, (_, w) in zip(ids.tolist(), items):
        if not math.isfinite(float(w)):
            raise ValueError(f"class weight for {c} must be finite, got {w!r}")
        vec[0, c] += float(w)
    return vec


def interpolate_class_vectors(start: int, end: int, steps: int, n_classes: int = 1000) -> torch.Tensor:
    """`steps` one-hot -> one-hot linear interpolations from class `start` to `end`
    (both ends included): steps x n_classes. CGN's interpolation sheets use
    steps = midpoints + 2."""
    if steps < 2:
        raise ValueError(f"steps must be >= 2 (both ends included), got {steps}")
    a, b = class_vector([start, end], n_classes)
    alpha = torch.linspace(0.0, 1.0, steps).unsqueeze(1)
    return (1 - alpha) * a + alpha * b
