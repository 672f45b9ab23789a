"""A small ILSVRC-2012-style tree of real photos (shipped in scikit-image, scikit-learn and matplotlib), with
every kind of bad file found in the real data set. Reusable by any test (import tests.imagenet_fixture or,
from tests/, ``from imagenet_fixture import make_imagenet_tree``).

Layout:
    <root>/train/<wnid>/<wnid>_<k>.JPEG        9 photos x ``copies`` crops, plus the bad files below
    <root>/val/ILSVRC2012_val_000000NN.JPEG     flat, one crop per photo (shuffled class order)
    <root>/devkit/data/ILSVRC2012_validation_ground_truth.txt + meta.mat   (devkit class IDs, not sorted order)

Bad files in train (as in real ILSVRC, where there are 22 CMYK JPEGs, one PNG named .JPEG, grayscale files):
    truncated JPEG (rejected), CMYK JPEG (converted), grayscale JPEG (converted), PNG named .JPEG
    (converted), zero-byte file (rejected), a directory named .JPEG and a dangling symlink named .JPEG
    (both unreadable, rejected), and when not running as root a chmod-000 file (unreadable, rejected;
    root reads through chmod 000, so the directory and the dangling link make the unreadable case real).
"""
from __future__ import annotations

import io
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

# photo name -> WNID (a plausible ImageNet class for what the photo shows)
PHOTO_WNIDS = {
    "chelsea": "n02124075",        # Egyptian cat
    "coffee": "n07920052",         # espresso
    "astronaut": "n03127747",      # crash helmet
    "rocket": "n04008634",         # projectile, missile
    "motorcycle_left": "n03785016",   # moped
    "motorcycle_right": "n03791053",  # motor scooter
    "china": "n03877845",          # palace
    "flower": "n11939491",         # daisy
    "grace_hopper": "n03763968",   # military uniform
}


def photo_arrays() -> dict[str, np.ndarray]:
    """The nine real photos as HxWx3 uint8 arrays (300..600 px sides, like ImageNet's)."""
    import matplotlib.cbook
    import skimage.data
    from sklearn.datasets import load_sample_images

    left, right, _ = skimage.data.stereo_motorcycle()
    sk = load_sample_images()
    china, flower = (np.asarray(im) for im in sk.images)
    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        hopper = np.asarray(Image.open(f).convert("RGB"))
    return {"chelsea": skimage.data.chelsea(), "coffee": skimage.data.coffee(),
            "astronaut": skimage.data.astronaut(), "rocket": skimage.data.rocket(),
            "motorcycle_left": left, "motorcycle_right": right, "china": china, "flower": flower,
            "grace_hopper": hopper}


def _jpeg(arr: np.ndarray, quality: int = 90, mode: str | None = None) -> bytes:
    img = Image.fromarray(arr)
    if mode:
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _crop(arr: np.ndarray, k: int) -> np.ndarray:
    """Crop k of a photo: the whole photo for k=0, then shifted 90 % crops (distinct images, real content)."""
    if k == 0:
        return arr
    h, w = arr.shape[:2]
    ch, cw = int(h * 0.9), int(w * 0.9)
    oy, ox = (k * 37) % (h - ch + 1), (k * 53) % (w - cw + 1)
    return np.ascontiguousarray(arr[oy:oy + ch, ox:ox + cw])


@dataclass
class ImagenetTree:
    root: Path
    train: Path
    val: Path
    val_labels: Path
    devkit_meta: Path
    good: dict[str, int] = field(default_factory=dict)  # train relpath -> label, stored with original bytes
    converted: dict[str, int] = field(default_factory=dict)  # train relpath -> label, converted to RGB JPEG
    rejected: dict[str, str] = field(default_factory=dict)  # train relpath -> word expected in the reason
    val_good: dict[str, int] = field(default_factory=dict)  # val file name -> label

    @property
    def listed(self) -> int:
        return len(self.good) + len(self.converted) + len(self.rejected)


def imagenet_label(wnid: str) -> int:
    """Index of ``wnid`` in the standard order, read here independently of the package (sorted WNIDs)."""
    here = Path(__file__).resolve().parents[1]
    ref = here.parent / "shared" / "reference" / "eval" / "categories.txt"
    if not ref.is_file():  # outside the dev layout: the standard order is the sorted WNIDs of the package file
        ref = here / "cgn_dist" / "data" / "imagenet_categories.txt"
    wnids = sorted(line.split()[0] for line in ref.read_text().splitlines() if line.strip())
    return wnids.index(wnid)


