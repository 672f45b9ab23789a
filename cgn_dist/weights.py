"""Every weight file cgn_dist can use: where it comes from, how big it is, its sha256, where we look for it.

A config refers to a weight by its registry name (``imagenet.u2net=u2net``) or by a path. Names resolve to
the weights cache: ``$CGN_DIST_CACHE`` or ``~/.cache/cgn_dist``; torchvision's classifiers live in torch's
own hub cache (``$TORCH_HOME/hub/checkpoints``), where torchvision looks for them.

``cgn-dist weights`` lists them; ``cgn-dist weights fetch NAME`` downloads one with a progress bar, checks
its size and sha256, and renames it into place only when both agree. Where the hash is not known in
advance (the file could not be downloaded when this table was written) the first fetch records the sha256
it saw beside the file (``<file>.sha256``) and later checks compare against that record: trust on first
use, said so in the listing.
"""
from __future__ import annotations

import os
import pickle
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from cgn_dist.data.shards import sha256_file
from cgn_dist.errors import UserError

CACHE_ENV = "CGN_DIST_CACHE"
DOWNLOAD_TIMEOUT_S = 30


class WeightsError(UserError, OSError):
    """A weight file is missing, cannot be downloaded, or is not the expected file."""


@dataclass(frozen=True)
class WeightFile:
    name: str  # registry name, usable in configs
    filename: str  # file name in its cache folder
    url: str  # where `weights fetch` downloads it from
    what: str  # one line for the listing
    used_by: str  # the config keys that take it
    size: int | None = None  # bytes; None = not known in advance
    sha256: str | None = None  # full hex digest; None = recorded on first fetch
    sha256_prefix: str | None = None  # torchvision's file names carry the first hex digits of the sha256
    cache: str = "cgn_dist"  # "cgn_dist" (our cache) or "torch" (torch hub checkpoints)
    subdir: str = ""  # folder inside the cache (BigGAN: a directory with config.json + pytorch_model.bin)
    note: str = ""


def _drive(file_id: str) -> str:
    # The usercontent endpoint with confirm=t serves large files without the virus-scan page.
    return f"https://drive.usercontent.google.com/download?id={file_id}&export=download&confirm=t"


_HF = "https://s3.amazonaws.com/models.huggingface.co/biggan/biggan-deep-256"
_MNIST = ("https://raw.githubusercontent.com/autonomousvision/counterfactual_generative_networks/"
          "1cba9d4ed334a436d9d1d2e1a3ab2a71235c3d41/mnists/experiments/cgn_{}_MNIST/weights/ckp.pth")
_MNIST_SHA = {  # computed from the three released files (2,661,744 bytes each)
    "colored": "6b178e7c1924b9efc532c467e7f0b77d2702efb536de9816bbd7e92c26d9b3fe",
    "double_colored": "7aa06c907f099c63a26127164a38d2ab353f1cdcafabdf8ca9303a0e9197b933",
    "wildlife": "db5bc3108f7bfbd74a85e2b267e65e95bd918920a02fd8de64c947fd8a0015f0",
}

