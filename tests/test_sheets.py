"""Sheets that explain themselves (column titles, row labels) and the optimizer scalars in TensorBoard."""
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cgn_dist.config import load_config
from cgn_dist.distributed.engine import TorchEngine
from cgn_dist.distributed.env import DistEnv
from cgn_dist.train.imagenet import train_imagenet
from cgn_dist.train.metrics import SHEET_PAD, engine_scalars, make_sheet

REPO = Path(__file__).resolve().parents[1]


def _ink(region: torch.Tensor) -> int:
    return int((region < 0.5).any(dim=0).sum())  # dark pixels (text is black on white)


def test_titles_and_row_labels_frame_the_unchanged_grid():
    g = torch.Generator().manual_seed(0)
    cols = [torch.rand(3, 3, 64, 64, generator=g) * 0.4 + 0.6 for _ in range(3)]  # light tiles: no "ink"
    plain = make_sheet(cols, unit=[True] * 3)
    titled = make_sheet(cols, unit=[True] * 3, titles=["mask", "", "composite"], row_labels=["0", "1", "2"])
    top, left = titled.shape[1] - plain.shape[1], titled.shape[2] - plain.shape[2]
    assert top > 8 and left > 4
    # The tiles themselves are untouched (to 8-bit precision), just moved by the header and margin.
    torch.testing.assert_close(titled[:, top:, left:], plain, atol=0.5 / 255 + 1e-6, rtol=0)
    step = 64 + SHEET_PAD
    header = [titled[:, :top, left + SHEET_PAD + j * step: left + SHEET_PAD + j * step + 64] for j in range(3)]
    assert _ink(header[0]) > 0 and _ink(header[2]) > _ink(header[0])  # "composite" is longer than "mask"
    assert _ink(header[1]) == 0  # no title, no text over that column
    for i in range(3):
        assert _ink(titled[:, top + SHEET_PAD + i * step: top + SHEET_PAD + i * step + 64, :left]) > 0
    assert _ink(titled[:, top:top + SHEET_PAD, :left]) == 0


def test_small_tiles_are_enlarged_so_titles_fit():
    cols = [torch.zeros(2, 3, 32, 32)] * 2
    titled = make_sheet(cols, titles=["foreground", "background"], row_labels=["a", "b"])
    assert titled.shape[1] >= 2 * 64  # 32-px tiles shown at 64 px


def test_grad_norm_is_the_l2_norm_of_all_gradients():
    lin = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD([{"params": [lin.weight], "lr": 0.1, "name": "w"}, {"params": [lin.bias], "lr": 0.5}])
    eng = TorchEngine(lin, opt, grad_accum=1, env=DistEnv(0, 1, 0, torch.device("cpu")))
    x = torch.tensor([[1.0, 2.0, 3.0]])
    eng.backward(eng(x).sum())  # d/dW = [x; x], d/db = [1, 1]: norm^2 = 2 * 14 + 2 = 30
    eng.step()
    assert abs(eng.grad_norm - 30 ** 0.5) < 1e-5
    assert engine_scalars({"net": eng}) == {"lr/w": 0.1, "lr/net_1": 0.5, "grad_norm/net": eng.grad_norm}


def test_training_writes_labelled_sheets_and_optimizer_scalars(tmp_path):
    cfg = load_config(REPO / "configs" / "debug" / "imagenet_tiny.yaml", [f"out_dir={tmp_path}", "name=t"])
    train_imagenet(cfg)
    run = tmp_path / "t"
    png = np.asarray(Image.open(run / "samples" / "sheet_classes_0000003.png"))
    rows, tile = len(cfg.imagenet.sheet_classes), 64  # 32-px tiny model, enlarged for the titles
    assert png.shape[0] > rows * (tile + SHEET_PAD) + SHEET_PAD and png.shape[1] > 6 * (tile + SHEET_PAD)
    acc = EventAccumulator(str(run / "tb"), size_guidance={"images": 0, "scalars": 0}).Reload()
    tags = acc.Tags()
    img = acc.Images("sheet/classes")[-1]
    assert (img.height, img.width) == png.shape[:2]
    # Learning rates as configured (configs/imagenet/authors_code.yaml), one per mechanism.
    ic = cfg.imagenet
    for group, lr in (("shape", ic.lr_shape), ("text", ic.lr_text), ("bg", ic.lr_bg)):
        assert abs(acc.Scalars(f"lr/{group}")[-1].value - lr) < 1e-12 * max(1, lr) + 1e-12
    norms = [e.value for e in acc.Scalars("grad_norm/mechanisms")]
    assert len(norms) == 3 and all(n > 0 and np.isfinite(n) for n in norms)
    assert "loss/total" in tags["scalars"]
