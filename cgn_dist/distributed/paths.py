"""Paths a config names, made absolute in the driver before a Ray launch.

Ray moves each worker's cwd to a session folder, so a relative path that is right in the driver names
nothing (or the wrong thing) in a worker. URIs (s3://, gs://, ...) pass through unchanged: resolving one
as a local path would turn s3://bucket/x into <cwd>/s3:/bucket/x.
"""
from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

from cgn_dist.config import Config

_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")

# Output locations: always paths, made absolute even before they exist.
OUTPUT_KEYS = ("out_dir", "ray.storage_path", "shards.out", "eval.out")
# Inputs that are a path or a name/keyword ("auto", "tiny", "cgn-imagenet", "torchvision:resnet50"):
# made absolute only when they look like a path (a separator) or exist here.
INPUT_KEYS = (
    "data.root", "data.textures", "mnist.vgg_weights", "mnist.init_from",
    "imagenet.biggan", "imagenet.cache_dir", "imagenet.u2net", "imagenet.vgg_weights", "imagenet.init_from",
    "generate.checkpoint", "generate.interp_noise",
    "shards.root", "shards.val_labels", "shards.devkit_meta",
    "mnist_pipeline.released_dir",
    "invariant.weights", "invariant.init_from", "invariant.real_shards", "invariant.cf_shards",
    "eval.model", "eval.weights", "eval.cue_conflict", "eval.decisions_csv", "eval.in9", "eval.val_shards",
    "eval.cf_val_shards", "eval.samples", "eval.inception_weights",
    "imagenet_pipeline.train_root", "imagenet_pipeline.val_root", "imagenet_pipeline.val_labels",
)


def is_uri(value: str) -> bool:
    """True for scheme://... (object storage, ray://): never a local path."""
    return bool(_URI.match(value))


def absolute(value: str, always: bool = True) -> str:
    """``value`` as an absolute local path; unchanged when empty, a URI, or (always=False) a bare name."""
    if not value or is_uri(value) or os.path.isabs(value):
        return value
    if not always and os.sep not in value and "/" not in value and not os.path.exists(value):
        return value  # a keyword or a registry name, not a file
    return str(Path(value).expanduser().resolve())


def _get(cfg: Config, key: str):
    obj = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def _set(cfg: Config, key: str, value) -> Config:
    head, _, rest = key.partition(".")
    if not rest:
        return dataclasses.replace(cfg, **{head: value})
    return dataclasses.replace(cfg, **{head: _set(getattr(cfg, head), rest, value)})


def config_paths(cfg: Config) -> dict[str, str]:
    """Every non-empty path-valued key of ``cfg`` (dotted key -> value as given)."""
    out = {}
    for key in OUTPUT_KEYS + INPUT_KEYS:
        value = _get(cfg, key)
        if isinstance(value, str) and value:
            out[key] = value
    return out


def absolute_config(cfg: Config) -> Config:
    """A copy of ``cfg`` with every path it names absolute (against the driver's cwd); URIs and names kept."""
    for key in OUTPUT_KEYS + INPUT_KEYS:
        value = _get(cfg, key)
        if isinstance(value, str):
            new = absolute(value, always=key in OUTPUT_KEYS)
            if new != value:
                cfg = _set(cfg, key, new)
    return cfg
