"""Top-1 / top-5 from shards: ImageNet val (every output vs the label) and counterfactual val (each head vs
its own class: shape head vs shape class, texture head vs texture class, bg head vs background class).

Shards are split over ranks (rank r reads shards r, r+world, ...), hits and totals are summed, so the
numbers do not depend on the world size. Images get the val transform (Resize 256, CenterCrop 224).
"""
from __future__ import annotations

import io
import json
from typing import Any, Iterable, Iterator, Sequence

import torch
from PIL import Image

from cgn_dist.classifier.evaluation import (forward_outputs, gather_rows, imagenet_eval_transform, rank_part,
                                            sum_counts)
from cgn_dist.data.shards import iter_tar_samples

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
CF_LABELS = {"shape": "shape_cls", "texture": "texture_cls", "bg": "bg_cls"}
PAPER = {"imagenet_val": {"top1": 74.0, "top5": 91.7}}  # IN + CGN, avg output [paper*, spec §2.8]
BASELINE = {"ResNet-50 (IN)": {"top1": 76.13, "top5": 92.86}}


def topk_correct(logits: torch.Tensor, target: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, int]:
    """Number of rows whose target is among the k largest logits, for each k."""
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices
    hit = top == target.view(-1, 1)
    return {k: int(hit[:, :min(k, kmax)].any(dim=1).sum()) for k in ks}


def sample_labels(sample: dict[str, Any]) -> dict[str, int]:
    """Labels a shard sample carries: ``label`` (real ImageNet: .cls or json label/cls) and, for
    counterfactuals, shape_cls / texture_cls / bg_cls from the json."""
    out = {}
    meta = sample.get("json")
    if isinstance(meta, (bytes, bytearray)):
        meta = json.loads(meta)
    meta = meta or {}
    for ext in ("cls", "label", "class"):
        if ext in sample:
            v = sample[ext]
            out["label"] = int(v.decode() if isinstance(v, (bytes, bytearray)) else v)
            break
    else:
        for k in ("label", "cls", "class"):
            if k in meta:
                out["label"] = int(meta[k])
                break
    for k in CF_LABELS.values():
        if k in meta:
            out[k] = int(meta[k])
    return out


def decode_image(sample: dict[str, Any]) -> Image.Image:
    for ext in IMAGE_EXTS:
        if ext in sample:
            return Image.open(io.BytesIO(sample[ext])).convert("RGB")
    raise ValueError(f"sample {sample.get('__key__')} has no image ({', '.join(IMAGE_EXTS)})")


def labelled_batches(urls: Sequence[str], transform, batch_size: int, limit: int = 0
                     ) -> Iterator[tuple[torch.Tensor, list[dict[str, int]]]]:
    xs, labels, n = [], [], 0
    for url in urls:
        for s in iter_tar_samples(url):
            if limit and n >= limit:
                break
            xs.append(transform(decode_image(s)))
            labels.append(sample_labels(s))
            n += 1
            if len(xs) == batch_size:
                yield torch.stack(xs), labels
                xs, labels = [], []
    if xs:
        yield torch.stack(xs), labels


def count_topk(model: torch.nn.Module, batches: Iterable, kind: str = "real", device="cpu",
               precision: str = "fp32", ks: Sequence[int] = (1, 5)) -> dict[str, int]:
    """Counts ``<output>/top<k>`` and ``<output>/n`` over ``batches`` of (images, label dicts)."""
    counts: dict[str, int] = {}
    was = model.training
    model.eval()
    try:
        for x, labels in batches:
            out = forward_outputs(model, x, device, precision)
            for h, logits in out.items():
                key = "label" if kind == "real" else CF_LABELS.get(h, "shape_cls" if h == "logits" else None)
                if key is None:
                    continue
                keep = [i for i, lab in enumerate(labels) if key in lab]
                if not keep:
                    continue
                y = torch.tensor([labels[i][key] for i in keep])
                for k, c in topk_correct(logits[keep], y, ks).items():
                    counts[f"{h}/top{k}"] = counts.get(f"{h}/top{k}", 0) + c
                counts[f"{h}/n"] = counts.get(f"{h}/n", 0) + len(keep)
    finally:
        model.train(was)
    return counts


def evaluate_topk(model: torch.nn.Module, source, kind: str = "real", batch_size: int = 64, device="cpu",
                  precision: str = "fp32", image_size: int = 224, limit_per_rank: int = 0,
                  ks: Sequence[int] = (1, 5)) -> dict[str, Any]:
    """Top-k % per output over the shards of ``source`` (folder with index.json, index, tar or list)."""
    from cgn_dist.classifier.mnist import shard_urls_of

    if kind not in ("real", "counterfactual"):
        raise ValueError(f"kind must be 'real' or 'counterfactual', got {kind!r}")
    urls = shard_urls_of(source)
    mine = rank_part(urls)
    counts = count_topk(model, labelled_batches(mine, imagenet_eval_transform(image_size), batch_size,
                                                limit_per_rank), kind, device, precision, ks)
    heads = sorted(set(gather_rows(sorted({k.split("/")[0] for k in counts}))))
    keys = [f"{h}/{m}" for h in heads for m in ("n", *(f"top{k}" for k in ks))]
    s = sum_counts(counts, keys)
    result = {h: {"images": s[f"{h}/n"], **{f"top{k}": (100.0 * s[f"{h}/top{k}"] / s[f"{h}/n"]
                                                       if s[f"{h}/n"] else None) for k in ks},
                  **{f"top{k}_hits": s[f"{h}/top{k}"] for k in ks}} for h in heads}
    return {"kind": kind, "per_output": result, "shards": len(urls)}


def accuracy_table(real: dict[str, Any] | None, cf: dict[str, Any] | None) -> dict[str, Any]:
    rows = []
    for name, res in (("ImageNet val", real), ("counterfactual val", cf)):
        if not res:
            continue
        for h, r in res["per_output"].items():
            paper = PAPER["imagenet_val"] if (name == "ImageNet val" and h == "avg") else {}
            rows.append({"set": name, "output": h, "top1": _r(r["top1"]), "top5": _r(r.get("top5")),
                         "paper_top1": paper.get("top1"), "paper_top5": paper.get("top5"), "images": r["images"]})
    for name, v in BASELINE.items():
        rows.append({"set": "ImageNet val", "output": name, "paper_top1": v["top1"], "paper_top5": v["top5"]})
    return {"columns": ["set", "output", "top1", "top5", "paper_top1", "paper_top5", "images"], "rows": rows,
            "notes": ["paper: IN + CGN avg output 74.0 / 91.7 [paper*, spec §2.8]; counterfactual val: each head "
                      "against its own class"]}


def _r(v):
    return None if v is None else round(v, 2)


__all__ = ["topk_correct", "count_topk", "evaluate_topk", "labelled_batches", "sample_labels", "accuracy_table"]
