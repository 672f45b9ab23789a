"""Training and evaluating the MNIST classifier on original and counterfactual shards.

Protocol: the CNN of cgn_dist.models.classifier, NLL loss, Adadelta (lr 1.0), StepLR (step 1 epoch,
gamma 0.7), 10 epochs, batch 64 for training and 640 for testing, evaluated on the de-correlated test set.
Three training sets: the original data, the counterfactual data, and both together (concatenated and
shuffled; the authors' code could only train on one of them).

Data: shards are read once with webdataset and kept in memory as uint8 (MNIST is small: 60k images are
184 MB), then turned into [-1, 1] floats one batch at a time. Batches come from a seeded permutation per
epoch (seed, epoch), weights from a seeded init, so a run is a pure function of its data and seed on a
given machine and thread count.

Accuracies: test accuracy after the last epoch; train accuracy is measured the same way (eval mode, after
the last epoch) on the whole training set of that classifier.
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from cgn_dist.data.pixels import decode_uint8
from cgn_dist.errors import InputError
from cgn_dist.models.classifier import build_classifier
from cgn_dist.progress import progress_bar
from cgn_dist.data.shard_index import shard_urls_of

TRAIN_SETS = ("original", "counterfactual", "combined")


@dataclass
class ImageSet:
    """Images as uint8 N x 3 x H x W with int64 labels (kept compact; decoded per batch)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"images must be uint8 N x C x H x W, got {self.images.dtype} {tuple(self.images.shape)}")
        if len(self.images) != len(self.labels):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    @staticmethod
    def concat(sets: Sequence["ImageSet"]) -> "ImageSet":
        if len(sets) == 1:
            return sets[0]
        return ImageSet(torch.cat([s.images for s in sets]), torch.cat([s.labels for s in sets]))


# --- reading shards ---------------------------------------------------------------------------------------

def load_image_set(source: str | os.PathLike | Sequence[str | os.PathLike], limit: int | None = None,
                   label_key: str = "label") -> ImageSet:
    """Read every sample of some shards (png + json) with webdataset into memory.

    The label is ``json[label_key]`` (our counterfactual and original samples both carry ``label``; for a
    counterfactual it is the shape class). ``limit`` keeps the first samples only.
    """
    import webdataset as wds

    urls = shard_urls_of(source)
    pipeline = (wds.WebDataset(urls, shardshuffle=False, empty_check=False)
                .decode("rgb8").to_tuple("png", "json"))
    images, labels = [], []
    for img, meta in pipeline:
        if label_key not in meta:
            raise KeyError(f"a sample's json has no {label_key!r} (keys: {sorted(meta)})")
        images.append(np.asarray(img, dtype=np.uint8))
        labels.append(int(meta[label_key]))
        if limit is not None and len(labels) >= limit:
            break
    if not images:
        raise InputError(f"no samples in {urls[:3]}{' ...' if len(urls) > 3 else ''}")
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    return ImageSet(x, torch.tensor(labels, dtype=torch.int64))


# --- training ---------------------------------------------------------------------------------------------

@dataclass
class ClassifierSettings:
    """The training protocol (defaults: the paper's). Any object with these attributes works too, e.g.
    cgn_dist.config.MnistClassifierConfig."""

    epochs: int = 10
    batch_size: int = 64
    test_batch_size: int = 640
    lr: float = 1.0  # Adadelta
    gamma: float = 0.7  # StepLR(step_size=1)


def _to_input(images_u8: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    # channels_last: oneDNN's CPU convolutions (and their backward) run ~1.5-2x faster in NHWC here.
    return decode_uint8(images_u8).to(device).contiguous(memory_format=torch.channels_last)


@contextlib.contextmanager
def _threads(n: int):
    """Run with n intra-op threads (0 = leave as is), restoring the previous count."""
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _epoch_seed(seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence([seed, 0x636C73, epoch]).generate_state(1)[0])


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: ImageSet, batch_size: int = 640,
             device: str | torch.device = "cpu") -> float:
    """Accuracy (%) of ``model`` on ``data`` in eval mode."""
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, len(data), batch_size):
        x = _to_input(data.images[start:start + batch_size], device)
        y = data.labels[start:start + batch_size].to(device)
        correct += int((model(x).argmax(1) == y).sum())
    model.train(was_training)
    return 100.0 * correct / len(data)


