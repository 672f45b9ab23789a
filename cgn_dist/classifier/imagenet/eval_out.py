"""Where ``cgn-dist eval`` writes, and which weights an evaluation may use.

Folder: ``eval.out`` when given (refused when it already holds a result, unless ``eval.overwrite=true``);
otherwise ``<out_dir>/eval/<what is evaluated>-<kind>`` (e.g. runs/eval/resnet50-shape-bias), with
``-2``, ``-3``, ... appended when that name is taken, so a second evaluation never replaces the first.

Weights: an evaluation never falls back to random weights. "auto" means "imagenet" here; unavailable
weights stop the evaluation with one line; random weights are used only when asked for by name
(``eval.weights=random``), and then every table says so and shows no paper figure.
"""
from __future__ import annotations

import re
from pathlib import Path

from cgn_dist.config import Config, ConfigError

RESULT = "metrics.json"  # written last: a folder holding it holds a complete result
RANDOM = "random"
RANDOM_NOTE = ("random weights (asked for by name, e.g. eval.weights=random): an untrained network; "
               "no published figure applies")


def eval_weights(spec: str) -> str:
    """The weights spec an evaluation uses: "auto" would fall back to random, so it means "imagenet"."""
    return "imagenet" if spec == "auto" else spec


def is_random(model) -> bool:
    """True for a model whose weights are a random init (asked for with eval.weights=random)."""
    net = getattr(model, "net", model)
    return getattr(model, "weights_source", getattr(net, "weights_source", "")) == RANDOM


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", text).strip("_.") or "model"


def subject_name(cfg: Config, what: str) -> str:
    """A short name of what is evaluated: the torchvision arch, the run / checkpoint, or the data's name."""
    e = cfg.eval
    uses_model = what not in ("inception",) and not (what == "shape-bias" and not e.cue_conflict)
    if uses_model and e.model:
        if e.model.startswith("torchvision:"):
            arch = e.model.split(":", 1)[1]
            return _slug(arch + ("-random" if e.weights == RANDOM else ""))
        p = Path(e.model.rstrip("/"))
        if p.parent.name == "checkpoints":  # runs/x/checkpoints/step_000100 -> x-step_000100
            return _slug(f"{p.parent.parent.name}-{p.name}")
        return _slug(p.stem if p.is_file() else p.name)
    if what == "inception" and e.samples:
        return _slug(Path(e.samples.rstrip("/")).name) + ("-random" if e.inception_weights == RANDOM else "")
    if e.decisions_csv:
        return _slug(Path(e.decisions_csv).stem)
    return "eval"


def choose_out(cfg: Config, what: str) -> tuple[Path, bool]:
    """(folder, derived?) for this evaluation; ConfigError when eval.out already holds a result."""
    e = cfg.eval
    if e.out:
        out = Path(e.out)
        if (out / RESULT).exists() and not e.overwrite:
            raise ConfigError(f"eval.out={out} already holds a result ({RESULT}); give another eval.out, leave it "
                              "unset for a new folder under <out_dir>/eval/, or set eval.overwrite=true to replace it")
        return out, False
    base = Path(cfg.out_dir) / "eval" / f"{subject_name(cfg, what)}-{what}"
    out, n = base, 1
    while out.exists():
        n += 1
        out = base.with_name(f"{base.name}-{n}")
    return out, True


__all__ = ["eval_weights", "is_random", "subject_name", "choose_out", "RESULT", "RANDOM", "RANDOM_NOTE"]
