"""DeepSpeed configuration generated from ours, and engine construction.

Global batch, micro batch, accumulation, precision and ZeRO stage are defined
once in TrainConfig; the JSON DeepSpeed wants is derived here.
"""
from __future__ import annotations

import os

import torch

from cgn_dist.config import ConfigError, TrainConfig
from cgn_dist.distributed.env import DistEnv, set_single_process_env
from cgn_dist.errors import InputError


# bf16 by autocast: the module stays fp32 (its parameters are the master weights, BatchNorm's weights and
# running statistics stay fp32 and on cuDNN's fp32-statistics kernels), torch.autocast runs convolutions and
# matmuls in bf16 inside the engine's forward. No module gets a bf16 communication dtype (the empty list):
# gradients are reduced in fp32, as under DDP.
AUTOCAST_BF16 = {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}


def build_ds_config(train: TrainConfig, world_size: int, autocast: bool = False) -> dict:
    """``autocast``: bf16 as torch.autocast over an fp32 module (DeepSpeed's ``torch_autocast`` section)
    instead of DeepSpeed's ``bf16`` mode, which casts the whole module, BatchNorm included."""
    cfg = {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "train_batch_size": train.micro_batch_size * train.grad_accum * world_size,
        "zero_optimization": {"stage": train.zero_stage},
        # ZeRO wraps any torch optimizer; DeepSpeed only asserts on those it has not listed (SGD among them).
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": 0.0,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if train.precision == "fp16":
        cfg["fp16"] = {"enabled": True, "initial_scale_power": 16}
    elif train.precision == "bf16" and autocast:
        cfg["torch_autocast"] = dict(AUTOCAST_BF16)  # fp32 gradients: any accumulation is fp32
    elif train.precision == "bf16":
        cfg["bf16"] = {"enabled": True}
        if train.zero_stage >= 1:
            # Sum micro-step gradients in fp32: a bf16 sum of the paper's 4,000 micro-steps is percents off.
            # (DeepSpeed takes this for ZeRO >= 1 only; ZeRO-0 bf16 with accumulation is refused below.)
            cfg["data_types"] = {"grad_accum_dtype": "fp32"}
        elif train.grad_accum > 1:
            raise ConfigError(
                f"train.precision=bf16 with train.zero_stage=0 sums the {train.grad_accum} micro-steps of "
                "train.grad_accum in bf16 (percents off over long sums); set train.zero_stage=1, which "
                "accumulates in fp32, or train.grad_accum=1")
    return cfg


def _prepare_cpu() -> None:
    """CPU-only machines: pick DeepSpeed's CPU accelerator and skip a JIT op build."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed.ops

    # The shm comm op compiles (~35 s) on every fresh CPU machine and training does not need it.
    getattr(deepspeed.ops, "__compatible_ops__", {})["deepspeed_shm_comm"] = False


def initialize_deepspeed(module: torch.nn.Module, optimizer: torch.optim.Optimizer, train: TrainConfig, env: DistEnv,
                         autocast: bool = False):
    if train.precision == "fp16" and env.device.type == "cpu":
        raise InputError("train.precision=fp16: DeepSpeed refuses fp16 on CPU; use bf16 or fp32 there")
    _prepare_cpu()
    set_single_process_env()
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(
        model=module, optimizer=optimizer, config=build_ds_config(train, env.world_size, autocast),
        dist_init_required=None,
    )
    if train.precision in ("bf16", "fp16") and not (autocast and train.precision == "bf16"):
        # DeepSpeed casts parameters only; buffers that meet them in a matmul or a norm
        # (spectral-norm u/v, BigGAN's stored BN statistics) must follow.
        dtype = next(engine.module.parameters()).dtype
        for buf in engine.module.buffers():
            if buf.is_floating_point():
                buf.data = buf.data.to(dtype)
    return engine
