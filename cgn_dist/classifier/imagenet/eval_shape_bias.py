"""Shape bias on Geirhos et al.'s cue-conflict stimuli.

Per image: Resize 256, CenterCrop 224, ImageNet normalisation; softmax over the 1,000 logits; each of the
16 categories gets the MEAN probability over its ImageNet indices; the decision is the argmax. Images whose
shape and texture categories are equal are left out. shape bias = shape hits / (shape hits + texture hits).

The metric is a function of per-image (shape, texture, decision) triples alone, so published decisions
(Geirhos' raw-data CSVs: object_response, category, imagename) are scored by the same code as our models.
"""
from __future__ import annotations

import csv
import json
import re
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from cgn_dist.classifier.imagenet.eval_out import RANDOM_NOTE
from cgn_dist.classifier.imagenet.evaluation import (gather_rows, image_batches, imagenet_eval_transform, rank_part,
                                            run_model, sum_counts)
from cgn_dist.errors import InputError, InputNotFound

# "airplane1-bicycle2.png", also with a prefix ("0001_s5n_dnn_0_airplane_00_airplane1-bicycle2.png")
STIMULUS = re.compile(r"(?:^|_)([a-z]+)\d+-([a-z]+)\d+\.(?:png|jpe?g)$", re.IGNORECASE)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")

# Published shape bias (%) for reference rows.
PAPER_HEADS = {"shape": 54.8, "texture": 16.7, "bg": 22.9}  # IN + CGN, per head
BASELINES = {"ResNet-50 (IN), Geirhos release": 21.39, "ResNet-50 (IN), texture-vs-shape paper": 22.1,
             "SIN": 81.37, "IN+SIN": 34.65, "IN+SIN->IN": 20.54}
# The published figure of one network, shown beside that network's row only: torchvision architectures
# (with their ImageNet weights) and the `subj` of Geirhos' decision files. ResNet-50: 22.1 (texture-vs-shape
# paper; its released decisions score 22.07). Others are left empty until a verified figure is known.
PUBLISHED_BY_MODEL = {"resnet50": 22.1}


def load_category_indices() -> dict[str, list[int]]:
    """The 16 categories (sorted) and their ImageNet indices, shipped with cgn_dist."""
    text = resources.files("cgn_dist.classifier").joinpath("resources/shape_bias_16class_imagenet_indices.json")
    mapping = json.loads(text.read_text())
    return {k: [int(i) for i in mapping[k]] for k in sorted(mapping)}


def parse_stimulus(name: str) -> tuple[str, str]:
    """(shape, texture) categories from a cue-conflict file name."""
    m = STIMULUS.search(Path(name).name)
    if not m:
        raise InputError(f"{name!r} is not a cue-conflict stimulus name (<shape><n>-<texture><m>.png)")
    return m.group(1).lower(), m.group(2).lower()


def to_16_class(logits: torch.Tensor, categories: dict[str, list[int]]) -> torch.Tensor:
    """B x 1000 logits -> B x 16 mean probabilities (categories in the mapping's sorted order)."""
    p = torch.softmax(logits.float(), dim=1)
    return torch.stack([p[:, idx].mean(dim=1) for idx in categories.values()], dim=1)


def shape_bias_counts(triples: Iterable[tuple[str, str, str]]) -> dict[str, int]:
    """Counts over (shape, texture, decision); images with shape == texture are excluded."""
    c = {"n": 0, "shape_hits": 0, "texture_hits": 0, "excluded_same": 0}
    for shape, texture, decision in triples:
        if shape == texture:
            c["excluded_same"] += 1
            continue
        c["n"] += 1
        c["shape_hits"] += decision == shape
        c["texture_hits"] += decision == texture
    return c


def summarize(c: dict[str, int]) -> dict[str, Any]:
    hits = c["shape_hits"] + c["texture_hits"]
    return {**c, "shape_bias": None if hits == 0 else c["shape_hits"] / hits,
            "cue_accuracy": None if c["n"] == 0 else hits / c["n"]}


def shape_bias_from_decisions_csv(path: str | Path, subject: str | None = None) -> dict[str, Any]:
    """Shape bias of published per-image 16-class decisions (Geirhos raw-data CSV format)."""
    triples, subjects = [], set()
    if not Path(path).is_file():
        raise InputNotFound(f"eval.decisions_csv: {path} does not exist (a Geirhos raw-data CSV of per-image "
                            "decisions, e.g. from the model-vs-human release)")
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            if subject and row.get("subj") != subject:
                continue
            subjects.add(row.get("subj") or "")
            shape, texture = parse_stimulus(row["imagename"])
            if row.get("category") and row["category"] != shape:
                raise InputError(f"{path}: row {row['imagename']} has category {row['category']} but its name "
                                 f"says shape {shape}")
            triples.append((shape, texture, row["object_response"]))
    if not triples:
        raise InputError(f"{path}: no decisions" + (f" for subject {subject!r}" if subject else ""))
    return {**summarize(shape_bias_counts(triples)), "subjects": sorted(subjects), "csv": Path(path).name}


def list_stimuli(root: str | Path) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        raise InputNotFound(f"eval.cue_conflict: {root} is not a folder of cue-conflict stimuli")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and STIMULUS.search(p.name))
    if not files:
        raise InputNotFound(f"eval.cue_conflict: no <shape><n>-<texture><m>.png stimuli under {root}")
    return files


