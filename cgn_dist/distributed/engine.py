"""One small interface over the two ways a model is trained: plain torch or DeepSpeed.

Both count micro steps and update only at the accumulation boundary. The gradient of
one update is the mean over the accumulated micro batches and the processes
(``train.grad_reduction=mean``, DeepSpeed's convention) or their sum (``sum``: what the
authors' ImageNet code does, batch 1 x 4000 backward calls per Adam step; Adam's eps
makes the two differ slightly). Loops therefore read the same under either engine.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch
from torch import nn

from cgn_dist.config import TrainConfig
from cgn_dist.distributed.env import DistEnv
from cgn_dist.errors import InputNotFound
from cgn_dist.precision import resolve_precision

log = logging.getLogger(__name__)


class TorchEngine:
    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, grad_accum: int,
                 env: DistEnv, precision: str = "fp32", ddp: bool | None = None, grad_reduction: str = "mean"):
        self.module = module.to(env.device)
        self.optimizer = optimizer
        self.grad_accum = grad_accum
        self.micro_steps = 0
        self.global_steps = 0
        self.grad_norm: float | None = None  # L2 norm of all gradients at the last update (for TensorBoard)
        self.env = env
        self.dtype = torch.bfloat16 if precision == "bf16" else None
        use_ddp = env.is_distributed if ddp is None else ddp
        self.forward_module = (
            nn.parallel.DistributedDataParallel(self.module, device_ids=[env.device] if env.device.type == "cuda" else None)
            if use_ddp else self.module
        )
        self.grad_sum = grad_reduction == "sum"
        # DDP averages over processes: a sum multiplies that back, in the loss before backward.
        self.sum_factor = env.world_size if use_ddp else 1

    def __call__(self, *args, **kwargs):
        return self.forward_module(*args, **kwargs)

    def call_module(self, *args, **kwargs):
        """The raw module, outside DDP's hooks: for a forward whose gradient this engine must not sync."""
        return self.module(*args, **kwargs)

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.env.device.type, dtype=self.dtype)

    def is_boundary(self) -> bool:
        return (self.micro_steps + 1) % self.grad_accum == 0

    def backward(self, loss: torch.Tensor) -> None:
        sync = self.is_boundary() or not isinstance(self.forward_module, nn.parallel.DistributedDataParallel)
        ctx = contextlib.nullcontext() if sync else self.forward_module.no_sync()
        with ctx:
            if not self.grad_sum:
                loss = loss / self.grad_accum
            elif self.sum_factor > 1:
                loss = loss * self.sum_factor
            loss.backward()

    def step(self) -> None:
        if self.is_boundary():
            self.grad_norm = _grad_norm(p.grad for g in self.optimizer.param_groups for p in g["params"])
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.global_steps += 1
        self.micro_steps += 1

    def save(self, directory: Path, name: str) -> None:
        if self.env.is_main:
            torch.save({"module": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                        "micro_steps": self.micro_steps, "global_steps": self.global_steps},
                       Path(directory) / f"{name}.pt")

    def load(self, directory: Path, name: str) -> None:
        state = torch.load(Path(directory) / f"{name}.pt", map_location=self.env.device, weights_only=True)
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.micro_steps, self.global_steps = state["micro_steps"], state["global_steps"]


def _grad_norm(grads) -> float | None:
    """L2 norm of all the given gradients (None entries skipped); None when there are none."""
    norms = [torch.linalg.vector_norm(g.float()) for g in grads if g is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else None


def _cast(obj, dtype):
    if isinstance(obj, torch.Tensor) and obj.is_floating_point():
        return obj.to(dtype)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cast(o, dtype) for o in obj)
    if isinstance(obj, dict):
        return {k: _cast(v, dtype) for k, v in obj.items()}
    return obj


