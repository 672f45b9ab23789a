"""The ImageNet experiment end to end: real shards -> counterfactuals -> invariant classifier -> evaluations
-> the paper's table. ``cgn-dist imagenet-pipeline CONFIG``.

Stages, all under the run directory <out_dir>/<name>/, each resumable and skipped when done:
1. real_train/, real_val/: ``make-shards`` of imagenet_pipeline.train_root / val_root (skipped when unset:
   invariant.real_shards / eval.val_shards are used as given); done = index.json present.
2. cf_train/, cf_val/: ``generate`` of imagenet_pipeline.cf_train_samples / cf_val_samples counterfactuals
   with the CGN of generate.checkpoint (imagenet.* model settings); exactly-once shards, so an interrupted
   run continues; done = index.json present.
3. classifier/: the invariant classifier (resumes from its latest checkpoint; nothing left = no work), under
   Ray Train when distributed.num_workers > 0.
4. eval/: every configured evaluation of the final model; done = eval/final_done.json.
5. imagenet_table.{json,csv,txt,png}: shape bias per head, top-1/5, IN-9 and BG-gap beside the paper's.
"""
from __future__ import annotations

import copy
import json
import logging
import time
from pathlib import Path
from typing import Any

from cgn_dist.config import Config, save_config
from cgn_dist.errors import InputError

log = logging.getLogger("cgn_dist.imagenet_pipeline")

PAPER_ROWS = [  # (metric, metrics key, paper value) [paper, via MLRC-2021]
    ("shape bias %, shape head", "shape_bias/shape", 54.8),
    ("shape bias %, texture head", "shape_bias/texture", 16.7),
    ("shape bias %, bg head", "shape_bias/bg", 22.9),
    ("ImageNet top-1 %, avg", "val/avg/top1", 74.0),
    ("ImageNet top-5 %, avg", "val/avg/top5", 91.7),
    ("IN-9 original %", "in9/original/shape_texture", 94.2),
    ("IN-9 mixed_same %", "in9/mixed_same/shape_texture", 83.4),
    ("IN-9 mixed_rand %", "in9/mixed_rand/shape_texture", 80.1),
    ("IN-9 BG-gap", "in9/bg_gap", 3.3),
]


def _stage_real(cfg: Config, root: str, out: Path, val_labels: str = "") -> str:
    from cgn_dist.ingest.make_shards import run_make_shards

    if (out / "index.json").is_file():
        log.info("real shards %s: done, skipped", out)
        return "skipped"
    c = copy.deepcopy(cfg)
    c.shards.root, c.shards.out, c.shards.val_labels = root, str(out), val_labels
    run_make_shards(c)
    return "ran"


def _stage_cf(cfg: Config, n: int, out: Path, seed: int) -> str:
    from cgn_dist.generate.command import run_generate

    if (out / "index.json").is_file():
        log.info("counterfactual shards %s: done, skipped", out)
        return "skipped"
    c = copy.deepcopy(cfg)
    c.task, c.seed, c.out_dir, c.name = "imagenet", seed, str(out.parent), out.name
    c.generate.n_samples, c.generate.dry_run = n, False
    if c.generate.mode == "interpolation":
        raise InputError("generate.mode=interpolation makes sheets, not a data set: use random or best_classes")
    run_generate(c)
    return "ran"


def build_table(metrics: dict[str, float]) -> dict[str, Any]:
    rows = [{"metric": name, "ours": None if key not in metrics else round(metrics[key], 2), "paper": paper}
            for name, key, paper in PAPER_ROWS]
    return {"columns": ["metric", "ours", "paper"], "rows": rows,
            "notes": ["paper: ResNet-50 trained on IN + CGN, 3 heads [paper, via MLRC-2021]; – = not evaluated "
                      "(data not configured)"]}


def run_imagenet_pipeline(cfg: Config) -> dict[str, Any]:
    from cgn_dist.classifier.imagenet import report
    from cgn_dist.classifier.imagenet.eval_command import evaluate_classifier, load_eval_model
    from cgn_dist.classifier.imagenet.train import train_invariant
    from cgn_dist.train.metrics import setup_logging

    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    setup_logging(run_dir)
    p = cfg.imagenet_pipeline
    stages: dict[str, str] = {}
    walls: dict[str, float] = {}
    c = copy.deepcopy(cfg)  # the classifier's config: data paths filled in by the stages

    def timed(name, fn, *a):
        t0 = time.perf_counter()
        stages[name] = fn(*a)
        walls[name] = round(time.perf_counter() - t0, 2)

    if p.train_root:
        timed("real_train", _stage_real, cfg, p.train_root, run_dir / "real_train")
        c.invariant.real_shards = str(run_dir / "real_train")
    if p.val_root:
        timed("real_val", _stage_real, cfg, p.val_root, run_dir / "real_val", p.val_labels)
        c.eval.val_shards = str(run_dir / "real_val")
    if p.cf_train_samples:
        timed("cf_train", _stage_cf, cfg, p.cf_train_samples, run_dir / "cf_train", cfg.seed)
        c.invariant.cf_shards = str(run_dir / "cf_train")
    if p.cf_val_samples:
        timed("cf_val", _stage_cf, cfg, p.cf_val_samples, run_dir / "cf_val", cfg.seed + 1)
        c.eval.cf_val_shards = str(run_dir / "cf_val")

    c.task, c.out_dir, c.name = "invariant", str(run_dir), "classifier"
    t0 = time.perf_counter()
    if c.distributed.num_workers > 0:  # the cluster config: Ray Train workers, fault tolerant
        from cgn_dist.launchers.ray_train import train_with_ray

        result = train_with_ray(c)
    else:
        result = train_invariant(c)
    stages["classifier"] = f"{result.get('steps', result.get('step'))} updates"
    walls["classifier"] = round(time.perf_counter() - t0, 2)

    done = run_dir / "eval" / "final_done.json"
    if done.is_file():
        metrics = json.loads(done.read_text())["metrics"]
        stages["eval"] = "skipped"
    else:
        t0 = time.perf_counter()
        c.eval.model = str(c.run_dir)
        model = load_eval_model(c)
        metrics = evaluate_classifier(model, c, "all", "cpu" if not _cuda() else "cuda", run_dir / "eval",
                                      tag="final")
        done.parent.mkdir(parents=True, exist_ok=True)
        done.write_text(json.dumps({"metrics": metrics, "model": model.weights_source}, indent=1))
        stages["eval"], walls["eval"] = "ran", round(time.perf_counter() - t0, 2)
    table = build_table(metrics)
    paths = report.save_table(run_dir, "imagenet_table", "Invariant classifier on ImageNet: ours vs the paper",
                              table["columns"], table["rows"], table["notes"], {"stages": stages, "wall_s": walls})
    print(report.format_table("Invariant classifier on ImageNet: ours vs the paper", table["columns"],
                              table["rows"], table["notes"]))
    summary = {"run_dir": str(run_dir), "stages": stages, "wall_s": walls, "metrics": metrics,
               "table": {k: str(v) for k, v in paths.items()}}
    (run_dir / "pipeline.json").write_text(json.dumps(summary, indent=1))
    return summary


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


__all__ = ["run_imagenet_pipeline", "build_table"]
