"""Real-image data plane throughput, in one run on the same JPEGs:

1. the shard writer (``cgn-dist make-shards`` in-process, original bytes kept): images/s;
2. images/s per DataLoader worker of torchvision ``ImageFolder`` + ``DataLoader`` (PIL loader,
   RandomResizedCrop(224) + flip + ToTensor + Normalize, per sample) against the WebDataset reader
   (cgn_dist.data.stream, same crop/flip/normalise, normalising per batch) with each decoder: PIL, PIL draft
   mode, torchvision.io.decode_image; with ``--uint8`` also both sides handing out uint8 batches (mean/std
   then applied on the accelerator, which this CPU benchmark does not count). Same batch size, same worker count; the passes alternate so machine noise
   falls on all of them alike; the median pass counts. Per core = images per CPU-second (user + system
   time of the main process and its joined DataLoader workers): on a shared machine wall-clock figures
   swing with the neighbours' load, CPU time much less.

The JPEGs are made from the real photos shipped in scikit-image / scikit-learn / matplotlib, cropped and
scaled to ImageNet-like sizes (long side 500 for most, a tail up to 1200 px; quality 96: ~100 kB mean, like
ILSVRC-2012 train).

    python benchmarks/bench_reader.py --n 1200 --workers 1 --repeats 3 --out bench_reader.json
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def make_jpegs(root: Path, n: int, seed: int = 0) -> dict:
    """ImageFolder tree of ``n`` realistic-size JPEGs (9 classes, one per photo)."""
    from PIL import Image

    from imagenet_fixture import PHOTO_WNIDS, photo_arrays

    rng = np.random.default_rng(seed)
    photos = list(photo_arrays().items())
    sizes, nbytes = [], 0
    for i in range(n):
        name, arr = photos[i % len(photos)]
        h, w = arr.shape[:2]
        f = rng.uniform(0.75, 1.0)  # a random crop of 75-100 % of the photo...
        ch, cw = int(h * f), int(w * f)
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        img = Image.fromarray(arr[y:y + ch, x:x + cw])
        long_side = 500 if rng.random() < 0.85 else int(rng.integers(700, 1201))  # ...scaled like ILSVRC's
        s = long_side / max(cw, ch)
        img = img.resize((max(1, round(cw * s)), max(1, round(ch * s))), Image.BICUBIC)
        if rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        d = root / PHOTO_WNIDS[name]
        d.mkdir(parents=True, exist_ok=True)
        path = d / f"{PHOTO_WNIDS[name]}_{i}.JPEG"
        img.save(path, format="JPEG", quality=96)
        sizes.append(img.size)
        nbytes += path.stat().st_size
    w, h = np.mean([s[0] for s in sizes]), np.mean([s[1] for s in sizes])
    return {"n": n, "mean_width": round(float(w)), "mean_height": round(float(h)), "mean_kB": round(nbytes / n / 1e3, 1)}


def bench_writer(tree: Path, out: Path, workers: int) -> dict:
    from cgn_dist.config import load_config
    from cgn_dist.ingest.make_shards import run_make_shards

    cfg = load_config(None, [f"shards.root={tree}", f"shards.out={out}", "shards.labels=imagenet",
                             "shards.shard_size=250", f"shards.num_workers={workers}", "train.progress=false"])
    c0 = cpu_seconds()
    s = run_make_shards(cfg)
    out = {"workers": workers, "images": s["written"], "seconds": s["seconds"], "images_per_s": s["images_per_s"],
           "MB_per_s": round(s["total_bytes"] / 1e6 / s["seconds"], 1)}
    if workers == 1:  # in this process: its CPU time is the writer's (pool workers are not our children)
        out["images_per_cpu_s"] = round(s["written"] / (cpu_seconds() - c0), 1)
    return out


def imagefolder_loader(tree: Path, batch: int, workers: int, uint8: bool = False):
    """The PyTorch ImageNet example's loader (what the authors' classifier script derives from)."""
    import torch
    from torchvision import datasets, transforms

    tail = [transforms.PILToTensor()] if uint8 else [
        transforms.ToTensor(), transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))]
    tf = transforms.Compose([transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip(), *tail])
    ds = datasets.ImageFolder(str(tree), transform=tf)
    return torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers,
                                       persistent_workers=False)


def shard_loader(shards: Path, batch: int, workers: int, decoder: str, epoch: int, uint8: bool = False):
    from cgn_dist.data.stream import make_loader

    return make_loader(shards, batch, train=True, rank=0, world_size=1, num_workers=workers, seed=0, epoch=epoch,
                       decoder=decoder, shuffle_buffer=500, normalize=not uint8)


def make_variant(name: str, tree: Path, shards: Path, batch: int, workers: int, epoch: int):
    uint8 = name.endswith("_uint8")
    base = name[: -len("_uint8")] if uint8 else name
    if base == "imagefolder":
        return imagefolder_loader(tree, batch, workers, uint8)
    return shard_loader(shards, batch, workers, base[len("wds_"):], epoch, uint8)


def cpu_seconds() -> float:
    """CPU time of this process and of its finished (joined) children, user + system."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def timed_pass(loader) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds of this process + its DataLoader workers, images) of one epoch."""
    gc.collect()  # outside the timed window: a full collection costs ~1 s of CPU with torch loaded
    c0, t0 = cpu_seconds(), time.perf_counter()
    n = 0
    it = iter(loader)
    for b in it:
        x = b["image"] if isinstance(b, dict) else b[0]
        n += x.shape[0]
    del it  # exhausted: its workers were joined, so their CPU time is in RUSAGE_CHILDREN
    return time.perf_counter() - t0, cpu_seconds() - c0, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1200, help="JPEGs to make")
    ap.add_argument("--workers", type=int, default=1, help="DataLoader workers (per-core figures: 1)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--writer-workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--decoders", nargs="+", default=["pil", "pil_draft", "torchvision"])
    ap.add_argument("--uint8", action="store_true", help="also: uint8 batches (mean/std left to the accelerator), "
                    "for ImageFolder (PILToTensor) and the reader (normalize=False)")
    ap.add_argument("--out", default="", help="also write the figures as JSON here")
    args = ap.parse_args()

    import torch
    torch.set_num_threads(1)
    res: dict = {"cpu_count": os.cpu_count(), "workers": args.workers, "batch": args.batch}
    with tempfile.TemporaryDirectory(prefix="bench_reader_") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        res["jpegs"] = make_jpegs(tmp / "tree", args.n)
        print(f"made {args.n} JPEGs in {time.perf_counter() - t0:.1f} s: {res['jpegs']}")
        res["writer"] = [bench_writer(tmp / "tree", tmp / f"shards{w}", w) for w in args.writer_workers]
        for r in res["writer"]:
            per_cpu = f", {r['images_per_cpu_s']:.0f} images per CPU-second" if "images_per_cpu_s" in r else ""
            print(f"shard writer, {r['workers']} worker(s): {r['images_per_s']:.0f} images/s wall "
                  f"({r['MB_per_s']} MB/s){per_cpu}")
        shards = tmp / f"shards{args.writer_workers[0]}"

        variants = ["imagefolder"] + [f"wds_{d}" for d in args.decoders]
        if args.uint8:
            variants += ["imagefolder_uint8"] + [f"wds_{d}_uint8" for d in args.decoders]
        wall: dict[str, list[float]] = {v: [] for v in variants}
        cpu: dict[str, list[float]] = {v: [] for v in variants}
        for rep in range(args.repeats):
            for v in variants:  # alternating passes: noise hits every variant alike
                loader = make_variant(v, tmp / "tree", shards, args.batch, args.workers, rep)
                secs, cpu_s, n = timed_pass(loader)
                wall[v].append(n / secs)
                cpu[v].append(n / cpu_s)
                print(f"  pass {rep}: {v:16s} {n / secs:7.1f} images/s wall, {n / cpu_s:7.1f} images per CPU-second "
                      f"({n} images, {secs:.2f} s, {cpu_s:.2f} CPU-s)", flush=True)
    med = statistics.median
    base_wall, base_cpu = med(wall["imagefolder"]), med(cpu["imagefolder"])
    res["reader"] = {v: {"images_per_s_wall": round(med(wall[v]), 1), "images_per_cpu_s": round(med(cpu[v]), 1),
                         "ratio_wall": round(med(wall[v]) / base_wall, 3), "ratio_cpu": round(med(cpu[v]) / base_cpu, 3),
                         "passes_wall": [round(x, 1) for x in wall[v]], "passes_cpu": [round(x, 1) for x in cpu[v]]}
                     for v in variants}
    print(f"\nreader, {args.workers} worker(s), batch {args.batch}, median of {args.repeats} passes "
          "(per core = images per CPU-second of the loader's processes):")
    for v, r in res["reader"].items():
        print(f"  {v:16s} {r['images_per_cpu_s']:7.1f} images/CPU-s  x{r['ratio_cpu']:.2f} ImageFolder per core   "
              f"| wall {r['images_per_s_wall']:7.1f} images/s  x{r['ratio_wall']:.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
