"""BigGAN wrapper: layouts, random / local loading paths, noise and class inputs."""
import json
import math

import pytest
import torch

from cgn_dist.models.biggan import (
    BigGAN,
    biggan_deep_256_config,
    build_biggan,
    check_truncation,
    class_vector,
    clone_biggan,
    count_parameters,
    interpolate_class_vectors,
    load_biggan_dir,
    save_biggan_dir,
    soft_class_vector,
    tiny_biggan_config,
    truncated_noise,
)


@pytest.fixture(scope="module")
def deep256():
    # Plain construction (no forward, no power iterations): ~1.5 s, 230 MB.
    return BigGAN(biggan_deep_256_config())


def test_256_layout_matches_released_mechanism_keys(deep256, shared_ref):
    ref = json.loads((shared_ref / "original_cgn_imagenet_keys.json").read_text())
    want = {k[len("f_shape."):]: v for k, v in ref.items() if k.startswith("f_shape.")}
    got = {k: list(v.shape) for k, v in deep256.state_dict().items()}
    assert got == want  # 602 keys, every shape


def _count_from_layer_list() -> int:
    """BigGAN-deep-256's parameters counted by hand from its layer list (spec §2.1): (upsample, in x128,
    out x128) per GenBlock, self-attention before block 8, bottleneck blocks with reduction 4."""
    layers = [(False, 16, 16), (True, 16, 16), (False, 16, 16), (True, 16, 8), (False, 8, 8), (True, 8, 8),
              (False, 8, 8), (True, 8, 4), (False, 4, 4), (True, 4, 2), (False, 2, 2), (True, 2, 1)]
    ch, z_dim, n_classes = 128, 128, 1000
    cond = 2 * z_dim  # noise + class embedding
    n = n_classes * z_dim  # embeddings: Linear(1000 -> 128), no bias
    n += cond * 4 * 4 * 16 * ch + 4 * 4 * 16 * ch  # gen_z with bias
    for i, (_, a, b) in enumerate(layers):
        cin, cout = ch * a, ch * b
        mid = cin // 4
        if i == 8:  # theta, phi (C -> C/8), g (C -> C/2), o (C/2 -> C), no biases; gamma
            n += 2 * cin * (cin // 8) + 2 * cin * (cin // 2) + 1
        n += 2 * cond * (cin + 3 * mid)  # four conditional BNs: gain and bias linears, no biases
        n += (cin * mid + mid) + 2 * (9 * mid * mid + mid) + (mid * cout + cout)  # 1x1, 3x3, 3x3, 1x1 convs
    n += 2 * ch + 9 * ch * ch + ch  # final BN (weight, bias) and conv_to_rgb
    return n


def test_256_parameter_count(deep256):
    n = count_parameters(deep256)
    assert n == _count_from_layer_list()  # 55,880,833: the spec's ~55.88M per mechanism
    assert deep256.config.output_dim == 256 and deep256.config.num_classes == 1000


def test_tiny_forward_is_finite_deterministic_and_in_range():
    a, b = build_biggan("tiny", seed=0), build_biggan("tiny", seed=0)
    assert count_parameters(a) < 200_000
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    u = truncated_noise(3, 16, 0.7, seed=1)
    y = class_vector([0, 4, 9], 10)
    with torch.no_grad():
        x = a(u, y, 0.7)
    assert x.shape == (3, 3, 32, 32)
    assert torch.isfinite(x).all() and x.abs().max() <= 1 and x.std() > 0.01
    assert not torch.equal(build_biggan("tiny", seed=1).state_dict()["embeddings.weight"],
                           a.state_dict()["embeddings.weight"])


def test_tiny_does_not_touch_global_rng():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_biggan("tiny")
    assert torch.equal(torch.rand(3), expected)


def test_clone_is_independent_and_deepcopy_safe():
    m = build_biggan("tiny").train()
    u, y = truncated_noise(1, 16, 1.0, seed=0), class_vector([1], 10)
    m(u, y, 1.0).sum().backward()  # leaves non-leaf SN weights behind
    c = clone_biggan(m)
    with torch.no_grad():
        c.embeddings.weight.add_(1.0)
    assert not torch.equal(c.embeddings.weight, m.embeddings.weight)


def test_local_directory_roundtrip_and_key_check(tmp_path):
    m = build_biggan("tiny", seed=3)
    save_biggan_dir(m, tmp_path / "g")
    r = build_biggan(tmp_path / "g")
    u, y = truncated_noise(2, 16, 0.5, seed=2), class_vector([3, 3], 10)
    with torch.no_grad():
        assert torch.equal(m(u, y, 0.5), r(u, y, 0.5))
    # A state dict that lacks a key is refused (the package itself loads strict=False).
    sd = m.state_dict()
    del sd["embeddings.weight"]
    torch.save(sd, tmp_path / "g" / "pytorch_model.bin")
    with pytest.raises(ValueError, match="missing keys.*embeddings.weight"):
        load_biggan_dir(tmp_path / "g")
    (tmp_path / "g" / "pytorch_model.bin").unlink()
    with pytest.raises(FileNotFoundError, match="pytorch_model.bin"):
        load_biggan_dir(tmp_path / "g")


def test_bad_sources_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="Unknown BigGAN source"):
        build_biggan(tmp_path / "nowhere")
    # Offline (tests route HTTP to a dead loopback proxy): a named model fails at once
    # with advice to pass a local directory.
    with pytest.raises(ConnectionError, match="local directory"):
        build_biggan("biggan-deep-256", cache_dir=tmp_path / "cache")


