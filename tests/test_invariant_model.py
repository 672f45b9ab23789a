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


def test_trunk_weights_from_a_local_file_and_auto_falls_back_to_random_once(tmp_path, caplog, monkeypatch):
    import logging

    import torchvision

    from cgn_dist.models import torchvision_weights as tw

    ref = torchvision.models.resnet18()
    torch.save(ref.state_dict(), tmp_path / "r18.pth")
    m = InvariantClassifier("resnet18", weights=str(tmp_path / "r18.pth"))
    assert m.weights_source == str(tmp_path / "r18.pth")
    assert torch.equal(m.backbone.conv1.weight, ref.conv1.weight)

    tw._warned.clear()
    hub = tmp_path / "hub"  # an empty torch hub: nothing cached
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(hub))

    def offline(url, *args, **kwargs):  # the network is what is absent here, not the code under test
        import urllib.error
        raise urllib.error.URLError(f"offline: {url}")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    try:
        with caplog.at_level(logging.WARNING):
            a = InvariantClassifier("resnet18", weights="auto")
            b = InvariantClassifier("resnet18", weights="auto")
    finally:
        torch.hub.set_dir(old)
    assert a.weights_source == b.weights_source == "random"
    assert sum("RANDOM" in r.message for r in caplog.records) == 1  # said once, not per model


def test_inception_probabilities():
    from cgn_dist.classifier.imagenet.inception_score import InceptionProbs, build_inception

    import torch.nn.functional as F
    import torchvision

    torch.manual_seed(0)
    inc = build_inception("random")
    net = InceptionProbs(inc)
    x = torch.rand(2, 3, 64, 64)
    p = net(x)
    # Second formulation: torchvision's own Inception v3 with the same weights, fed by hand (bilinear to
    # 299 px, ImageNet mean/std; its transform_input then maps back to its training normalisation).
    ref = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False,
                                          transform_input=True).eval()
    ref.load_state_dict(inc.state_dict())
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        logits = ref((F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) - mean) / std)
    torch.testing.assert_close(p, torch.softmax(logits, dim=1), rtol=1e-4, atol=1e-6)
