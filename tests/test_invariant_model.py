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


def test_trunk_weights_from_a_local_file_and_auto_falls_back_to_random_once(tmp_path, caplog):
    import logging

    import torchvision

    from cgn_dist.models import torchvision_weights as tw

    ref = torchvision.models.resnet18()
    torch.save(ref.state_dict(), tmp_path / "r18.pth")
    m = InvariantClassifier("resnet18", weights=str(tmp_path / "r18.pth"))
    assert m.weights_source == str(tmp_path / "r18.pth")
    assert torch.equal(m.backbone.conv1.weight, ref.conv1.weight)

    tw._warned.clear()
    hub = tmp_path / "hub"  # an empty torch hub: nothing cached, and no network here
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(hub))
    try:
        with caplog.at_level(logging.WARNING):
            a = InvariantClassifier("resnet18", weights="auto")
            b = InvariantClassifier("resnet18", weights="auto")
    finally:
        torch.hub.set_dir(old)
    if a.weights_source == "random":  # offline (the usual case here): said once in the log
        assert b.weights_source == "random"
        assert sum("RANDOM" in r.message for r in caplog.records) == 1


def test_inception_probabilities():
    from cgn_dist.classifier.inception_score import InceptionProbs, build_inception

    net = InceptionProbs(build_inception("random"))
    p = net(torch.rand(2, 3, 64, 64))
    assert p.shape == (2, 1000)
    torch.testing.assert_close(p.sum(1), torch.ones(2), rtol=1e-5, atol=1e-5)
