"""CGN-MNIST training: LSGAN + binary mask + Gram-only VGG16 style losses.

Every random draw of an update (batch order, colour jitter, generated labels,
noise, shuffler crops, dropout) comes from the global RNG re-seeded from
(seed, rank, update), so a resumed run equals an uninterrupted one bit for bit.
"""
from __future__ import annotations

import math

import torch

from cgn_dist import interrupts
from cgn_dist.config import Config
from cgn_dist.data.mnist import build_mnist_dataset
from cgn_dist.distributed.engine import build_engine
from cgn_dist.distributed.env import DistEnv, read_env
from cgn_dist.losses import VGG16Features
from cgn_dist.progress import progress_bar
from cgn_dist.models.cgn_mnist import CGNMnist, init_cgn_weights
from cgn_dist.models.discriminator import DiscConv, DiscLin
from cgn_dist.train.checkpoint import (find_resume_checkpoint, latest_checkpoint, load_checkpoint,
                                      save_checkpoint)
from cgn_dist.train.ema import EMA_NAME, EmaWeights
from cgn_dist.train.loop_context import loop_context
from cgn_dist.train.common import NullReporter, Reporter, step_seed, stop_requested
from cgn_dist.train.run_dir import (build_summary, checkpoint_step, complete_line, progress_line, read_summary,
                                    start_line, write_summary)
from cgn_dist.train.mnist_sheets import counterfactual_sheet
from cgn_dist.train.mnist_step import MnistUpdate, make_batches, to_fast_layout
from cgn_dist.train.metrics import Throughput, engine_scalars, make_sheet


# --------------------------------------------------------------------------- models


BORDER_CLAMP = 0.96  # |border mean| cap for bg_init_from_data: atanh(0.96) = 1.95, tanh not saturated


def border_bias(dataset, n: int = 2048, width: int = 2) -> torch.Tensor:
    """Per channel: atanh of the mean colour of the images' outer `width` pixels (the first n items, in
    [-1, 1], clamped to +-BORDER_CLAMP). As f_bg's last BatchNorm bias it starts the background mechanism at
    the data's background colour, which settles mask and background the right way round."""
    xs = torch.stack([dataset[i][0] for i in range(min(n, len(dataset)))])
    ring = torch.ones(xs.shape[-2:], dtype=torch.bool)
    ring[width:-width, width:-width] = False
    mean = xs[..., ring].mean(dim=(0, 2))
    return torch.atanh(mean.clamp(-BORDER_CLAMP, BORDER_CLAMP))


def build_generator(cfg: Config, bg_bias: torch.Tensor | None = None) -> CGNMnist:
    """The generator as cfg says; `bg_bias` (mnist.bg_init_from_data: border_bias of the training set)
    overrides mnist.bg_init_bias."""
    m = cfg.mnist
    torch.manual_seed(cfg.seed)
    g = CGNMnist(n_classes=m.n_classes, latent_dim=m.latent_dim, ngf=m.ngf, img_size=m.img_size)
    init_cgn_weights(g, m.init_type, m.init_gain)
    if bg_bias is not None or m.bg_init_bias:
        with torch.no_grad():
            g.f_bg.bn3.bias.copy_(bg_bias if bg_bias is not None else torch.full((3,), m.bg_init_bias))
    if m.init_from:
        from cgn_dist.models.original_mnist import load_mnist_weights

        from cgn_dist import weights

        load_mnist_weights(weights.resolve(m.init_from, "mnist.init_from"), g)
    return g


def build_discriminator(cfg: Config) -> torch.nn.Module:
    m = cfg.mnist
    torch.manual_seed(cfg.seed + 1)
    if m.disc == "linear":
        return DiscLin(n_classes=m.n_classes, ndf=m.ndf)
    return DiscConv(n_classes=m.n_classes, ndf=m.ndf)


