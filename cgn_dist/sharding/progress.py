"""What a person watches during generation: a tqdm bar in images/s and a TensorBoard image grid."""
from __future__ import annotations

import io
from typing import Any, Callable, Sequence

import numpy as np


class _NullProgress:
    def update_shard(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


class _ShardProgress:
    def __init__(self, total: int, initial: int, n_shards: int, shards_done: int):
        from cgn_dist.progress import progress_bar
        self.n_shards, self.shards_done = n_shards, shards_done
        # smoothing=0: the rate is the run's average images/s, not the last shard's burst.
        self.bar = progress_bar(total=total, initial=initial, unit="img", unit_scale=total >= 10_000, smoothing=0,
                                desc="generate", dynamic_ncols=True)
        self._postfix()

    def _postfix(self) -> None:
        self.bar.set_postfix_str(f"shards {self.shards_done}/{self.n_shards}")

    def update_shard(self, n: int) -> None:
        self.shards_done += 1
        self.bar.update(n)
        self._postfix()

    def close(self) -> None:
        self.bar.close()


def make_progress(total: int, initial: int, n_shards: int, shards_done: int, enabled: bool = True):
    """A per-shard progress bar (``update_shard(n)``, ``close()``); a do-nothing one when disabled."""
    return _ShardProgress(total, initial, n_shards, shards_done) if enabled else _NullProgress()


# --- TensorBoard grids --------------------------------------------------------------------------------------

def log_shard_grid(writer: Any, images: Sequence[np.ndarray], step: int, tag: str = "generate/samples",
                   nrow: int = 8) -> None:
    """Log HxWx3 uint8 images as one grid image to a TensorBoard SummaryWriter at ``step``."""
    if not len(images):
        return
    import torch
    from torchvision.utils import make_grid
    batch = torch.stack([torch.from_numpy(np.array(_rgb(im), copy=True)).permute(2, 0, 1) for im in images])
    grid = make_grid(batch, nrow=nrow, padding=2, pad_value=255)
    writer.add_image(tag, grid, global_step=step, dataformats="CHW")


def _rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[:, :, None]
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    return image[:, :, :3]


def decode_image(data: bytes) -> np.ndarray:
    from PIL import Image
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def first_images(tar_path: str, max_images: int = 16, exts: Sequence[str] = ("jpg", "png", "jpeg")) -> list[np.ndarray]:
    """Decode the main image of the first ``max_images`` samples of a shard."""
    from cgn_dist.data.shards import iter_tar_samples
    out = []
    for sample in iter_tar_samples(tar_path):
        ext = next((e for e in exts if e in sample), None)
        if ext is not None:
            out.append(decode_image(sample[ext]))
        if len(out) >= max_images:
            break
    return out


def grid_callback(writer: Any, every: int = 10, max_images: int = 16, tag: str = "generate/samples",
                  ) -> Callable[[dict[str, Any]], None]:
    """An ``on_shard_done`` hook that logs a grid of the first images of the first and of every ``every``-th
    finished shard, at step = number of shards finished so far in this run."""
    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    finished = 0

    def on_shard_done(stats: dict[str, Any]) -> None:
        nonlocal finished
        finished += 1
        if finished == 1 or finished % every == 0:  # the first one early, to catch a broken run soon
            log_shard_grid(writer, first_images(stats["path"], max_images), step=finished, tag=tag)
            writer.add_scalar(f"{tag}/shard_seconds", stats["durations_s"]["total"], finished)

    return on_shard_done
