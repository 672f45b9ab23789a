"""The ImageNet invariant classifier on real + counterfactual streams.

Per step: a real batch (b images) and a counterfactual batch (int(cf_ratio * b)) from
cgn_dist.data.mix; loss = CE(avg, y) on the real images + CE(shape, y_shape) + CE(texture, y_texture)
+ CE(bg, y_bg) on the counterfactuals; one SGD update (momentum 0.9, weight decay 1e-4, lr 0.001 x 0.1
every 15 epochs, 45 epochs). The two batches go through ONE forward, concatenated: BatchNorm is frozen
(eval mode, as the authors'), so this equals their two forwards and two backward calls before one step,
and DDP sees a single forward per backward.

Resume: checkpoints hold the engine (model + optimizer), RNG and the update count. The streams are
deterministic given (seed, epoch, world size, loader workers, batch size), so a run resumed at update k of
epoch e restarts epoch e's streams with ``set_epoch(e, start_step=k x grad_accum)``: the real and the
counterfactual stream yield exactly the batches an uninterrupted run would have from there on (the skipped
samples are read but not decoded; crops and flips come from (seed, epoch, shard, key)), so training continues
at the next sample and the weights equal an uninterrupted run's bit for bit. With another world size,
invariant.num_workers or batch size the epoch splits differently. The learning rate is a function of the
epoch, so no scheduler state is needed.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from cgn_dist import interrupts
from cgn_dist.config import Config
from cgn_dist.data.transforms import normalize_images
from cgn_dist.distributed.engine import build_engine, resolve_train_precision
from cgn_dist.distributed.env import DistEnv, read_env
from cgn_dist.errors import InputError, InputNotFound
from cgn_dist.models.invariant import HEADS, build_invariant_classifier
from cgn_dist.precision import resolve_layout
from cgn_dist.progress import progress_bar
from cgn_dist.train.checkpoint import find_resume_checkpoint, latest_checkpoint, load_checkpoint, save_checkpoint
from cgn_dist.train.common import NullReporter, Reporter, stop_requested
from cgn_dist.train.loop_context import loop_context
from cgn_dist.train.metrics import DeviceSums, Throughput
from cgn_dist.train.run_dir import build_summary, write_summary

log = logging.getLogger(__name__)
CF_KEYS = {"shape": "shape_cls", "texture": "texture_cls", "bg": "bg_cls"}


def lr_at(cfg: Config, epoch: int) -> float:
    ic = cfg.invariant
    return ic.lr * ic.lr_gamma ** (epoch // ic.lr_step_epochs)


def build_streams(cfg: Config, env: DistEnv):
    from cgn_dist.data.mix import make_mixed_loader

    ic, t = cfg.invariant, cfg.train
    if not ic.real_shards:
        raise InputError("invariant.real_shards is empty: point it at the real ImageNet train shards "
                         "(cgn-dist make-shards output, a folder with index.json)")
    if not ic.cf_shards or ic.cf_ratio == 0:
        log.warning("no counterfactual stream (invariant.cf_shards empty or invariant.cf_ratio=0): training on "
                    "real images only, CE(avg, y)")
    for key, value in (("invariant.real_shards", ic.real_shards), ("invariant.cf_shards", ic.cf_shards)):
        if value and not (Path(value).is_dir() and (Path(value) / "index.json").is_file()) and \
                not (Path(value).is_file() and value.endswith(".json")):
            raise InputNotFound(f"{key}={value}: not a shard folder with index.json (cgn-dist make-shards / "
                                "cgn-dist generate write one) nor an index.json file")
    return make_mixed_loader(ic.real_shards, ic.cf_shards or None, t.micro_batch_size, ic.cf_ratio,
                             rank=env.rank, world_size=env.world_size, num_workers=ic.num_workers, seed=cfg.seed,
                             train=True, image_size=ic.image_size, resize=round(ic.image_size * 256 / 224),
                             decoder=ic.decoder, normalize=False, pin_memory=env.device.type == "cuda")


class _CastInput(torch.nn.Module):
    """Evaluations feed fp32 images; a DeepSpeed bf16 module wants its own dtype."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module
        self.weights_source = getattr(module, "weights_source", "training")

    def forward(self, x):
        dtype = next(self.module.parameters()).dtype
        out = self.module(x.to(dtype))
        return {k: v.float() for k, v in out.items()}


