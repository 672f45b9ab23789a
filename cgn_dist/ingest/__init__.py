"""Image trees (ILSVRC, ImageFolder) into WebDataset shards on the shard engine: listing, the file
sampler, the make-shards command.
"""
