"""Counterfactual ImageNet generation at full size, one run: the authors' path against ours in fp32, bf16 and
bf16 + torch.compile; counted GFLOP/image, achieved GFLOP/s, MFU on known GPUs; bf16 quality against fp32.

Per variant (model built and, with compile, warmed up BEFORE any timing):
  forward   images/s of the generation forward alone (batches of --batch, inputs ready on the device);
  engine    images/s of write_shard with the same sampler: forward, uint8, JPEG encoding, tar writing
            (overlapped: the next forward group runs while one is encoded and written).
(a) is benchmarks/bench_generate_cgn.py's reproduction of the authors' loop (batch 1, full training forward
with the teacher and two U²-Net passes, save_image per JPEG file), on the fp32 model.

    python benchmarks/bench_generate_speed.py --n 8 --batch 8                 # this CPU, full size
    python benchmarks/bench_generate_speed.py --tiny --n 8 --batch 4          # 32 px, seconds
    python benchmarks/bench_generate_speed.py --device-check --batches 16,64,128 --budget-s 420   # GPU
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cgn_dist.generate.imagenet.factory import ImagenetCounterfactualFactory
from cgn_dist.generate.imagenet.labels import draw_classes
from cgn_dist.sharding.plan import ShardSpec, sample_seed  # noqa: E402
from cgn_dist.generate.speed import count_flops, peak_bf16_tflops  # noqa: E402
from cgn_dist.sharding.writer import write_shard  # noqa: E402
from cgn_dist.models.biggan import class_vector, truncated_noise  # noqa: E402

VARIANTS = {"fp32": dict(precision="fp32"), "bf16": dict(precision="bf16"),
            # the package's BigGAN blocks instead of the fused ones (generate.blocks=package)
            "fp32-package": dict(precision="fp32", blocks="package"), "bf16-package": dict(precision="bf16", blocks="package"),
            "bf16+compile": dict(precision="bf16", compile=True)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _inputs(sampler, seeds):
    nc = sampler.n_classes
    triples = [draw_classes("random", s, nc) for s in seeds]
    u = truncated_noise(len(seeds), sampler.model.z_dim, sampler.cfg.truncation, seed=list(seeds))
    d, dt = sampler.device, sampler.dtype
    return [u.to(d, dt)] + [class_vector([t[i] for t in triples], nc).to(d, dt) for i in range(3)]


def time_forward(sampler, n: int, batch: int, keep: bool = False):
    """(images/s, outputs as fp32 CPU tensors or None). One untimed warm-up batch first."""
    seeds = [sample_seed(0, 0, i) for i in range(max(n, batch))]
    batches = [_inputs(sampler, seeds[a:a + batch]) for a in range(0, n, batch)]
    batches = [b for b in batches if b[0].shape[0] == batch]  # whole batches only (compiled shapes)
    sampler.forward(*batches[0])  # warm-up
    _sync(sampler.device)
    outs = []
    t0, c0 = time.perf_counter(), time.process_time()
    for b in batches:
        out = sampler.forward(*b)
        if keep:
            outs.append({k: out[k].float().cpu() for k in ("composite", "mask")})
    _sync(sampler.device)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    kept = {k: torch.cat([o[k] for o in outs]) for k in ("composite", "mask")} if keep else None
    n_img = len(batches) * batch
    return n_img / seconds, kept, cpu / n_img


def time_engine(sampler, n: int, batch: int, out: Path) -> tuple[float, float]:
    """(images/s, CPU s/image) of write_shard (one shard of n samples, engine batch = forward batch); the
    sampler is warm."""
    t0, c0 = time.perf_counter(), time.process_time()
    write_shard(sampler, ShardSpec(shard_id=1, n=n, seed=1), out, batch)
    return n / (time.perf_counter() - t0), (time.process_time() - c0) / n


def gflop_per_image(sampler) -> tuple[float, float]:
    """(generation forward, authors' training forward) GFLOP per image, counted at batch 1 in fp32 eager."""
    cgn = sampler.model
    u, ys, yt, yb = _inputs(sampler, [1])
    with torch.inference_mode():
        ours = count_flops(cgn.generate, u, ys, yt, yb, truncation=sampler.cfg.truncation)
        theirs = count_flops(cgn, u, ys, sampler.cfg.truncation)
    return ours / 1e9, theirs / 1e9


def quality(ref: dict, test: dict) -> dict:
    """bf16 against fp32 on the same seeds: per image PSNR of the uint8 composites, max |Δ| of the float
    composites (range [-1, 1]), and the share of pixels where the mask sides (> 0.5) agree."""
    a = torch.round((ref["composite"].clamp(-1, 1) + 1) * 127.5)
    b = torch.round((test["composite"].clamp(-1, 1) + 1) * 127.5)
    mse = ((a - b) ** 2).mean(dim=(1, 2, 3))
    psnr = [float("inf") if m == 0 else 10 * math.log10(255.0 ** 2 / float(m)) for m in mse]
    maxd = (ref["composite"] - test["composite"]).abs().amax(dim=(1, 2, 3))
    agree = ((ref["mask"] > 0.5) == (test["mask"] > 0.5)).float().mean(dim=(1, 2, 3))
    return {"psnr_db": [round(p, 2) for p in psnr], "max_abs_diff": [round(float(x), 4) for x in maxd],
            "mask_agreement": [round(float(x), 5) for x in agree],
            "mask_max_abs_diff": round(float((ref["mask"] - test["mask"]).abs().max()), 4)}


def authors_images(cgn, sampler, indices, out: Path) -> None:
    """bench_generate_cgn's reproduction of the authors' loop on these sample indices: per image one
    training forward at batch 1 (teacher, three mechanisms, U²-Net on pre-mask and background) and one
    save_image(normalize=True) JPEG file; ``cgn`` is a plain fp32 model (spectral-norm hooks, NCHW)."""
    from torchvision.utils import save_image

    nc, trunc = sampler.n_classes, sampler.cfg.truncation
    for i in indices:
        seed = sample_seed(0, 0, i)
        s, t, b = (class_vector([c], nc) for c in draw_classes("random", seed, nc))
        u = truncated_noise(1, cgn.z_dim, trunc, seed=[seed])
        with torch.no_grad():
            res = cgn(u, s, trunc, mechanisms=lambda u_, ys, yt, yb, tr: cgn.mechanisms(u_, ys, t, b, tr))
        save_image(res["composite"], out / f"run_{i:07d}_x_gen.jpg", normalize=True)


def run_interleaved(args, base: dict, variants: list[str], tmp: Path, results: dict) -> None:
    """CPU: every variant built first, then ``--rounds`` rounds; each round times, one after the other, the
    authors' path on B images, each variant's forward on one batch of B (the same seeds for all) and each
    variant's engine on one shard of B. The load of a shared machine drifts over minutes: ratios are taken
    within each round, and the medians over rounds are reported."""
    import statistics

    from cgn_dist.generate.imagenet.weights import build_generation_model

    b = args.batch
    samplers = {}
    for v in variants:
        t0 = time.perf_counter()
        print(f"{v}: building the model{' and compiling' if 'compile' in v else ''}...", flush=True)
        samplers[v] = ImagenetCounterfactualFactory(**base, **VARIANTS[v], forward_batch=b)()
        print(f"{v}: ready in {time.perf_counter() - t0:.0f} s ({samplers[v].forward_kind})", flush=True)
    first = samplers[variants[0]]
    gflop, gflop_authors = gflop_per_image(first)
    results["gflop_per_image"] = {"generation": gflop, "authors_training_forward": gflop_authors}
    print(f"counted: generation forward {gflop:.4g} GFLOP/image; authors' training forward {gflop_authors:.4g} "
          "GFLOP/image (FlopCounterMode: convolutions and matmuls)", flush=True)
    authors_cgn = None
    if not args.no_authors:
        authors_cgn, _ = build_generation_model("", base["biggan"], base["u2net"], "", 0)
        (tmp / "authors").mkdir(parents=True, exist_ok=True)
        authors_images(authors_cgn, first, [10**6], tmp / "authors")  # warm-up
    for v in variants:  # warm-up forward, untimed (one-time kernel set-up)
        samplers[v].forward(*_inputs(samplers[v], [sample_seed(0, 9, i) for i in range(b)]))
    per: dict[str, list[dict]] = {k: [] for k in ["authors", *variants]}
    kept: dict[str, list] = {v: [] for v in variants}
    for r in range(args.rounds):
        idx = list(range(r * b, (r + 1) * b))
        if authors_cgn is not None:
            t0, c0 = time.perf_counter(), time.process_time()
            authors_images(authors_cgn, first, idx, tmp / "authors")
            per["authors"].append({"s": (time.perf_counter() - t0) / b, "cpu": (time.process_time() - c0) / b})
        for v in variants:
            sp = samplers[v]
            x = _inputs(sp, [sample_seed(0, 0, i) for i in idx])
            t0, c0 = time.perf_counter(), time.process_time()
            out = sp.forward(*x)
            per[v].append({"fwd_s": (time.perf_counter() - t0) / b, "fwd_cpu": (time.process_time() - c0) / b})
            kept[v].append({k: out[k].float().cpu() for k in ("composite", "mask")})
        for v in variants:
            t0, c0 = time.perf_counter(), time.process_time()
            write_shard(samplers[v], ShardSpec(shard_id=r, n=b, seed=2), tmp / f"engine_{v}", b)
            per[v][-1].update(eng_s=(time.perf_counter() - t0) / b, eng_cpu=(time.process_time() - c0) / b)
        line = [f"round {r + 1}/{args.rounds}:"]
        if per["authors"]:
            line.append(f"authors {per['authors'][-1]['s']:.2f} s/img")
        line += [f"{v} fwd {per[v][-1]['fwd_s']:.2f} eng {per[v][-1]['eng_s']:.2f}" for v in variants]
        print("  ".join(line), flush=True)

    med = statistics.median
    print(f"\ns/image, median of {args.rounds} interleaved rounds (wall; CPU = process CPU seconds per image, all "
          "threads); ratios: median over rounds of the per-round ratio")
    if per["authors"]:
        a = per["authors"]
        results["rows"].append({"variant": "(a) authors' path", "batch": 1, "s_per_img": med(r["s"] for r in a),
                                "cpu_s_per_img": med(r["cpu"] for r in a)})
        print(f"  {'(a) authors (batch 1)':24s} engine {med(r['s'] for r in a):7.2f} s/img (CPU {med(r['cpu'] for r in a):.2f})")
    f32 = per.get("fp32")
    for v in variants:
        rows = per[v]
        row = {"variant": v, "batch": b, "forward_s_per_img": med(r["fwd_s"] for r in rows),
               "engine_s_per_img": med(r["eng_s"] for r in rows), "forward_cpu_s_per_img": med(r["fwd_cpu"] for r in rows),
               "engine_cpu_s_per_img": med(r["eng_cpu"] for r in rows), "forward_kind": samplers[v].forward_kind}
        row["gflop_s"] = gflop / row["forward_s_per_img"]
        row["engine_over_forward"] = med(r["fwd_s"] / r["eng_s"] for r in rows)
        if f32:
            row["forward_vs_fp32"] = med(f["fwd_s"] / r["fwd_s"] for f, r in zip(f32, rows))
        if per["authors"]:
            row["engine_vs_authors"] = med(a["s"] / r["eng_s"] for a, r in zip(per["authors"], rows))
        results["rows"].append(row)
        extra = (f"  forward {row['forward_vs_fp32']:.2f}x fp32" if f32 else "") + (
            f"  engine {row['engine_vs_authors']:.2f}x authors" if per["authors"] else "")
        print(f"  {v + f' (batch {b})':24s} forward {row['forward_s_per_img']:7.2f} s/img (CPU "
              f"{row['forward_cpu_s_per_img']:.2f}, {row['gflop_s']:.4g} GFLOP/s)  engine {row['engine_s_per_img']:7.2f} "
              f"s/img (CPU {row['engine_cpu_s_per_img']:.2f}; {row['engine_over_forward'] * 100:.0f} % of forward "
              f"images/s){extra}  [{row['forward_kind']}]")
    if "fp32" in kept and "bf16" in kept:
        cat = {v: {k: torch.cat([o[k] for o in kept[v]]) for k in ("composite", "mask")} for v in ("fp32", "bf16")}
        results["bf16_vs_fp32"] = q = quality(cat["fp32"], cat["bf16"])
        print(f"bf16 vs fp32, same seeds, {len(q['psnr_db'])} images: PSNR {min(q['psnr_db']):.1f}.."
              f"{max(q['psnr_db']):.1f} dB (per image {q['psnr_db']}), max |Δ| {max(q['max_abs_diff']):.4f} (per image "
              f"{q['max_abs_diff']}), mask agreement {min(q['mask_agreement']) * 100:.3f}..{max(q['mask_agreement']) * 100:.3f} %, "
              f"mask max |Δ| {q['mask_max_abs_diff']}")
    for fused, package in (("fp32", "fp32-package"), ("bf16", "bf16-package")):
        if fused in kept and package in kept:  # the fused blocks' images against the package's, same seeds
            cat = {v: {k: torch.cat([o[k] for o in kept[v]]) for k in ("composite", "mask")} for v in (fused, package)}
            results[f"{fused}_vs_{package}"] = q = quality(cat[package], cat[fused])
            print(f"{fused} (fused blocks) vs {package}, same seeds: PSNR {min(q['psnr_db']):.1f}.."
                  f"{max(q['psnr_db']):.1f} dB, max |Δ| {max(q['max_abs_diff']):.2e}, mask agreement "
                  f"{min(q['mask_agreement']) * 100:.3f} %")
    for sp in samplers.values():
        sp.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="32 px random model (biggan=tiny, u2net=tiny)")
    ap.add_argument("--n", type=int, default=8, help="images timed per measurement")
    ap.add_argument("--batch", type=int, default=8, help="forward batch (CPU run)")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch's default)")
    ap.add_argument("--variants", default="fp32,bf16,bf16+compile")
    ap.add_argument("--no-authors", action="store_true", help="skip (a)")
    ap.add_argument("--device-check", action="store_true", help="GPU table: forward at each of --batches")
    ap.add_argument("--batches", default="16,64,128")
    ap.add_argument("--budget-s", type=float, default=0, help="stop starting measurements after this (0 = none)")
    ap.add_argument("--json", default="", help="also write the results here")
    ap.add_argument("--rounds", type=int, default=3, help="CPU: interleaved rounds (0 = one block per variant)")
    args = ap.parse_args()
    t_start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    biggan, u2net = ("tiny", "tiny") if args.tiny else ("random-256", "random")
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(0) if dev.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    peak = peak_bf16_tflops(name) if dev.type == "cuda" else None
    print(f"device: {name}; dense bf16 peak {peak or 'unknown'} TFLOP/s; torch {torch.__version__}; "
          f"threads {torch.get_num_threads()}; model biggan={biggan} u2net={u2net} (random weights)", flush=True)
    base = dict(biggan=biggan, u2net=u2net, num_threads=args.threads, image_format="jpg", truncation=0.5)
    if args.device_check:  # a GPU forward outruns 2 Pillow threads: encode on half the cores
        base["encode_threads"] = max(2, (os.cpu_count() or 4) // 2)
    batches = [int(b) for b in args.batches.split(",")] if args.device_check else [args.batch]
    from cgn_dist.precision import resolve_precision

    results: dict = {"device": name, "peak_bf16_tflops": peak, "rows": [],
                     "auto_precision": resolve_precision("auto", dev, "generate.precision")}
    tmp = Path(tempfile.mkdtemp(prefix="bench_speed_"))

    def dump() -> None:  # after every row: a run cut short by a time limit keeps what it measured
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1, default=str))

    if args.rounds and not args.device_check:
        run_interleaved(args, base, args.variants.split(","), tmp, results)
        print(f"total {time.perf_counter() - t_start:.0f} s")
        dump()
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
        return

    def over_budget() -> bool:
        return bool(args.budget_s) and time.perf_counter() - t_start > args.budget_s

    gflop = gflop_authors = None
    kept: dict = {}
    authors = None
    for vname in args.variants.split(","):
        if over_budget():
            print(f"{vname}: skipped (time budget {args.budget_s:.0f} s spent)", flush=True)
            continue
        # One model per variant, its forward batch the largest timed (compile warms up at that shape; other
        # batch sizes compile at their untimed warm-up call).
        print(f"{vname}: building the model{' and compiling' if 'compile' in vname else ''}...", flush=True)
        t0 = time.perf_counter()
        factory = ImagenetCounterfactualFactory(**base, **VARIANTS[vname], forward_batch=batches[-1])
        sampler = factory()
        build_s = time.perf_counter() - t0
        if gflop is None:  # FLOPs do not depend on the precision; counted once
            gflop, gflop_authors = gflop_per_image(sampler)
            print(f"counted: generation forward {gflop:.4g} GFLOP/image; authors' training forward "
                  f"{gflop_authors:.4g} GFLOP/image (FlopCounterMode: convolutions and matmuls)", flush=True)
        if vname == "fp32" and authors is None and not args.no_authors and not args.device_check:
            from bench_generate_cgn import bench_authors_path

            a = bench_authors_path(factory, args.n, tmp / "authors")
            authors = {"variant": "(a) authors' path (batch 1, fp32)", "batch": 1, "forward_img_s": None,
                       "engine_img_s": a["img_per_s"], "s_per_img": 1 / a["img_per_s"],
                       "engine_cpu_s_per_img": a["cpu_ms_per_img"] / 1000}
            results["rows"].append(authors)
            print(f"(a) authors' path: {1 / a['img_per_s']:.3f} s/image, CPU {a['cpu_ms_per_img'] / 1000:.3g} "
                  "s/image", flush=True)
        for batch in batches:
            if over_budget():
                print(f"{vname} batch {batch}: skipped (time budget {args.budget_s:.0f} s spent)", flush=True)
                continue
            fwd, out, fwd_cpu = time_forward(sampler, max(args.n, batch), batch, keep=not args.device_check)
            if out is not None:
                kept[vname] = out
            eng = eng_cpu = None
            if batch == batches[-1] and not over_budget():
                # 4 forward groups: the overlap computes group k+1 while group k is encoded and written
                eng, eng_cpu = time_engine(sampler, 4 * batch, batch, tmp / f"{vname}_{batch}")
            row = {"variant": vname, "batch": batch, "forward_img_s": fwd, "engine_img_s": eng,
                   "s_per_img": 1 / (eng or fwd), "build_s": build_s, "forward_kind": sampler.forward_kind,
                   "gflop_s": fwd * gflop, "forward_cpu_s_per_img": fwd_cpu, "engine_cpu_s_per_img": eng_cpu}
            if peak:
                row["mfu"] = fwd * gflop / (peak * 1e3)
            results["rows"].append(row)
            dump()
            mfu = f"  MFU {row['mfu'] * 100:5.1f} %" if peak else ""
            engine = f"  engine {eng:9.3f} img/s ({eng / fwd * 100:4.0f} % of forward)" if eng else ""
            if dev.type == "cpu":
                engine += f"  CPU s/img: forward {fwd_cpu:.3g}" + (f", engine {eng_cpu:.3g}" if eng else "")
            print(f"{vname:13s} batch {batch:4d}: forward {fwd:9.3f} img/s = {1 / fwd:7.3f} s/img, "
                  f"{fwd * gflop:9.4g} GFLOP/s{mfu}{engine}  [build {build_s:.0f} s, {sampler.forward_kind}]",
                  flush=True)
        sampler.close()
        del sampler
    results["gflop_per_image"] = {"generation": gflop, "authors_training_forward": gflop_authors}
    if "fp32" in kept and "bf16" in kept:
        results["bf16_vs_fp32"] = q = quality(kept["fp32"], kept["bf16"])
        print(f"bf16 vs fp32, same seeds, {len(q['psnr_db'])} images: PSNR {min(q['psnr_db']):.1f}.."
              f"{max(q['psnr_db']):.1f} dB, max |Δ| {max(q['max_abs_diff']):.4f} (per image {q['max_abs_diff']}), "
              f"mask agreement {min(q['mask_agreement']) * 100:.3f} %.., mask max |Δ| {q['mask_max_abs_diff']}")
    rows = {(r["variant"], r["batch"]): r for r in results["rows"]}
    if authors and ("fp32", args.batch) in rows:
        print("ratios (s/image against the fp32 forward / the authors' path):")
        f32 = rows[("fp32", args.batch)]
        for v in VARIANTS:
            r = rows.get((v, args.batch))
            if r:
                print(f"  {v:13s} forward {r['forward_img_s'] / f32['forward_img_s']:5.2f}x fp32; engine "
                      f"{r['engine_img_s'] / authors['engine_img_s']:5.2f}x authors; engine/forward "
                      f"{r['engine_img_s'] / r['forward_img_s'] * 100:4.0f} %")
    print(f"total {time.perf_counter() - t_start:.0f} s")
    dump()
    import shutil
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
