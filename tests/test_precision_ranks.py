"""Where precision=auto rests on a timed probe (AVX-512 BF16 without AMX), two ranks of one job could answer
differently; every rank takes rank 0's answer before the run's config is written. Two real processes over
gloo, each given other capabilities (what two probes on a busy machine could measure)."""
import json

import torch.multiprocessing as mp

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "debug" / "mnist_tiny.yaml"

# what each rank's decision reads: rank 0 measured bf16 2.0x faster, rank 1 (busy) only 1.1x
SPEEDUP = {0: 2.0, 1: 1.1}


def _rank(rank, init_file, out_dir, out):
    import torch.distributed as dist

    import cgn_dist.precision as precision
    from cgn_dist.config import load_config
    from cgn_dist.train.run_dir import resolve_run_precisions

    caps = {"type": "cpu", "cuda_bf16": False, "amx": False, "avx512_bf16": True, "avx2": True,
            "isa_cap": None, "bf16_speedup": SPEEDUP[rank]}
    precision.device_capabilities = lambda device: caps
    alone = precision.decide_precision("auto", caps)[0]
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        cfg = load_config(TINY, [f"out_dir={out_dir}", "name=r", "mnist.fast_update=true"])
        resolve_run_precisions(cfg, "cpu")
        with open(f"{out}.{rank}", "w") as f:
            json.dump({"alone": alone, "train": cfg.train.precision, "mnist": cfg.mnist.precision}, f)
    finally:
        dist.destroy_process_group()


def test_ranks_that_measured_differently_all_take_rank_0s_answer(tmp_path):
    out = tmp_path / "result"
    mp.start_processes(_rank, args=(str(tmp_path / "init"), str(tmp_path / "runs"), str(out)), nprocs=2,
                       start_method="spawn")
    got = [json.loads((tmp_path / f"result.{r}").read_text()) for r in range(2)]
    assert [g["alone"] for g in got] == ["bf16", "fp32"]  # alone they would differ (1.1 < the 1.25 margin)
    assert all(g["mnist"] == "bf16" and g["train"] == got[0]["train"] for g in got), got


def test_without_a_process_group_the_values_pass_through():
    from cgn_dist.distributed.env import agree_with_rank0

    assert agree_with_rank0(["bf16", "auto"], ("auto", "fp32", "bf16")) == ["bf16", "auto"]
