"""CGN-ImageNet training: three BigGAN mechanisms as ONE engine.

The frozen teacher, U²-Net and VGG16 stay outside the engine and out of the
checkpoints. Each micro batch draws one class (shared by the three mechanisms
and the batch, as in the authors' code) and per-sample noise from a generator
seeded by (seed, update, j), where j = micro * world + rank is the micro batch's
place in the global batch. So one process with accumulation 2 and two processes
with accumulation 1 see exactly the same samples.
"""
from __future__ import annotations

import torch

from cgn_dist import interrupts
from cgn_dist.config import Config
from cgn_dist.distributed.engine import build_engine
from cgn_dist.distributed.env import DistEnv, read_env
from cgn_dist.errors import InputError
from cgn_dist.losses import VGG16Features
from cgn_dist.models.biggan import truncated_noise
from cgn_dist.progress import progress_bar
from cgn_dist.models.cgn_imagenet import CGNImageNet, build_cgn_imagenet
from cgn_dist.train.loop_context import loop_context
from cgn_dist.train.checkpoint import (find_resume_checkpoint, latest_checkpoint, load_checkpoint,
                                      save_checkpoint)
from cgn_dist.train.common import NullReporter, Reporter, step_seed, stop_requested
from cgn_dist.train.imagenet_step import ImagenetLossWeights, build_optimizer, imagenet_losses, sample_inputs
from cgn_dist.train.run_dir import (build_summary, checkpoint_step, complete_line, progress_line, read_summary,
                                    start_line, write_summary)
from cgn_dist.train.metrics import DeviceSums, Throughput, engine_scalars, make_sheet


def build_cgn(cfg: Config) -> CGNImageNet:
    ic = cfg.imagenet
    cgn = build_cgn_imagenet(ic.biggan, ic.u2net, cache_dir=ic.cache_dir or None, seed=cfg.seed,
                             u2net_align_corners=ic.u2net_align_corners)
    if ic.init_from:
        from cgn_dist.models.original_imagenet import load_original_cgn_checkpoint

        from cgn_dist import weights

        load_original_cgn_checkpoint(weights.resolve(ic.init_from, "imagenet.init_from"), cgn)
    return cgn


SHEET_COLUMNS = ("mask", "premask", "foreground", "background", "composite", "teacher")


@torch.no_grad()
def class_sheet(cgn: CGNImageNet, classes: list[int], truncation: float, device, seed: int = 0,
                mechanisms=None) -> torch.Tensor:
    """Rows = classes, one fixed noise vector: mask | premask | fg | bg | composite | teacher."""
    from cgn_dist.models.biggan import class_vector

    classes = [c % cgn.n_classes for c in classes]
    u = truncated_noise(1, cgn.z_dim, truncation, seed=[seed]).expand(len(classes), -1).to(device)
    y = class_vector(classes, cgn.n_classes).to(device)
    out = cgn(u, y, truncation, mechanisms=mechanisms)
    from cgn_dist.data.imagenet_classes import class_name

    return make_sheet([out["mask"], out["premask"], out["foreground"], out["background"], out["composite"],
                       out["x_gt"]], unit=[True, False, False, False, False, False], titles=list(SHEET_COLUMNS),
                      row_labels=[f"{c} {class_name(c)}" for c in classes])


@interrupts.deferred()  # Ctrl-C / SIGTERM: the update in progress finishes and is saved
def train_imagenet(cfg: Config, env: DistEnv | None = None, reporter: Reporter | None = None) -> dict:
    env = env or read_env(cfg.train.device)
    reporter = reporter or NullReporter()
    if cfg.train.max_steps <= 0:
        raise InputError("train.max_steps must be > 0 for ImageNet CGN (the number of optimizer updates)")
    with loop_context(cfg, env) as (run_dir, logger):
        return _train(cfg, env, reporter, run_dir, logger)