REGISTRY: dict[str, WeightFile] = {w.name: w for w in [
    WeightFile("biggan-deep-256", "pytorch_model.bin", _HF + "-pytorch_model.bin",
               "BigGAN-deep-256 generator (teacher and the three mechanisms' start)", "imagenet.biggan",
               subdir="biggan-deep-256", note="fetch also writes config.json beside it"),
    WeightFile("u2net", "u2net.pth", _drive("1ao1ovG1Qtx4b7EoskHXmi2E9rp5CHLcZ"),
               "U²-Net salient-object detector (full, ~176 MB), upstream U-2-Net release", "imagenet.u2net",
               note="the CGN README's own link (id 1VkKexkWh5SeB8fgxAZxLKgmmvDXhVYUy) is dead"),
    WeightFile("cgn-imagenet", "cgn.pth", _drive("12yVFHPUjKmUFGnO2D4xVlTSpF8CUj136"),
               "the authors' trained CGN-ImageNet (all five networks)",
               "generate.checkpoint, imagenet.init_from"),
    *[WeightFile(f"cgn-mnist-{ds.replace('_', '-')}", f"cgn_{ds}_MNIST.pth", _MNIST.format(ds),
                 f"the authors' released CGN-MNIST, {ds.replace('_', ' ')}",
                 "generate.checkpoint, mnist.init_from, mnist_pipeline.released_dir (the folder)",
                 size=2661744, sha256=sha) for ds, sha in _MNIST_SHA.items()],
    WeightFile("vgg16", "vgg16-397923af.pth", "https://download.pytorch.org/models/vgg16-397923af.pth",
               "torchvision VGG16 IMAGENET1K_V1 (style and perceptual losses)",
               "mnist.vgg_weights, imagenet.vgg_weights", sha256_prefix="397923af", cache="torch"),
    # V1 (76.13 % top-1): torchvision's `pretrained=True` in the authors' torchvision 0.8, and the network
    # behind the published shape-bias baselines; V2 (the DEFAULT today) is a different, retrained model.
    WeightFile("resnet50", "resnet50-0676ba61.pth", "https://download.pytorch.org/models/resnet50-0676ba61.pth",
               "torchvision ResNet-50 IMAGENET1K_V1 (invariant classifier trunk)",
               "invariant.weights, eval.weights", sha256_prefix="0676ba61", cache="torch"),
    WeightFile("inception-v3", "inception_v3_google-0cc3c7bd.pth",
               "https://download.pytorch.org/models/inception_v3_google-0cc3c7bd.pth",
               "torchvision Inception v3 IMAGENET1K_V1 (Inception Score)", "eval.inception_weights",
               sha256_prefix="0cc3c7bd", cache="torch"),
]}
BIGGAN_CONFIG_URL = _HF + "-config.json"


# --- where files live ---------------------------------------------------------------------------------------

def cache_dir() -> Path:
    """Our weights cache: $CGN_DIST_CACHE, else ~/.cache/cgn_dist."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "cgn_dist").expanduser()


def torch_cache_dir() -> Path:
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints"


def path_of(name: str) -> Path:
    """Where weight ``name`` lives (present or not)."""
    w = get(name)
    root = torch_cache_dir() if w.cache == "torch" else cache_dir()
    return root / w.subdir / w.filename if w.subdir else root / w.filename


def get(name: str) -> WeightFile:
    if name not in REGISTRY:
        raise WeightsError(f"no weight file named {name!r}; known: {', '.join(REGISTRY)} (`cgn-dist weights`)")
    return REGISTRY[name]


def is_name(value: str) -> bool:
    return str(value) in REGISTRY


def resolve(value: str, key: str = "") -> str:
    """A config value naming a weight (registry name) -> the path of the file (the BigGAN directory for
    biggan-deep-256); anything else is returned unchanged (a path, "tiny", ...). A name whose file is not
    there raises WeightsError saying how to get it."""
    if not is_name(value):
        return value
    p = path_of(value)
    if not p.is_file():
        raise WeightsError(missing_message(value, key))
    return str(p.parent if get(value).subdir else p)


def how_to_copy(name: str) -> str:
    """The offline way in: which file to put where."""
    w, p = get(name), path_of(name)
    size = f"{w.size:,} bytes, " if w.size else ""
    sha = (f"sha256 {w.sha256}" if w.sha256 else f"sha256 starting {w.sha256_prefix}" if w.sha256_prefix
           else "sha256 not known in advance")
    also = f" and config.json (from {BIGGAN_CONFIG_URL})" if w.subdir else ""
    elsewhere = ("TORCH_HOME to a folder whose hub/checkpoints/ holds it" if w.cache == "torch" else
                 f"{CACHE_ENV} to a folder holding it{' under ' + w.subdir + '/' if w.subdir else ''}")
    return f"copy {w.filename} ({size}{sha}; from {w.url}){also} to {p.parent}/ (or set {elsewhere})"


def missing_message(name: str, key: str = "") -> str:
    where = f" ({key}={name})" if key else ""
    return (f"weights {name!r}{where} are not at {path_of(name)}: run `cgn-dist weights fetch {name}`, or "
            f"offline {how_to_copy(name)}; `cgn-dist weights` lists what is present")


def recorded_sha(name: str) -> str | None:
    """The sha256 to check a present file against: the registry's, else the one recorded on first fetch."""
    w = get(name)
    if w.sha256:
        return w.sha256
    side = path_of(name).with_name(path_of(name).name + ".sha256")
    return side.read_text().split()[0] if side.is_file() else None


