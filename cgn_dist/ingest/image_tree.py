"""Listing an image tree with its labels: ILSVRC-2012 train / val layouts and any ImageFolder tree.

- class folders (``<root>/<wnid>/*.JPEG``, ILSVRC train and the usual re-foldered val; or any
  ``<root>/<class>/<file>`` tree): with ``labels="imagenet"`` the label is the index of the WNID in the
  standard 1000-class order (sorted WNIDs, shipped in ``imagenet_categories.txt``, the order torchvision's
  ImageFolder gives a full ILSVRC tree); with ``labels="folders"`` the index in sorted folder order;
- flat val (``<root>/ILSVRC2012_val_00000001.JPEG`` ...) with a ground-truth list: the devkit's
  ``ILSVRC2012_validation_ground_truth.txt`` (one ILSVRC2012_ID per line, in file order; the IDs are the
  devkit's own class numbering, NOT the sorted-WNID order, and map to WNIDs through the devkit's
  ``data/meta.mat``), Kaggle's ``LOC_val_solution.csv`` (``ImageId,PredictionString``), or plain
  ``<file name> <wnid>`` lines.

Every file whose name ends in an image extension is listed, even if it turns out unreadable (a directory or
a dangling link named ``.JPEG``): the sharder decides, by decoding, what is written and what is rejected.
Other files are counted as ignored, never dropped silently.
"""
from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from cgn_dist.data.imagenet_classes import imagenet_classes
from cgn_dist.errors import InputError, InputNotFound

# torchvision's ImageFolder extensions (case-insensitive); ILSVRC uses .JPEG.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
WNID_RE = re.compile(r"^n\d{8}$")
VAL_NAME_RE = re.compile(r"ILSVRC2012_val_(\d{8})")


@dataclass(frozen=True)
class SourceFile:
    path: str  # relative to the tree's root, '/'-separated
    label: int
    wnid: str  # the class folder (or ground-truth WNID); for non-ImageNet trees the folder name
    size: int  # bytes on disk (0 for a file that cannot be stat'ed)


@dataclass
class TreeListing:
    root: str
    layout: str  # "folders" or "flat"
    labels: str  # "imagenet" or "folders"
    classes: list[str]  # label -> wnid / folder name
    class_names: list[str]  # label -> human-readable name
    files: list[SourceFile]
    ignored: list[str]  # relative paths of files that are not images by name


def imagenet_categories() -> list[tuple[str, str]]:
    """The standard 1000 ImageNet classes in label order: (wnid, names)."""
    return list(imagenet_classes())


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


def _scan(folder: str) -> tuple[list[str], list[str], list[str]]:
    """(image names, other file names, subfolder names) of one folder, sorted; a dangling link or a folder
    with an image name counts as an image (to be rejected later with its reason)."""
    images, others, dirs = [], [], []
    with os.scandir(folder) as it:
        for e in it:
            if _is_image(e.name):
                images.append(e.name)
            elif e.is_dir(follow_symlinks=True):
                dirs.append(e.name)
            else:
                others.append(e.name)
    return sorted(images), sorted(others), sorted(dirs)


def list_tree(root: str | os.PathLike, labels: str = "imagenet", val_labels: str = "",
              devkit_meta: str = "") -> TreeListing:
    """List ``root`` (class folders, or a flat folder with ``val_labels``) in sorted path order."""
    if labels not in ("imagenet", "folders"):
        raise InputError(f"shards.labels must be 'imagenet' or 'folders', got {labels!r}")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise InputNotFound(f"shards.root={str(root)!r} is not a folder; point it at ILSVRC's train/ or val/ "
                            "folder, or any <root>/<class>/<image> tree")
    images, others, dirs = _scan(str(root))
    if val_labels:
        return _list_flat(root, images, others, dirs, val_labels, devkit_meta, labels)
    if images and not dirs:
        raise InputError(f"{root} holds images directly ({images[0]}, ...) but no class folders: for ILSVRC's flat "
                         "val folder set shards.val_labels to the devkit's ILSVRC2012_validation_ground_truth.txt "
                         "(or LOC_val_solution.csv, or '<file> <wnid>' lines)")
    if not dirs:
        raise InputError(f"{root} has no class folders")
    ignored = [*images, *others]  # files beside the class folders belong to no class
    if labels == "imagenet":
        cats = imagenet_categories()
        index = {w: i for i, (w, _) in enumerate(cats)}
        unknown = [d for d in dirs if d not in index]
        if unknown:
            raise InputError(f"{len(unknown)} folder(s) of {root} are not ImageNet WNIDs (e.g. {unknown[:3]}): set "
                             "shards.labels=folders to label by sorted folder order instead")
        classes, names = [w for w, _ in cats], [n for _, n in cats]
    else:
        index = {d: i for i, d in enumerate(dirs)}
        classes, names = list(dirs), list(dirs)
    files = []
    for d in dirs:
        sub_images, sub_others, sub_dirs = _scan(str(root / d))
        ignored += [f"{d}/{n}" for n in sub_others + sub_dirs]
        files += [SourceFile(f"{d}/{n}", index[d], d, _size(str(root / d / n))) for n in sub_images]
    return TreeListing(str(root.resolve()), "folders", labels, classes, names, files, sorted(ignored))


