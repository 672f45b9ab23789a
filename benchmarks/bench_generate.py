"""Throughput of the generation engine itself (plan, encode, tar, fsync, stats), with the model-free toy
sampler, per backend. The numbers bound what the engine adds to a real sampler's own cost.

    python benchmarks/bench_generate.py --n 2000 --shard-size 250 --image-size 64 --backends local local2 ray
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from cgn_dist.sharding.run import generate_dataset
from cgn_dist.sharding.toy import ToySamplerFactory


def bench(backend: str, n: int, shard_size: int, image_size: int, image_format: str, batch_size: int) -> dict:
    name, workers = {"local": ("local", 1), "local2": ("local", 2), "ray": ("ray", 2)}[backend]
    out = Path(tempfile.mkdtemp(prefix=f"bench_{backend}_"))
    try:
        t0 = time.perf_counter()
        m = generate_dataset(ToySamplerFactory(image_size=image_size, image_format=image_format), out, n,
                             shard_size, 0, batch_size=batch_size, backend=name, num_workers=workers,
                             progress=False)
        seconds = time.perf_counter() - t0
        t1 = time.perf_counter()
        generate_dataset(ToySamplerFactory(image_size=image_size, image_format=image_format), out, n,
                         shard_size, 0, batch_size=batch_size, backend=name, num_workers=workers, progress=False)
        rerun = time.perf_counter() - t1
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return {"backend": backend, "seconds": seconds, "img_per_s": n / seconds,
            "mb_per_s": m["total_bytes"] / 1e6 / seconds, "rerun_verify_s": rerun}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--shard-size", type=int, default=250)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--image-format", default="jpg", choices=["jpg", "png"])
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--backends", nargs="+", default=["local", "local2"], choices=["local", "local2", "ray"])
    args = ap.parse_args()
    print(f"{args.n} toy samples of {args.image_size}px {args.image_format}, shards of {args.shard_size}")
    print(f"{'backend':8s} {'seconds':>8s} {'img/s':>8s} {'MB/s':>7s} {'rerun s':>8s}")
    for backend in args.backends:
        r = bench(backend, args.n, args.shard_size, args.image_size, args.image_format, args.batch_size)
        print(f"{r['backend']:8s} {r['seconds']:8.2f} {r['img_per_s']:8.0f} {r['mb_per_s']:7.2f} "
              f"{r['rerun_verify_s']:8.2f}")


if __name__ == "__main__":
    main()
