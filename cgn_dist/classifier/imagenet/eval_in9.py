"""The Backgrounds Challenge, IN-9 (Xiao et al.).

Layout: ``<root>/<variant>/val/<class folder>/*`` (MadryLab's release; ``<root>/<variant>/<class folder>``
also works), nine class folders per variant whose sorted order gives labels 0..8. Every variant folder
present is evaluated (original, mixed_same, mixed_rand, only_fg, ...), the ``original`` column included.

Images stay at their 224 x 224 (no resize) and use IN-9's own normalisation. The prediction is the argmax
over ALL 1,000 logits mapped by in_to_in9.json; the 630 unmapped classes count as wrong. Accuracy =
correct / number of images (exact: a partial last batch counts what it holds). BG-gap = acc(mixed_same) -
acc(mixed_rand) of ``shape_texture`` (the bg head left out), or of ``logits`` for a plain classifier.
"""
from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

import torch

from cgn_dist.classifier.imagenet.eval_out import RANDOM_NOTE
from cgn_dist.classifier.imagenet.evaluation import gather_rows, image_batches, rank_part, run_model, sum_counts
from cgn_dist.errors import InputError, InputNotFound

IN9_MEAN = (0.4717, 0.4499, 0.3837)
IN9_STD = (0.2600, 0.2516, 0.2575)
IN9_SIZE = 224
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
# Published top-1 %: IN-9 original, mixed_same, mixed_rand, BG-gap.
PAPER = {"IN + CGN (paper)": {"original": 94.2, "mixed_same": 83.4, "mixed_rand": 80.1, "bg_gap": 3.3},
         "IN (ResNet-50)": {"original": 95.6, "mixed_same": 86.2, "mixed_rand": 78.9, "bg_gap": 7.3},
         "SIN": {"original": 89.2, "mixed_same": 73.1, "mixed_rand": 63.7, "bg_gap": 9.4},
         "IN+SIN": {"original": 94.7, "mixed_same": 85.9, "mixed_rand": 78.5, "bg_gap": 7.4},
         "Mixed-Rand": {"original": 73.3, "mixed_same": 71.5, "mixed_rand": 71.3, "bg_gap": 0.2}}


def load_in_to_in9() -> torch.Tensor:
    """1000-long tensor: ImageNet index -> IN-9 class, -1 when unmapped (shipped with cgn_dist)."""
    f = resources.files("cgn_dist.classifier").joinpath("resources/in_to_in9.json")
    mapping = json.loads(f.read_text())
    table = torch.full((1000,), -1, dtype=torch.long)
    for k, v in mapping.items():
        table[int(k)] = int(v)
    return table


def in9_transform():
    from torchvision import transforms

    def check_size(im):
        if im.size != (IN9_SIZE, IN9_SIZE):
            raise InputError(f"IN-9 images are {IN9_SIZE} x {IN9_SIZE} and are not resized; got {im.size} "
                             "(point eval.in9 at the Backgrounds Challenge release)")
        return im

    return transforms.Compose([transforms.Lambda(check_size), transforms.ToTensor(),
                               transforms.Normalize(IN9_MEAN, IN9_STD)])


def list_variants(root: str | Path) -> dict[str, list[tuple[Path, int]]]:
    """{variant: [(file, label), ...]} for every variant folder under ``root``."""
    root = Path(root)
    if not root.is_dir():
        raise InputNotFound(f"eval.in9: {root} is not a folder (expected <root>/<variant>/val/<class>/...)")
    out = {}
    for vdir in sorted(p for p in root.iterdir() if p.is_dir()):
        base = vdir / "val" if (vdir / "val").is_dir() else vdir
        classes = sorted(p for p in base.iterdir() if p.is_dir())
        if not classes:
            continue
        if len(classes) != 9:
            raise InputError(f"eval.in9: {base} holds {len(classes)} class folders; IN-9 has 9 "
                             "(00_dog ... 08_fish in the release)")
        items = [(f, label) for label, c in enumerate(classes) for f in sorted(c.iterdir())
                 if f.suffix.lower() in IMAGE_SUFFIXES]
        out[vdir.name] = items
    known = ("original", "mixed_same", "mixed_rand", "only_fg", "no_fg", "only_bg_b", "only_bg_t", "no_fg",
             "mixed_next")
    out = dict(sorted(out.items(), key=lambda kv: (known.index(kv[0]) if kv[0] in known else len(known), kv[0])))
    if not out:
        raise InputNotFound(f"eval.in9: no variant folders with 9 class folders under {root}")
    return out


