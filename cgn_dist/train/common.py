"""What both training loops share: per-update seeds and the reporter a launcher hands them.

A loop never knows which launcher started it (a plain call, torchrun/deepspeed, Ray Train). The launcher
passes a ``Reporter``: the loop asks it once for a checkpoint to resume from and tells it about every
checkpoint it writes. The default ``NullReporter`` does neither, so the run dir alone decides resumption.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cgn_dist import interrupts


def step_seed(seed: int, rank: int, step: int, micro: int = 0) -> int:
    """A 32-bit seed for one (micro) update; independent streams per (seed, rank, step, micro)."""
    return int(np.random.SeedSequence([seed, rank, step, micro]).generate_state(1)[0])


class Reporter:
    """Checkpoint and metrics hand-off from a training loop to its launcher. The base class does nothing."""

    def resume_checkpoint(self) -> Path | None:
        """A checkpoint the launcher wants the loop to resume from (e.g. after a worker restart), else None."""
        return None

    def report(self, step: int, metrics: dict[str, float], checkpoint_dir: Path | None, is_main: bool) -> None:
        """Called by every rank right after the checkpoint of ``step`` is complete on disk."""

    def stop_requested(self) -> int | None:
        """A signal number when the launcher asks the loop to stop at its next safe point (the user pressed
        Ctrl-C at a driver in another process), else None."""
        return None


NullReporter = Reporter


def stop_requested(device, reporter: Reporter | None = None) -> int | None:
    """The signal asking this run to stop (interrupts.requested, or the launcher's), agreed on by every rank:
    a signal reaches the processes of a job at slightly different updates, and the checkpoint it leads to is
    written by all of them together, at the same update."""
    signum = interrupts.requested() or (reporter.stop_requested() if reporter is not None else None) or 0
    d = torch.distributed
    if d.is_available() and d.is_initialized() and d.get_world_size() > 1:
        flag = torch.tensor([signum], dtype=torch.int64,
                            device=device if d.get_backend() == "nccl" else "cpu")
        d.all_reduce(flag, op=d.ReduceOp.MAX)
        signum = int(flag.item())
    return signum or None
