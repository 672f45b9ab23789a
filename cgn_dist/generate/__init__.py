"""Counterfactual datasets from trained CGNs on the shard engine (cgn_dist.sharding): the MNIST
sampler (mnist.py), the ImageNet one (imagenet/), generation speed (speed.py) and the generate command."""
