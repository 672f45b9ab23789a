"""End-to-end recipes built from the commands below: MNIST (pipelines.mnist) and ImageNet
(pipelines.imagenet).
"""