def build_optimizer(module: torch.nn.Module, cfg: Config, device) -> torch.optim.Adam:
    """The authors' Adam; with mnist.fast_update its fused kernel (the same update rule in one kernel per
    step instead of ~10 per tensor: 1.8 ms instead of 13 ms for G + D on this CPU)."""
    m = cfg.mnist
    fused = m.fast_update and torch.device(device).type in ("cpu", "cuda")
    return torch.optim.Adam(module.parameters(), lr=m.lr, betas=tuple(m.betas), **({"fused": True} if fused else {}))


# --------------------------------------------------------------------------- sheets


SHEET_COLUMNS = ("mask", "foreground", "background", "composite")


@torch.no_grad()
def class_sheet(gen: CGNMnist, n_classes: int, device, seed: int = 1234) -> torch.Tensor:
    """One row per class: mask | foreground | background | composite, fixed noise."""
    was_training = gen.training
    gen.eval()
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n_classes, device=device)
    u = gen.sample_noise(n_classes, generator=g).to(device)
    mask, fg, bg, x = gen(y, u=u, shuffle=False)
    gen.train(was_training)
    return make_sheet([mask, fg, bg, x], unit=[True, False, False, False], upsample=2, titles=list(SHEET_COLUMNS),
                      row_labels=[str(c) for c in range(n_classes)])


# --------------------------------------------------------------------------- loop

def _cache_target_grams(update: MnistUpdate, stream, m, device, logger):
    """The fast update's target Grams of fixed real images, computed once (cgn_dist.train.target_grams)."""
    if not m.fast_update or m.target_gram_cache_gb <= 0:
        return None
    fixed = getattr(stream, "fixed_images", None)
    if fixed is None:
        logger.info("target Grams: computed per batch (this data set draws its real images' colours / crops per batch)")
        return None
    grams = update.cache_target_grams(fixed.to(device), m.target_gram_cache_gb)
    if grams is not None:
        logger.info(grams.describe(m.target_gram_cache_gb))
    return grams


@interrupts.deferred()  # Ctrl-C / SIGTERM: the update in progress finishes and is saved
def train_mnist(cfg: Config, env: DistEnv | None = None, reporter: Reporter | None = None) -> dict:
    env = env or read_env(cfg.train.device)
    reporter = reporter or NullReporter()
    with loop_context(cfg, env) as (run_dir, logger):
        return _train(cfg, env, reporter, run_dir, logger)