def test_truncated_noise_range_and_per_sample_seeds():
    u = truncated_noise(64, 128, 0.4, seed=0)
    assert u.shape == (64, 128) and u.dtype == torch.float32
    assert u.abs().max() <= 2 * 0.4 + 1e-6
    # A sample's noise depends on its own seed only, not on its batch.
    assert torch.equal(truncated_noise(3, 8, 1.0, seed=5)[:2], truncated_noise(2, 8, 1.0, seed=5))
    batch = truncated_noise(3, 8, 1.0, seed=[(7, 0, 1), 11, 12])
    assert torch.equal(batch[1:2], truncated_noise(1, 8, 1.0, seed=[11]))
    assert torch.equal(batch[0:1], truncated_noise(1, 8, 1.0, seed=[(7, 0, 1)]))
    assert not torch.equal(batch[1], batch[2])
    # Scaling: same draw, times the truncation.
    assert torch.allclose(truncated_noise(1, 8, 0.5, seed=[3]), 0.5 * truncated_noise(1, 8, 1.0, seed=[3]))
    with pytest.raises(ValueError, match="seeds"):
        truncated_noise(2, 8, 1.0, seed=[1])


@pytest.mark.parametrize("bad", [0, -0.1, 1.01, float("nan"), "x"])
def test_check_truncation_rejects(bad):
    with pytest.raises(ValueError, match="truncation"):
        check_truncation(bad)
    with pytest.raises(ValueError):
        truncated_noise(1, 4, bad)


def test_class_vectors():
    y = class_vector([0, 999])
    assert y.shape == (2, 1000) and y.sum() == 2 and y[1, 999] == 1
    for bad in ([1000], [-1], [1.5]):
        with pytest.raises(ValueError):
            class_vector(bad)
    with pytest.raises(ValueError, match="out of range"):
        class_vector([10], n_classes=10)
    s = soft_class_vector({1: 0.25, 3: 0.75}, n_classes=5)
    assert torch.allclose(s, torch.tensor([[0, 0.25, 0, 0.75, 0]]))
    with pytest.raises(ValueError):
        soft_class_vector({7: 1.0}, n_classes=5)
    path = interpolate_class_vectors(2, 4, steps=5, n_classes=5)
    assert path.shape == (5, 5)
    assert torch.equal(path[0], class_vector([2], 5)[0]) and torch.equal(path[-1], class_vector([4], 5)[0])
    assert torch.allclose(path.sum(1), torch.ones(5)) and math.isclose(path[2, 2].item(), 0.5)


def test_tiny_config_builds_the_model_the_tests_rely_on():
    # What the tiny model does, not what its config says: 16-d noise and 10 classes in, 32-px RGB out.
    model = build_biggan("tiny", seed=0)
    assert model.config.to_dict() == tiny_biggan_config().to_dict()
    with torch.no_grad():
        x = model(torch.randn(2, 16), class_vector([0, 9], 10), 0.5)
    assert x.shape == (2, 3, 32, 32) and x.min() >= -1 and x.max() <= 1
