"""Rank-0 output: TensorBoard scalars and image sheets, a log file, progress bars.

Other ranks get a NullLogger with the same methods, so loops call the logger
unconditionally instead of sprinkling ``if rank == 0``.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
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


SHEET_PAD = 2  # make_grid's padding between tiles
MIN_LABELLED_TILE = 64  # tiles are upsampled (nearest) to at least this many pixels when the sheet has titles


def make_sheet(columns: list[torch.Tensor], unit: list[bool] | None = None, upsample: int = 1,
               titles: list[str] | None = None, row_labels: list[str] | None = None) -> torch.Tensor:
    """A grid with one row per class and one column per entry of ``columns`` (each B×C×H×W), 3×H×W in [0, 1].

    With ``titles`` (one per column) and ``row_labels`` (one per row) the grid gets a header strip and a
    left margin with that text, so a sheet read on its own says what it shows; small tiles are then enlarged
    (nearest) to at least MIN_LABELLED_TILE pixels so the titles fit."""
    unit = unit or [False] * len(columns)
    if titles or row_labels:
        side = columns[0].shape[-1] * upsample
        upsample *= max(1, -(-MIN_LABELLED_TILE // side))
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
    grid = torchvision.utils.make_grid(tiles, nrow=len(cols), padding=SHEET_PAD, pad_value=1.0)
    if titles or row_labels:
        grid = label_grid(grid, cols[0].shape[-1], titles or [], row_labels or [])
    return grid


def label_grid(grid: torch.Tensor, tile: int, titles: list[str], row_labels: list[str]) -> torch.Tensor:
    """Add a header strip (column titles, centred over their tiles) and a left margin (row labels, centred on
    their rows) in black on white around a make_grid grid of square ``tile``-pixel tiles."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def size(text: str) -> tuple[int, int]:
        x0, y0, x1, y1 = probe.textbbox((0, 0), text, font=font)
        return x1 - x0, y1 - y0

    text_h = max([size(t)[1] for t in titles + row_labels] or [0])
    top = text_h + 6 if titles else 0
    left = max([size(t)[0] for t in row_labels] or [0]) + 8 if row_labels else 0
    h, w = grid.shape[1:]
    canvas = Image.new("RGB", (w + left, h + top), "white")
    body = (grid.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    canvas.paste(Image.fromarray(body), (left, top))
    draw = ImageDraw.Draw(canvas)
    step = tile + SHEET_PAD
    for j, text in enumerate(titles):
        tw, _ = size(text)
        draw.text((left + SHEET_PAD + j * step + (tile - tw) // 2, 2), text, fill="black", font=font)
    for i, text in enumerate(row_labels):
        tw, th = size(text)
        draw.text((left - tw - 4, top + SHEET_PAD + i * step + (tile - th) // 2), text, fill="black", font=font)
    return torch.from_numpy(np.asarray(canvas).copy()).permute(2, 0, 1).float() / 255


def engine_scalars(engines: dict) -> dict[str, float]:
    """TensorBoard scalars of the optimizers: ``lr/<group>`` for every parameter group (its "name", else
    ``<engine>_<i>``) and ``grad_norm/<engine>`` (L2 norm of all gradients at the last update)."""
    out: dict[str, float] = {}
    for name, engine in engines.items():
        groups = engine.optimizer.param_groups
        for i, g in enumerate(groups):
            label = g.get("name") or (name if len(groups) == 1 else f"{name}_{i}")
            out[f"lr/{label}"] = float(g["lr"])
        norm = getattr(engine, "grad_norm", None)
        if norm is not None:
            out[f"grad_norm/{name}"] = float(norm)
    return out


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


class DeviceSums:
    """Means over an update's micro-steps of scalar loss tensors, kept on the device and read back in one host
    sync when a log line, a checkpoint or the summary needs them: a ``.item()`` per term and micro-step stalls
    a launch-bound GPU loop (batch 1) every few kernels. Summed in float64, as float(.item()) sums were, so
    the values are the same to the bit."""

    def __init__(self, micro_steps: int):
        self.micro_steps = micro_steps
        self.sums: dict[str, torch.Tensor | float] = {}

    def add(self, name: str, value: torch.Tensor | float) -> None:
        v = value.detach().double() if torch.is_tensor(value) else float(value)
        self.sums[name] = self.sums.get(name, 0.0) + v / self.micro_steps

    def read(self) -> dict[str, float]:
        """Plain floats of every sum (one device-to-host copy for all tensors)."""
        names = [k for k, v in self.sums.items() if torch.is_tensor(v)]
        values = torch.stack([self.sums[k].reshape(()) for k in names]).tolist() if names else []
        out = {k: float(v) for k, v in self.sums.items() if not torch.is_tensor(v)}
        out.update(zip(names, values))
        return {k: out[k] for k in self.sums}


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
