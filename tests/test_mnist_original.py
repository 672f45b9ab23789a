"""Importing the authors' released MNIST checkpoints: outputs equal an independent
functional re-computation from the raw state-dict tensors; bad files fail clearly."""
import pytest
import torch
import torch.nn.functional as F

from cgn_dist.models.cgn_mnist import CGNMnist
from cgn_dist.models.original_mnist import (OriginalCheckpointError, convert_original_mnist_state_dict,
                                            expected_original_keys, load_original_mnist_checkpoint)

DATASETS = ["colored", "double_colored", "wildlife"]


def _ckpt(shared_ref, name):
    return shared_ref / "original_mnist_checkpoints" / f"cgn_{name}_MNIST.pth"


def _reference(sd, y, u):
    """The original generator in eval mode, written with functional ops on the raw tensors."""
    def bn(h, p):
        return F.batch_norm(h, sd[f"{p}.running_mean"], sd[f"{p}.running_var"], sd[f"{p}.weight"],
                            sd[f"{p}.bias"], training=False, eps=1e-5)

    def up(h):
        return F.interpolate(h, scale_factor=2, mode="nearest")

    inp = torch.cat([u, F.embedding(y, sd["label_emb.weight"])], dim=1)  # noise first, then label
    h = F.linear(inp, sd["f_shape.0.weight"], sd["f_shape.0.bias"]).view(-1, 64, 8, 8)
    h = F.instance_norm(h)
    h = F.instance_norm(F.leaky_relu(bn(F.conv2d(up(h), sd["f_shape.4.weight"], padding=1), "f_shape.5"), 0.2))
    h = F.instance_norm(F.leaky_relu(bn(F.conv2d(up(h), sd["f_shape.9.weight"], padding=1), "f_shape.10"), 0.2))
    mask = h.clamp(1e-4, 0.9999)

    def texture(p):
        h = F.linear(inp, sd[f"{p}.0.weight"], sd[f"{p}.0.bias"]).view(-1, 64, 8, 8)
        h = F.leaky_relu(bn(F.conv2d(up(h), sd[f"{p}.3.weight"], padding=1), f"{p}.4"), 0.2)
        h = F.leaky_relu(bn(F.conv2d(up(h), sd[f"{p}.7.weight"], padding=1), f"{p}.8"), 0.2)
        return torch.tanh(bn(F.conv2d(h, sd[f"{p}.10.weight"], sd[f"{p}.10.bias"], padding=1), f"{p}.11"))

    return mask, texture("f_text1"), texture("f_text2")


@pytest.mark.parametrize("name", DATASETS)
def test_imported_model_matches_original_computation(shared_ref, name):
    path = _ckpt(shared_ref, name)
    sd = torch.load(path, map_location="cpu", weights_only=True)
    model = load_original_mnist_checkpoint(path)
    assert not model.training
    g = torch.Generator().manual_seed(0)
    y = torch.arange(10).repeat(2)
    u = torch.randn(20, 32, generator=g)
    with torch.no_grad():
        mask, fg, bg, x = model(y, u=u, shuffle=False)
        ref_mask, ref_fg, ref_bg = _reference(sd, y, u)
    assert mask.shape == (20, 1, 32, 32)
    torch.testing.assert_close(mask, ref_mask, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fg, ref_fg, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(bg, ref_bg, atol=1e-5, rtol=1e-5)
    # A trained model: masks are nearly binary and cover part of the image.
    assert 0.05 < mask.mean() < 0.5
    assert ((mask < 0.1) | (mask > 0.9)).float().mean() > 0.8


def test_load_into_given_model_keeps_its_mode_and_accepts_module_prefix(shared_ref, tmp_path):
    sd = torch.load(_ckpt(shared_ref, "double_colored"), map_location="cpu", weights_only=True)
    path = tmp_path / "dp.pth"
    torch.save({f"module.{k}": v for k, v in sd.items()}, path)
    model = CGNMnist()
    out = load_original_mnist_checkpoint(path, model)
    assert out is model and model.training
    torch.testing.assert_close(model.f_bg.conv3.weight, sd["f_text2.10.weight"])
    torch.testing.assert_close(model.f_shape.bn2.running_var, sd["f_shape.10.running_var"])


def test_bad_files(shared_ref, tmp_path):
    sd = torch.load(_ckpt(shared_ref, "colored"), map_location="cpu", weights_only=True)
    assert sorted(sd) == sorted(expected_original_keys())

    with pytest.raises(FileNotFoundError):
        load_original_mnist_checkpoint(tmp_path / "nope.pth")

    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(OriginalCheckpointError, match="expected a state dict"):
        load_original_mnist_checkpoint(tmp_path / "list.pth")

    wrong = dict(sd)
    del wrong["f_text1.7.weight"]
    wrong["discriminator.model.0.weight"] = torch.zeros(1)
    with pytest.raises(OriginalCheckpointError, match=r"missing keys \['f_text1.7.weight'\].*"
                                                      r"unexpected keys \['discriminator.model.0.weight'\]"):
        convert_original_mnist_state_dict(wrong)

    wrong = dict(sd)
    wrong["f_text2.10.weight"] = torch.zeros(3, 32, 5, 5)
    with pytest.raises(OriginalCheckpointError, match=r"f_text2.10.weight: \(3, 32, 5, 5\)"):
        convert_original_mnist_state_dict(wrong)

    wrong = dict(sd)
    wrong["label_emb.weight"] = "not a tensor"
    with pytest.raises(OriginalCheckpointError, match="not tensors"):
        convert_original_mnist_state_dict(wrong)

    torch.save({"model": Unpicklable()}, tmp_path / "code.pth")
    with pytest.raises(OriginalCheckpointError, match="pickled Python objects"):
        load_original_mnist_checkpoint(tmp_path / "code.pth")

    (tmp_path / "junk.pth").write_bytes(b"definitely not a checkpoint")
    with pytest.raises(OriginalCheckpointError, match="it is a text file .*, not a checkpoint"):
        load_original_mnist_checkpoint(tmp_path / "junk.pth")


class Unpicklable:
    """Any class instance: refused by weights_only loading."""
