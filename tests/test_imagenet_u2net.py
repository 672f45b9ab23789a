"""U^2-Net: exact upstream parameter layout, small variant, loading errors."""
import json

import pytest
import torch

from cgn_dist.models.u2net import TINY_U2NET_WIDTH, U2Net, build_u2net, load_u2net


@pytest.fixture(scope="module")
def full_u2net():
    return U2Net()


def test_state_dict_matches_released_u2net(full_u2net, shared_ref):
    ref = json.loads((shared_ref / "original_cgn_imagenet_keys.json").read_text())
    want = {k[len("u2net."):]: v for k, v in ref.items() if k.startswith("u2net.")}
    got = {k: list(v.shape) for k, v in full_u2net.state_dict().items()}
    assert list(got) == list(want)  # same keys, same order
    assert got == want
    assert sum(p.numel() for p in full_u2net.parameters()) == 44_009_869


@pytest.mark.parametrize("size", [(32, 32), (33, 21)])
def test_tiny_forward_shape_and_range(size):
    net = build_u2net("tiny")
    assert net.width == TINY_U2NET_WIDTH and not net.training
    x = torch.rand(2, 3, *size) * 2 - 1
    with torch.no_grad():
        m = net(x)
    assert m.shape == (2, 1, *size)
    assert (m > 0).all() and (m < 1).all()


def test_tiny_is_same_structure_fewer_channels(full_u2net):
    tiny = U2Net(width=TINY_U2NET_WIDTH)
    assert list(tiny.state_dict()) == list(full_u2net.state_dict())
    assert sum(p.numel() for p in tiny.parameters()) < 500_000


def test_load_roundtrip_with_module_prefix(full_u2net, tmp_path):
    sd = {"module." + k: v for k, v in full_u2net.state_dict().items()}
    torch.save(sd, tmp_path / "u2net.pth")
    net = load_u2net(tmp_path / "u2net.pth")
    assert not net.training
    for k, v in full_u2net.state_dict().items():
        assert torch.equal(net.state_dict()[k], v)


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="U-2-Net"):
        load_u2net(tmp_path / "missing.pth")
    torch.save(U2Net(width=TINY_U2NET_WIDTH).state_dict(), tmp_path / "small.pth")
    with pytest.raises(ValueError, match="shape mismatches"):
        load_u2net(tmp_path / "small.pth")
    torch.save({"side1.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="missing keys"):
        load_u2net(tmp_path / "other.pth")
    (tmp_path / "junk.pth").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="it is not a torch checkpoint"):
        load_u2net(tmp_path / "junk.pth")
