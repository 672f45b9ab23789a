"""The process group on GPUs serves CPU tensors too: evaluation counts are summed as CPU tensors, which a
plain NCCL group refuses. Here, with gloo standing in for NCCL (no GPU), a group declared per device as the
product declares it sums CPU counts across two real processes, and a group that serves only CUDA fails on
the same call: the failure the declaration prevents."""
import json

import torch.multiprocessing as mp

from cgn_dist.distributed.env import process_group_backend


def _rank(rank, init_file, backend, out):
    import torch.distributed as dist

    from cgn_dist.classifier.imagenet.evaluation import sum_counts

    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        try:
            got = sum_counts({"correct": 3 + rank, "n": 10}, ["correct", "n"])
            result = {"ok": got}
        except Exception as e:  # noqa: BLE001 - reported to the parent
            result = {"error": f"{type(e).__name__}: {e}"}
        with open(f"{out}.{rank}", "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()


def _run(tmp_path, backend):
    out = tmp_path / "result"
    mp.start_processes(_rank, args=(str(tmp_path / "init"), backend, str(out)), nprocs=2, start_method="spawn")
    return [json.loads((tmp_path / f"result.{r}").read_text()) for r in range(2)]


def test_the_gpu_group_declares_a_cpu_backend_too():
    assert process_group_backend("cuda") == "cpu:gloo,cuda:nccl"
    assert process_group_backend("cpu") == "gloo"


def test_cpu_counts_sum_on_a_group_declared_per_device(tmp_path):
    backend = process_group_backend("cuda").replace("nccl", "gloo")  # gloo stands in for NCCL on CPU
    assert _run(tmp_path, backend) == [{"ok": {"correct": 7, "n": 20}}] * 2  # 3 + 4 by hand


def test_a_group_serving_only_cuda_refuses_the_cpu_counts(tmp_path):
    results = _run(tmp_path, "cuda:gloo")  # what plain "nccl" is: no backend for CPU tensors
    assert all("error" in r for r in results), results

