"""Generation's inference fusions compute the models' own functions: BigGAN blocks fused
(cgn_dist.models.biggan_inference) and U²-Net's BatchNorms folded into its convolutions (models.u2net).

The references are pytorch-pretrained-biggan's own GenBlock forward on the same folded weights and our U²-Net
with its BatchNorm modules in place; running statistics are randomised (the random init holds means 0 and variances 1, which would hide a wrong BatchNorm),
and truncation 0.73 takes the package's interpolation between two stored statistics.
"""
import copy
import json

import numpy as np
import pytest
import torch
from pytorch_pretrained_biggan.model import BigGANBatchNorm

from cgn_dist.generate.imagenet.factory import ImagenetCounterfactualFactory
from cgn_dist.generate.speed import fold_spectral_norm, prepare_model
from cgn_dist.models.biggan import _random_biggan, class_vector, tiny_biggan_config, truncated_noise
from cgn_dist.models.biggan_inference import InferenceGenBlock, to_inference_blocks
from cgn_dist.sharding.run import generate_dataset

TINY = dict(biggan="tiny", u2net="tiny", model_seed=0, forward_batch=4, truncation=0.5)


def _model_with_statistics(seed=0):
    model = _random_biggan(tiny_biggan_config(), seed).eval()
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, BigGANBatchNorm):
            m.running_means.copy_(torch.randn(m.running_means.shape, generator=g) * 0.3)
            m.running_vars.copy_(torch.rand(m.running_vars.shape, generator=g) * 2 + 0.2)
    fold_spectral_norm(model)
    return model


@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("truncation", [1.0, 0.73])
def test_fused_blocks_give_the_package_output(channels_last, truncation):
    ref = _model_with_statistics()
    fused = copy.deepcopy(ref)
    assert to_inference_blocks(fused) == 5
    assert all(type(b) is InferenceGenBlock for b in fused.generator.layers if hasattr(b, "bn_0"))
    for m in (ref, fused):
        prepare_model(m, torch.device("cpu"), "fp32", channels_last)
    cfg = tiny_biggan_config()
    u = truncated_noise(3, cfg.z_dim, truncation, seed=[4, 5, 6])
    y = class_vector([1, 2, 7], cfg.num_classes)
    with torch.no_grad():
        a, b = ref(u, y, truncation), fused(u, y, truncation)
    assert a.abs().mean() > 0.05  # an image, not a constant
    torch.testing.assert_close(b, a, rtol=1e-5, atol=2e-6)
    # the state dict is the package's: the phase kernels are derived, not saved
    assert set(fused.state_dict()) == set(ref.state_dict())


def test_u2net_with_folded_batchnorm_gives_the_same_saliency():
    from cgn_dist.models.u2net import build_u2net, fold_batchnorm

    ref = build_u2net("tiny", seed=2)
    g = torch.Generator().manual_seed(2)
    for m in ref.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    folded = copy.deepcopy(ref)
    n_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in ref.modules())
    assert fold_batchnorm(folded) == n_bn > 0
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    x = torch.rand(2, 3, 64, 64, generator=g) * 2 - 1
    with torch.no_grad():
        a, b = ref(x), folded(x)
    assert a.std() > 1e-3
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="eval"):
        fold_batchnorm(copy.deepcopy(ref).train())


def test_blocks_with_spectral_norm_hooks_are_refused():
    model = _random_biggan(tiny_biggan_config(), 0)
    with pytest.raises(ValueError, match="spectral norm folded"):
        to_inference_blocks(model)


def test_generation_records_fused_blocks_and_keeps_a_folders_package_blocks(tmp_path):
    fused = ImagenetCounterfactualFactory(**TINY)()
    package = ImagenetCounterfactualFactory(**TINY, blocks="package")()
    assert fused.info()["blocks"] == "fused" and "blocks" not in package.info()
    a, b = fused.compute(list(range(4))), package.compute(list(range(4)))
    diff = np.abs(a.composite.astype(int) - b.composite.astype(int))
    assert diff.max() <= 1  # the same images, up to a rounding flip of one level
    # A folder written before the option existed: made with the package's blocks, its plan's factory without
    # "blocks" (as that version described it), its shards' provenance without "blocks". Completed under auto,
    # it continues with the package's blocks: the bytes of an uninterrupted package run.
    ref = generate_dataset(ImagenetCounterfactualFactory(**TINY, blocks="package"), tmp_path / "ref", 8, 4, 0,
                           batch_size=4, progress=False)
    assert "blocks" not in ref["sampler_info"]
    old = tmp_path / "old"
    generate_dataset(ImagenetCounterfactualFactory(**TINY, blocks="package"), old, 4, 4, 0, batch_size=4,
                     progress=False)
    for name in ("plan.json", "manifest.json"):
        doc = json.loads((old / name).read_text())
        del doc["sampler_factory"]["kwargs"]["blocks"]
        (old / name).write_text(json.dumps(doc))
    assert ImagenetCounterfactualFactory(**TINY).with_recorded(ref["sampler_info"]).blocks == "package"
    again = generate_dataset(ImagenetCounterfactualFactory(**TINY), old, 8, 4, 0, batch_size=4, progress=False)
    assert [s["sha256"] for s in again["shards"]] == [s["sha256"] for s in ref["shards"]]
    # a new folder under auto is fused, and its plan does not spell out the default
    new = generate_dataset(ImagenetCounterfactualFactory(**TINY), tmp_path / "new", 4, 4, 0, batch_size=4,
                           progress=False)
    assert new["sampler_info"]["blocks"] == "fused" and "blocks" not in new["sampler_factory"]["kwargs"]
    with pytest.raises(ValueError, match="blocks"):
        ImagenetCounterfactualFactory(**TINY, blocks="fast")