class DeepSpeedEngine:
    """Thin adapter so a DeepSpeed engine offers the TorchEngine surface.

    Under bf16/fp16 DeepSpeed casts the module's weights but not its inputs, and the frozen
    networks around it (teacher, U²-Net, VGG16) stay fp32: floating inputs are cast to the
    engine's dtype and outputs back to fp32 at this boundary.
    """

    def __init__(self, engine, grad_reduction: str = "mean", world_size: int = 1):
        self.engine = engine
        self.grad_sum = grad_reduction == "sum"
        self.world_size = world_size
        self.module = engine.module
        self.optimizer = engine.optimizer
        self.dtype = next(engine.module.parameters()).dtype

    def __call__(self, *args, **kwargs):
        return self._boundary(self.engine, args, kwargs)

    def call_module(self, *args, **kwargs):
        """The raw module, outside the engine's hooks (its parameters are frozen for this forward)."""
        return self._boundary(self.module, args, kwargs)

    def _boundary(self, fn, args, kwargs):
        if self.dtype == torch.float32:
            return fn(*args, **kwargs)
        return _cast(fn(*_cast(args, self.dtype), **_cast(kwargs, self.dtype)), torch.float32)

    @property
    def forward_module(self):
        return self

    def autocast(self):
        # DeepSpeed casts the module itself, or autocasts inside its forward (its torch_autocast section)
        return contextlib.nullcontext()

    @property
    def micro_steps(self) -> int:
        return self.engine.micro_steps

    @property
    def global_steps(self) -> int:
        return self.engine.global_steps

    def is_boundary(self) -> bool:
        return self.engine.is_gradient_accumulation_boundary()

    @property
    def grad_norm(self) -> float | None:
        """DeepSpeed's global gradient norm of the last update where it computes one, else ours from the
        parameters' gradients (ZeRO 0/1; None under ZeRO 2, whose gradients are partitioned)."""
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else getattr(self, "_grad_norm", None)

    def backward(self, loss: torch.Tensor) -> None:
        if self.grad_sum:  # DeepSpeed divides by the accumulation steps and averages over processes
            self.engine.backward(loss * self.world_size if self.world_size > 1 else loss, scale_wrt_gas=False)
        else:
            self.engine.backward(loss)

    def step(self) -> None:
        if self.is_boundary():
            self._grad_norm = _grad_norm(p.grad for p in self.module.parameters())
        self.engine.step()

    def save(self, directory: Path, name: str) -> None:
        # Every rank writes its part (ZeRO shards the optimizer state).
        self.engine.save_checkpoint(str(directory), tag=name, save_latest=False)

    def load(self, directory: Path, name: str) -> None:
        path, _ = self.engine.load_checkpoint(str(directory), tag=name)
        if path is None:
            raise InputNotFound(f"no DeepSpeed checkpoint {name!r} under {directory}")


def resolve_train_precision(train: TrainConfig, device, recorded: str | None = None, autocast: bool = False) -> None:
    """train.precision=auto -> bf16 where the device runs it faster, else fp32 (cgn_dist.precision), in place;
    ``recorded``: what the run being resumed used, kept. ``autocast``: DeepSpeed's bf16 will be autocast
    over fp32 weights (fp32 gradients), so ZeRO-0 with accumulation may use it."""
    if train.precision != "auto":
        return
    if recorded is None and train.engine == "deepspeed" and train.zero_stage == 0 and train.grad_accum > 1 \
            and not autocast:
        # bf16 would sum the micro-steps in bf16 there, which initialize_deepspeed refuses
        train.precision = "fp32"
        log.info("train.precision: fp32 (DeepSpeed ZeRO-0 with accumulation sums gradients in bf16; "
                 "train.zero_stage=1 allows bf16 with fp32 accumulation)")
        return
    train.precision = resolve_precision("auto", device, "train.precision", recorded)


def build_engine(module: nn.Module, optimizer: torch.optim.Optimizer, train: TrainConfig, env: DistEnv,
                 ddp: bool | None = None, bf16_autocast: bool = False):
    """Wrap ``module`` + ``optimizer`` in the engine ``train.engine`` names (an ``auto`` precision not yet
    resolved by the run directory is resolved here, for this process's device).

    ``bf16_autocast``: under DeepSpeed, bf16 is torch.autocast over the fp32 module rather than DeepSpeed's
    cast of the whole module; for models with BatchNorm, whose weights and running statistics must stay
    fp32 (the torch engine always autocasts)."""
    resolve_train_precision(train, env.device, autocast=bf16_autocast)
    if train.engine == "torch":
        return TorchEngine(module, optimizer, train.grad_accum, env, train.precision, ddp=ddp,
                           grad_reduction=train.grad_reduction)
    from cgn_dist.distributed.deepspeed import initialize_deepspeed

    return DeepSpeedEngine(initialize_deepspeed(module.to(env.device), optimizer, train, env, bf16_autocast),
                           train.grad_reduction, env.world_size)
