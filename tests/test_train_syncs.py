"""The training loops read their loss scalars back once per logged update, not once per term and micro-step
(each .item() of a CUDA tensor waits for the GPU), and the values logged are the same to the bit."""
import math
import sys

import torch

from cgn_dist.config import load_config
from cgn_dist.train.metrics import DeviceSums


class CountFloatItems:
    """Counts cgn_dist's own .item() calls on floating-point tensors (loss terms, means): on CUDA each waits
    for the GPU. (torch's optimizers read their CPU step counters with .item(): no sync, not counted.)"""

    def __init__(self, monkeypatch):
        self.n = 0
        real = torch.Tensor.item

        def item(t):
            if t.is_floating_point() and "/cgn_dist/" in sys._getframe(1).f_code.co_filename:
                self.n += 1
            return real(t)

        monkeypatch.setattr(torch.Tensor, "item", item)


def test_device_sums_equal_the_item_sums_bitwise():
    g = torch.Generator().manual_seed(0)
    terms = [{"a": torch.rand((), generator=g) * 100, "b": torch.rand((), generator=g).double(), "c": 0.25}
             for _ in range(7)]
    sums, ref = DeviceSums(7), {}
    for t in terms:
        for k, v in t.items():
            sums.add(k, v)
            ref[k] = ref.get(k, 0.0) + (v.item() if torch.is_tensor(v) else v) / 7
    assert sums.read() == ref and list(sums.read()) == ["a", "b", "c"]


def test_imagenet_loop_syncs_once_per_logged_update(tmp_path, monkeypatch, repo_root):
    from cgn_dist.train.imagenet import train_imagenet

    cfg = load_config(repo_root / "configs/debug/imagenet_tiny.yaml",
                      [f"out_dir={tmp_path}", "train.micro_batch_size=1", "train.grad_accum=4", "train.max_steps=3",
                       "train.log_every=3", "train.checkpoint_every=3", "train.sample_every=3"])
    counter = CountFloatItems(monkeypatch)
    out = train_imagenet(cfg)
    assert out["steps"] == 3 and math.isfinite(out["loss/total"])
    # 8 .item() calls per micro-step were 96 here; now the one logged update reads every scalar at once
    assert counter.n < 4, counter.n
