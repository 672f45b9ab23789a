"""Top-1 / top-5 from shards: ImageNet val (every output vs the label) and counterfactual val (each head vs
its own class: shape head vs shape class, texture head vs texture class, bg head vs background class).

Read with the data plane's val stream (cgn_dist.data.stream, train=False: every sample exactly once over all
ranks and DataLoader workers); hits and totals are summed over ranks, so the numbers do not depend on the world
size. Images get the val transform (Resize 256, CenterCrop 224).
"""
from __future__ import annotations

import io
import os
from typing import Any, Iterable, Sequence

import torch
from PIL import Image

from cgn_dist.classifier.imagenet.eval_out import RANDOM_NOTE
from cgn_dist.classifier.imagenet.evaluation import forward_outputs, gather_rows, sum_counts
from cgn_dist.data.shards import iter_tar_samples
from cgn_dist.errors import InputError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
CF_LABELS = {"shape": "shape_cls", "texture": "texture_cls", "bg": "bg_cls"}
PAPER = {"imagenet_val": {"top1": 74.0, "top5": 91.7}}  # IN + CGN, avg output [paper, via MLRC-2021]
BASELINE = {"ResNet-50 (IN)": {"top1": 76.13, "top5": 92.86}}
BY_ARCH = {"resnet50": BASELINE["ResNet-50 (IN)"]}  # torchvision's IMAGENET1K_V1, what eval.weights=imagenet loads


def topk_correct(logits: torch.Tensor, target: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, int]:
    """Number of rows whose target is among the k largest logits, for each k."""
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices
    hit = top == target.view(-1, 1)
    return {k: int(hit[:, :min(k, kmax)].any(dim=1).sum()) for k in ks}


def decode_image(sample: dict[str, Any]) -> Image.Image:
    for ext in IMAGE_EXTS:
        if ext in sample:
            return Image.open(io.BytesIO(sample[ext])).convert("RGB")
    raise InputError(f"sample {sample.get('__key__')} has no image ({', '.join(IMAGE_EXTS)})")


def shard_set_of(source):
    """The data plane's ShardSet: a shard folder / index.json, (url, count) pairs, or plain tar paths (counted)."""
    from cgn_dist.data.stream import load_shard_set

    if isinstance(source, (str, os.PathLike)) and str(source).endswith(".tar"):
        source = [source]
    if isinstance(source, (list, tuple)) and source and isinstance(source[0], (str, os.PathLike)):
        return load_shard_set([(str(u), sum(1 for _ in iter_tar_samples(u))) for u in source])
    return load_shard_set(source)


def count_topk(model: torch.nn.Module, batches: Iterable[dict], kind: str = "real", device="cpu",
               precision: str = "fp32", ks: Sequence[int] = (1, 5), limit: int = 0) -> dict[str, int]:
    """Counts ``<output>/top<k>`` and ``<output>/n`` over the data plane's batches (image + label tensors)."""
    counts: dict[str, int] = {}
    seen = 0
    was = model.training
    model.eval()
    try:
        for batch in batches:
            x = batch["image"]
            if limit:
                if seen >= limit:
                    break
                x = x[:limit - seen]
            seen += len(x)
            out = forward_outputs(model, x, device, precision)
            for h, logits in out.items():
                key = "label" if kind == "real" else CF_LABELS.get(h, "shape_cls" if h == "logits" else None)
                if key is None:
                    continue
                y = batch[key][:len(x)]
                for k, c in topk_correct(logits, y, ks).items():
                    counts[f"{h}/top{k}"] = counts.get(f"{h}/top{k}", 0) + c
                counts[f"{h}/n"] = counts.get(f"{h}/n", 0) + len(y)
    finally:
        model.train(was)
    return counts


def evaluate_topk(model: torch.nn.Module, source, kind: str = "real", batch_size: int = 64, device="cpu",
                  precision: str = "fp32", image_size: int = 224, limit_per_rank: int = 0,
                  ks: Sequence[int] = (1, 5), num_workers: int = 0) -> dict[str, Any]:
    """Top-k % per output over the shards of ``source`` (folder with index.json, index, pairs or tars).

    Read with the data plane's val stream (Resize 256 + CenterCrop 224, every sample once over all ranks).
    """
    from cgn_dist.data.stream import CF_LABELS as LABELS_CF, REAL_LABELS, make_loader

    if kind not in ("real", "counterfactual"):
        raise ValueError(f"kind must be 'real' or 'counterfactual', got {kind!r}")
    shards = shard_set_of(source)
    loader = make_loader(shards, batch_size, train=False, num_workers=num_workers,
                         labels=REAL_LABELS if kind == "real" else LABELS_CF, image_size=image_size,
                         resize=round(image_size * 256 / 224))
    counts = count_topk(model, loader, kind, device, precision, ks, limit_per_rank)
    heads = sorted(set(gather_rows(sorted({k.split("/")[0] for k in counts}))))
    keys = [f"{h}/{m}" for h in heads for m in ("n", *(f"top{k}" for k in ks))]
    s = sum_counts(counts, keys)
    result = {h: {"images": s[f"{h}/n"], **{f"top{k}": (100.0 * s[f"{h}/top{k}"] / s[f"{h}/n"]
                                                       if s[f"{h}/n"] else None) for k in ks},
                  **{f"top{k}_hits": s[f"{h}/top{k}"] for k in ks}} for h in heads}
    return {"kind": kind, "per_output": result, "shards": len(shards.urls), "images_listed": shards.n_samples}


def accuracy_table(real: dict[str, Any] | None, cf: dict[str, Any] | None, arch: str = "",
                   random: bool = False) -> dict[str, Any]:
    """paper_* beside a measured row only for the model it was published for: the IN + CGN avg output, or a
    torchvision network's logits with its ImageNet weights (arch); nothing for random weights."""
    rows = []
    for name, res in (("ImageNet val", real), ("counterfactual val", cf)):
        if not res:
            continue
        for h, r in res["per_output"].items():
            paper = {}
            if name == "ImageNet val" and not random:
                paper = PAPER["imagenet_val"] if h == "avg" else (BY_ARCH.get(arch, {}) if h == "logits" else {})
            rows.append({"set": name, "output": h + (" (random weights)" if random else ""), "top1": _r(r["top1"]),
                         "top5": _r(r.get("top5")), "paper_top1": paper.get("top1"), "paper_top5": paper.get("top5"),
                         "images": r["images"]})
    for name, v in ({} if random else BASELINE).items():
        rows.append({"set": "ImageNet val", "output": name, "paper_top1": v["top1"], "paper_top5": v["top5"]})
    return {"columns": ["set", "output", "top1", "top5", "paper_top1", "paper_top5", "images"], "rows": rows,
            "notes": [RANDOM_NOTE] if random else
            ["paper: IN + CGN avg output 74.0 / 91.7 [paper, via MLRC-2021]; torchvision ResNet-50 V1 76.13 / "
             "92.86; counterfactual val: each head against its own class"]}


def _r(v):
    return None if v is None else round(v, 2)


__all__ = ["topk_correct", "count_topk", "evaluate_topk", "shard_set_of", "decode_image", "accuracy_table"]
