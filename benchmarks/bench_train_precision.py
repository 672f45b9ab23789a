"""The CGN-ImageNet training update at full size in fp32 against bf16, one run: plain torch fp32, torch bf16
(autocast), DeepSpeed bf16 (ZeRO-0, one process). Batch 1, random weights (BigGAN-deep-256 layout, full
U²-Net, random VGG16). Each variant runs two updates; the second is timed (the first pays start-up).

    python benchmarks/bench_train_precision.py                  # full size, minutes per variant on a CPU
    python benchmarks/bench_train_precision.py --tiny           # 32 px, seconds
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from cgn_dist.config import load_config

REPO = Path(__file__).resolve().parents[1]
VARIANTS = (("torch fp32", "torch", "fp32"), ("torch bf16 (autocast)", "torch", "bf16"),
            ("deepspeed bf16", "deepspeed", "bf16"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch's default)")
    ap.add_argument("--variants", default=",".join(v[0] for v in VARIANTS))
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    from cgn_dist.distributed.ray_train import train_fn

    size = ["imagenet.biggan=tiny", "imagenet.u2net=tiny"] if args.tiny else \
        ["imagenet.biggan=random-256", "imagenet.u2net=random"]
    out = Path(tempfile.mkdtemp(prefix="bench_train_prec_"))
    rows = []
    print(f"CGN-ImageNet training update, batch 1, {'tiny' if args.tiny else 'full size (256 px)'}, random weights; "
          f"{torch.get_num_threads()} threads; torch {torch.__version__}", flush=True)
    try:
        for label, engine, precision in VARIANTS:
            if label not in args.variants.split(","):
                continue
            cfg = load_config(REPO / "configs/imagenet/authors_code.yaml", size + [
                "imagenet.vgg_weights=random", "train.micro_batch_size=1", "train.grad_accum=1",
                "train.max_steps=2", "train.checkpoint_every=1000", "train.sample_every=1000",
                "train.log_every=1", "train.progress=false", "train.resume=false", f"train.engine={engine}",
                f"train.precision={precision}", f"out_dir={out}", f"name={engine}_{precision}",
                "imagenet.sheet_classes=[0]"])
            t0 = time.perf_counter()
            res = train_fn(cfg)(cfg)
            sps = float(res["perf/samples_per_s"])
            rows.append({"variant": label, "s_per_update": 1 / sps, "wall_s": time.perf_counter() - t0,
                         "loss_total": res.get("loss/total")})
            print(f"{label:24s} {1 / sps:8.2f} s/update (second update; run incl. build {rows[-1]['wall_s']:.0f} s, "
                  f"loss {rows[-1]['loss_total']:.4g})", flush=True)
            shutil.rmtree(out / f"{engine}_{precision}", ignore_errors=True)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    base = rows[0]["s_per_update"] if rows else None
    for r in rows:
        print(f"  {r['variant']:24s} {base / r['s_per_update']:5.2f}x the speed of {rows[0]['variant']}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
