"""The one configuration of cgn_dist: loading, checking, merging and saving (the schema: config_schema.py).

Stdlib dataclasses hold every default with a one-line doc; YAML files hold only
overrides (optionally on top of a ``base:`` file); ``key=value`` dotted overrides
come from the command line. Unknown keys, wrong types and bad values fail here,
before any work starts, naming the key and what is accepted.
"""
from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from cgn_dist.config_schema import (  # noqa: F401  (the schema's names are part of this module's API)
    DataConfig, MnistConfig, ImagenetConfig, TrainConfig, DistributedConfig, RayConfig, GenerateConfig,
    ShardsConfig, MnistClassifierConfig, MnistPipelineConfig, InvariantConfig, EvalConfig, ImagenetPipelineConfig, Config)
from cgn_dist.errors import UserError


class ConfigError(UserError, ValueError):
    """A config file or override is wrong; the message says which key and what is accepted."""


# --------------------------------------------------------------------------- checks


def _check_values(cfg: Config) -> None:
    def need(ok: bool, key: str, msg: str) -> None:
        if not ok:
            raise ConfigError(f"{key}: {msg}")

    t = cfg.train
    need(t.zero_stage in (0, 1, 2), "train.zero_stage", f"got {t.zero_stage}; accepted: 0, 1, 2")
    need(t.micro_batch_size >= 1, "train.micro_batch_size", "must be >= 1")
    need(t.grad_accum >= 1, "train.grad_accum", "must be >= 1")
    need(t.keep_last >= 1, "train.keep_last", "must be >= 1")
    need(t.max_steps >= 0, "train.max_steps", "must be >= 0 (0 = derive from epochs)")
    for k in ("log_every", "sample_every", "checkpoint_every"):
        need(getattr(t, k) >= 1, f"train.{k}", "must be >= 1")
    need(t.precision != "fp16" or t.engine == "deepspeed", "train.precision",
         "fp16 needs train.engine=deepspeed (its loss scaler); use bf16 or fp32 with the torch engine")
    for key, tr in (("imagenet.truncation", cfg.imagenet.truncation), ("generate.truncation", cfg.generate.truncation)):
        need(0.0 < tr <= 1.0, key, f"got {tr}; truncation must lie in (0, 1]")
    need(len(cfg.mnist.style_weights) == 4, "mnist.style_weights", "needs 4 values (VGG blocks 1-4)")
    need(len(cfg.mnist.betas) == 2, "mnist.betas", "needs 2 values")
    need(len(cfg.imagenet.betas) == 2, "imagenet.betas", "needs 2 values")
    need(len(cfg.imagenet.w_perceptual) == 4, "imagenet.w_perceptual", "needs 4 values")
    need(len(cfg.imagenet.w_texture) == 4, "imagenet.w_texture", "needs 4 values")
    m_lo_hi = cfg.mnist.mask_area_bounds
    need(len(m_lo_hi) == 2 and 0 <= m_lo_hi[0] < m_lo_hi[1] <= 1, "mnist.mask_area_bounds",
         "needs [lo, hi] with 0 <= lo < hi <= 1")
    need(cfg.mnist.mask_area_weight >= 0, "mnist.mask_area_weight", "must be >= 0")
    need(not (cfg.mnist.bg_init_from_data and cfg.mnist.bg_init_bias), "mnist.bg_init_bias",
         "is set and so is mnist.bg_init_from_data; keep one (bg_init_bias=0 or bg_init_from_data=false)")
    need(0 <= cfg.mnist.ema_decay < 1, "mnist.ema_decay", "must lie in [0, 1) (0 = off; 0.999 is typical)")
    lo_hi = cfg.imagenet.mask_area_bounds
    need(len(lo_hi) == 2 and 0 <= lo_hi[0] < lo_hi[1] <= 1, "imagenet.mask_area_bounds", "needs [lo, hi] with 0 <= lo < hi <= 1")
    g = cfg.generate
    need(g.n_samples >= 1 and g.shard_size >= 1 and g.batch_size >= 1, "generate",
         "n_samples, shard_size and batch_size must be >= 1")
    need(1 <= g.jpeg_quality <= 100, "generate.jpeg_quality", "must lie in 1..100")
    need(g.mode != "fixed_classes" or len(g.classes) == 3, "generate.classes",
         "fixed_classes mode needs three class ids [shape, texture, background]")
    need(g.forward_batch >= 1, "generate.forward_batch", "must be >= 1")
    need(g.num_threads >= 0, "generate.num_threads", "must be >= 0 (0 = torch's setting)")
    need(g.dry_run_samples >= 0, "generate.dry_run_samples", "must be >= 0 (0 = one forward batch)")
    need(cfg.distributed.num_workers >= 0, "distributed.num_workers", "must be >= 0")
    sh = cfg.shards
    need(1 <= sh.shard_size <= 999_999, "shards.shard_size", "must lie in 1..999999")
    need(sh.shard_bytes >= 0 and sh.resize >= 0, "shards", "shard_bytes and resize must be >= 0")
    need(1 <= sh.jpeg_quality <= 100, "shards.jpeg_quality", "must lie in 1..100")
    need(sh.batch_size >= 1, "shards.batch_size", "must be >= 1")
    need(sh.num_workers >= 0, "shards.num_workers", "must be >= 0 (0 = one per core)")
    need(g.num_workers >= 0, "generate.num_workers", "must be >= 0 (0 = one per GPU, else per core)")
    bad_ds = set(cfg.mnist_pipeline.datasets) - {"colored", "double_colored", "wildlife"}
    need(not bad_ds, "mnist_pipeline.datasets", f"unknown {sorted(bad_ds)}; accepted: colored, double_colored, wildlife")
    need(not cfg.mnist_pipeline.datasets or cfg.mnist_pipeline.released_dir, "mnist_pipeline.datasets",
         "needs mnist_pipeline.released_dir=DIR (the authors' cgn_<dataset>_MNIST.pth files); without it the "
         "pipeline trains one CGN on data.dataset")
    need(cfg.eval.is_splits >= 1, "eval.is_splits", "must be >= 1")
    need(cfg.eval.batch_size >= 1, "eval.batch_size", "must be >= 1")
    need(cfg.invariant.cf_ratio >= 0, "invariant.cf_ratio", "must be >= 0 (0 = real images only)")
    need(cfg.invariant.lr_step_epochs >= 1, "invariant.lr_step_epochs", "must be >= 1")
    bad = set(cfg.mnist_classifier.train_on) - {"original", "counterfactual", "combined"}
    need(not bad, "mnist_classifier.train_on", f"unknown {sorted(bad)}; accepted: original, counterfactual, combined")
    _check_optimizer_values(cfg, need)


