"""CGN training under Ray Train on a simulated two-node cluster: DeepSpeed in each worker,
checkpoints reported to Ray, and a killed worker restarted from the latest checkpoint."""
import sys
import threading
from pathlib import Path

import pytest
import torch

from cgn_dist.config import load_config
from cgn_dist.launchers.ray_train import checkpoint_from_pointer, train_with_ray
from cgn_dist.train.mnist import train_mnist
from cgn_dist.train.checkpoint import list_checkpoints

sys.path.insert(0, str(Path(__file__).parent))
from ray_helpers import kill_a_train_worker_after_first_checkpoint, two_node_cluster  # noqa: E402

TINY = Path(__file__).resolve().parents[1] / "configs" / "debug" / "mnist_tiny.yaml"
pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]


@pytest.fixture(scope="module")
def two_nodes():
    with two_node_cluster() as cluster:
        yield cluster


def _cfg(tmp_path, name, *extra):
    return load_config(TINY, [f"out_dir={tmp_path}", f"name={name}", "train.engine=deepspeed",
                              "distributed.num_workers=2", "distributed.cpus_per_worker=0.5",
                              "train.max_steps=8", "train.checkpoint_every=2", *extra])


def _generator(run_dir: Path, step: int) -> dict:
    f = run_dir / "checkpoints" / f"step_{step:07d}" / "generator" / "mp_rank_00_model_states.pt"
    return torch.load(f, weights_only=False)["module"]


def test_killed_worker_restarts_from_checkpoint_and_matches_uninterrupted(two_nodes, tmp_path):
    clean = train_with_ray(_cfg(tmp_path, "clean"))
    assert clean["step"] == 8
    # One copy of each checkpoint: Ray Train's storage holds pointers (bytes, not models) to the run dir's
    # checkpoints, pruned like them to train.keep_last.
    keep = load_config(TINY).train.keep_last
    run_ckpts = [d for _, d in list_checkpoints(Path(clean["run_dir"]))]
    assert len(run_ckpts) == keep and clean["checkpoint"] == str(run_ckpts[-1])
    ray_ckpts = sorted(d for d in (tmp_path / "ray" / "clean").glob("checkpoint_*") if d.is_dir())
    assert len(ray_ckpts) == keep
    assert sum(f.stat().st_size for d in ray_ckpts for f in d.rglob("*") if f.is_file()) < 1024 * keep
    assert sorted(checkpoint_from_pointer(d) for d in ray_ckpts) == sorted(run_ckpts)
    # In-process and Ray Train runs give the same summary keys.
    local = train_mnist(load_config(TINY, [f"out_dir={tmp_path}", "name=local", "train.max_steps=8",
                                           "train.engine=deepspeed", "train.checkpoint_every=2"]))
    assert set(local) == set(clean)

    cfg = _cfg(tmp_path, "faulty", "distributed.max_failures=2")
    killed, stop = [], threading.Event()
    watcher = threading.Thread(target=kill_a_train_worker_after_first_checkpoint,
                               args=(cfg.run_dir.resolve(), killed, stop), daemon=True)
    watcher.start()
    try:
        faulty = train_with_ray(cfg)
    finally:
        stop.set()
    assert killed, "no Ray Train worker was found to kill"
    assert faulty["step"] == 8
    log_txt = (Path(faulty["run_dir"]) / "log.txt").read_text()
    restarts = log_txt.count("resumed from")
    print(f"killed worker pid {killed[0]}; restarts observed: {restarts}; final step {faulty['step']}")
    assert restarts == 1, log_txt
    a, b = _generator(Path(clean["run_dir"]), 8), _generator(Path(faulty["run_dir"]), 8)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)

    # The same run name again says it is complete (nothing left to do) instead of starting over.
    again = train_with_ray(cfg)
    assert again == faulty
    log_txt = (Path(faulty["run_dir"]) / "log.txt").read_text()
    assert log_txt.count("resumed from") == 1 and log_txt.count("is complete (update 8 of 8)") == 1
