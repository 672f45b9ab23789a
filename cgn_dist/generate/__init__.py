"""Sharded, seeded, exactly-once generation of WebDataset shards from any sampler.

plan (shards, keys, seeds) -> sampler (a model's batch of samples) -> writer (atomic tar + stats marker)
-> backends (local / process pool / Ray actors) -> manifest.json + index.json.

Ray (and torch, for TensorBoard grids) is imported only where used.
"""
from cgn_dist.generate.backends import run_shards
from cgn_dist.generate.manifest import load_manifest, verify_output
from cgn_dist.generate.plan import (SampleRef, ShardSpec, make_plan, parse_key, sample_key, sample_refs,
                                    sample_seed)
from cgn_dist.generate.progress import grid_callback, log_shard_grid
from cgn_dist.generate.regenerate import regenerate_sample
from cgn_dist.generate.run import describe_plan, format_plan, generate_dataset
from cgn_dist.generate.sampler import DEFAULT_COVERAGE_KEYS, Sampler, SamplerFactory
from cgn_dist.generate.writer import GenerationError, ShardCheck, verify_shard, write_shard

__all__ = [
    "DEFAULT_COVERAGE_KEYS", "GenerationError", "SampleRef", "Sampler", "SamplerFactory", "ShardCheck",
    "ShardSpec", "describe_plan", "format_plan", "generate_dataset", "grid_callback", "load_manifest",
    "log_shard_grid", "make_plan", "parse_key", "regenerate_sample", "run_shards", "sample_key",
    "sample_refs", "sample_seed", "verify_output", "verify_shard", "write_shard",
]
