"""The invariant classifier: three fresh heads on one trunk, the averaged outputs, BatchNorm frozen."""
import torch

from cgn_dist.models.invariant import InvariantClassifier


def test_outputs_heads_and_frozen_batchnorm():
    m = InvariantClassifier("resnet18", n_classes=1000, weights="random", seed=0)
    assert m.weights_source == "random"
    assert [h.in_features for h in m.heads.values()] == [512] * 3
    m.train()
    bns = [b for b in m.modules() if isinstance(b, torch.nn.BatchNorm2d)]
    assert bns and not any(b.training for b in bns) and m.heads["shape"].training
    before = bns[0].running_mean.clone()
    x = torch.randn(2, 3, 64, 64)
    out = m(x)
    assert torch.equal(bns[0].running_mean, before)  # running statistics do not move in training
    assert set(out) == {"avg", "shape_texture", "shape", "texture", "bg"}
    torch.testing.assert_close(out["avg"], (out["shape"] + out["texture"] + out["bg"]) / 3)
    torch.testing.assert_close(out["shape_texture"], (out["shape"] + out["texture"]) / 2)
    assert not torch.equal(out["shape"], out["texture"])  # heads are initialised separately
    again = InvariantClassifier("resnet18", weights="random", seed=0)
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), again.state_dict().values()))
