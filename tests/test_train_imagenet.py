"""ImageNet CGN training on the tiny config: checkpoints, resume, and engine/world-size equivalence."""
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cgn_dist.config import load_config
from cgn_dist.distributed.env import free_port
from cgn_dist.train.imagenet import train_imagenet

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "debug" / "imagenet_tiny.yaml"


def _cfg(tmp_path, name, *extra):
    return load_config(TINY, [f"out_dir={tmp_path}", f"name={name}", *extra])


def _mechanisms(run_dir: Path, step: int, engine: str = "torch") -> dict:
    d = Path(run_dir) / "checkpoints" / f"step_{step:07d}"
    if engine == "torch":
        return torch.load(d / "mechanisms.pt", weights_only=True)["module"]
    return torch.load(d / "mechanisms" / "mp_rank_00_model_states.pt", weights_only=False)["module"]


def test_checkpoint_holds_only_the_mechanisms_and_resume_is_bitwise(tmp_path):
    full = train_imagenet(_cfg(tmp_path, "full"))
    state = torch.load(Path(full["run_dir"]) / "checkpoints" / "step_0000003" / "mechanisms.pt", weights_only=True)
    assert {k.split(".")[0] for k in state["module"]} == {"f_shape", "f_text", "f_bg"}
    assert [g["name"] for g in state["optimizer"]["param_groups"]] == ["shape", "text", "bg"]
    assert (Path(full["run_dir"]) / "samples" / "sheet_classes_0000003.png").is_file()

    train_imagenet(_cfg(tmp_path, "part", "train.max_steps=1"))
    resumed = train_imagenet(_cfg(tmp_path, "part"))
    a, b = _mechanisms(full["run_dir"], 3), _mechanisms(resumed["run_dir"], 3)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_deepspeed_zero0_fp32_equals_plain_torch(tmp_path):
    t = train_imagenet(_cfg(tmp_path, "t"))
    d = train_imagenet(_cfg(tmp_path, "d", "train.engine=deepspeed"))
    a, b = _mechanisms(t["run_dir"], 3), _mechanisms(d["run_dir"], 3, "deepspeed")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["deepspeed", "torch"])
def test_two_processes_equal_one_process_with_the_same_global_batch(tmp_path, engine):
    # one process: micro 1 x accumulation 2; two processes (torchrun, gloo): micro 1 x accumulation 1
    sn = ["imagenet.spectral_norm_updates=false"]  # per-forward power iteration depends on the split
    one = train_imagenet(_cfg(tmp_path, "one", f"train.engine={engine}", "train.micro_batch_size=1",
                              "train.grad_accum=2", *sn))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "-m", "cgn_dist.cli", "train", str(TINY), f"out_dir={tmp_path}",
           "name=two", f"train.engine={engine}", "train.micro_batch_size=1", "train.grad_accum=1", *sn]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = _mechanisms(one["run_dir"], 3, engine), _mechanisms(tmp_path / "two", 3, engine)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("precision,stage", [("bf16", 0), ("fp32", 1), ("bf16", 2)])
def test_deepspeed_precisions_and_zero_stages_train_and_resume(tmp_path, precision, stage):
    over = [f"train.engine=deepspeed", f"train.precision={precision}", f"train.zero_stage={stage}"]
    full = train_imagenet(_cfg(tmp_path, "full", "train.max_steps=2", *over))
    out = train_imagenet(_cfg(tmp_path, "z", "train.max_steps=1", *over))
    assert math.isfinite(out["loss/total"]) and out["loss/total"] > 0
    again = train_imagenet(_cfg(tmp_path, "z", "train.max_steps=2", *over))  # resumes from step 1
    assert again["steps"] == 2
    # Resumed equals uninterrupted: optimizer state (ZeRO partitions, fp32 master weights) and RNG came back.
    a, b = _mechanisms(full["run_dir"], 2, "deepspeed"), _mechanisms(again["run_dir"], 2, "deepspeed")
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_fp16_on_cpu_is_refused_with_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="fp16 on CPU"):
        train_imagenet(_cfg(tmp_path, "f", "train.engine=deepspeed", "train.precision=fp16"))