def evaluate_in9(model: torch.nn.Module, root: str | Path, batch_size: int = 64, device="cpu",
                 precision: str = "fp32", num_workers: int = 0, variants: Sequence[str] | None = None,
                 outputs: Sequence[str] | None = None) -> dict[str, Any]:
    """Accuracy per variant and model output (counts summed over ranks) and the BG-gap."""
    table = load_in_to_in9()
    found = list_variants(root)
    names = [v for v in (variants or found) if v in found]
    counts: dict[str, int] = {}
    heads_seen: set[str] = set()
    for v in names:
        mine = rank_part(found[v])
        labels = torch.tensor([lab for _, lab in mine], dtype=torch.long)
        counts[f"{v}/images"] = len(mine)
        loader = image_batches([f for f, _ in mine], in9_transform(), batch_size, num_workers)
        for out, (idx,) in run_model(model, loader, device, precision):
            y = labels[idx]
            for h, logits in out.items():
                if outputs and h not in outputs:
                    continue
                heads_seen.add(h)
                pred = table[logits.argmax(dim=1)]
                key = f"{v}/{h}"
                counts[key] = counts.get(key, 0) + int((pred == y).sum())
    heads = sorted(set(gather_rows(sorted(heads_seen))), key=_order)
    keys = [f"{v}/images" for v in names] + [f"{v}/{h}" for v in names for h in heads]
    summed = sum_counts(counts, keys)
    acc = {v: {h: {"correct": summed[f"{v}/{h}"], "images": summed[f"{v}/images"],
                   "accuracy": 100.0 * summed[f"{v}/{h}"] / summed[f"{v}/images"] if summed[f"{v}/images"] else None}
               for h in heads} for v in names}
    gap_head = "shape_texture" if "shape_texture" in heads else ("logits" if "logits" in heads else None)
    gap = None
    if gap_head and "mixed_same" in acc and "mixed_rand" in acc:
        a, b = acc["mixed_same"][gap_head]["accuracy"], acc["mixed_rand"][gap_head]["accuracy"]
        gap = None if a is None or b is None else a - b
    return {"accuracy": acc, "bg_gap": gap, "bg_gap_output": gap_head, "variants": names, "root": str(root)}


def _order(h: str):
    order = ["avg", "shape_texture", "shape", "texture", "bg", "logits"]
    return (order.index(h) if h in order else len(order), h)


def in9_table(result: dict[str, Any], random: bool = False) -> dict[str, Any]:
    """Our rows, then the published rows (each under its own model's name); none for random weights."""
    variants = result["variants"]
    columns = ["model", "output", *variants, "bg_gap"]
    rows = []
    heads = sorted({h for v in variants for h in result["accuracy"][v]}, key=_order)
    for h in heads:
        row = {"model": "ours, random weights" if random else "ours", "output": h}
        for v in variants:
            a = result["accuracy"][v][h]["accuracy"]
            row[v] = None if a is None else round(a, 2)
        row["bg_gap"] = round(result["bg_gap"], 2) if (h == result["bg_gap_output"] and result["bg_gap"]
                                                      is not None) else None
        rows.append(row)
    for name, p in ({} if random else PAPER).items():
        rows.append({"model": name, "output": "shape_texture" if "CGN" in name else "-",
                     **{v: p.get(v) for v in variants}, "bg_gap": p["bg_gap"]})
    n = {v: result["accuracy"][v][heads[0]]["images"] if heads else 0 for v in variants}
    return {"columns": columns, "rows": rows,
            "notes": [*([RANDOM_NOTE] if random else []), f"images per variant: {n}", "BG-gap = mixed_same - mixed_rand of shape_texture "
                      "(logits for a plain classifier); paper values [paper, via MLRC-2021]"]}


__all__ = ["evaluate_in9", "list_variants", "load_in_to_in9", "in9_transform", "in9_table", "PAPER"]
