"""Time per invariant-classifier update: ResNet-50 trunk + 3 heads, batch B real + B counterfactual
images in one forward (as the training loop does), cross-entropy terms, backward, SGD step.
fp32 and bf16 autocast, each in NCHW and channels-last (model and batch, as the training loop puts them
where cgn_dist.precision.use_channels_last says so), are timed alternately in the same run, so their ratios
survive a noisy machine.

    python benchmarks/bench_classifier_step.py --batch 8 --size 224 --steps 3 --device cpu
    ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 python benchmarks/bench_classifier_step.py ...  # oneDNN capped
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import time

import torch

from cgn_dist.models.invariant import InvariantClassifier
from cgn_dist.classifier.imagenet.train import classifier_losses


def one_step(model, opt, x, y, cf, precision: str, device: torch.device) -> float:
    ctx = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with ctx:
        out = model(x)
    terms, _ = classifier_losses(out, y, cf, len(y))
    terms["total"].backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--batch", type=int, default=8, help="real images per step (as many counterfactuals)")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--steps", type=int, default=3, help="timed steps per precision (after one warm-up each)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--backbone", default="resnet50")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--json", default="", help="also write the result here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    b = args.batch
    x = torch.randn(2 * b, 3, args.size, args.size, generator=g).to(device)
    y = torch.randint(0, 1000, (b,), generator=g).to(device)
    cf = {k: torch.randint(0, 1000, (b,), generator=g).to(device) for k in ("shape_cls", "texture_cls", "bg_cls")}
    setups = {}
    for fmt, memory_format in (("nchw", torch.contiguous_format), ("cl", torch.channels_last)):
        model = InvariantClassifier(args.backbone, weights="random").to(device, memory_format=memory_format).train()
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
        setups[fmt] = (model, opt, x.contiguous(memory_format=memory_format))
    variants = [(prec, fmt) for prec in ("fp32", "bf16") for fmt in setups]
    times: dict[str, list[float]] = {f"{p}_{f}": [] for p, f in variants}
    for prec, fmt in variants:
        one_step(*setups[fmt][:2], setups[fmt][2], y, cf, prec, device)  # warm-up
    for i in range(args.steps):
        for prec, fmt in (variants if i % 2 == 0 else variants[::-1]):
            times[f"{prec}_{fmt}"].append(one_step(*setups[fmt][:2], setups[fmt][2], y, cf, prec, device))
    res = {"device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
           "threads": torch.get_num_threads(), "backbone": args.backbone, "real_batch": b, "cf_batch": b,
           "size": args.size, "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA", "")}
    med = {}
    for name, ts in times.items():
        med[name] = sorted(ts)[len(ts) // 2]
        res[name] = {"s_per_step_median": round(med[name], 3), "all": [round(t, 3) for t in ts],
                     "images_per_s": round(2 * b / med[name], 2)}
    res["bf16_speedup"] = round(med["fp32_nchw"] / med["bf16_nchw"], 2)
    # > 1: channels-last is faster
    res["channels_last_speedup"] = {p: round(med[f"{p}_nchw"] / med[f"{p}_cl"], 2) for p in ("fp32", "bf16")}
    from cgn_dist.precision import resolve_precision, use_channels_last

    res["auto_precision"] = resolve_precision("auto", device, "train.precision")
    res["use_channels_last"] = {p: use_channels_last(device, p) for p in ("fp32", "bf16")}
    print(json.dumps(res, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
