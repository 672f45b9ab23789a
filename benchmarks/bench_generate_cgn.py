"""Counterfactual ImageNet generation: the authors' path vs ours, on the same model, in one run.

(a) authors' path, reproduced: batch 1, the full training forward (frozen teacher on the shape class, the
    three mechanisms, U²-Net on the pre-mask AND on the background: CGNImageNet.forward), then
    torchvision's save_image(normalize=True), one JPEG file per image;
(b) ours: generate_dataset (generation forward only: no teacher, no second U²-Net pass; forward batch B;
    JPEG into WebDataset shards), local backend, one worker; also at B=1 to separate the two gains;
(c) scaling: 1 vs 2 workers (local process pool; --ray adds Ray actors).

    python benchmarks/bench_generate_cgn.py --tiny                     # 32 px random model, seconds
    python benchmarks/bench_generate_cgn.py --checkpoint runs/x --u2net weights/u2net.pth --n 64 --batch 32
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from cgn_dist.generate.imagenet.factory import ImagenetCounterfactualFactory
from cgn_dist.generate.imagenet.labels import draw_classes
from cgn_dist.sharding.plan import sample_seed
from cgn_dist.sharding.run import generate_dataset


def bench_authors_path(factory: ImagenetCounterfactualFactory, n: int, out: Path) -> dict:
    """The authors' loop: per image one training forward at batch 1 and one save_image(normalize=True)."""
    from torchvision.utils import save_image

    from cgn_dist.models.biggan import class_vector, truncated_noise

    sampler = factory()  # the same model and device as (b)
    cgn, nc, trunc = sampler.model, sampler.n_classes, factory.truncation
    out.mkdir(parents=True, exist_ok=True)

    def one(i: int) -> None:
        seed = sample_seed(0, 0, i)
        s, t, b = (class_vector([c], nc).to(sampler.device) for c in draw_classes("random", seed, nc))
        u = truncated_noise(1, cgn.z_dim, trunc, seed=[seed]).to(sampler.device)
        # CGNImageNet.forward shares one class; the authors' forward took the triple (teacher on the shape
        # class): the same work, with each mechanism on its own class.
        with torch.no_grad():
            res = cgn(u, s, trunc, mechanisms=lambda u_, ys, yt, yb, tr: cgn.mechanisms(u_, ys, t, b, tr))
        save_image(res["composite"], out / f"run_{i:07d}_x_gen.jpg", normalize=True)

    one(0)  # warm-up, not timed
    if sampler.device.type == "cuda":
        torch.cuda.synchronize()
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(1, n + 1):
        one(i)
    if sampler.device.type == "cuda":
        torch.cuda.synchronize()
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    sampler.close()
    return {"seconds": seconds, "img_per_s": n / seconds, "cpu_ms_per_img": 1000 * cpu / n}