def classifier_losses(out: dict[str, torch.Tensor], y_real: torch.Tensor, cf: dict | None, n_real: int):
    """Loss terms and train top-1 per output, for a forward over cat(real, counterfactual)."""
    terms, top1 = {}, {}
    real_avg = out["avg"][:n_real]
    terms["real"] = F.cross_entropy(real_avg.float(), y_real)
    # top-1 stays a device tensor: the loop reads every scalar back in one sync when it logs
    top1["real/avg"] = (real_avg.argmax(1) == y_real).float().mean()
    if cf is not None:
        for h in HEADS:
            logits, y = out[h][n_real:].float(), cf[CF_KEYS[h]]
            terms[f"cf_{h}"] = F.cross_entropy(logits, y)
            top1[f"cf/{h}"] = (logits.argmax(1) == y).float().mean()
    terms["total"] = sum(terms.values())
    return terms, top1


@interrupts.deferred()  # Ctrl-C / SIGTERM: the update in progress finishes and is saved
def train_invariant(cfg: Config, env: DistEnv | None = None, reporter: Reporter | None = None) -> dict:
    env = env or read_env(cfg.train.device)
    reporter = reporter or NullReporter()
    streams = build_streams(cfg, env)  # bad data paths fail here, before a run directory exists
    with loop_context(cfg, env) as (run_dir, logger):
        return _train(cfg, env, reporter, streams, run_dir, logger)


