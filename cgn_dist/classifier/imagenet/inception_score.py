"""Inception Score and μ_mask of generated samples (the paper's loss ablation).

IS = exp(E_x KL(p(y|x) || p(y))) per split, p(y) the mean of p(y|x) over the split; reported as the mean
and standard deviation over 10 contiguous splits of the samples in shard order (the usual protocol of
Salimans et al.). p(y|x) comes from torchvision's Inception v3 at 299 x 299 (bilinear resize, ImageNet
normalisation; the weights' own input transform then applies). μ_mask = mean mask value: the per-sample
``mask_mean`` each generated sample's json carries (or its stored mask).

The paper gives no sample count or truncation for IS; the reproduction found ~2,000 samples
give the paper's magnitudes. Ours: eval.is_samples (0 = every sample of the run).
"""
from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from cgn_dist.classifier.imagenet.eval_accuracy import decode_image
from cgn_dist.classifier.imagenet.eval_out import RANDOM_NOTE
from cgn_dist.classifier.imagenet.evaluation import IMAGENET_MEAN, IMAGENET_STD, gather_rows, rank_part
from cgn_dist.data.shards import iter_tar_samples

PAPER = {"full CGN": (130.2, 0.3), "without L_shape": (85.9, 0.2), "without L_text": (198.4, 0.9),
         "without L_bg": (195.6, 0.1), "without L_rec": (38.4, 0.3), "BigGAN (upper bound)": (202.9, None)}


def inception_score(probs: torch.Tensor | np.ndarray, splits: int = 10) -> tuple[float, float]:
    """(mean, std) of exp(mean KL(p(y|x) || p(y))) over ``splits`` contiguous splits of N x C probabilities."""
    p = torch.as_tensor(probs, dtype=torch.float64)
    if p.dim() != 2 or len(p) < splits:
        raise ValueError(f"need an N x C probability matrix with N >= splits ({splits}), got {tuple(p.shape)}")
    scores = []
    for part in torch.tensor_split(p, splits):
        py = part.mean(dim=0, keepdim=True)
        kl = (part * (torch.log(part.clamp_min(1e-30)) - torch.log(py.clamp_min(1e-30)))).sum(dim=1)
        scores.append(float(torch.exp(kl.mean())))
    return float(np.mean(scores)), float(np.std(scores))


def build_inception(weights: str = "auto", seed: int = 0) -> torch.nn.Module:
    """torchvision Inception v3 (eval mode, no aux head in use) with ImageNet weights per the usual rule."""
    from cgn_dist.models.invariant import build_torchvision

    model, source = build_torchvision("inception_v3", weights, seed, aux_logits=True, init_weights=False,
                                      transform_input=True)
    model.weights_source = source
    return model.eval()


class InceptionProbs(torch.nn.Module):
    """[0, 1] RGB images of any size -> softmax over 1000 classes of a 299-px classifier."""

    def __init__(self, net: torch.nn.Module, size: int = 299):
        super().__init__()
        self.net, self.size = net, size
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        out = self.net((x - self.mean) / self.std)
        logits = out.logits if hasattr(out, "logits") else out
        return torch.softmax(logits.float(), dim=1)


def _mask_mean(sample: dict[str, Any]) -> float | None:
    meta = sample.get("json")
    if isinstance(meta, (bytes, bytearray)):
        meta = json.loads(meta)
    if isinstance(meta, dict) and "mask_mean" in meta:
        return float(meta["mask_mean"])
    if "mask.png" in sample:
        return float(np.asarray(Image.open(io.BytesIO(sample["mask.png"])).convert("L"), dtype=np.float64).mean() / 255)
    return None


def evaluate_samples(classifier: torch.nn.Module, source, splits: int = 10, max_samples: int = 0,
                     batch_size: int = 32, device="cpu") -> dict[str, Any]:
    """IS and μ_mask of the generated samples in ``source`` (a generation run folder, index or tars).

    Distributed: shards are split over ranks; the per-sample probabilities are gathered in shard order,
    so the splits (and the score) do not depend on the world size.
    """
    from cgn_dist.data.shard_index import shard_urls_of

    urls = shard_urls_of(source)
    mine = rank_part(list(enumerate(urls)))
    rows = []  # (shard position, sample position, probabilities, mask mean)
    device = torch.device(device)
    classifier = classifier.to(device).eval()
    for pos, url in mine:
        batch, meta = [], []
        samples = list(iter_tar_samples(url))
        for j, s in enumerate(samples):
            img = torch.from_numpy(np.asarray(decode_image(s), dtype=np.float32) / 255).permute(2, 0, 1)
            batch.append(img)
            meta.append((j, _mask_mean(s)))
            if len(batch) == batch_size or j == len(samples) - 1:
                probs = classifier(torch.stack(batch).to(device)).cpu()
                rows += [(pos, jj, p.numpy(), m) for (jj, m), p in zip(meta, probs)]
                batch, meta = [], []
    rows = sorted(gather_rows(rows), key=lambda r: (r[0], r[1]))
    if max_samples:
        rows = rows[:max_samples]
    probs = np.stack([r[2] for r in rows]) if rows else np.zeros((0, 1000))
    masks = [r[3] for r in rows if r[3] is not None]
    mean, std = inception_score(probs, splits) if len(rows) >= splits else (None, None)
    return {"inception_score": mean, "inception_score_std": std, "splits": splits, "samples": len(rows),
            "mask_mean": float(np.mean(masks)) if masks else None, "masks": len(masks),
            "classifier": getattr(getattr(classifier, "net", classifier), "weights_source", "unknown")}


def is_table(result: dict[str, Any], random: bool = False) -> dict[str, Any]:
    """Ours, then the paper's rows; with a random Inception v3 (asked for) the score means nothing: no paper rows."""
    rows = [{"model": "ours, random Inception weights" if random else "ours", "IS": _r(result["inception_score"]),
             "IS_std": _r(result["inception_score_std"]), "mu_mask": _r(result["mask_mean"], 3),
             "samples": result["samples"]}]
    if not random:
        rows += [{"model": f"paper: {k}", "IS": v[0], "mu_mask": v[1]} for k, v in PAPER.items()]
    return {"columns": ["model", "IS", "IS_std", "mu_mask", "samples"], "rows": rows,
            "notes": [*([RANDOM_NOTE] if random else []),
                      f"Inception v3 weights: {result['classifier']}; {result['splits']} splits",
                      "the paper states no IS sample count or truncation"]}


def _r(v, d: int = 2):
    return None if v is None else round(float(v), d)


__all__ = ["inception_score", "build_inception", "InceptionProbs", "evaluate_samples", "is_table", "PAPER"]
