"""bf16 DeepSpeed training sums its micro-step gradients in fp32 (ZeRO >= 1), and ZeRO-0 bf16 with
accumulation is refused: a bf16 running sum of thousands of micro-steps is percents off."""
import numpy as np
import pytest
import torch

from cgn_dist.config import ConfigError, load_config
from cgn_dist.distributed.deepspeed import build_ds_config

N_MICRO = 2000


def _running_sum(values: torch.Tensor, dtype: torch.dtype) -> float:
    acc = torch.zeros((), dtype=dtype)
    for v in values.to(dtype):
        acc = acc + v
    return float(acc)


def test_a_bf16_running_sum_of_thousands_of_micro_steps_is_percents_off():
    # The hazard itself, by hand: 4,000 micro-step gradients of one weight (the paper's schedule on 1 GPU).
    g = torch.from_numpy(np.random.default_rng(0).uniform(0.5, 1.5, 4000) / 4000)
    exact = float(g.double().sum())
    assert abs(_running_sum(g, torch.bfloat16) - exact) / exact > 0.02
    assert abs(_running_sum(g, torch.float32) - exact) / exact < 1e-5


def _train_cfg(*over):
    return load_config(None, ["train.engine=deepspeed", "train.precision=bf16", *over]).train


def test_the_generated_config_accumulates_in_fp32_and_refuses_zero0_bf16_accumulation():
    ds = build_ds_config(_train_cfg("train.zero_stage=1", "train.grad_accum=8"), world_size=1)
    assert ds["bf16"] == {"enabled": True} and ds["data_types"] == {"grad_accum_dtype": "fp32"}
    assert "data_types" not in build_ds_config(_train_cfg("train.zero_stage=0", "train.grad_accum=1"), 1)
    with pytest.raises(ConfigError, match="train.zero_stage=1"):
        build_ds_config(_train_cfg("train.zero_stage=0", "train.grad_accum=8"), world_size=1)


def _one_update(ds_config: dict, x: torch.Tensor) -> torch.Tensor:
    """One optimizer step of a 1-weight model after len(x) micro-steps; SGD lr=1 from w=0, so the new weight is
    minus the accumulated (mean) gradient."""
    import deepspeed

    from cgn_dist.distributed.deepspeed import _prepare_cpu
    from cgn_dist.distributed.env import set_single_process_env

    _prepare_cpu()
    set_single_process_env()
    model = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config, dist_init_required=None)
    for xi in x:
        loss = engine(xi.view(1, 1).to(torch.bfloat16)).float().sum()
        engine.backward(loss)
        engine.step()
    weight = engine.module.weight.detach().float().clone()
    engine.destroy()
    return -weight.flatten()[0]


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2])
def test_a_real_engine_matches_the_fp64_mean_gradient_within_bf16_rounding(stage):
    x = torch.from_numpy(np.random.default_rng(1).uniform(0.5, 1.5, N_MICRO)).float()
    exact = float(x.double().mean())  # d(w*x)/dw = x; DeepSpeed averages over the micro-steps
    cfg = build_ds_config(_train_cfg(f"train.zero_stage={stage}", f"train.grad_accum={N_MICRO}",
                                     "train.micro_batch_size=1"), world_size=1)
    got = float(_one_update(cfg, x))
    assert abs(got - exact) / exact < 2 ** -8  # one bf16 rounding of the updated weight, no more
    cfg.pop("data_types")  # DeepSpeed's default for bf16: accumulate in bf16 (measured here: ~75 % off)
    assert abs(float(_one_update(cfg, x)) - exact) / exact > 0.1


def test_a_zero_checkpoint_of_two_processes_is_refused_by_one(tmp_path):
    # A real one-process ZeRO-1 run whose checkpoint then claims two processes (what a 2-GPU run writes).
    import json

    from cgn_dist.train.imagenet import train_imagenet
    tiny = "configs/debug/imagenet_tiny.yaml"
    over = [f"out_dir={tmp_path}", "name=z", "train.engine=deepspeed", "train.zero_stage=1", "train.max_steps=1"]
    out = train_imagenet(load_config(tiny, over))
    meta_file = tmp_path / "z" / "checkpoints" / "step_0000001" / "meta.json"
    meta = json.loads(meta_file.read_text())
    assert meta["world_size"] == 1
    meta_file.write_text(json.dumps(dict(meta, world_size=2)))
    with pytest.raises(ConfigError, match=r"saved by 2 processes .* ZeRO stage 1.*distributed.num_workers=2"):
        train_imagenet(load_config(tiny, [*over[:-1], "train.max_steps=2"]))
    assert out["steps"] == 1
