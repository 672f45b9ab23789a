"""The exactly-once shard engine: a plan of shards (keys, seeds), any sampler, atomic tars with a
commit marker, local / process-pool / Ray workers, manifest + index, regenerate, verify. It knows nothing
of CGNs or ImageNet: the counterfactual samplers (generate/) and the image-tree ingest (ingest/) use it.
"""
