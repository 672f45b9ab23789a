"""The first GPU run of every CUDA path, in minutes: one row each, JSON written after every row.

  train      2 CGN-ImageNet updates at full size (BigGAN-deep-256 + U²-Net layouts, random weights) under
             DeepSpeed bf16 with fp32 gradient accumulation (ZeRO-1), micro batch 1 x accumulation 8;
  generate   2 shards in bf16 + channels-last with nvJPEG, then the same shards with Pillow's encoder:
             every JPEG decoded back and compared (PSNR, must exceed --min-psnr), the provenance checked;
  classifier 10 ResNet-50 steps + the evaluations on a process group of one ("cpu:gloo,cuda:nccl"), the
             evaluation's count all-reduce included;
  forward    the device check's table (benchmarks/bench_generate_speed.py): forward images/s and MFU.

    python benchmarks/gpu_smoke.py --json /tmp/gpu_smoke.json          # a GPU; exit 1 when a row fails
    python benchmarks/gpu_smoke.py --cpu --json /tmp/s.json             # tiny sizes on the CPU: the script's
                                                                        # own smoke test, not a measurement
Random-init models: nothing is downloaded. Without CUDA (and without --cpu) it exits 4 at once.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cgn_dist.config import load_config  # noqa: E402


def _sizes(cpu: bool) -> dict:
    if cpu:
        return dict(device="cpu", biggan="tiny", u2net="tiny", imagenet_cfg="configs/debug/imagenet_tiny.yaml",
                    classifier_cfg="configs/debug/classifier_tiny.yaml", forward_batch=2, shard_size=4,
                    jpeg_encoder="pil", classifier_batch=4, image_px=48, images_per_class=6)
    return dict(device="cuda", biggan="random-256", u2net="random", imagenet_cfg="configs/imagenet/authors_code.yaml",
                classifier_cfg="configs/classifier/paper_single_gpu.yaml", forward_batch=16, shard_size=32,
                jpeg_encoder="nvjpeg", classifier_batch=16, image_px=96, images_per_class=48)


def _peak_gb() -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None


def _leave_process_group() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def row_train(s: dict, tmp: Path) -> dict:
    from cgn_dist.distributed.deepspeed import build_ds_config
    from cgn_dist.train.imagenet import train_imagenet

    over = [f"out_dir={tmp}", "name=train", f"imagenet.biggan={s['biggan']}", f"imagenet.u2net={s['u2net']}",
            "imagenet.vgg_weights=random", f"train.device={s['device']}", "train.engine=deepspeed",
            "train.precision=bf16", "train.zero_stage=1", "train.micro_batch_size=1", "train.grad_accum=8",
            "train.max_steps=2", "train.log_every=1", "train.sample_every=1000", "train.checkpoint_every=1000",
            "train.progress=false"]
    cfg = load_config(REPO / s["imagenet_cfg"], over)
    ds = build_ds_config(cfg.train, 1)
    try:
        out = train_imagenet(cfg)
    finally:
        _leave_process_group()  # DeepSpeed's group of one; the classifier row makes its own
    losses = {k: v for k, v in out.items() if k.startswith("loss/")}
    ok = out.get("steps") == 2 and all(math.isfinite(v) for v in losses.values())
    return {"ok": ok, "steps": out.get("steps"), "loss_total": out.get("loss/total"),
            "samples_per_s": out.get("perf/samples_per_s"), "grad_accum_dtype": ds.get("data_types", {}),
            "bf16": ds.get("bf16"), "peak_mem_gb": _peak_gb()}


def _decoded(folder: Path) -> dict[str, np.ndarray]:
    from PIL import Image

    from cgn_dist.data.shards import iter_tar_samples

    out = {}
    for tar in sorted(folder.glob("shard-*.tar")):
        for sample in iter_tar_samples(tar):
            out[sample["__key__"]] = np.asarray(Image.open(io.BytesIO(sample["jpg"])).convert("RGB"), dtype=np.float64)
    return out


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def row_generate(s: dict, tmp: Path, min_psnr: float, compile_forward: bool) -> dict:
    from cgn_dist.generate.imagenet.factory import ImagenetCounterfactualFactory
    from cgn_dist.sharding.run import generate_dataset

    base = dict(biggan=s["biggan"], u2net=s["u2net"], image_format="jpg", truncation=0.5, precision="bf16",
                channels_last=True, compile=compile_forward, forward_batch=s["forward_batch"], device=s["device"],
                num_threads=0)
    n = 2 * s["shard_size"]
    info, times = {}, {}
    for enc in dict.fromkeys([s["jpeg_encoder"], "pil"]):
        t0 = time.perf_counter()
        m = generate_dataset(ImagenetCounterfactualFactory(**base, jpeg_encoder=enc), tmp / f"gen_{enc}", n,
                             s["shard_size"], 0, batch_size=s["forward_batch"], progress=False)
        times[enc] = round(time.perf_counter() - t0, 2)
        info[enc] = {"n_shards": m["n_shards"], "samples": m["total_samples"],
                     "jpeg_encoder": m["sampler_info"].get("jpeg_encoder"),
                     "images_per_s": round(m["total_samples"] / times[enc], 2)}
    gpu, cpu = _decoded(tmp / f"gen_{s['jpeg_encoder']}"), _decoded(tmp / "gen_pil")
    values = [psnr(gpu[k], cpu[k]) for k in sorted(cpu)] if gpu.keys() == cpu.keys() else []
    finite = [v for v in values if math.isfinite(v)]
    provenance_ok = info[s["jpeg_encoder"]]["jpeg_encoder"] == s["jpeg_encoder"]
    ok = (len(values) == n and min(values, default=0) > min_psnr and provenance_ok
          and all(i["n_shards"] == 2 for i in info.values()))
    return {"ok": ok, "images_compared": len(values), "psnr_db_min": min(finite) if finite else None,
            "psnr_db_mean": sum(finite) / len(finite) if finite else None, "identical_images": len(values) - len(finite),
            "min_psnr_db": min_psnr, "runs": info, "seconds_per_run": times, "provenance_ok": provenance_ok,
            "compile": compile_forward, "peak_mem_gb": _peak_gb()}


def _classifier_data(s: dict, tmp: Path) -> dict[str, Path]:
    """Real shards (make-shards on a random-pixel image tree, two classes) and counterfactual shards."""
    from PIL import Image

    from cgn_dist.ingest.make_shards import run_make_shards
    from cgn_dist.data.shard_index import build_wids_index
    from cgn_dist.data.shards import encode_jpeg, write_json_atomic, write_tar

    rng = np.random.default_rng(0)
    px, per = s["image_px"], s["images_per_class"]
    for c in ("n01440764", "n01443537"):
        (tmp / "tree" / c).mkdir(parents=True)
        for i in range(per):
            Image.fromarray(rng.integers(0, 255, (px, px, 3), dtype=np.uint8)).save(tmp / "tree" / c / f"{i}.jpg")
    run_make_shards(load_config(None, [f"shards.root={tmp / 'tree'}", f"shards.out={tmp / 'real'}",
                                       f"shards.shard_size={per}", "train.progress=false"]))
    cf, entries = tmp / "cf", []
    cf.mkdir()
    for sh in range(2):
        samples = [(f"{sh:06d}_{i:06d}", {"jpg": encode_jpeg(rng.integers(0, 255, (px, px, 3), dtype=np.uint8)),
                                          "json": {"shape_cls": int(c), "texture_cls": int((c * 7) % 1000),
                                                   "bg_cls": int((c * 13) % 1000)}})
                   for i, c in enumerate(rng.integers(0, 1000, per))]
        write_tar(cf / f"shard-{sh:06d}.tar", samples)
        entries.append({"url": f"shard-{sh:06d}.tar", "nsamples": per})
    write_json_atomic(cf / "index.json", build_wids_index(entries))
    return {"real": tmp / "real", "cf": cf}


def row_classifier(s: dict, tmp: Path) -> dict:
    from cgn_dist.distributed.env import free_port, process_group_backend
    from cgn_dist.classifier.imagenet.train import train_invariant
    from cgn_dist.precision import use_channels_last

    data = _classifier_data(s, tmp)
    cfg = load_config(REPO / s["classifier_cfg"], [
        f"out_dir={tmp}", "name=classifier", "invariant.weights=random", f"invariant.real_shards={data['real']}",
        f"invariant.cf_shards={data['cf']}", f"eval.val_shards={data['real']}", "invariant.eval_every_epochs=1",
        "invariant.num_workers=0", "eval.num_workers=0", f"train.micro_batch_size={s['classifier_batch']}",
        "train.max_steps=10", "train.checkpoint_every=1000", f"train.device={s['device']}", "train.progress=false"])
    backend = process_group_backend(s["device"])
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
    if s["device"] == "cuda":
        torch.cuda.set_device(0)
    torch.distributed.init_process_group(backend, rank=0, world_size=1,
                                         init_method=f"tcp://127.0.0.1:{free_port()}")
    try:
        group = str(torch.distributed.get_backend())
        probe = torch.ones(4, device=s["device"])  # a CUDA tensor goes through NCCL, a CPU one through gloo
        torch.distributed.all_reduce(probe)
        reduce_ok = bool(torch.equal(probe.cpu(), torch.ones(4)))
        out = train_invariant(cfg)
    finally:
        _leave_process_group()
    evals = sorted(p.name for p in (Path(out["run_dir"]) / "eval").glob("accuracy*.json"))
    ok = (out.get("steps") == 10 and bool(evals) and math.isfinite(out.get("loss/total", float("nan"))) and reduce_ok
          and (s["device"] != "cuda" or "nccl" in group))
    return {"ok": ok, "steps": out.get("steps"), "loss_total": out.get("loss/total"), "process_group": group,
            "all_reduce_ok": reduce_ok, "channels_last": use_channels_last(s["device"], cfg.train.precision),
            "precision": cfg.train.precision, "evaluations": evals, "images_per_s": out.get("perf/images_per_s"), "peak_mem_gb": _peak_gb()}


def row_forward(s: dict, tmp: Path, budget_s: float) -> dict:
    """The device check's table (benchmarks/bench_generate_speed.py): forward images/s and MFU, fp32 / bf16."""
    import subprocess

    tmp.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(REPO / "benchmarks" / "bench_generate_speed.py"), "--device-check", "--json",
           str(tmp / "forward.json"), "--budget-s", str(budget_s), "--variants", "fp32,bf16"]
    cmd += ["--tiny", "--batches", "2", "--n", "2", "--threads", "1"] if s["device"] == "cpu" else [
        "--batches", "16,64", "--n", "64"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=budget_s + 240)
    doc = json.loads((tmp / "forward.json").read_text()) if (tmp / "forward.json").is_file() else {}
    table = [{k: r.get(k) for k in ("variant", "batch", "forward_img_s", "engine_img_s", "mfu", "forward_kind")}
             for r in doc.get("rows", [])]
    return {"ok": proc.returncode == 0 and bool(table), "table": table, "peak_bf16_tflops": doc.get("peak_bf16_tflops"),
            "gflop_per_image": doc.get("gflop_per_image"), **({} if proc.returncode == 0 else
                                                               {"error": proc.stdout[-1500:] + proc.stderr[-1500:]})}


