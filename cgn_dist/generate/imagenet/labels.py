"""The class triple of each counterfactual sample.

``draw_classes`` by ``mode`` (everything from the sample's seed, numpy.random.default_rng([seed, CLASS_STREAM])):
  random        three independent uniform ids in [0, n_classes) (shape, texture, background);
  best_classes  one uniform pick from each curated list of class_lists.py (1000-class models only);
  fixed_classes the configured [shape, texture, background] for every sample.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cgn_dist.data.imagenet_classes import IMAGENET_CLASSES, class_name, imagenet_classes  # noqa: F401
from cgn_dist.errors import InputError
from cgn_dist.generate.class_lists import BEST_BACKGROUND_CLASSES, BEST_SHAPE_CLASSES, BEST_TEXTURE_CLASSES

MODES = ("random", "best_classes", "fixed_classes")
CLASS_STREAM = 1  # the class triple's generator: default_rng([seed, CLASS_STREAM]); the noise uses seed alone


def check_classes(mode: str, classes: Sequence[int], n_classes: int) -> None:
    """ValueError unless the mode's class ids exist in a model of ``n_classes`` classes."""
    if mode == "best_classes" and n_classes != IMAGENET_CLASSES:
        # The curated lists name ImageNet classes; reduced modulo a small model's classes they would pick
        # arbitrary ids while claiming to be the authors' selection.
        raise InputError(f"best_classes picks from curated ImageNet id lists and needs a {IMAGENET_CLASSES}-class "
                         f"model; this one has {n_classes} classes: use mode random or fixed_classes")
    bad = [c for c in classes if not 0 <= int(c) < n_classes]
    if bad:
        raise InputError(f"class ids {bad} are out of range for this model ({n_classes} classes: 0..{n_classes - 1})")


def draw_classes(mode: str, seed: int, n_classes: int, fixed: Sequence[int] = ()) -> tuple[int, int, int]:
    """The (shape, texture, background) class triple of the sample with this seed."""
    if mode == "fixed_classes":
        return int(fixed[0]), int(fixed[1]), int(fixed[2])
    rng = np.random.default_rng([int(seed), CLASS_STREAM])
    if mode == "random":
        s, t, b = rng.integers(0, n_classes, 3)
        return int(s), int(t), int(b)
    if mode == "best_classes":
        return tuple(int(lst[rng.integers(len(lst))]) for lst in  # type: ignore[return-value]
                     (BEST_SHAPE_CLASSES, BEST_TEXTURE_CLASSES, BEST_BACKGROUND_CLASSES))
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


