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
    with pytest.raises(ValueError, match="it is a text file .*, not a checkpoint"):
        load_u2net(tmp_path / "junk.pth")


def _fill_by_golden_rule(net: U2Net) -> None:
    # The weight-fill rule of ../shared/reference/golden/README.md (no weight file needed).
    import zlib

    sd = net.state_dict()
    for key in sorted(sd):
        t = sd[key]
        if not t.is_floating_point():
            continue
        g = torch.Generator().manual_seed(zlib.crc32(key.encode()))
        t.copy_(torch.rand(t.shape, generator=g) + 0.5 if key.endswith("running_var")
                else torch.randn(t.shape, generator=g) * 0.1)


@pytest.fixture(scope="module")
def golden(shared_ref):
    return torch.load(shared_ref / "golden" / "u2net_forward.pt", weights_only=False)


def test_forward_matches_the_authors_u2net(golden):
    """The authors' U²-Net class (golden, made with their code) upsamples with align_corners=True;
    our default must reproduce its mask, and upstream's align_corners=False must not."""
    net, upstream = U2Net().eval(), U2Net(align_corners=False).eval()
    assert list(net.state_dict()) == golden["keys"]
    _fill_by_golden_rule(net)
    upstream.load_state_dict(net.state_dict())
    with torch.no_grad():
        d0, d0_upstream = net(golden["input"]), upstream(golden["input"])
    torch.testing.assert_close(d0, golden["d0"], rtol=0, atol=1e-5)
    err = (d0 - golden["d0"]).abs().max().item()
    err_upstream = (d0_upstream - golden["d0"]).abs().max().item()
    print(f"max |d0 - golden|: authors' upsampling {err:.2e}, upstream's {err_upstream:.2e}")
    assert err_upstream > 100 * max(err, 1e-7)  # the golden can tell the two apart


def test_align_corners_option_reaches_every_upsampling():
    net = build_u2net("tiny", align_corners=False)
    flags = {m.align_corners for m in net.modules() if hasattr(m, "align_corners")}
    assert flags == {False}
    assert {m.align_corners for m in build_u2net("tiny").modules() if hasattr(m, "align_corners")} == {True}
