"""Counterfactual sheet of a CGN-MNIST generator: the picture that shows whether the mechanisms separate.

Row s holds the shape (mask) of class s, fixed, composed with the texture and background of class t in
column t: the diagonal is the class itself, every other tile a counterfactual. The sheet says so itself:
rows are labelled "shape s", columns "mask" and "tex+bg t". A mask that caught the
digit reads as digit s in every column; a mask stuck as a blob, or inverted, shows up at once.
"""
from __future__ import annotations

import torch

from cgn_dist.models.cgn_mnist import CGNMnist
from cgn_dist.train.metrics import make_sheet


@torch.no_grad()
def counterfactual_sheet(gen: CGNMnist, n_classes: int, device, seed: int = 4321,
                         labels: bool = True) -> torch.Tensor:
    was_training = gen.training
    gen.eval()
    g = torch.Generator().manual_seed(seed)
    shape = torch.arange(n_classes, device=device)
    u_shape = gen.sample_noise(n_classes, generator=g).to(device)
    columns = []
    for t in range(n_classes):
        other = torch.full((n_classes,), t, device=device)
        u_t = gen.sample_noise(n_classes, generator=g).to(device)
        u_b = gen.sample_noise(n_classes, generator=g).to(device)
        # the model's own counterfactual pass: the fixed shape noise gives the same mask in every column
        mask, _, _, x = gen(shape, other, other, u=u_shape, u_text=u_t, u_bg=u_b, generator=g)
        columns.append(x)
    gen.train(was_training)
    if not labels:
        return make_sheet([mask] + columns, unit=[True] + [False] * n_classes, upsample=2)
    # Rows are the shape class (its mask first), columns the class whose texture and background it wears.
    return make_sheet([mask] + columns, unit=[True] + [False] * n_classes, upsample=2,
                      titles=["mask"] + [f"tex+bg {t}" for t in range(n_classes)],
                      row_labels=[f"shape {s}" for s in range(n_classes)])


__all__ = ["counterfactual_sheet"]
