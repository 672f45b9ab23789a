"""Training benchmark: time per sample of the same config under each engine and worker count,
measured in one run and reported as ratios against plain torch at one process.

Throughput counts from the end of each run's first update, so start-up (model build,
DeepSpeed init, Ray worker start) is excluded and only steady-state steps are compared.
"""
from __future__ import annotations

import copy
import json
import tempfile
from pathlib import Path

import torch

from cgn_dist.config import Config


def _run_local(cfg: Config) -> float:
    from cgn_dist.launchers.tasks import training_loop

    return float(training_loop(cfg.task)(cfg)["perf/samples_per_s"])


def _run_ray(cfg: Config) -> float:
    from cgn_dist.launchers.ray_train import train_with_ray

    return float(train_with_ray(cfg)["perf_samples_per_s"])


def bench_train(cfg: Config, threads: int = 1, workers: tuple[int, ...] = (1, 2)) -> dict:
    """Plain torch vs DeepSpeed (ZeRO-0, one process), then DeepSpeed under Ray Train with 1 and 2 workers."""
    torch.set_num_threads(threads)
    out_dir = Path(tempfile.mkdtemp(prefix="cgn_bench_"))
    rows = []

    def variant(label: str, engine: str, n_workers: int) -> None:
        c = copy.deepcopy(cfg)
        c.out_dir, c.name = str(out_dir), label.replace(" ", "_").replace(",", "")
        c.train.engine, c.train.progress, c.train.resume = engine, False, False
        c.train.checkpoint_every = c.train.sample_every = max(c.train.max_steps, 1)
        c.distributed.num_workers = n_workers
        c.distributed.cpus_per_worker = float(threads)
        sps = _run_ray(c) if n_workers else _run_local(c)
        rows.append({"variant": label, "engine": engine, "workers": max(n_workers, 1),
                     "samples_per_s": sps, "sec_per_sample": 1.0 / sps if sps else float("inf")})

    variant("torch, 1 process", "torch", 0)
    variant("deepspeed, 1 process", "deepspeed", 0)
    for n in workers:
        variant(f"deepspeed, ray {n} worker{'s' if n > 1 else ''}", "deepspeed", n)
    base = rows[0]["sec_per_sample"]
    ray1 = next((r["sec_per_sample"] for r in rows if r["workers"] == 1 and "ray" in r["variant"]), None)
    for r in rows:
        r["vs_torch"] = r["sec_per_sample"] / base
        if ray1 and "ray" in r["variant"]:
            r["vs_1_worker"] = r["sec_per_sample"] / ray1
    return {"config": cfg.name, "task": cfg.task, "micro_batch_size": cfg.train.micro_batch_size,
            "grad_accum": cfg.train.grad_accum, "updates": cfg.train.max_steps, "threads_per_worker": threads,
            "rows": rows}


def format_bench(result: dict) -> str:
    lines = [f"train benchmark: {result['config']} ({result['task']}), micro batch {result['micro_batch_size']} x "
             f"accumulation {result['grad_accum']}, {result['updates']} updates, "
             f"{result['threads_per_worker']} thread(s) per worker",
             f"{'variant':<28}{'s/sample':>10}{'samples/s':>11}{'vs torch':>10}{'vs 1 worker':>13}"]
    for r in result["rows"]:
        one = f"{r['vs_1_worker']:.2f}x" if "vs_1_worker" in r else "-"
        lines.append(f"{r['variant']:<28}{r['sec_per_sample']:>10.4f}{r['samples_per_s']:>11.2f}"
                     f"{r['vs_torch']:>9.2f}x{one:>13}")
    lines.append("(ratios are time per sample: < 1 is faster)")
    return "\n".join(lines)


def main_bench_train(cfg: Config, json_out: str | None = None) -> dict:
    result = bench_train(cfg)
    print(format_bench(result))
    if json_out:
        Path(json_out).write_text(json.dumps(result, indent=1))
    return result
