"""Class-conditional discriminators for the MNIST CGN.

DiscLin (colored, double-colored; ndf 512) and DiscConv (wildlife; ndf 32). Both return
one realness score per sample, shape (B,), for an LSGAN (MSE) objective.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class DiscLin(nn.Module):
    """MLP on the flattened image concatenated with a 10-d label embedding.

    PyTorch default initialisation (as in the original).
    """

    def __init__(self, n_classes: int = 10, ndf: int = 512, img_shape: tuple[int, int, int] = (3, 32, 32)):
        super().__init__()
        self.img_shape = tuple(img_shape)
        self.label_emb = nn.Embedding(n_classes, n_classes)
        in_dim = math.prod(self.img_shape) + n_classes
        self.model = nn.Sequential(
            nn.Linear(in_dim, ndf),
            nn.LeakyReLU(0.2),
            nn.Linear(ndf, ndf),
            nn.Dropout(0.4),
            nn.LeakyReLU(0.2),
            nn.Linear(ndf, ndf),
            nn.Dropout(0.4),
            nn.LeakyReLU(0.2),
            nn.Linear(ndf, 1),
        )

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = torch.cat([x.flatten(1), self.label_emb(y)], dim=1)
        return self.model(h).view(-1)


class DiscConv(nn.Module):
    """Conv net; the label enters as a constant 4th input channel from Embedding(n, 1).

    Spatial size 32 -> 30 -> 28 -> 13 -> 5 -> (AvgPool 3) 1 for 32-px inputs. Convs have no
    padding and no bias. Init: Conv weights N(0, 0.02), BatchNorm weights N(1, 0.02), biases 0;
    the embedding keeps its default N(0, 1).
    """

    def __init__(self, n_classes: int = 10, ndf: int = 32, init_generator: torch.Generator | None = None):
        super().__init__()
        self.label_emb = nn.Embedding(n_classes, 1)

        def block(cin: int, cout: int, k: int, stride: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, k, stride=stride, padding=0, bias=False),
                    nn.BatchNorm2d(cout), nn.LeakyReLU(0.2)]

        self.model = nn.Sequential(
            *block(4, ndf, 3, 1),
            *block(ndf, 2 * ndf, 3, 1),
            *block(2 * ndf, 4 * ndf, 4, 2),
            *block(4 * ndf, 4 * ndf, 4, 2),
            nn.AvgPool2d(3),
            nn.Conv2d(4 * ndf, 1, 1, bias=False),
        )
        for m in self.model.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02, generator=init_generator)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02, generator=init_generator)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        label_plane = self.label_emb(y).view(b, 1, 1, 1).expand(b, 1, h, w)
        return self.model(torch.cat([x, label_plane], dim=1)).view(b)


__all__ = ["DiscLin", "DiscConv"]
