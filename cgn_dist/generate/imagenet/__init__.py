"""The ImageNet counterfactual sampler: settings (factory), model and weights, class labels,
the sampler itself, class interpolation.
"""