def _train(cfg: Config, env: DistEnv, reporter: Reporter, run_dir, logger) -> dict:
    t, ic = cfg.train, cfg.imagenet
    ckpt = find_resume_checkpoint(run_dir, reporter) if t.resume else None
    if ckpt is not None and checkpoint_step(ckpt) >= t.max_steps:
        logger.info(complete_line(run_dir, checkpoint_step(ckpt)))
        return read_summary(run_dir) or build_summary(run_dir, t.max_steps, checkpoint_step(ckpt), ckpt, {})

    cgn = build_cgn(cfg).to(env.device)
    vgg = VGG16Features(ic.vgg_weights).to(env.device)
    weights = ImagenetLossWeights.from_config(ic)
    opt = build_optimizer(cgn.mechanisms, ic.lr_shape, ic.lr_text, ic.lr_bg, tuple(ic.betas))
    engine = build_engine(cgn.mechanisms, opt, t, env)
    engines = {"mechanisms": engine}

    start = 0
    if ckpt is not None:
        start = load_checkpoint(ckpt, engines, rank=env.rank)["step"]
        logger.info(f"resumed from {ckpt} at update {start}")
    logger.info(start_line(cfg, env.world_size, t.max_steps, start, env.device))

    global_batch = t.micro_batch_size * t.grad_accum * env.world_size
    bar = progress_bar(range(start, t.max_steps), initial=start, total=t.max_steps, unit="update",
                       enabled=t.progress and env.is_main, desc="cgn-imagenet", lines=False)  # logs progress_line
    logs: dict[str, float] = {}
    meter = Throughput(global_batch)
    for step in bar:
        cgn.train()
        if not ic.spectral_norm_updates:
            # BigGAN has no dropout and never uses batch statistics: eval mode only stops the
            # per-forward power iteration, whose buffers would otherwise drift apart per worker.
            cgn.mechanisms.eval()
        sums = DeviceSums(t.grad_accum)  # on the device: no host sync per micro-step
        for micro in range(t.grad_accum):
            g = torch.Generator().manual_seed(step_seed(cfg.seed, 0, step, micro * env.world_size + env.rank))
            u, y, _ = sample_inputs(t.micro_batch_size, cgn.n_classes, cgn.z_dim, ic.truncation, g)
            with engine.autocast():
                out = cgn(u.to(env.device), y.to(env.device), ic.truncation, mechanisms=engine.forward_module)
                losses = imagenet_losses(out, vgg, weights, generator=g)
            engine.backward(losses["total"])
            engine.step()
            for k, v in losses.items():
                sums.add(k, v)
            sums.add("mask_mean", out["mask"].detach().mean())
        done = step + 1
        rate = meter.update()
        # The scalars are read back (one sync) only where a log line, a checkpoint or the summary uses them.
        if done % t.log_every == 0 or done % t.checkpoint_every == 0 or done == t.max_steps:
            values = sums.read()
            logs = {f"loss/{k}": v for k, v in values.items() if k != "mask_mean"}
            logs |= {"mask/mean": values["mask_mean"], "perf/samples_per_s": rate} | engine_scalars(engines)
        if done % t.log_every == 0 or done == t.max_steps:
            logger.scalars(logs, done)
            logger.info(progress_line(done, t.max_steps, logs))
            bar.set_postfix(loss=f"{logs['loss/total']:.2f}", samples_s=f"{logs['perf/samples_per_s']:.2f}")
        if done % t.sample_every == 0 or done == t.max_steps:
            cgn.eval()
            logger.image("sheet/classes", class_sheet(cgn, ic.sheet_classes, ic.truncation, env.device, cfg.seed,
                                                         engine.forward_module), done)
        stop = stop_requested(env.device, reporter) if done < t.max_steps else None
        if done % t.checkpoint_every == 0 or done == t.max_steps or stop:
            path = save_checkpoint(run_dir, done, engines, cfg=cfg, keep_last=t.keep_last, rank=env.rank)
            reporter.report(done, logs, path, env.is_main)
        if stop:
            bar.close()
            raise interrupts.Interrupted(stop, "train", done, t.max_steps, path)
    summary = build_summary(run_dir, t.max_steps, t.max_steps, latest_checkpoint(run_dir), logs)
    if env.is_main:
        write_summary(run_dir, summary)
        logger.info(f"finished {run_dir}: {progress_line(t.max_steps, t.max_steps, logs)}; summary.json written")
    logger.flush()
    return summary
