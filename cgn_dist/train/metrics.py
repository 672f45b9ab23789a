"""Rank-0 output: TensorBoard scalars and image sheets, a log file, progress bars.

Other ranks get a NullLogger with the same methods, so loops call the logger
unconditionally instead of sprinkling ``if rank == 0``.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
import torchvision

log = logging.getLogger("cgn_dist")


def setup_logging(run_dir: Path | None = None, is_main: bool = True) -> None:
    level = logging.INFO if is_main else logging.WARNING
    root = logging.getLogger("cgn_dist")
    root.setLevel(level)
    if not any(isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler) for h in root.handlers):
        h = logging.StreamHandler()
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        root.addHandler(h)
    if run_dir is not None and is_main:
        path = str(Path(run_dir) / "log.txt")
        if not any(isinstance(h, logging.FileHandler) and h.baseFilename == str(Path(path).resolve()) for h in root.handlers):
            fh = logging.FileHandler(path)
            fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
            root.addHandler(fh)


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images to [0, 1] for display."""
    return ((x.detach().float().cpu() + 1) / 2).clamp(0, 1)


def make_sheet(columns: list[torch.Tensor], unit: list[bool] | None = None, upsample: int = 1) -> torch.Tensor:
    """A grid with one row per class and one column per entry of ``columns`` (each B×C×H×W)."""
    unit = unit or [False] * len(columns)
    cols = []
    for x, is_unit in zip(columns, unit):
        x = x.detach().float().cpu()
        x = x.clamp(0, 1) if is_unit else to_unit(x)
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        if upsample > 1:
            x = torch.nn.functional.interpolate(x, scale_factor=upsample, mode="nearest")
        cols.append(x)
    b = cols[0].shape[0]
    tiles = torch.stack(cols, dim=1).reshape(b * len(cols), *cols[0].shape[1:])
    return torchvision.utils.make_grid(tiles, nrow=len(cols), padding=2, pad_value=1.0)


class Logger:
    """TensorBoard + log file; created on rank 0 only."""

    def __init__(self, run_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.run_dir = Path(run_dir)
        self.tb = SummaryWriter(str(self.run_dir / "tb"))

    def scalars(self, values: dict[str, float], step: int) -> None:
        for k, v in values.items():
            self.tb.add_scalar(k, float(v), step)

    def image(self, tag: str, grid: torch.Tensor, step: int, save: bool = True) -> None:
        self.tb.add_image(tag, grid, step)
        if save:
            path = self.run_dir / "samples" / f"{tag.replace('/', '_')}_{step:07d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            torchvision.utils.save_image(grid, path)

    def info(self, msg: str) -> None:
        log.info(msg)

    def flush(self) -> None:
        self.tb.flush()

    def close(self) -> None:
        self.tb.close()


class NullLogger:
    """Same surface as Logger, does nothing (non-zero ranks)."""

    def __getattr__(self, name):
        return lambda *a, **k: None


def build_logger(run_dir: Path, is_main: bool) -> Logger | NullLogger:
    return Logger(run_dir) if is_main else NullLogger()


class Throughput:
    """Samples/s over all workers, counted from the end of the first update (start-up excluded)."""

    def __init__(self, samples_per_update: int):
        self.samples_per_update = samples_per_update
        self.t0: float | None = None
        self.updates = 0

    def update(self) -> float:
        now = time.perf_counter()
        if self.t0 is None:
            self.t0 = now
            return 0.0
        self.updates += 1
        return self.updates * self.samples_per_update / (now - self.t0)
