"""Data: MNIST variants (mnist.py), wildlife textures (textures.py), WebDataset shards (shards.py), image trees
into shards (image_tree.py, image_shards.py, make_shards.py), the streaming reader (stream.py, transforms.py) and
the real + counterfactual mix (mix.py).

Nothing is imported here, so shard workers that only need ``data.shards`` do not pay for torch.
"""
