"""The 1000 ImageNet classes (package data, one file for the whole project): WNIDs in the standard label
order (sorted WNIDs, torchvision's and the ILSVRC devkit's order) and their names."""
from __future__ import annotations

from functools import lru_cache
from importlib.resources import files

IMAGENET_CLASSES = 1000
_FILE = "imagenet_categories.txt"  # one "<wnid> <name>, <synonym>, ..." line per class, in label order


@lru_cache(maxsize=1)
def imagenet_classes() -> tuple[tuple[str, str], ...]:
    """The 1000 classes in label order as (wnid, "name, synonym, ...")."""
    text = files("cgn_dist.data").joinpath(_FILE).read_text(encoding="utf-8")
    rows = []
    for line in text.splitlines():
        if line.strip():
            wnid, _, names = line.partition(" ")
            rows.append((wnid, names.strip()))
    if len(rows) != IMAGENET_CLASSES:
        raise RuntimeError(f"{_FILE} holds {len(rows)} classes, not {IMAGENET_CLASSES}")
    return tuple(rows)


def class_name(class_id: int) -> str:
    """The short name (first synonym) of a class id, e.g. 0 -> "tench". Two names occur twice ("crane"
    134/517, "maillot" 638/639): the id, not the name, identifies a class. Models with fewer classes
    (tests) use the same ids, hence the same names."""
    return imagenet_classes()[int(class_id)][1].split(",")[0].strip()
