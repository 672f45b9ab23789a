"""The MNIST invariant-classifier experiment: original sets as shards, classifier training on original /
counterfactual / combined data, and the paper's MNIST table.

Heavy imports (webdataset, matplotlib) happen on use, not here.
"""
from cgn_dist.classifier.experiment import run_mnist_experiment
from cgn_dist.classifier.mnist import (ClassifierSettings, ImageSet, evaluate, load_image_set, train_classifier,
                                       train_classifiers)
from cgn_dist.classifier.originals import dump_original_sets
from cgn_dist.classifier.table import build_mnist_table, format_mnist_table, save_mnist_table

__all__ = ["run_mnist_experiment", "ClassifierSettings", "ImageSet", "evaluate", "load_image_set",
           "train_classifier", "train_classifiers", "dump_original_sets", "build_mnist_table",
           "format_mnist_table", "save_mnist_table"]
