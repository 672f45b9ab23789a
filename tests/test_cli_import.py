"""`cgn-dist import` turns the authors' released checkpoints into cgn_dist weights files."""
import torch

from cgn_dist.cli import main
from cgn_dist.models.cgn_mnist import CGNMnist
from cgn_dist.models.original_mnist import load_original_mnist_checkpoint


def test_import_mnist_checkpoint_roundtrip(tmp_path, shared_ref):
    src = shared_ref / "original_mnist_checkpoints" / "cgn_double_colored_MNIST.pth"
    assert main(["import", str(src), str(tmp_path / "dc.pt")]) == 0
    saved = torch.load(tmp_path / "dc.pt", weights_only=True)
    assert saved["kind"] == "cgn_mnist"
    model = CGNMnist(init_type=None)
    model.load_state_dict(saved["module"])
    ref = load_original_mnist_checkpoint(src)
    for k, v in ref.state_dict().items():
        assert torch.equal(v, model.state_dict()[k])
    # and against the authors' raw file under their own names (cgn_spec §1.2 layer order), not our importer
    raw = torch.load(src, map_location="cpu", weights_only=True)
    mod = saved["module"]
    for ours, theirs in (("f_shape.fc.weight", "f_shape.0.weight"), ("f_shape.conv2.weight", "f_shape.9.weight"),
                         ("f_shape.bn2.running_var", "f_shape.10.running_var"),
                         ("f_text.conv3.bias", "f_text1.10.bias"), ("f_bg.bn3.weight", "f_text2.11.weight"),
                         ("label_emb.weight", "label_emb.weight")):
        assert torch.equal(mod[ours], raw[theirs]), ours


def test_import_rejects_what_is_not_a_checkpoint(tmp_path, capsys):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    assert main(["import", str(bad), str(tmp_path / "out.pt")]) == 2
    assert "is not an authors' CGN checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "out.pt").exists()
    assert main(["import", str(tmp_path / "missing.pth"), str(tmp_path / "out.pt")]) == 2
    assert "does not exist" in capsys.readouterr().err
