"""train.grad_reduction: one update's gradient is the mean (default) or the sum (the authors' ImageNet code)
of the accumulated micro batches, under either engine; checked against hand-computed SGD updates."""
import pytest
import torch

from cgn_dist.config import TrainConfig
from cgn_dist.distributed.engine import build_engine
from cgn_dist.distributed.env import DistEnv


@pytest.mark.parametrize("engine", ["torch", "deepspeed"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_accumulated_gradient_is_mean_or_sum(engine, reduction):
    # loss_i = w * x_i, so d loss_i / dw = x_i: micro batches 1, 2, 4 give 7 (sum) or 7/3 (mean).
    w = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        w.weight.fill_(10.0)
    eng = build_engine(w, torch.optim.SGD(w.parameters(), lr=0.5),
                       TrainConfig(engine=engine, grad_accum=3, grad_reduction=reduction, micro_batch_size=1),
                       DistEnv(0, 1, 0, torch.device("cpu")))
    for x in (1.0, 2.0, 4.0):
        eng.backward(eng(torch.tensor([[x]])).sum())
        eng.step()
    want = 10.0 - 0.5 * (7.0 if reduction == "sum" else 7.0 / 3)
    assert eng.global_steps == 1
    assert eng.module.weight.item() == pytest.approx(want, rel=1e-6)


def _two_process_worker(rank, port, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        for engine in ("torch", "deepspeed"):
            for reduction in ("mean", "sum"):
                w = torch.nn.Linear(1, 1, bias=False)
                with torch.no_grad():
                    w.weight.fill_(10.0)
                eng = build_engine(w, torch.optim.SGD(w.parameters(), lr=0.5),
                                   TrainConfig(engine=engine, grad_accum=2, grad_reduction=reduction,
                                               micro_batch_size=1),
                                   DistEnv(rank, 2, rank, torch.device("cpu")), ddp=True)
                for x in ((1.0, 2.0), (4.0, 8.0))[rank]:
                    eng.backward(eng(torch.tensor([[x]])).sum())
                    eng.step()
                out[(rank, engine, reduction)] = eng.module.weight.item()
    finally:
        from cgn_dist.distributed.env import destroy_process_group

        destroy_process_group()  # a barrier first: without it one rank sometimes aborts at exit (SIGABRT)


@pytest.mark.slow
def test_two_processes_mean_or_sum_over_the_global_batch():
    # Micro batches 1, 2 (rank 0) and 4, 8 (rank 1), over gloo: the global gradient is 15 (sum) or 15/4.
    import torch.multiprocessing as mp

    from cgn_dist.distributed.env import free_port

    out = mp.Manager().dict()
    mp.spawn(_two_process_worker, args=(free_port(), out), nprocs=2, join=True)
    for engine in ("torch", "deepspeed"):
        for reduction, grad in (("mean", 15.0 / 4), ("sum", 15.0)):
            for rank in (0, 1):
                key = (rank, engine, reduction)
                assert out[key] == pytest.approx(10.0 - 0.5 * grad, rel=1e-6), key
