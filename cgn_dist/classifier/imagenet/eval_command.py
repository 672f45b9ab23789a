"""``cgn-dist eval <what> CONFIG``: load the model named by eval.model, run the evaluations, write tables.

what = shape-bias | in9 | accuracy | inception | all. Each evaluation whose data is configured writes
``<name>.{json,csv,txt,png}`` with the published figure of the model evaluated beside ours, and every figure
into metrics.json and onto stdout. The folder is eval.out, or one of its own under <out_dir>/eval/ (see
eval_out: never overwritten). Pretrained weights that cannot be loaded stop the evaluation; random weights
only when asked for (eval.weights=random), and then no paper figure stands beside them. Under torchrun / the deepspeed launcher every rank evaluates its part and counts are summed.
Training calls ``evaluate_classifier`` the same way before the first epoch and after each epoch.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from cgn_dist.classifier.imagenet import report
from cgn_dist.classifier.imagenet.eval_out import RESULT, choose_out, eval_weights, is_random
from cgn_dist.config import Config
from cgn_dist.errors import InputError, InputNotFound
from cgn_dist.precision import resolve_precision
from cgn_dist.weights import WeightsError

log = logging.getLogger(__name__)

WHAT = ("shape-bias", "in9", "accuracy", "inception", "all")


def _state_of_checkpoint(path: Path) -> dict:
    """The classifier weights of our checkpoint directory (torch or DeepSpeed engine) or a state-dict file."""
    from cgn_dist.models.torchvision_weights import read_state_file

    if path.is_file():
        return read_state_file(path)
    if (path / "classifier.pt").is_file():
        return read_state_file(path / "classifier.pt")
    ds = path / "classifier" / "mp_rank_00_model_states.pt"
    if ds.is_file():
        # DeepSpeed files hold more than tensors; this is our own checkpoint, so a full unpickle is fine.
        state = torch.load(ds, map_location="cpu", weights_only=False)["module"]
        return {k: v.float() for k, v in state.items()}
    raise InputNotFound(f"eval.model: {path} holds no classifier.pt or classifier/ (DeepSpeed) weights")


def resolve_model_path(spec: str) -> Path:
    from cgn_dist.train.checkpoint import latest_checkpoint

    p = Path(spec)
    if p.is_dir() and (p / "checkpoints").is_dir():
        ckpt = latest_checkpoint(p)
        if ckpt is None:
            raise InputNotFound(f"eval.model: run {p} has no completed checkpoint yet")
        return ckpt
    if not p.exists():
        raise InputNotFound(f"eval.model: {spec!r} is neither torchvision:<arch>, a run dir, a checkpoint "
                            "directory nor a weights file")
    return p


def load_eval_model(cfg: Config) -> torch.nn.Module:
    from cgn_dist.models.invariant import InvariantClassifier, TorchvisionClassifier

    spec = cfg.eval.model
    if not spec:
        raise InputError("eval.model is empty: name our classifier (run dir, checkpoint or file) or "
                         "torchvision:<arch>, e.g. eval.model=torchvision:resnet50")
    if spec.startswith("torchvision:"):
        arch = spec.split(":", 1)[1]
        try:
            return TorchvisionClassifier(arch, eval_weights(cfg.eval.weights), cfg.seed)
        except WeightsError as err:
            raise WeightsError(f"eval.weights={cfg.eval.weights}: {str(err).rstrip('.')}; random weights only on "
                               "purpose: eval.weights=random (no paper figure then)") from None
    path = resolve_model_path(spec)
    ic = cfg.invariant
    backbone, n_classes = ic.backbone, ic.n_classes
    meta = path / "meta.json" if path.is_dir() else None
    if meta is not None and meta.is_file():  # our checkpoint knows its own architecture
        trained = (json.loads(meta.read_text()).get("config") or {}).get("invariant") or {}
        backbone, n_classes = trained.get("backbone", backbone), trained.get("n_classes", n_classes)
    model = InvariantClassifier(backbone, n_classes, "random", cfg.seed, ic.freeze_bn)
    model.load_state_dict(_state_of_checkpoint(path))
    model.weights_source = str(path)
    return model


def evaluate_classifier(model: torch.nn.Module, cfg: Config, what: str = "all", device="cpu",
                        out_dir: str | Path | None = None, is_main: bool = True, tag: str = "") -> dict[str, float]:
    """Run the configured evaluations; write tables on the main rank; return flat metrics for TensorBoard."""
    e = cfg.eval
    want = set(WHAT[:-1]) if what == "all" else {what}
    out = Path(out_dir) if out_dir else (Path(e.out) if e.out else cfg.run_dir / "eval")
    metrics: dict[str, float] = {}
    kw = dict(device=device, precision=resolve_precision(e.precision, device, "eval.precision"))
    suffix = f"_{tag}" if tag else ""
    random = is_random(model)
    arch = cfg.eval.model.split(":", 1)[1] if cfg.eval.model.startswith("torchvision:") else ""
    source = getattr(model, "weights_source", "")
    # The published figure of a torchvision network belongs to its ImageNet weights only.
    paper_arch = arch if source == "imagenet" else ""
    model_label = (Path(e.decisions_csv or e.samples or "no model").name if isinstance(model, torch.nn.Identity)
                   else (f"{cfg.eval.model}, random weights" if random else
                         (f"{cfg.eval.model}, {source}" if arch else source or type(model).__name__)))

    def write(name: str, table: dict, details: dict, label: str = "") -> None:
        if is_main:
            # Stamped with what was run, so a smoke evaluation (tiny crops, a few images) cannot pass for a result.
            stamp = (f"settings: {label or model_label}; image size {e.image_size}, precision {kw['precision']}, "
                     f"images per rank {e.limit or 'all'}")
            paths = report.save_table(out, name + suffix, f"{name.replace('_', ' ')} ({label or model_label})",
                                      table["columns"], table["rows"], [*table["notes"], stamp], details)
            log.info("wrote %s", paths["txt"])

    if "shape-bias" in want and (e.cue_conflict or e.decisions_csv):
        from cgn_dist.classifier.imagenet.eval_shape_bias import (evaluate_shape_bias, shape_bias_from_decisions_csv,
                                                         shape_bias_table)

        res = (evaluate_shape_bias(model, e.cue_conflict, e.batch_size, image_size=e.image_size,
                                   num_workers=e.num_workers, **kw) if e.cue_conflict else {"per_output": {}})
        csv_res = shape_bias_from_decisions_csv(e.decisions_csv) if e.decisions_csv else None
        for h, r in res["per_output"].items():
            if r["shape_bias"] is not None:
                metrics[f"shape_bias/{h}"] = 100 * r["shape_bias"]
        if csv_res is not None and csv_res["shape_bias"] is not None:
            metrics["shape_bias/decisions_csv"] = 100 * csv_res["shape_bias"]
        write("shape_bias", shape_bias_table(res, csv_res, arch=paper_arch, random=random),
              {"result": {k: v for k, v in res.items() if k != "decisions"}, "decisions_csv": csv_res})
        if is_main and res.get("decisions"):
            (out / f"shape_bias_decisions{suffix}.csv").write_text(
                report.table_csv(["image", "output", "shape", "texture", "decision"], res["decisions"]))
    if "in9" in want and e.in9:
        from cgn_dist.classifier.imagenet.eval_in9 import evaluate_in9, in9_table

        res = evaluate_in9(model, e.in9, e.batch_size, num_workers=e.num_workers, **kw)
        for v, per in res["accuracy"].items():
            for h, a in per.items():
                if a["accuracy"] is not None:
                    metrics[f"in9/{v}/{h}"] = a["accuracy"]
        if res["bg_gap"] is not None:
            metrics["in9/bg_gap"] = res["bg_gap"]
        write("in9", in9_table(res, random=random), res)
    if "accuracy" in want and (e.val_shards or e.cf_val_shards):
        from cgn_dist.classifier.imagenet.eval_accuracy import accuracy_table, evaluate_topk

        real = (evaluate_topk(model, e.val_shards, "real", e.batch_size, image_size=e.image_size,
                              limit_per_rank=e.limit, num_workers=e.num_workers, **kw) if e.val_shards else None)
        cf = (evaluate_topk(model, e.cf_val_shards, "counterfactual", e.batch_size, image_size=e.image_size,
                            limit_per_rank=e.limit, num_workers=e.num_workers, **kw) if e.cf_val_shards else None)
        for name, res in (("val", real), ("cf_val", cf)):
            for h, r in (res or {}).get("per_output", {}).items():
                for k in ("top1", "top5"):
                    if r.get(k) is not None:
                        metrics[f"{name}/{h}/{k}"] = r[k]
        write("accuracy", accuracy_table(real, cf, arch=paper_arch, random=random),
              {"real": real, "counterfactual": cf})
    if "inception" in want and e.samples:
        from cgn_dist.classifier.imagenet.inception_score import InceptionProbs, build_inception, evaluate_samples, is_table

        try:
            net = InceptionProbs(build_inception(eval_weights(e.inception_weights), cfg.seed))
        except WeightsError as err:
            raise WeightsError(f"eval.inception_weights={e.inception_weights}: {str(err).rstrip('.')}; random "
                               "weights only on purpose: eval.inception_weights=random (no paper figure then)") from None
        res = evaluate_samples(net, e.samples, e.is_splits, e.is_samples, e.batch_size, device)
        if res["inception_score"] is not None:
            metrics["is/score"] = res["inception_score"]
        if res["mask_mean"] is not None:
            metrics["is/mask_mean"] = res["mask_mean"]
        rand_is = is_random(net.net)
        write("inception_score", is_table(res, random=rand_is), res,
              f"{Path(e.samples).name}, Inception v3 {'random weights' if rand_is else net.net.weights_source}")
    return metrics


def run_eval(cfg: Config, what: str) -> dict[str, Any]:
    from cgn_dist.distributed.env import destroy_process_group, init_process_group, read_env
    from cgn_dist.train.metrics import setup_logging

    if what not in WHAT:
        raise InputError(f"cgn-dist eval: unknown evaluation {what!r}; accepted: {', '.join(WHAT)}")
    e = cfg.eval
    needs = {"shape-bias": e.cue_conflict or e.decisions_csv, "in9": e.in9, "accuracy": e.val_shards or e.cf_val_shards,
             "inception": e.samples}
    if what == "all" and not any(needs.values()):
        raise InputError("cgn-dist eval all: no evaluation data set; give any of eval.cue_conflict, "
                         "eval.decisions_csv, eval.in9, eval.val_shards, eval.cf_val_shards, eval.samples")
    if what != "all" and not needs[what]:
        keys = {"shape-bias": "eval.cue_conflict or eval.decisions_csv", "in9": "eval.in9",
                "accuracy": "eval.val_shards or eval.cf_val_shards", "inception": "eval.samples"}[what]
        raise InputError(f"cgn-dist eval {what}: set {keys}")
    env = read_env("auto")
    owns = init_process_group(env)
    setup_logging(None, env.is_main)
    out, derived = choose_out(cfg, what)  # every rank: the same answer, before anything is written
    existed = out.exists()
    try:
        model = None if (what == "inception" or (what == "shape-bias" and not e.cue_conflict)) else \
            load_eval_model(cfg).to(env.device)
        metrics = evaluate_classifier(model if model is not None else torch.nn.Identity(), cfg, what, env.device,
                                      out, env.is_main)
        if env.is_main:
            out.mkdir(parents=True, exist_ok=True)
            tmp = out / (RESULT + ".tmp")  # metrics.json last and whole: its presence marks a complete result
            tmp.write_text(json.dumps(metrics, indent=1) + "\n")
            tmp.replace(out / RESULT)
    except BaseException:
        if env.is_main and derived and not existed and out.exists():  # no half result under a name of its own
            shutil.rmtree(out, ignore_errors=True)
        raise
    finally:
        if owns:
            destroy_process_group()
    return {"out": str(out), "metrics": metrics}


__all__ = ["run_eval", "evaluate_classifier", "load_eval_model", "WHAT"]