def main(argv: list[str] | None = None) -> int:
    # One process of its own: a rendezvous left in the environment by whatever started it (a launcher, a
    # test process holding its own group on that port) must not be joined.
    for key in ("MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        os.environ.pop(key, None)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="tiny sizes on the CPU (a smoke test of this script)")
    ap.add_argument("--json", default="/tmp/gpu_smoke.json", help="results, rewritten after every row")
    ap.add_argument("--min-psnr", type=float, default=40.0, help="nvJPEG vs Pillow, every image (dB)")
    ap.add_argument("--compile", action="store_true", help="also torch.compile the generation forward")
    ap.add_argument("--rows", default="train,generate,classifier,forward")
    ap.add_argument("--forward-budget-s", type=float, default=120, help="the forward table starts no timing after this")
    args = ap.parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        print(f"gpu_smoke: torch {torch.__version__} sees no CUDA device — fix: install the torch build for this "
              "driver (README \"torch builds per driver\"), or --cpu / GPU_SMOKE_CPU=1 for the CPU smoke run")
        return 4
    s = _sizes(args.cpu)
    name = torch.cuda.get_device_name(0) if s["device"] == "cuda" else f"CPU ({os.cpu_count()} cores)"
    results = {"device": name, "mode": "cpu-smoke (not a measurement)" if args.cpu else "gpu", "torch": torch.__version__,
               "cuda": torch.version.cuda, "rows": []}
    path = Path(args.json)

    def dump() -> None:  # after every row: a run cut short keeps what it found
        path.parent.mkdir(parents=True, exist_ok=True)
        path.with_suffix(".tmp").write_text(json.dumps(results, indent=1, default=str))
        path.with_suffix(".tmp").replace(path)

    dump()
    print(f"gpu_smoke on {name} ({results['mode']}), torch {torch.__version__}", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="gpu_smoke_"))
    rows = {"train": lambda: row_train(s, tmp / "t"),
            "generate": lambda: row_generate(s, tmp / "g", args.min_psnr, args.compile),
            "classifier": lambda: row_classifier(s, tmp / "c"),
            "forward": lambda: row_forward(s, tmp / "f", args.forward_budget_s)}
    try:
        for key in args.rows.split(","):
            t0 = time.perf_counter()
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            try:
                row = rows[key]()
            except Exception as e:  # a failed row is a result: recorded, and the next row still runs
                row = {"ok": False, "error": f"{type(e).__name__}: {str(e).strip()[:800]}",
                       "traceback": traceback.format_exc()[-4000:]}
            row = {"row": key, **row, "seconds": round(time.perf_counter() - t0, 1)}
            results["rows"].append(row)
            dump()
            print(("ok   " if row["ok"] else "FAIL ") + json.dumps({k: v for k, v in row.items() if k != "traceback"},
                                                                   default=str), flush=True)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    bad = [r["row"] for r in results["rows"] if not r["ok"]]
    print(f"gpu_smoke: {len(results['rows']) - len(bad)} ok, {len(bad)} failed{': ' + ', '.join(bad) if bad else ''}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