def _train(cfg: Config, env: DistEnv, reporter: Reporter, streams, run_dir, logger) -> dict:
    t, ic = cfg.train, cfg.invariant
    model = build_invariant_classifier(ic.backbone, ic.weights, ic.n_classes, cfg.seed, ic.init_from, ic.freeze_bn)
    resolve_train_precision(t, env.device, autocast=True)
    # channels-last batches only: every convolution then runs NHWC (its output follows the input), while
    # the weights stay NCHW for any engine: DeepSpeed's start-up broadcast views each parameter as bytes,
    # which a channels-last weight refuses ("stride(-1) must be 1"), and ZeRO flattens them anyway. One layout
    # for both engines keeps their runs equal. Batches alone measured 1.10x / 1.13x faster than NCHW (fp32 /
    # bf16), weights converted too 1.09x / 1.14x (a ResNet-50 update, an EPYC Zen 4): the same.
    # invariant.layout, resolved with the run's precisions when its folder was prepared (config.yaml has it)
    channels_last = resolve_layout(ic.layout, env.device, t.precision) == "channels_last"
    opt = torch.optim.SGD(model.parameters(), lr=ic.lr, momentum=ic.momentum, weight_decay=ic.weight_decay)
    # bf16 as autocast under DeepSpeed too: BatchNorm's weights and running statistics stay fp32
    engine = build_engine(model, opt, t, env, bf16_autocast=True)
    engines = {"classifier": engine}
    updates_per_epoch = len(streams) // t.grad_accum
    if ic.steps_per_epoch:
        updates_per_epoch = min(updates_per_epoch, ic.steps_per_epoch)
    if updates_per_epoch < 1:
        raise InputError(f"an epoch gives {len(streams)} micro batches per rank, fewer than train.grad_accum="
                         f"{t.grad_accum}: lower train.micro_batch_size or add real shards")
    total = t.max_steps or ic.epochs * updates_per_epoch

    start = 0
    ckpt = find_resume_checkpoint(run_dir, reporter) if t.resume else None
    if ckpt is not None:
        start = load_checkpoint(ckpt, engines, rank=env.rank)["step"]
        logger.info(f"resumed from {ckpt} at update {start}")

    def evaluate(tag: str, step: int) -> None:
        if not ic.eval_every_epochs:
            return
        from cgn_dist.classifier.imagenet.eval_command import evaluate_classifier

        metrics = evaluate_classifier(_CastInput(engine.module), cfg, "all", env.device, run_dir / "eval",
                                      env.is_main, tag=tag)
        logger.scalars({f"eval/{k}": v for k, v in metrics.items()}, step)
        if metrics:
            logger.info(f"evaluation {tag}: " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(metrics.items())))

    if start == 0:
        evaluate("epoch000", 0)
    global_images = (t.micro_batch_size + int(ic.cf_ratio * t.micro_batch_size)) * t.grad_accum * env.world_size
    meter = Throughput(global_images)
    bar = progress_bar(total=total, initial=start, unit="update", enabled=t.progress and env.is_main,
                       desc="invariant classifier")
    logs: dict[str, float] = {}
    step = start
    first_epoch = start // updates_per_epoch
    for epoch in range(first_epoch, math.ceil(total / updates_per_epoch)):
        lr = lr_at(cfg, epoch)
        for group in engine.optimizer.param_groups:
            group["lr"] = lr
        # resumed mid-epoch: both streams continue after the micro batches already trained on
        streams.set_epoch(epoch, start_step=(step - epoch * updates_per_epoch) * t.grad_accum)
        last = min(total, (epoch + 1) * updates_per_epoch)
        sums = DeviceSums(t.grad_accum)
        n_real = n_cf = 0
        for real, cf in streams:
            if step >= last:
                break
            x = real["image"] if cf is None else torch.cat([real["image"], cf["image"]])
            # uint8 from the workers (a quarter of the bytes through shared memory); mean/std here, on the device
            x = normalize_images(x.to(env.device, non_blocking=True))
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            y = real["label"].to(env.device)
            cf_dev = None if cf is None else {k2: cf[k2].to(env.device) for k2 in CF_KEYS.values()}
            model.train()
            with engine.autocast():
                out = engine(x)
            terms, top1 = classifier_losses(out, y, cf_dev, len(y))
            engine.backward(terms["total"])
            boundary = engine.is_boundary()
            engine.step()
            n_real += len(y)
            n_cf += 0 if cf is None else len(cf["image"])
            for name, v in list(terms.items()) + list(top1.items()):
                sums.add(name, v)
            if not boundary:
                continue
            step += 1
            bar.update(1)
            rate = meter.update()
            # One sync, only where a log line, a checkpoint (the last of an epoch included) uses the scalars.
            if step % t.log_every == 0 or step % t.checkpoint_every == 0 or step in (last, total):
                values = sums.read()
                logs = {f"loss/{k2}": v for k2, v in values.items() if k2 in terms}
                logs |= {f"train_top1/{k2}": 100 * v for k2, v in values.items() if k2 not in terms}
                logs |= {"mix/cf_per_real": n_cf / max(1, n_real), "mix/cf_fraction": n_cf / max(1, n_real + n_cf),
                         "perf/images_per_s": rate, "lr": lr, "epoch": epoch}
            sums = DeviceSums(t.grad_accum)
            if step % t.log_every == 0 or step == total:
                logger.scalars(logs, step)
                bar.set_postfix(loss=f"{logs['loss/total']:.3f}", img_s=f"{logs['perf/images_per_s']:.1f}")
            stop = stop_requested(env.device, reporter) if step < total else None
            if step % t.checkpoint_every == 0 or step == last or stop:
                path = save_checkpoint(run_dir, step, engines, cfg=cfg, keep_last=t.keep_last, rank=env.rank,
                                       extra_meta={"epoch": epoch, "updates_per_epoch": updates_per_epoch})
                reporter.report(step, logs, path, env.is_main)
            if stop:
                bar.close()
                raise interrupts.Interrupted(stop, "train", step, total, path)
        if step % updates_per_epoch == 0 and (epoch + 1) % max(1, ic.eval_every_epochs) == 0:
            evaluate(f"epoch{epoch + 1:03d}", step)
    bar.close()
    # the summary every loop returns (and writes as summary.json), plus this loop's epoch length
    summary = build_summary(run_dir, total, step, latest_checkpoint(run_dir), logs) | {
        "updates_per_epoch": updates_per_epoch}
    if env.is_main:
        write_summary(run_dir, summary)
    logger.flush()
    return summary


__all__ = ["train_invariant", "classifier_losses", "lr_at", "build_streams"]