def _check_optimizer_values(cfg: Config, need) -> None:
    """Learning rates, betas and loss weights, checked here so that the error names the key (torch's own
    check says only "Invalid learning rate: -1.0", deep inside the run)."""
    def number(key: str) -> float:
        section, name = key.split(".")
        return getattr(getattr(cfg, section), name)

    # lr 0 would train nothing; for the three ImageNet mechanisms it freezes one on purpose
    for key in ("mnist.lr", "mnist_classifier.lr", "invariant.lr"):
        need(number(key) > 0, key, f"got {number(key)}; a learning rate must be > 0 (e.g. the default "
                                   f"{_default_of(key)})")
    for key in ("imagenet.lr_shape", "imagenet.lr_text", "imagenet.lr_bg", "mnist.lambda_mask", "imagenet.w_l1",
                "imagenet.w_binary", "imagenet.w_mask_area", "imagenet.w_background", "invariant.weight_decay"):
        need(number(key) >= 0, key, f"got {number(key)}; must be >= 0 (0 = off)")
    for key in ("mnist_classifier.gamma", "invariant.lr_gamma", "mnist.init_gain", "distributed.cpus_per_worker"):
        need(number(key) > 0, key, f"got {number(key)}; must be > 0 (default {_default_of(key)})")
    need(0 <= cfg.invariant.momentum < 1, "invariant.momentum", f"got {cfg.invariant.momentum}; must lie in [0, 1)")
    for key in ("mnist.betas", "imagenet.betas"):
        need(all(0 <= b < 1 for b in number(key)), key, f"got {number(key)}; Adam betas must lie in [0, 1)")
    for key in ("mnist.style_weights", "imagenet.w_perceptual", "imagenet.w_texture"):
        need(all(w >= 0 for w in number(key)), key, f"got {number(key)}; weights must be >= 0")