# --- flat val with a ground-truth list ----------------------------------------------------------------------

def devkit_id_to_wnid(meta_mat: str | os.PathLike) -> dict[int, str]:
    """ILSVRC2012_ID -> WNID from the devkit's ``data/meta.mat`` (its ``synsets`` struct array)."""
    from scipy.io import loadmat

    synsets = loadmat(str(meta_mat), squeeze_me=True)["synsets"]
    return {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets}


def read_val_labels(path: str | os.PathLike, devkit_meta: str = "") -> dict[str, str]:
    """Validation file stem (``ILSVRC2012_val_00000001``) -> WNID, from any of the supported lists."""
    path = Path(path)
    if not path.is_file():
        raise InputNotFound(f"shards.val_labels={str(path)!r} does not exist")
    text = path.read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if lines and lines[0].lower().startswith("imageid"):  # Kaggle LOC_val_solution.csv
        return {row["ImageId"]: row["PredictionString"].split()[0] for row in csv.DictReader(lines)}
    if lines and all(ln.isdigit() for ln in lines):  # devkit ground truth: IDs in file order
        meta = Path(devkit_meta) if devkit_meta else path.parent / "meta.mat"
        if not meta.is_file():
            raise InputNotFound(
                f"{path} holds devkit class IDs, which need the devkit's meta.mat to become WNIDs; set "
                f"shards.devkit_meta (looked for {meta}; it is data/meta.mat in ILSVRC2012_devkit_t12)")
        id_to_wnid = devkit_id_to_wnid(meta)
        return {f"ILSVRC2012_val_{i:08d}": id_to_wnid[int(x)] for i, x in enumerate(lines, start=1)}
    out = {}
    for ln in lines:
        parts = ln.replace(",", " ").split()
        if len(parts) < 2 or not WNID_RE.match(parts[1]):
            raise InputError(f"{path}: cannot read line {ln!r}; expected devkit IDs, LOC_val_solution.csv, or "
                             "'<file name> <wnid>' lines")
        out[Path(parts[0]).stem] = parts[1]
    return out


def _list_flat(root: Path, images: Sequence[str], others: Sequence[str], dirs: Sequence[str], val_labels: str,
               devkit_meta: str, labels: str) -> TreeListing:
    truth = read_val_labels(val_labels, devkit_meta)
    cats = imagenet_categories()
    if labels == "imagenet":
        classes, names = [w for w, _ in cats], [n for _, n in cats]
    else:
        classes = sorted(set(truth.values()))
        names = list(classes)
    index = {w: i for i, w in enumerate(classes)}
    files, unlabelled = [], []
    for n in images:
        wnid = truth.get(Path(n).stem)
        if wnid is None:
            unlabelled.append(n)
            continue
        if wnid not in index:
            raise InputError(f"{val_labels} gives {n} the class {wnid}, which is not an ImageNet WNID")
        files.append(SourceFile(n, index[wnid], wnid, _size(str(root / n))))
    if unlabelled:
        raise InputError(f"{len(unlabelled)} image(s) in {root} have no entry in {val_labels} (e.g. "
                         f"{unlabelled[:3]}); is it the ground truth of this folder?")
    missing = len(truth) - len(files)
    if missing:
        raise InputError(f"{val_labels} lists {missing} image(s) that are not in {root}: an incomplete download?")
    return TreeListing(str(root.resolve()), "flat", labels, classes, names, files, sorted([*others, *dirs]))
