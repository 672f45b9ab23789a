"""The interface between the generation engine and a model.

A *sampler factory* is a picklable zero-argument callable (best: a frozen dataclass holding paths and
settings) that builds a *sampler* once per worker; the model stays loaded while the worker pulls shards.

A sampler has:
- ``sample(refs: list[SampleRef]) -> list[dict]``: one dict per ref, mapping WebDataset extensions to
  values (``"jpg"``/``"png"`` bytes, ``"json"`` dict, ``"mask.png"`` bytes, ...; see
  ``cgn_dist.data.shards.encode_value``). The stored bytes of a sample must depend on its ref alone,
  never on the batch it came in or on earlier calls: draw all noise from generators seeded by ``ref.seed``.
  (Batches are fixed by shard and batch size, see plan.batch_bounds, so numerics that vary with the batch
  composition, e.g. GPU kernels picked by batch size, still give the same bytes for the same batch_size.)
  A sampler that reads inputs may instead return ``{"__reject__": reason, "__source__": path}`` for a bad
  input: the sample is not written, and shard stats and manifest list it (``rejects``). A ``"__note__"``
  string in a written sample (e.g. "CMYK converted to RGB") is listed likewise (``notes``).
- optionally ``info() -> dict``: JSON-able provenance (checkpoint sha256, truncation, mode...), stored in
  every shard's stats and in the manifest; shards made with different info are never mixed in one run.
- optionally ``coverage_keys``: names of integer class fields in the ``json`` value whose per-class counts
  the shard stats keep (default ``DEFAULT_COVERAGE_KEYS``).
- optionally ``begin_shard(spec: ShardSpec)``: called before a shard's samples are asked for (a sampler may
  compute ahead within the shard); it must not change any bytes.
- optionally ``close()``: frees the model when the worker stops.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
from typing import Any, Callable, Protocol, runtime_checkable

from cgn_dist.errors import InputError
from cgn_dist.sharding.plan import SampleRef

# Field names of the class triple in a counterfactual sample's json (the original labels.csv columns).
DEFAULT_COVERAGE_KEYS = ("shape_cls", "texture_cls", "bg_cls")


@runtime_checkable
class Sampler(Protocol):
    def sample(self, refs: list[SampleRef]) -> list[dict[str, Any]]: ...


SamplerFactory = Callable[[], Sampler]


def sampler_info(sampler: Any) -> dict[str, Any]:
    info = sampler.info() if hasattr(sampler, "info") else {}
    if not isinstance(info, dict):
        raise TypeError(f"{type(sampler).__name__}.info() must return a dict, got {type(info).__name__}")
    return json.loads(json.dumps(info, sort_keys=True, default=str))  # JSON-normalised: comparable later


def coverage_keys(sampler: Any) -> tuple[str, ...]:
    return tuple(getattr(sampler, "coverage_keys", DEFAULT_COVERAGE_KEYS))


def describe_factory(factory: Any) -> dict[str, Any]:
    """A JSON description of the factory; for a dataclass of JSON-able fields it can rebuild the factory.

    Stored in the manifest so that ``regenerate_sample`` can work from the manifest alone. A field with
    ``metadata={"omit_default": True}`` (one added after folders were written) is left out at its default:
    those folders' descriptions then still name the same run, and rebuild with the default.
    """
    cls = type(factory)
    target = f"{cls.__module__}:{cls.__qualname__}"
    if dataclasses.is_dataclass(factory) and not isinstance(factory, type):
        kwargs = {f.name: getattr(factory, f.name) for f in dataclasses.fields(factory)
                  if f.init and not (f.metadata.get("omit_default") and getattr(factory, f.name) == f.default)}
        try:
            json.dumps(kwargs, allow_nan=False)
            return {"target": target, "kwargs": kwargs}
        except (TypeError, ValueError):
            pass
    return {"target": target, "repr": repr(factory)}


# Factories whose module moved: folders written before keep their target in plan.json and manifest.json,
# so the old names still rebuild the factory and still count as the same run.
MOVED_TARGETS = {"cgn_dist.generate.imagenet_factory": "cgn_dist.generate.imagenet.factory",
                 "cgn_dist.generate.toy": "cgn_dist.sharding.toy",
                 "cgn_dist.data.image_shards": "cgn_dist.ingest.image_shards"}


def canonical_target(target: str | None) -> str | None:
    """``module:qualname`` with a moved module under its present name."""
    if not target:
        return target
    module, sep, qualname = target.partition(":")
    return MOVED_TARGETS.get(module, module) + sep + qualname


def build_factory(description: dict[str, Any]) -> Any:
    """Inverse of describe_factory for dataclass factories; ValueError when the manifest cannot rebuild it."""
    if "kwargs" not in description:
        raise InputError(f"the manifest describes the sampler factory only as {description.get('repr')!r}; "
                         "pass sampler_factory explicitly")
    module, _, qualname = canonical_target(description["target"]).partition(":")
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj(**description["kwargs"])


def close_sampler(sampler: Any) -> None:
    close = getattr(sampler, "close", None)
    if callable(close):
        close()
