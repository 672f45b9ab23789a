"""Cached target Grams (cgn_dist.train.target_grams) give the style loss the plain path computes.

The reference is cgn_dist.losses.perceptual_loss: the NCHW fp32 VGG16 run on the real batch at every call,
its Grams divided after the product and F.l1_loss: a separate formulation from the cached, channels-last,
scale-folded one. Sizes are hand computed from the Gram shapes (C x C floats per weighted layer).
"""
from pathlib import Path

import pytest
import torch

from cgn_dist.config import load_config
from cgn_dist.losses import VGG16Features, perceptual_loss, style_loss_to_grams
from cgn_dist.train.mnist_step import fast_vgg
from cgn_dist.train.target_grams import TargetGrams

COLORED = [0.05, 0.1, 0.01, 0.0]
WILDLIFE = [0.01, 0.05, 0.0, 0.01]
TINY = Path(__file__).resolve().parents[1] / "configs" / "debug" / "mnist_tiny.yaml"


@pytest.fixture(scope="module")
def vgg():
    return VGG16Features("random")


def _fp32():
    return torch.autocast("cpu", enabled=False)


def _cache(vgg, images, weights, n_cached):
    per = TargetGrams(fast_vgg(vgg, torch.float32), images[:1], weights, _fp32, 1 << 40).bytes_per_image
    return TargetGrams(fast_vgg(vgg, torch.float32), images, weights, _fp32, per * n_cached + per // 2)


def test_bytes_per_image_are_the_weighted_grams():
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    net = VGG16Features("random")
    assert TargetGrams(net, images, COLORED, _fp32, 1 << 30).bytes_per_image == (64 ** 2 + 128 ** 2 + 256 ** 2) * 4
    assert TargetGrams(net, images, WILDLIFE, _fp32, 1 << 30).bytes_per_image == (64 ** 2 + 128 ** 2 + 512 ** 2) * 4
    assert TargetGrams(net, images, COLORED, _fp32, (64 ** 2 + 128 ** 2 + 256 ** 2) * 4 * 2).capacity == 2


@pytest.mark.parametrize("weights", [COLORED, WILDLIFE])
@pytest.mark.parametrize("n_cached", [12, 5, 0])
def test_cached_style_loss_is_the_plain_one(vgg, weights, n_cached):
    g = torch.Generator().manual_seed(1)
    # noise images of different contrast and tint: their Grams differ clearly, so a wrong row shows
    contrast = torch.linspace(0.2, 1.0, 12)[:, None, None, None]
    tint = torch.rand(12, 3, 1, 1, generator=g) - 0.5
    images = ((torch.rand(12, 3, 32, 32, generator=g) * 2 - 1) * contrast + tint).clamp(-1, 1)
    cache = _cache(vgg, images, weights, n_cached)
    assert cache.capacity == n_cached
    index = torch.tensor([0, 7, 3, 11, 4, 5])  # rows below and above the cached ones
    x = (torch.rand(6, 3, 32, 32, generator=g) * 2 - 1).requires_grad_(True)
    ref = perceptual_loss(vgg, x, images[index], weights)
    (g_ref,) = torch.autograd.grad(ref, x)
    n = 4 if weights[3] else 3
    feats = cache.vgg(x.contiguous(memory_format=torch.channels_last), num_outputs=n)
    got = style_loss_to_grams(feats, cache.lookup(index, images[index]), weights[:n])
    (g_got,) = torch.autograd.grad(got, x)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(g_got, g_ref, rtol=1e-4, atol=1e-9)


def test_a_fast_run_with_cached_grams_trains_as_one_without(tmp_path, caplog):
    from cgn_dist.train.mnist import train_mnist

    def run(name, gb):
        cfg = load_config(TINY, [f"out_dir={tmp_path}", f"name={name}", "mnist.fast_update=true",
                                 "mnist.precision=fp32", f"mnist.target_gram_cache_gb={gb}"])
        return Path(train_mnist(cfg)["run_dir"])

    with caplog.at_level("INFO", logger="cgn_dist"):
        cached = run("cached", 0.3)  # ~870 of the 4,167 digits: the 3 updates meet cached and computed rows
    assert "target Grams cached for 871 of 4,167 real images" in caplog.text
    computed = run("computed", 0)
    for part in ("generator", "discriminator"):
        a = torch.load(cached / "checkpoints" / "step_0000003" / f"{part}.pt", weights_only=True)["module"]
        b = torch.load(computed / "checkpoints" / "step_0000003" / f"{part}.pt", weights_only=True)["module"]
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
