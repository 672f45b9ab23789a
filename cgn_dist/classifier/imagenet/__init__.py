"""The invariant ImageNet classifier: its training loop (task=invariant) and the paper's
evaluations (shape bias, IN-9, accuracy, Inception Score) with their tables.
"""
