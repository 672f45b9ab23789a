"""Where this process sits in a distributed job, read in one place.

Launchers (torchrun, the deepspeed launcher, Ray Train) all export the same
RANK / WORLD_SIZE / LOCAL_RANK variables; without them we are a single process
and nothing else in cgn_dist needs to care.
"""
from __future__ import annotations

import os
import random
import socket
from dataclasses import dataclass

import torch

from cgn_dist.errors import SetupError


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def pick_device(choice: str = "auto", local_rank: int = 0) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise SetupError("train.device=cuda but no CUDA device is visible; use train.device=cpu or auto")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def rank_world() -> tuple[int, int]:
    """(rank, world size): the torch.distributed group's when one is up, else the launcher's RANK /
    WORLD_SIZE, else a single process (0, 1). The one place cgn_dist reads them."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def is_main_process() -> bool:
    return rank_world()[0] == 0


def read_env(device: str = "auto") -> DistEnv:
    """Rank, world, local rank and device of this process (rank_world's rank and world)."""
    rank, world = rank_world()
    grouped = torch.distributed.is_available() and torch.distributed.is_initialized()
    local = int(os.environ.get("LOCAL_RANK", rank if grouped else 0))
    return DistEnv(rank, world, local, pick_device(device, local))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now, for a process group's rendezvous. Drawn between Ray's worker
    ports (10002-19999) and Linux's ephemeral range (32768-60999): a port the OS hands to some other socket
    (a Ray worker's, say) cannot take it between this check and the group binding it."""
    draw = random.SystemRandom()  # not the seeded global generators: a run's draws must not depend on this
    for _ in range(200):
        port = draw.randint(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # that whole range busy: any port the OS gives
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_group_backend(device_type: str) -> str:
    """The process group's backend for a device type. On GPUs the group serves both devices: NCCL reduces
    CUDA tensors only, and some reductions (evaluation counts, object gathers) are of CPU tensors."""
    return "cpu:gloo,cuda:nccl" if device_type == "cuda" else "gloo"


def init_process_group(env: DistEnv) -> bool:
    """Join the launcher's process group (gloo on CPU; gloo + nccl on GPU); True if this call created it."""
    if not env.is_distributed or torch.distributed.is_initialized():
        return False
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    backend = process_group_backend(env.device.type)
    if env.device.type == "cuda":
        torch.cuda.set_device(env.device)
    torch.distributed.init_process_group(backend, rank=env.rank, world_size=env.world_size)
    return True


def set_single_process_env() -> None:
    """DeepSpeed's initialize wants a process group or these variables (else it reaches for MPI)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))


def destroy_process_group() -> None:
    # Without the barrier, 2-process gloo runs sometimes abort at exit.
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def agree_with_rank0(values: list[str], choices: tuple[str, ...]) -> list[str]:
    """``values`` (each one of ``choices``) as rank 0 has them, on every rank of the process group (unchanged
    without one). For answers each rank works out alone but all must share: a precision chosen by a timed
    probe (cgn_dist.precision) could come out otherwise on a busy rank, and ranks in different precisions
    would train one model on different bytes. A CPU tensor: the group serves CPU tensors on GPUs too."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return list(values)
    codes = torch.tensor([choices.index(v) for v in values], dtype=torch.int64)
    dist.broadcast(codes, src=0)
    return [choices[int(c)] for c in codes]
