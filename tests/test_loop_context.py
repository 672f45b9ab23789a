"""Every training loop closes what it opened on every way out: a failing update in a 2-process gloo run
leaves no process group behind and no TensorBoard file held open (before the loop context, both leaked)."""
import multiprocessing as mp
import os
from pathlib import Path

import pytest

from cgn_dist.distributed.env import free_port

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "debug" / "mnist_tiny.yaml"


def _rank(rank: int, port: int, out: str, q) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    import psutil
    import torch

    import cgn_dist.train.mnist as loop
    from cgn_dist.config import load_config

    def broken_update(self, *args, **kwargs):  # a bug in the middle of the first update
        raise RuntimeError("broken update")

    loop.MnistUpdate.__call__ = broken_update
    cfg = load_config(TINY, [f"out_dir={out}", "name=r", "train.device=cpu"])
    try:
        loop.train_mnist(cfg)
        q.put((rank, "no error", None, None))
    except Exception as e:  # any error reaches the test (an unexpected one fails it at once, not by timeout)
        held = [f.path for f in psutil.Process().open_files() if "/tb/" in f.path]
        q.put((rank, str(e), torch.distributed.is_initialized(), held))


def test_a_failing_update_closes_the_group_and_the_writer(tmp_path):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank, args=(r, port, str(tmp_path), q)) for r in range(2)]
    for p in procs:
        p.start()
    got = sorted(q.get(timeout=240) for _ in procs)
    for p in procs:
        p.join(60)
    assert [g[1] for g in got] == ["broken update", "broken update"], got
    assert [g[2] for g in got] == [False, False], got  # the loop's own group is gone
    assert got[0][3] == [], got  # rank 0's event file is closed
    assert any((tmp_path / "r" / "tb").iterdir())  # ... and it was open: the writer had started
