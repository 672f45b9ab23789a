"""Data: MNIST variants (mnist.py), wildlife textures (textures.py), WebDataset shards (shards.py).

Nothing is imported here, so shard workers that only need ``data.shards`` do not pay for torch.
"""