def _train(cfg: Config, env: DistEnv, reporter: Reporter, run_dir, logger) -> dict:
    t, m = cfg.train, cfg.mnist
    dataset = build_mnist_dataset(cfg.data.dataset, "train", source=cfg.data.source, root=cfg.data.root,
                                  seed=cfg.data.seed, textures_dir=cfg.data.textures or None,
                                  download=cfg.data.download)
    stream = make_batches(dataset, t.micro_batch_size, cfg.seed, env.rank, env.world_size, m.fast_update)
    total = t.max_steps or math.ceil(t.epochs * stream.batches_per_epoch / t.grad_accum)
    ckpt = find_resume_checkpoint(run_dir, reporter) if t.resume else None
    if ckpt is not None and checkpoint_step(ckpt) >= total:
        logger.info(complete_line(run_dir, checkpoint_step(ckpt)))
        return read_summary(run_dir) or build_summary(run_dir, total, checkpoint_step(ckpt), ckpt, {})

    bg_bias = border_bias(dataset) if m.bg_init_from_data and ckpt is None else None  # a resume loads f_bg
    if bg_bias is not None:
        logger.info(f"f_bg starts at the data's border colour: BatchNorm bias {[round(float(b), 3) for b in bg_bias]}")
    gen, disc = build_generator(cfg, bg_bias), build_discriminator(cfg)
    if m.fast_update:
        to_fast_layout(gen, disc)
    vgg = VGG16Features(m.vgg_weights).to(env.device)
    opt_g, opt_d = build_optimizer(gen, cfg, env.device), build_optimizer(disc, cfg, env.device)
    eng_g = build_engine(gen, opt_g, t, env)
    eng_d = build_engine(disc, opt_d, t, env)
    engines = {"generator": eng_g, "discriminator": eng_d}
    update = MnistUpdate(m, eng_g, eng_d, disc, vgg, fast=m.fast_update,
                         precision=m.precision if m.fast_update else "bf16")

    grams = _cache_target_grams(update, stream, m, env.device, logger)

    start = 0
    if ckpt is not None:
        resumed = load_checkpoint(ckpt, engines, rank=env.rank)
        start = resumed["step"]
        logger.info(f"resumed from {ckpt} at update {start}")
    ema = EmaWeights(gen, m.ema_decay, env.is_main) if m.ema_decay else None
    if ema is not None and ckpt is not None:
        if EMA_NAME in resumed["meta"].get("engines", []):
            ema.load(ckpt, EMA_NAME)
        else:  # only reachable with train.allow_config_change: the average starts at the resumed weights
            logger.info(f"{ckpt} has no weight average; it starts from the weights of update {start}")
    saved = engines | ({EMA_NAME: ema} if ema is not None else {})
    sampler_gen = ema.module if ema is not None else gen  # what sheets show and counterfactuals are drawn from
    logger.info(start_line(cfg, env.world_size, total, start, env.device))

    bar = progress_bar(range(start, total), initial=start, total=total, enabled=t.progress and env.is_main,
                       desc=f"cgn-mnist {cfg.data.dataset}", unit="it", lines=False)  # logs progress_line
    logs: dict[str, float] = {}
    meter = Throughput(t.micro_batch_size * t.grad_accum * env.world_size)
    for step in bar:
        for micro in range(t.grad_accum):
            torch.manual_seed(step_seed(cfg.seed, env.rank, step, micro))
            k = step * t.grad_accum + micro
            x_real, y_real = stream.batch(k)
            x_real, y_real = x_real.to(env.device), y_real.to(env.device)
            b = x_real.shape[0]

            # generator labels independent of the real batch
            y_gen = torch.randint(0, m.n_classes, (b,), device=env.device)
            out = update(x_real, y_real, y_gen, real_index=stream.indices(k)[1] if grams is not None else None)
        if ema is not None:
            ema.update(gen)

        logs = {"loss/g_adv": out["l_adv"].item(), "loss/g_binary": out["l_bin"].item(),
                "loss/g_perceptual": out["l_perc"].item(), "loss/g_total": out["loss_g"].item(),
                "loss/d": out["loss_d"].item(), "mask/mean": out["mask"].mean().item(),
                "perf/samples_per_s": meter.update()} | engine_scalars(engines)
        if "l_area" in out:
            logs["loss/g_mask_area"] = out["l_area"].item()
        done = step + 1
        if done % t.log_every == 0 or done == total:
            logger.scalars(logs, done)
            logger.info(progress_line(done, total, logs))
            bar.set_postfix(g=f"{logs['loss/g_total']:.3f}", d=f"{logs['loss/d']:.3f}",
                            samples_s=f"{logs['perf/samples_per_s']:.1f}")
        if done % t.sample_every == 0 or done == total:
            logger.image("sheet/classes", class_sheet(sampler_gen, m.n_classes, env.device), done)
            logger.image("sheet/counterfactuals", counterfactual_sheet(sampler_gen, m.n_classes, env.device), done)
        stop = stop_requested(env.device, reporter) if done < total else None
        if done % t.checkpoint_every == 0 or done == total or stop:
            path = save_checkpoint(run_dir, done, saved, cfg=cfg, keep_last=t.keep_last, rank=env.rank)
            reporter.report(done, logs, path, env.is_main)
        if stop:
            bar.close()
            raise interrupts.Interrupted(stop, "train", done, total, path)
    summary = build_summary(run_dir, total, total, latest_checkpoint(run_dir), logs)
    if env.is_main:
        write_summary(run_dir, summary)
        logger.info(f"finished {run_dir}: {progress_line(total, total, logs)}; summary.json written")
    logger.flush()
    return summary
