"""The CGN-ImageNet training update at full size in fp32 against bf16, one run: plain torch fp32, torch bf16
(autocast), DeepSpeed bf16 (ZeRO-0, one process). Batch 1, random weights (BigGAN-deep-256 layout, full
U²-Net, random VGG16). Each variant runs two updates; the second is timed (the first pays start-up).

    python benchmarks/bench_train_precision.py                  # full size, minutes per variant on a CPU
    python benchmarks/bench_train_precision.py --tiny           # 32 px, seconds
"""
from __future__ import annotations

import argparse
import copy
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


def interleaved(cfg_overrides: list[str], rounds: int) -> list[dict]:
    """The three updates on models built once, timed in interleaved rounds (the load of a shared machine drifts
    over minutes; a ratio is taken within each round, the median over rounds reported). Both torch engines
    drive the same fp32 model (autocast on or off); DeepSpeed bf16 casts its module, so it gets its own copy."""
    import statistics

    from cgn_dist.distributed.engine import build_engine
    from cgn_dist.distributed.env import read_env
    from cgn_dist.losses import VGG16Features
    from cgn_dist.train.imagenet import build_cgn
    from cgn_dist.train.imagenet_step import ImagenetLossWeights, build_optimizer, imagenet_losses, sample_inputs

    cfg = load_config(REPO / "configs/imagenet/authors_code.yaml", cfg_overrides)
    env = read_env("cpu")
    ic = cfg.imagenet
    vgg = VGG16Features(ic.vgg_weights)
    weights = ImagenetLossWeights.from_config(ic)
    setups = {}
    for label, engine, precision in VARIANTS:
        cgn = setups["torch fp32"][0] if engine == "torch" and "torch fp32" in setups else build_cgn(cfg)
        train = copy.deepcopy(cfg.train)
        train.engine, train.precision = engine, precision
        opt = build_optimizer(cgn.mechanisms, ic.lr_shape, ic.lr_text, ic.lr_bg, tuple(ic.betas))
        setups[label] = (cgn, build_engine(cgn.mechanisms, opt, train, env))

    def update(label: str, step: int) -> float:
        cgn, eng = setups[label]
        t0 = time.perf_counter()
        cgn.train()
        g = torch.Generator().manual_seed(step)
        u, y, _ = sample_inputs(1, cgn.n_classes, cgn.z_dim, ic.truncation, g)
        with eng.autocast():
            out = cgn(u, y, ic.truncation, mechanisms=eng.forward_module)
            losses = imagenet_losses(out, vgg, weights, generator=g)
        eng.backward(losses["total"])
        eng.step()
        return time.perf_counter() - t0

    for label in setups:
        print(f"{label}: warm-up update {update(label, 0):.1f} s", flush=True)
    times: dict[str, list[float]] = {label: [] for label in setups}
    for r in range(rounds):
        for label in setups:
            times[label].append(update(label, r + 1))
        print(f"round {r + 1}/{rounds}: " + "  ".join(f"{k} {v[-1]:.1f} s" for k, v in times.items()), flush=True)
    base = times["torch fp32"]
    return [{"variant": k, "s_per_update": statistics.median(v),
             "speed_vs_fp32": statistics.median(b / x for b, x in zip(base, v))} for k, v in times.items()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch's default)")
    ap.add_argument("--variants", default=",".join(v[0] for v in VARIANTS))
    ap.add_argument("--json", default="")
    ap.add_argument("--rounds", type=int, default=0, help="> 0: models built once, updates timed in interleaved "
                    "rounds (all three variants)")
    args = ap.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    from cgn_dist.launchers.ray_train import train_fn

    size = ["imagenet.biggan=tiny", "imagenet.u2net=tiny"] if args.tiny else \
        ["imagenet.biggan=random-256", "imagenet.u2net=random"]
    if args.rounds:
        rows = interleaved(size + ["imagenet.vgg_weights=random", "train.micro_batch_size=1", "train.grad_accum=1"],
                           args.rounds)
        print(f"median of {args.rounds} interleaved rounds, batch 1, {torch.get_num_threads()} threads:")
        for r in rows:
            print(f"  {r['variant']:24s} {r['s_per_update']:8.2f} s/update  {r['speed_vs_fp32']:5.2f}x the speed of "
                  "torch fp32 (median of per-round ratios)")
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1))
        return
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
