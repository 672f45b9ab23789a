"""The MNIST classifier experiment: original sets as shards, classifiers on original /
counterfactual / combined data, the paper's MNIST table.
"""
