"""Data sets: MNIST variants and textures (mnist.py, textures.py)."""

from cgn_dist.data.mnist import (ColoredMNIST, DoubleColoredMNIST, WildlifeMNIST, build_mnist_dataset,
                                 load_digits)
from cgn_dist.data.textures import load_texture_folder, make_procedural_textures

__all__ = ["ColoredMNIST", "DoubleColoredMNIST", "WildlifeMNIST", "build_mnist_dataset", "load_digits",
           "load_texture_folder", "make_procedural_textures"]
