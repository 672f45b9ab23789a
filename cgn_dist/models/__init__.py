"""Plain nn.Modules. MODELS maps a config name to its class."""

from cgn_dist.models.cgn_mnist import CGNMnist
from cgn_dist.models.discriminator import DiscConv, DiscLin

MODELS: dict[str, type] = {
    "cgn_mnist": CGNMnist,
    "disc_lin": DiscLin,
    "disc_conv": DiscConv,
}

__all__ = ["MODELS", "CGNMnist", "DiscLin", "DiscConv"]