def status(name: str) -> dict:
    """What `cgn-dist weights` prints for one file (no hashing: a size check only)."""
    w, p = get(name), path_of(name)
    present = p.is_file()
    size_ok = present and (w.size is None or p.stat().st_size == w.size)
    sha = recorded_sha(name)
    return {"name": name, "present": present, "size_ok": size_ok, "path": str(p), "url": w.url,
            "size": w.size, "sha256": sha or (f"{w.sha256_prefix}... (prefix, torchvision)" if w.sha256_prefix
                                              else "unknown: recorded on first fetch"),
            "sha256_source": ("registry" if w.sha256 else "recorded on first fetch" if sha else
                              "torchvision file-name prefix" if w.sha256_prefix else "unknown"),
            "what": w.what, "used_by": w.used_by, "note": w.note}


def format_listing() -> str:
    lines = [f"weights cache: {cache_dir()} (set {CACHE_ENV} to move it); torchvision's: {torch_cache_dir()}",
             "configs take a NAME below or a path; fetch one with `cgn-dist weights fetch NAME`", ""]
    for name in REGISTRY:
        s = status(name)
        state = ("present" if s["size_ok"] else "PRESENT, WRONG SIZE") if s["present"] else "missing"
        size = f"{s['size']:,} bytes" if s["size"] else "size unknown"
        lines += [f"{name:<26} {state:<8} {s['what']}",
                  f"    path:    {s['path']}",
                  f"    source:  {s['url']}",
                  f"    {size}; sha256 {s['sha256']}",
                  f"    used by: {s['used_by']}" + (f"; {s['note']}" if s["note"] else "")]
    return "\n".join(lines)


# --- reading -----------------------------------------------------------------------------------------------

# What torch.load raises on a file that is no checkpoint: a text file ends in IndexError ("pop from empty
# list") inside the unpickler, a truncated zip in RuntimeError, an empty file in EOFError.
TORCH_LOAD_ERRORS = (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, IndexError, KeyError,
                     TypeError)


def unreadable_reason(path: str | os.PathLike, err: BaseException) -> str:
    """Why torch could not load ``path``, in one short clause (torch's own messages run to paragraphs)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(512)
    except OSError:
        raw = b""
    head = raw.lstrip().lower()
    text = str(err)
    if not raw:
        return "it is an empty file"
    if head.startswith((b"<!doctype", b"<html", b"<?xml", b"<head")) or b"<html" in head:
        return "it is a web page, not a checkpoint (a download that got a login or warning page?)"
    if raw.startswith(b"PK\x03\x04"):
        import zipfile
        try:
            names = zipfile.ZipFile(path).namelist()
        except (zipfile.BadZipFile, OSError):
            return "it is truncated or corrupt (an interrupted download or copy?)"
        if not any(n.endswith("data.pkl") for n in names):
            return f"it is a zip archive of something else ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
    elif b"\x00" not in raw:
        try:
            first = raw.decode("utf-8").strip().splitlines()[0][:60]
        except (UnicodeDecodeError, IndexError):
            first = None
        if first is not None:
            return f"it is a text file (it begins {first!r}), not a checkpoint"
    if "Unsupported global" in text:
        what = next((ln.strip() for ln in text.splitlines() if "Unsupported global" in ln), "")
        return f"it holds pickled Python objects beyond tensors, refused because loading them could run code ({what})"
    if "central directory" in text or isinstance(err, EOFError) or "Ran out of input" in text:
        return "it is truncated or corrupt (an interrupted download or copy?)"
    if "Weights only load failed" in text or "invalid load key" in text or "Unsupported operand" in text:
        return "it is not a torch checkpoint"
    if "unpack requires" in text:
        return "it is too short: truncated, or not a torch checkpoint"
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), type(err).__name__)
    return f"torch cannot read it ({first if len(first) <= 160 else type(err).__name__})"


def load_user_file(path: str | os.PathLike, what: str):
    """torch.load (tensors only) of a file the user gave as ``what`` (its config key); one line saying what
    the file is instead of torch's unpickler error."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except TORCH_LOAD_ERRORS as e:
        raise WeightsError(f"{what}: {path} cannot be loaded: {unreadable_reason(path, e)}") from e


