"""The invariant ImageNet classifier: its training loop (task=classifier) and the paper's
evaluations (shape bias, IN-9, accuracy, Inception Score) with their tables.
"""
