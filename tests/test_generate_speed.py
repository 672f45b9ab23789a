"""Generation speed options on tiny random models: precision, folded spectral norm, overlap, encode threads,
the compile fallback, FLOP counting. References are independent: the unfolded model, the sequential path,
fp32 against bf16, hand-counted FLOPs."""
import logging

import numpy as np
import pytest
import torch
from torch import nn

from cgn_dist.generate.imagenet.factory import ImagenetCounterfactualFactory
from cgn_dist.generate.speed import count_flops, fold_spectral_norm, peak_bf16_tflops
from cgn_dist.sharding.run import generate_dataset
from cgn_dist.models.biggan import class_vector, truncated_noise
from cgn_dist.models.cgn_imagenet import build_cgn_imagenet

TINY = dict(biggan="tiny", u2net="tiny", model_seed=0, forward_batch=4, truncation=0.5)


def _shards(tmp_path, name, **kw):
    m = generate_dataset(ImagenetCounterfactualFactory(**TINY, **kw), tmp_path / name, 14, 7, 0, batch_size=3,
                         progress=False)
    return [s["sha256"] for s in m["shards"]], m


def test_precision_is_checked_with_the_config_key():
    with pytest.raises(ValueError, match="precision"):
        ImagenetCounterfactualFactory(**TINY, precision="fp8")
    with pytest.raises(ValueError, match="generate.precision=fp16 runs on CUDA only"):
        ImagenetCounterfactualFactory(**TINY, precision="fp16", device="cpu")
    with pytest.raises(ValueError, match="generate.jpeg_encoder=nvjpeg"):
        ImagenetCounterfactualFactory(**TINY, jpeg_encoder="nvjpeg", device="cpu")
    with pytest.raises(ValueError, match="generate.precision=fp16 runs on CUDA only"):  # auto resolved to cpu
        ImagenetCounterfactualFactory(**TINY, precision="fp16")()


def test_folded_spectral_norm_gives_the_hooked_models_output_exactly():
    torch.manual_seed(0)
    hooked = build_cgn_imagenet("tiny", "tiny", seed=3).eval()
    folded = build_cgn_imagenet("tiny", "tiny", seed=3).eval()
    assert fold_spectral_norm(folded) > 0 and fold_spectral_norm(folded) == 0
    u = truncated_noise(3, hooked.z_dim, 0.5, seed=[1, 2, 3])
    ys = [class_vector([1, 2, 3], hooked.n_classes) for _ in range(3)]
    with torch.no_grad():
        a, b = hooked.generate(u, *ys, truncation=0.5), folded.generate(u, *ys, truncation=0.5)
    assert torch.equal(a, b)


def test_bf16_weights_are_cast_once_and_stay_close_to_fp32():
    f32 = ImagenetCounterfactualFactory(**TINY, save_layers=True, precision="fp32")()
    b16 = ImagenetCounterfactualFactory(**TINY, save_layers=True, precision="bf16")()
    assert {p.dtype for p in b16.model.parameters()} == {torch.bfloat16}
    assert {b.dtype for b in b16.model.buffers() if b.is_floating_point()} == {torch.bfloat16}
    seeds = list(range(8))
    a, b = f32.compute(seeds[:4]), b16.compute(seeds[:4])
    diff = np.abs(a.composite.astype(int) - b.composite.astype(int))
    # bf16 keeps 8 significant bits: a pixel moves by a few levels at most, most not at all.
    assert diff.max() <= 16 and diff.mean() < 2.0, (diff.max(), diff.mean())
    agree = ((a.layers["mask"] >= 128) == (b.layers["mask"] >= 128)).mean()
    assert agree > 0.97
    assert b16.info()["precision"] == "bf16" and f32.info()["precision"] == "fp32"
    assert a.composite.shape == b.composite.shape


def test_overlap_and_encode_threads_give_the_sequential_bytes(tmp_path):
    seq, _ = _shards(tmp_path, "seq", overlap=False, encode_threads=0, save_layers=True)
    par, m = _shards(tmp_path, "par", overlap=True, encode_threads=3, save_layers=True)
    assert par == seq
    assert m["sampler_info"]["forward"] == "eager" and m["sampler_info"]["channels_last"] is True
    # channels-last changes the memory layout, not the arithmetic of these kernels on CPU
    nhwc, _ = _shards(tmp_path, "nchw", overlap=False, encode_threads=0, save_layers=True, channels_last=False)
    assert nhwc == seq


def test_overlap_prefetches_within_the_shard_only():
    s = ImagenetCounterfactualFactory(**TINY, overlap=True)()
    from cgn_dist.sharding.plan import ShardSpec, sample_refs

    spec = ShardSpec(shard_id=0, n=8, seed=5)
    s.begin_shard(spec)
    s.sample(sample_refs(spec, 0, 4))
    assert (5, 0, 1) in s._cache  # group 1 computed ahead
    s.sample(sample_refs(spec, 4, 8))
    assert (5, 0, 2) not in s._cache  # past the shard's end: nothing computed
    s.close()


def test_compile_failure_falls_back_to_eager_with_a_clear_warning(monkeypatch, caplog):
    def broken_compile(*args, **kwargs):
        raise RuntimeError("no C++ compiler here")

    monkeypatch.setattr(torch, "compile", broken_compile)
    with caplog.at_level(logging.WARNING, logger="cgn_dist.generate.speed"):
        s = ImagenetCounterfactualFactory(**TINY, compile=True)()
    assert s.forward_kind == "eager (compile failed: RuntimeError)"
    assert "torch.compile failed" in caplog.text and "generate.compile=false" in caplog.text
    assert "no C++ compiler here" in caplog.text
    eager = ImagenetCounterfactualFactory(**TINY)()
    assert np.array_equal(s.compute([1, 2, 3, 4]).composite, eager.compute([1, 2, 3, 4]).composite)
    assert s.info()["forward"] != eager.info()["forward"]  # never mixed with true eager runs in one folder


def test_flop_count_matches_a_hand_count():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 5 * 5, 10))
    x = torch.randn(2, 3, 5, 5)
    conv = 2 * 2 * 8 * 5 * 5 * (3 * 3 * 3)  # 2 FLOPs per multiply-add, batch 2, 8 x 5 x 5 outputs, 27 taps
    linear = 2 * 2 * 200 * 10
    assert count_flops(model, x) == conv + linear
    assert peak_bf16_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_bf16_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_bf16_tflops("NVIDIA A100-SXM4-40GB") == 312.0
    assert peak_bf16_tflops("NVIDIA H200") == 989.0 and peak_bf16_tflops("Tesla T4") is None


def test_bf16_run_regenerates_bit_exactly_and_refuses_mixing(tmp_path):
    from cgn_dist.data.shards import read_tar_samples
    from cgn_dist.sharding.regenerate import regenerate_sample
    from cgn_dist.sharding.writer import GenerationError

    _, m = _shards(tmp_path, "b16", precision="bf16")
    assert m["sampler_info"]["precision"] == "bf16"
    stored = {s["__key__"]: s for s in read_tar_samples(tmp_path / "b16" / "shard-000001.tar")}
    key = sorted(stored)[5]
    again = regenerate_sample(tmp_path / "b16" / "manifest.json", key)
    assert again["jpg"] == stored[key]["jpg"]
    # the same folder, completed at another precision: refused, nothing mixed
    with pytest.raises((GenerationError, ValueError)):
        _shards(tmp_path, "b16", precision="fp32")