def evaluate_shape_bias(model: torch.nn.Module, root: str | Path, batch_size: int = 32, device="cpu",
                        precision: str = "fp32", image_size: int = 224, num_workers: int = 0,
                        outputs: Sequence[str] | None = None) -> dict[str, Any]:
    """Shape bias per model output over the stimuli under ``root`` (distributed: this rank's part, summed)."""
    categories = load_category_indices()
    names = list(categories)
    files = list_stimuli(root)
    kept = [f for f in files if len(set(parse_stimulus(f.name))) == 2]
    mine = rank_part(kept)
    rows, counts = [], {}
    for out, (idx,) in run_model(model, image_batches(mine, imagenet_eval_transform(image_size), batch_size,
                                                       num_workers), device, precision):
        heads = [h for h in (outputs or out) if h in out]
        for h in heads:
            decisions = to_16_class(out[h], categories).argmax(dim=1).tolist()
            for i, d in zip(idx.tolist(), decisions):
                shape, texture = parse_stimulus(mine[i].name)
                rows.append({"image": str(mine[i].relative_to(Path(root))), "output": h, "shape": shape,
                             "texture": texture, "decision": names[d]})
                c = counts.setdefault(h, {"n": 0, "shape_hits": 0, "texture_hits": 0})
                c["n"] += 1
                c["shape_hits"] += names[d] == shape
                c["texture_hits"] += names[d] == texture
    heads = list(outputs) if outputs else _output_names(model, rows)
    keys = [f"{h}/{k}" for h in heads for k in ("n", "shape_hits", "texture_hits")]
    summed = sum_counts({f"{h}/{k}": v for h, c in counts.items() for k, v in c.items()}, keys)
    result = {h: summarize({"n": summed[f"{h}/n"], "shape_hits": summed[f"{h}/shape_hits"],
                            "texture_hits": summed[f"{h}/texture_hits"], "excluded_same": len(files) - len(kept)})
              for h in heads}
    all_rows = sorted(gather_rows(rows), key=lambda r: (r["output"], r["image"]))
    return {"per_output": result, "decisions": all_rows, "n_files": len(files), "root": str(root)}


def _output_names(model: torch.nn.Module, rows: list) -> list[str]:
    """Output names, agreed over ranks (a rank with no images has seen none)."""
    seen = gather_rows(sorted({r["output"] for r in rows}))
    order = ["avg", "shape_texture", "shape", "texture", "bg", "logits"]
    return sorted(set(seen), key=lambda h: (order.index(h) if h in order else len(order), h))


def _csv_subject(csv_result: dict[str, Any]) -> str:
    subjects = [s for s in csv_result.get("subjects", []) if s]
    return subjects[0] if len(subjects) == 1 else ""


def shape_bias_table(result: dict[str, Any], csv_result: dict[str, Any] | None = None, arch: str = "",
                     random: bool = False) -> dict[str, Any]:
    """Rows for report.save_table. paper_% stands only beside the model it was published for: the IN + CGN
    heads of an invariant classifier, ``PUBLISHED_BY_MODEL[arch]`` beside a torchvision network's logits
    (arch given only for its ImageNet weights), the CSV subject's figure beside its decisions; none at all
    for random weights."""
    rows = []
    ours = "ours, random weights" if random else "ours"
    for h, r in result.get("per_output", {}).items():
        paper = PUBLISHED_BY_MODEL.get(arch) if h == "logits" else PAPER_HEADS.get(h)
        rows.append({"model": ours, "output": h, "shape_bias_%": None if r["shape_bias"] is None
                     else round(100 * r["shape_bias"], 2), "paper_%": None if random else paper,
                     "shape_hits": r["shape_hits"], "texture_hits": r["texture_hits"], "images": r["n"]})
    if csv_result is not None:
        subject = _csv_subject(csv_result)
        rows.append({"model": f"published decisions: {subject or 'several subjects'} ({csv_result.get('csv', 'CSV')})",
                     "output": "-", "shape_bias_%": round(100 * csv_result["shape_bias"], 2),
                     "paper_%": None if random else PUBLISHED_BY_MODEL.get(subject),
                     "shape_hits": csv_result["shape_hits"], "texture_hits": csv_result["texture_hits"],
                     "images": csv_result["n"]})
    notes = ["16-class decision = argmax of the mean softmax probability per category; shape == texture "
             "stimuli excluded"]
    if random:
        return {"columns": ["model", "output", "shape_bias_%", "paper_%", "shape_hits", "texture_hits", "images"],
                "rows": rows, "notes": [RANDOM_NOTE, *notes]}
    for h, v in PAPER_HEADS.items():
        rows.append({"model": "IN + CGN (paper)", "output": h, "shape_bias_%": None, "paper_%": v})
    for name, v in BASELINES.items():
        rows.append({"model": name, "output": "-", "shape_bias_%": None, "paper_%": v})
    return {"columns": ["model", "output", "shape_bias_%", "paper_%", "shape_hits", "texture_hits", "images"],
            "rows": rows,
            "notes": ["paper_% beside a measured row: the figure published for that same model (IN + CGN heads "
                      "[paper, via MLRC-2021]; torchvision ResNet-50: 22.1, texture-vs-shape); empty = none known",
                      *notes]}


__all__ = ["evaluate_shape_bias", "shape_bias_from_decisions_csv", "shape_bias_counts", "summarize",
           "to_16_class", "parse_stimulus", "load_category_indices", "list_stimuli", "shape_bias_table"]