def make_imagenet_tree(root: str | os.PathLike, copies: int = 2, bad: bool = True) -> ImagenetTree:
    root = Path(root)
    if root.exists():
        shutil.rmtree(root)
    train, val, devkit = root / "train", root / "val", root / "devkit" / "data"
    for d in (train, val, devkit):
        d.mkdir(parents=True)
    tree = ImagenetTree(root, train, val, devkit / "ILSVRC2012_validation_ground_truth.txt", devkit / "meta.mat")
    photos = photo_arrays()
    for name, arr in photos.items():
        wnid = PHOTO_WNIDS[name]
        (train / wnid).mkdir(exist_ok=True)
        for k in range(copies):
            rel = f"{wnid}/{wnid}_{k + 1}.JPEG"
            (train / rel).write_bytes(_jpeg(_crop(arr, k)))
            tree.good[rel] = imagenet_label(wnid)
    if bad:
        _add_bad_files(tree, photos)
    # Flat val + devkit ground truth. Devkit class IDs are their own numbering: here 1..9 in reverse
    # sorted-WNID order, so a reader that took the IDs for sorted-order labels would get every label wrong.
    wnids = sorted(PHOTO_WNIDS.values())
    devkit_id = {w: len(wnids) - i for i, w in enumerate(wnids)}
    order = ["flower", "chelsea", "grace_hopper", "rocket", "coffee", "china", "motorcycle_left", "astronaut",
             "motorcycle_right"]
    ids = []
    for i, name in enumerate(order, start=1):
        fname = f"ILSVRC2012_val_{i:08d}.JPEG"
        (val / fname).write_bytes(_jpeg(_crop(photos[name], 3)))
        tree.val_good[fname] = imagenet_label(PHOTO_WNIDS[name])
        ids.append(devkit_id[PHOTO_WNIDS[name]])
    tree.val_labels.write_text("".join(f"{x}\n" for x in ids))
    _write_meta_mat(tree.devkit_meta, devkit_id)
    return tree


def _add_bad_files(tree: ImagenetTree, photos: dict[str, np.ndarray]) -> None:
    train = tree.train
    w = PHOTO_WNIDS
    full = _jpeg(photos["chelsea"])
    (train / w["chelsea"] / "truncated.JPEG").write_bytes(full[: len(full) * 6 // 10])
    tree.rejected[f"{w['chelsea']}/truncated.JPEG"] = "decode"
    (train / w["coffee"] / "cmyk.JPEG").write_bytes(_jpeg(photos["coffee"], mode="CMYK"))
    tree.converted[f"{w['coffee']}/cmyk.JPEG"] = imagenet_label(w["coffee"])
    (train / w["astronaut"] / "gray.JPEG").write_bytes(_jpeg(photos["astronaut"], mode="L"))
    tree.converted[f"{w['astronaut']}/gray.JPEG"] = imagenet_label(w["astronaut"])
    buf = io.BytesIO()
    Image.fromarray(photos["rocket"]).save(buf, format="PNG")
    (train / w["rocket"] / "png_named.JPEG").write_bytes(buf.getvalue())
    tree.converted[f"{w['rocket']}/png_named.JPEG"] = imagenet_label(w["rocket"])
    (train / w["flower"] / "empty.JPEG").write_bytes(b"")
    tree.rejected[f"{w['flower']}/empty.JPEG"] = "empty"
    (train / w["china"] / "a_folder.JPEG").mkdir()
    tree.rejected[f"{w['china']}/a_folder.JPEG"] = "unreadable"
    os.symlink(train / w["china"] / "does_not_exist.JPEG", train / w["china"] / "dangling.JPEG")
    tree.rejected[f"{w['china']}/dangling.JPEG"] = "unreadable"
    locked = train / w["grace_hopper"] / "no_permission.JPEG"
    locked.write_bytes(_jpeg(photos["grace_hopper"]))
    locked.chmod(0)
    if os.access(locked, os.R_OK):  # root: chmod 000 does not stop reads, so this file is simply good
        locked.chmod(0o644)
        tree.good[f"{w['grace_hopper']}/no_permission.JPEG"] = imagenet_label(w["grace_hopper"])
    else:
        tree.rejected[f"{w['grace_hopper']}/no_permission.JPEG"] = "unreadable"
    (train / w["chelsea"] / "README.txt").write_text("not an image: listed as ignored\n")


def _write_meta_mat(path: Path, devkit_id: dict[str, int]) -> None:
    """A devkit-style meta.mat: a ``synsets`` struct array with ILSVRC2012_ID and WNID (and words)."""
    from scipy.io import savemat

    dt = [("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("num_children", "O")]
    rows = sorted(devkit_id.items(), key=lambda kv: kv[1])
    arr = np.array([(np.int32(i), wnid, wnid, np.int32(0)) for wnid, i in rows], dtype=dt)
    savemat(str(path), {"synsets": arr})