def train_classifier(train: ImageSet | Sequence[ImageSet], test: ImageSet, settings: Any = None, seed: int = 0,
                     device: str | torch.device = "cpu", progress: bool = True, desc: str = "classifier",
                     eval_every_epoch: bool = True, num_threads: int = 1, position: int | None = None,
                     ) -> dict[str, Any]:
    """Train a fresh classifier on ``train`` (several sets: concatenated, then shuffled together).

    ``num_threads``: torch threads while training (restored afterwards; 0 = leave as is). Small convs gain
    little from a second thread; run classifiers side by side in processes instead (see
    cgn_dist.classifier.mnist.experiment). ``position``: tqdm line, for bars of parallel processes.
    Returns train_acc, test_acc (after the last epoch), history (per epoch: loss, lr, test_acc when
    eval_every_epoch), n_train, n_test, wall_s.
    """
    with _threads(num_threads):
        return _train(train, test, settings, seed, device, progress, desc, eval_every_epoch, position)


def _train(train, test, settings, seed, device, progress, desc, eval_every_epoch, position) -> dict[str, Any]:
    s = settings if settings is not None else ClassifierSettings()
    data = ImageSet.concat(list(train) if isinstance(train, (list, tuple)) else [train])
    t0 = time.perf_counter()
    device = torch.device(device)
    model = build_classifier(seed).to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.Adadelta(model.parameters(), lr=s.lr)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=s.gamma)
    n, bs = len(data), s.batch_size
    steps_per_epoch = -(-n // bs)
    history = []
    bar = progress_bar(total=s.epochs * steps_per_epoch, desc=desc, unit="it", enabled=progress,
                       dynamic_ncols=True, position=position)
    model.train()
    for epoch in range(s.epochs):
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(_epoch_seed(seed, epoch)))
        loss_sum, seen = 0.0, 0
        for start in range(0, n, bs):
            idx = perm[start:start + bs]
            x = _to_input(data.images[idx], device)
            y = data.labels[idx].to(device)
            optimizer.zero_grad(set_to_none=True)
            loss = F.nll_loss(model(x), y)
            loss.backward()
            optimizer.step()
            loss_sum += loss.item() * len(idx)
            seen += len(idx)
            bar.update(1)
        record = {"epoch": epoch + 1, "loss": loss_sum / seen, "lr": optimizer.param_groups[0]["lr"]}
        scheduler.step()
        if eval_every_epoch or epoch == s.epochs - 1:
            record["test_acc"] = evaluate(model, test, s.test_batch_size, device)
        history.append(record)
        bar.set_postfix(epoch=epoch + 1, loss=f"{record['loss']:.3f}",
                        test=f"{record.get('test_acc', float('nan')):.1f}")
    bar.close()
    train_acc = evaluate(model, data, s.test_batch_size, device)
    return {"train_acc": train_acc, "test_acc": history[-1]["test_acc"], "history": history, "n_train": n,
            "n_test": len(test), "wall_s": time.perf_counter() - t0}


def train_classifiers(original: ImageSet | None, counterfactual: ImageSet | None, test: ImageSet,
                      settings: Any = None, seed: int = 0, train_on: Iterable[str] = TRAIN_SETS,
                      device: str | torch.device = "cpu", progress: bool = True,
                      num_threads: int = 1) -> dict[str, dict[str, Any]]:
    """The three classifiers of the table: {"original", "counterfactual", "combined"} -> train_classifier's
    dict. All use the same seed (same initial weights), so they differ only in their data."""
    results = {}
    for name in train_on:
        if name not in TRAIN_SETS:
            raise ValueError(f"unknown training set {name!r}; choose from {TRAIN_SETS}")
        parts = {"original": [original], "counterfactual": [counterfactual],
                 "combined": [original, counterfactual]}[name]
        if any(p is None for p in parts):
            missing = "original" if parts[0] is None else "counterfactual"
            raise ValueError(f"training on {name!r} needs the {missing} set")
        results[name] = train_classifier(parts, test, settings, seed=seed, device=device, progress=progress,
                                         desc=f"classifier[{name}]", num_threads=num_threads)
    return results


def save_results(results: dict[str, Any], path: str | os.PathLike) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")


__all__ = ["ImageSet", "ClassifierSettings", "load_image_set", "evaluate", "train_classifier",
           "train_classifiers", "TRAIN_SETS"]