# --- fetching ----------------------------------------------------------------------------------------------

def _download(url: str, dest: Path, progress: bool, label: str) -> None:
    """url -> dest (whole file or an exception), with a tqdm bar in bytes."""
    from cgn_dist.progress import progress_bar

    req = urllib.request.Request(url, headers={"User-Agent": "cgn_dist"})
    with urllib.request.urlopen(req, timeout=DOWNLOAD_TIMEOUT_S) as r:
        if "text/html" in (r.headers.get("Content-Type") or ""):
            raise WeightsError(f"{url} returned a web page instead of the file (a changed link or a download "
                               f"quota); download it in a browser and copy it into place (`cgn-dist weights` "
                               f"says where)")
        total = int(r.headers.get("Content-Length") or 0) or None
        with open(dest, "wb") as f, progress_bar(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                                                 desc=label, enabled=progress) as bar:
            while block := r.read(1 << 20):
                f.write(block)
                bar.update(len(block))


def check_file(name: str, path: Path) -> str:
    """sha256 of ``path``; WeightsError when its size or hash is not what weight ``name`` must have."""
    w = get(name)
    size = path.stat().st_size
    if w.size is not None and size != w.size:
        raise WeightsError(f"{path} has {size:,} bytes; {name} has {w.size:,} (an interrupted or wrong download)")
    sha = sha256_file(path)
    expected = recorded_sha(name)
    if expected and sha != expected:
        raise WeightsError(f"{path}: sha256 {sha} is not {name}'s {expected}")
    if w.sha256_prefix and not sha.startswith(w.sha256_prefix):
        raise WeightsError(f"{path}: sha256 {sha} does not start with {w.sha256_prefix} as torchvision's name says")
    return sha


def fetch(name: str, progress: bool = True, force: bool = False) -> Path:
    """Download weight ``name`` into its cache folder (checked, then renamed into place); a present file is
    checked instead. Returns its path. WeightsError (one clear sentence) when offline or the file is wrong."""
    w, dest = get(name), path_of(name)
    if dest.is_file() and not force:
        check_file(name, dest)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + f".part{os.getpid()}")
    try:
        try:
            _download(w.url, part, progress, name)
            if w.subdir:  # the BigGAN directory also needs its config
                _download(BIGGAN_CONFIG_URL, dest.parent / "config.json.part", False, "config.json")
                os.replace(dest.parent / "config.json.part", dest.parent / "config.json")
        except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
            reason = getattr(e, "reason", None) or e
            raise WeightsError(f"cannot download {name} ({reason}); offline? {how_to_copy(name)}") from None
        sha = check_file(name, part)
        if recorded_sha(name) is None and not w.sha256_prefix:
            # Trust on first use: what we saw now is what later checks compare against.
            dest.with_name(dest.name + ".sha256").write_text(
                f"{sha}  {w.filename}  first fetched {time.strftime('%Y-%m-%d')} from {w.url}\n")
        os.replace(part, dest)
    finally:
        part.unlink(missing_ok=True)
    return dest


__all__ = ["REGISTRY", "WeightFile", "WeightsError", "cache_dir", "path_of", "resolve", "is_name", "fetch",
           "load_user_file",
           "status", "format_listing", "missing_message", "check_file", "CACHE_ENV"]