def _default_of(key: str):
    section, name = key.split(".")
    return getattr(getattr(Config(), section), name)


# --------------------------------------------------------------------------- typed merge


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp))


_FLOAT_LITERAL = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = get_origin(tp)
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{key}: got {value!r}; accepted: {', '.join(repr(a) for a in get_args(tp))}")
        return value
    if origin in (list, typing.List):
        (item_tp,) = get_args(tp) or (Any,)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list of {_type_name(item_tp)}, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        for arg in get_args(tp):
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: {value!r} is none of {[_type_name(a) for a in get_args(tp)]}")
    if tp is Any or tp is type(None) and value is None:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT_LITERAL.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 reads 2e-4 (no dot) as a string
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # a name like 7 or a version like 1.0 given bare on the command line
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


# Sections and task names that were renamed for what they configure. A config a user writes with an old
# name is refused with the new one; a config cgn_dist saved earlier (a run's config.yaml) is read as renamed.
RENAMED_SECTIONS = {"classifier": "mnist_classifier", "pipeline": "mnist_pipeline"}
RENAMED_TASKS = {"classifier": "invariant"}


def _refuse_old_names(layer: dict, where: str) -> None:
    for old, new in RENAMED_SECTIONS.items():
        if old in layer:
            raise ConfigError(f"{where}: section {old}: was renamed {new}: (it configures the MNIST experiment's "
                              f"{'classifiers' if old == 'classifier' else 'pipeline'}); write {new}.<key> instead")
    if layer.get("task") in RENAMED_TASKS:
        new = RENAMED_TASKS[layer["task"]]
        raise ConfigError(f"{where}: task={layer['task']} was renamed task={new} (the invariant ImageNet "
                          f"classifier, configured under invariant:); write task: {new}")


def upgrade_config_dict(d: dict) -> dict:
    """A saved config with the old section / task names, under the present ones (a copy)."""
    out = {RENAMED_SECTIONS.get(k, k): v for k, v in d.items()}
    if out.get("task") in RENAMED_TASKS:
        out["task"] = RENAMED_TASKS[out["task"]]
    return out


def _merge(obj: Any, updates: dict, prefix: str = "") -> None:
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for k, v in updates.items():
        key = f"{prefix}{k}"
        if k not in names:
            raise ConfigError(f"unknown key {key!r}; accepted here: {', '.join(sorted(names))}")
        current = getattr(obj, k)
        if dataclasses.is_dataclass(current):
            if not isinstance(v, dict):
                raise ConfigError(f"{key}: is a section; give its keys ({key}.<name>=...), not {v!r}")
            _merge(current, v, prefix=f"{key}.")
        else:
            setattr(obj, k, _coerce(v, hints[k], key))


def _dotted_to_nested(pairs: list[str]) -> list[dict]:
    out = []
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"override {pair!r} is not key=value (e.g. train.max_steps=10)")
        key, raw = pair.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {key}: cannot parse {raw!r}: {e}") from None
        nested: dict = {}
        node = nested
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
        out.append(nested)
    return out


