"""CGN-MNIST training: a few real steps, logging, checkpoints, bitwise resume, DeepSpeed parity."""
from pathlib import Path

import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cgn_dist.config import load_config
from cgn_dist.train.checkpoint import list_checkpoints
from cgn_dist.train.mnist import train_mnist

TINY = Path(__file__).resolve().parents[1] / "configs" / "debug" / "mnist_tiny.yaml"


def _cfg(tmp_path, *overrides):
    return load_config(TINY, [f"out_dir={tmp_path}", *overrides])


def _weights(run_dir: Path, step: int, name: str = "generator") -> dict:
    return torch.load(run_dir / "checkpoints" / f"step_{step:07d}" / f"{name}.pt", weights_only=True)


def test_three_steps_write_run_dir_tensorboard_and_sheets(tmp_path):
    out = train_mnist(_cfg(tmp_path, "name=r"))
    run = Path(out["run_dir"])
    assert out["steps"] == 3 and torch.isfinite(torch.tensor(out["loss/g_total"]))
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["train"]["max_steps"] == 3 and saved["name"] == "r"
    assert [s for s, _ in list_checkpoints(run)] == [2, 3]
    assert sorted(p.name for p in (run / "samples").glob("*.png")) == [
        "sheet_classes_0000002.png", "sheet_classes_0000003.png",
        "sheet_counterfactuals_0000002.png", "sheet_counterfactuals_0000003.png"]
    acc = EventAccumulator(str(run / "tb")).Reload()
    assert {"loss/g_total", "loss/d", "mask/mean"} <= set(acc.Tags()["scalars"])
    assert [e.step for e in acc.Scalars("loss/d")] == [1, 2, 3]
    assert sorted(acc.Tags()["images"]) == ["sheet/classes", "sheet/counterfactuals"]


def test_resume_equals_uninterrupted_bitwise(tmp_path):
    full = Path(train_mnist(_cfg(tmp_path, "name=full", "train.max_steps=4"))["run_dir"])
    part = _cfg(tmp_path, "name=part", "train.max_steps=2")
    train_mnist(part)
    resumed = Path(train_mnist(_cfg(tmp_path, "name=part", "train.max_steps=4"))["run_dir"])
    for name in ("generator", "discriminator"):
        a, b = _weights(full, 4, name), _weights(resumed, 4, name)
        for k in a["module"]:
            assert torch.equal(a["module"][k], b["module"][k]), (name, k)
        sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
        assert all(torch.equal(sa[i]["exp_avg"], sb[i]["exp_avg"]) for i in sa)


def test_keep_last_prunes_old_checkpoints(tmp_path):
    run = Path(train_mnist(_cfg(tmp_path, "name=k", "train.max_steps=4", "train.checkpoint_every=1",
                                "train.keep_last=2"))["run_dir"])
    assert [s for s, _ in list_checkpoints(run)] == [3, 4]


def test_deepspeed_zero0_fp32_matches_torch_engine(tmp_path):
    t = Path(train_mnist(_cfg(tmp_path, "name=t"))["run_dir"])
    d = Path(train_mnist(_cfg(tmp_path, "name=d", "train.engine=deepspeed"))["run_dir"])
    a = _weights(t, 3)["module"]
    b = torch.load(d / "checkpoints" / "step_0000003" / "generator" / "mp_rank_00_model_states.pt",
                   weights_only=False)["module"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
