"""Data: MNIST variants (mnist.py), wildlife textures (textures.py), WebDataset shards (shards.py, shard_index.py),
pixel codecs (pixels.py), ImageNet class names (imagenet_classes.py), the streaming reader (stream.py,
transforms.py), the real + counterfactual mix (mix.py) and batch orders (batch_order.py). Image trees into
shards live in cgn_dist.ingest.

Nothing is imported here, so shard workers that only need ``data.shards`` do not pay for torch.
"""