def _read_yaml(path: Path, seen: tuple = ()) -> list[dict]:
    """Return the override dicts of ``path`` after those of its ``base:`` chain."""
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    if path.resolve() in seen:
        raise ConfigError(f"config {path}: base chain loops back on itself")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config {path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config {path}: top level must be a mapping of keys")
    base = data.pop("base", None)
    chain = _read_yaml(_find_base(str(base), path), seen + (path.resolve(),)) if base else []
    return chain + [data]


def _find_base(base: str, of: Path) -> Path:
    """``base:`` of the config ``of``: beside it first, else like a top-level config path (the current
    directory, the project root, its configs/), so a config kept outside the checkout can build on
    ``base: configs/mnist/colored.yaml``."""
    p = Path(base).expanduser()
    candidates = [p] if p.is_absolute() else [of.parent / p, p, PROJECT_ROOT / p, PROJECT_ROOT / "configs" / p]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    where = "" if p.is_absolute() else f" (looked beside it, in {Path.cwd()} and under the project root {PROJECT_ROOT})"
    raise ConfigError(f"config {of}: base: {base!r} does not exist{where}; fix that base: line")


# The checkout cgn_dist runs from (quickstart installs it editable): its configs/ serve every directory.
PROJECT_ROOT = Path(__file__).resolve().parents[1]


def find_config(path: str | Path) -> Path:
    """``path`` as given if it exists, else the same relative path under the project root, so
    ``cgn-dist train configs/mnist/colored.yaml`` works from any directory."""
    p = Path(path).expanduser()
    if p.is_file() or p.is_absolute():
        return p
    for candidate in (PROJECT_ROOT / p, PROJECT_ROOT / "configs" / p):
        if candidate.is_file() and (PROJECT_ROOT / "configs").is_dir():
            return candidate
    raise ConfigError(f"config file {str(path)!r} does not exist here ({Path.cwd()}) nor under the project root "
                      f"{PROJECT_ROOT} (whose configs/ any directory can use: e.g. configs/mnist/colored.yaml)")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Build the config: defaults, then the YAML chain at ``path`` (relative paths: the current directory,
    else the project root), then ``key=value`` overrides."""
    cfg = Config()
    layers = _read_yaml(find_config(path)) if path else []
    for layer in layers:
        _refuse_old_names(layer, f"config {path}")
    for layer in _dotted_to_nested(list(overrides or [])):
        _refuse_old_names(layer, "override")
    for layer in layers + _dotted_to_nested(list(overrides or [])):
        _merge(cfg, layer)
    if not cfg.name:
        cfg.name = Path(path).stem if path else "run"
    _check_values(cfg)
    return cfg


# --------------------------------------------------------------------------- docs


def field_docs(cls: type = None, prefix: str = "") -> dict[str, str]:
    """``{dotted key: one-line doc}`` read from the schema's own comments (the ``# ...`` after each field,
    plus comment lines right below it), so the docs cannot drift from the code."""
    import inspect
    import re

    cls = cls or Config
    docs: dict[str, str] = {}
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    last = None
    for line in inspect.getsource(cls).splitlines()[1:]:
        m = re.match(r"^    (\w+): [^#]*?(?:#\s*(.*))?$", line)
        if m and m.group(1) in names:
            last = m.group(1)
            docs[prefix + last] = (m.group(2) or "").strip()
        elif last and re.match(r"^    \)\s*#", line):  # the comment after a field spanning lines
            docs[prefix + last] = line.split("#", 1)[1].strip()
        elif re.match(r"^    #.*:\s*$", line):  # a group header ("# ImageNet generation speed ...:") of the keys below
            last = None
        elif last and re.match(r"^    #", line):
            docs[prefix + last] = (docs[prefix + last] + " " + line.strip()[1:].strip()).strip()
        elif line.strip() and not line.startswith("        "):
            last = None
    for name in names:
        if dataclasses.is_dataclass(hints[name]):
            docs.pop(prefix + name, None)
            docs.update(field_docs(hints[name], f"{prefix}{name}."))
    return docs


def format_config_docs(cfg: Config) -> str:
    """Every key of ``cfg`` as ``key: value  # doc``, section by section."""
    docs = field_docs()
    flat: list[tuple[str, Any]] = []

    def walk(d: dict, prefix: str = "") -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                flat.append((prefix + k, v))

    walk(config_to_dict(cfg))
    width = max(len(f"{k}: {yaml.safe_dump(v, default_flow_style=True).strip()}") for k, v in flat)
    width = min(width, 48)
    lines, section = [], None
    for key, value in flat:
        sec = key.split(".")[0] if "." in key else ""
        if sec != section:
            lines.append(f"\n# {sec}" if sec else "# top level")
            section = sec
        text = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("\n...").removesuffix("...").strip()
        lines.append(f"{key + ': ' + text:<{width}}  # {docs.get(key, '')}")
    return "\n".join(lines).lstrip("\n")


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def config_from_dict(d: dict) -> Config:
    cfg = Config()
    _merge(cfg, upgrade_config_dict(d))
    _check_values(cfg)
    return cfg


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(path).with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    tmp.replace(path)