def bench_ours(factory: ImagenetCounterfactualFactory, n: int, shard_size: int, batch: int, out: Path,
               backend: str = "local", workers: int = 1) -> dict:
    t0, c0 = time.perf_counter(), time.process_time()
    m = generate_dataset(factory, out, n, shard_size, 0, batch_size=batch, backend=backend, num_workers=workers,
                         progress=False)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    # Time inside the shard writers: the steady rate, without worker start-up and model builds.
    import json
    shard_s = sum(json.loads((out / f"shard-{e['shard_id']:06d}_stats.json").read_text())["durations_s"]["total"]
                  for e in m["shards"])
    res = {"seconds": wall, "img_per_s": n / wall}
    if backend == "local" and workers == 1:  # in this process: its CPU time and shard time are the run's
        res.update(steady_img_per_s=n / shard_s if shard_s else 0.0, cpu_ms_per_img=1000 * cpu / n)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="biggan=tiny, u2net=tiny (random 32 px model)")
    ap.add_argument("--biggan", default="random-256", help="BigGAN source / layout (ignored with --tiny)")
    ap.add_argument("--u2net", default="random", help="U²-Net weights, or tiny / random (ignored with --tiny)")
    ap.add_argument("--checkpoint", default="", help="CGN weights ('' = random init)")
    ap.add_argument("--n", type=int, default=200, help="images timed in (a) and (b)")
    ap.add_argument("--batch", type=int, default=16, help="our forward batch B")
    ap.add_argument("--shard-size", type=int, default=100)
    ap.add_argument("--n-scaling", type=int, default=1000, help="images for the 1 vs 2 worker runs")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads per worker (both paths)")
    ap.add_argument("--ray", action="store_true", help="also time Ray at 1 and 2 workers")
    ap.add_argument("--truncation", type=float, default=0.5)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    biggan, u2net = ("tiny", "tiny") if args.tiny else (args.biggan, args.u2net)
    base = dict(checkpoint=args.checkpoint, biggan=biggan, u2net=u2net, truncation=args.truncation,
                num_threads=args.threads, image_format="jpg")
    ours_b = ImagenetCounterfactualFactory(**base, forward_batch=args.batch)
    ours_1 = ImagenetCounterfactualFactory(**base, forward_batch=1)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"model: biggan={biggan} u2net={u2net} checkpoint={args.checkpoint or '(random init)'}; device {dev}; "
          f"{args.threads} thread(s)/worker; {os.cpu_count()} CPUs; torch {torch.__version__}")
    tmp = Path(tempfile.mkdtemp(prefix="bench_cgn_"))
    rows = []
    try:
        a = bench_authors_path(ours_b, args.n, tmp / "authors")
        rows.append(("(a) authors: batch 1, full forward, save_image jpg", a))
        b1 = bench_ours(ours_1, args.n, args.shard_size, 1, tmp / "ours1")
        rows.append(("(b) ours: batch 1, generate_dataset", b1))
        bb = bench_ours(ours_b, args.n, args.shard_size, args.batch, tmp / "oursB")
        rows.append((f"(b) ours: batch {args.batch}, generate_dataset", bb))
        w1 = bench_ours(ours_b, args.n_scaling, args.shard_size, args.batch, tmp / "w1")
        rows.append((f"(c) local, 1 worker, {args.n_scaling} img", w1))
        w2 = bench_ours(ours_b, args.n_scaling, args.shard_size, args.batch, tmp / "w2", workers=2)
        rows.append((f"(c) local pool, 2 workers, {args.n_scaling} img", w2))
        if args.ray:
            r1 = bench_ours(ours_b, args.n_scaling, args.shard_size, args.batch, tmp / "r1", "ray", 1)
            rows.append((f"(c) ray, 1 worker, {args.n_scaling} img", r1))
            r2 = bench_ours(ours_b, args.n_scaling, args.shard_size, args.batch, tmp / "r2", "ray", 2)
            rows.append((f"(c) ray, 2 workers, {args.n_scaling} img", r2))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"{'path':50s} {'seconds':>8s} {'img/s':>8s} {'steady img/s':>13s} {'CPU ms/img':>11s}")
    for name, r in rows:
        steady = f"{r['steady_img_per_s']:13.1f}" if "steady_img_per_s" in r else f"{'':13s}"
        cpu = f"{r['cpu_ms_per_img']:11.1f}" if "cpu_ms_per_img" in r else ""
        print(f"{name:50s} {r['seconds']:8.2f} {r['img_per_s']:8.1f} {steady} {cpu}")
    print("steady = inside the shard writers (no start-up, no model build); CPU = this process's CPU time, "
          "the fairer figure on a shared machine")
    print("ratios (wall-clock images/s; (a) excludes its model build, (b)/(c) include theirs):")
    for label, r in (("ours batch 1   ", b1), (f"ours batch {args.batch:<4d}", bb)):
        cpu_ratio = a["cpu_ms_per_img"] / r["cpu_ms_per_img"]
        print(f"  {label}/ authors      {r['img_per_s'] / a['img_per_s']:6.2f}x  (steady "
              f"{r['steady_img_per_s'] / a['img_per_s']:.2f}x; CPU per image {cpu_ratio:.2f}x)")
    print(f"  local 2 workers / 1 worker    {w2['img_per_s'] / w1['img_per_s']:6.2f}x")
    if args.ray:
        print(f"  ray 2 workers / 1 worker      {r2['img_per_s'] / r1['img_per_s']:6.2f}x")


if __name__ == "__main__":
    main()
