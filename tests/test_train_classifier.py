"""The invariant classifier trains on real shards (the ILSVRC-layout photo fixture) + a tiny counterfactual
set with both loss terms, resumes bit for bit mid-epoch, and its torch and DeepSpeed engines agree."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cgn_dist.config import load_config  # noqa: E402
from cgn_dist.data.shards import encode_jpeg, write_json_atomic, write_tar  # noqa: E402
from cgn_dist.data.shard_index import build_wids_index  # noqa: E402
from cgn_dist.classifier.imagenet.train import train_invariant  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from imagenet_fixture import make_imagenet_tree  # noqa: E402
from ray_helpers import kill_a_train_worker_after_first_checkpoint, two_node_cluster  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "debug" / "classifier_tiny.yaml"


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from cgn_dist.ingest.make_shards import run_make_shards

    root = tmp_path_factory.mktemp("data")
    tree = make_imagenet_tree(root / "ILSVRC2012", copies=2, bad=False)
    run_make_shards(load_config(None, [f"shards.root={tree.train}", f"shards.out={root / 'real'}",
                                       "shards.shard_size=5", "train.progress=false"]))
    # counterfactuals: 12 images with (shape, texture, background) classes, as the generator writes them
    rng = np.random.default_rng(0)
    cf, entries = root / "cf", []
    cf.mkdir()
    for s in range(2):
        samples = [(f"{s:06d}_{i:06d}", {"jpg": encode_jpeg(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)),
                                         "json": {"shape_cls": int(c), "texture_cls": int((c * 7) % 1000),
                                                  "bg_cls": int((c * 13) % 1000)}})
                   for i, c in enumerate(rng.integers(0, 1000, 6))]
        write_tar(cf / f"shard-{s:06d}.tar", samples)
        entries.append({"url": f"shard-{s:06d}.tar", "nsamples": 6})
    write_json_atomic(cf / "index.json", build_wids_index(entries))
    return {"real": root / "real", "cf": cf}


def _cfg(tmp_path, shards, name, *extra):
    return load_config(TINY, [f"out_dir={tmp_path}", f"name={name}", f"invariant.real_shards={shards['real']}",
                              f"invariant.cf_shards={shards['cf']}", *extra])


def _weights(run_dir, step, engine="torch"):
    d = Path(run_dir) / "checkpoints" / f"step_{step:07d}"
    if engine == "torch":
        return torch.load(d / "classifier.pt", weights_only=True)["module"]
    return torch.load(d / "classifier" / "mp_rank_00_model_states.pt", weights_only=False)["module"]


def test_trains_with_both_terms_and_resumes_bitwise_mid_epoch(tmp_path, shards):
    full = train_invariant(_cfg(tmp_path, shards, "full", "train.max_steps=7"))
    per_epoch = full["updates_per_epoch"]
    assert per_epoch == 18 // 4 and full["steps"] == 7  # 9 photos x 2 crops, batch 4: 4 updates per epoch
    for term in ("real", "cf_shape", "cf_texture", "cf_bg", "total"):
        assert math.isfinite(full[f"loss/{term}"])
    assert full["mix/cf_per_real"] == pytest.approx(1.0)
    # resume mid-epoch 0 (update 3) and run across the epoch boundary to update 7
    train_invariant(_cfg(tmp_path, shards, "part", "train.max_steps=3"))
    resumed = train_invariant(_cfg(tmp_path, shards, "part", "train.max_steps=7"))
    assert "resumed from" in (Path(resumed["run_dir"]) / "log.txt").read_text()
    a, b = _weights(full["run_dir"], 7), _weights(resumed["run_dir"], 7)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    first = _weights(full["run_dir"], 5)  # weights moved: both heads and trunk are trained
    assert not torch.equal(first["heads.bg.weight"], a["heads.bg.weight"])
    assert not torch.equal(first["backbone.conv1.weight"], a["backbone.conv1.weight"])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ev = EventAccumulator(str(Path(full["run_dir"]) / "tb"))
    ev.Reload()
    tags = set(ev.Tags()["scalars"])
    assert {"loss/real", "loss/cf_shape", "train_top1/cf/texture", "mix/cf_per_real", "perf/images_per_s"} <= tags


def test_evaluations_run_before_training_and_after_each_epoch(tmp_path, shards, shared_ref):
    from cgn_dist.cli import main

    cue = shared_ref / "cue_conflict_sample"
    out = train_invariant(_cfg(tmp_path, shards, "ev", "train.max_steps=4", f"eval.cue_conflict={cue}"))
    ev = Path(out["run_dir"]) / "eval"
    for tag in ("epoch000", "epoch001"):
        assert (ev / f"shape_bias_{tag}.json").is_file() and (ev / f"shape_bias_{tag}.png").is_file()
    # the trained run evaluated later from its run dir (architecture read from the checkpoint: resnet18)
    assert main(["eval", "shape-bias", f"eval.model={out['run_dir']}", f"eval.cue_conflict={cue}",
                 "eval.image_size=32", "eval.batch_size=8", f"eval.out={tmp_path / 'later'}"]) == 0
    later = json.loads((tmp_path / "later" / "shape_bias.json").read_text())["details"]["result"]["per_output"]
    at_4 = json.loads((ev / "shape_bias_epoch001.json").read_text())["details"]["result"]["per_output"]
    assert later == at_4  # the last checkpoint (update 4) is the model evaluated at the end of epoch 1


def test_deepspeed_zero1_fp32_agrees_with_torch_across_an_lr_step(tmp_path, shards):
    # 4 updates per epoch, lr x 0.1 after every epoch: update 5 runs at lr 1e-4 in both engines
    over = ["train.max_steps=5", "invariant.eval_every_epochs=0", "invariant.lr_step_epochs=1", "invariant.lr=0.01"]
    t = train_invariant(_cfg(tmp_path, shards, "t", *over))
    d = train_invariant(_cfg(tmp_path, shards, "d", *over, "train.engine=deepspeed", "train.zero_stage=1"))
    assert t["lr"] == d["lr"] == pytest.approx(1e-3)
    a, b = _weights(t["run_dir"], 5), _weights(d["run_dir"], 5, "deepspeed")
    for k in a:
        torch.testing.assert_close(a[k].float(), b[k].float(), rtol=1e-5, atol=1e-6)


def test_channels_last_training_is_nchw_training(tmp_path, shards, monkeypatch):
    # what CUDA and AVX-512 BF16 CPUs without AMX get (invariant.layout=auto), set: channels-last batches
    # (every convolution's output follows its input), the weights NCHW (a layout DeepSpeed can broadcast)
    import cgn_dist.classifier.imagenet.train as train_module
    from cgn_dist.models.invariant import InvariantClassifier

    # Both runs pool by averaging: max-pooling's ties (flat image regions give equal activations) are broken
    # differently by the NCHW and NHWC kernels, both valid subgradients, and a tie at one update makes the runs
    # part by ~1e-3 in three (seen at 2 of 6 seeds). Without ties the two layouts agree to fp32 rounding.
    build = train_module.build_invariant_classifier

    def build_avg(*args, **kwargs):
        model = build(*args, **kwargs)
        model.backbone.maxpool = torch.nn.AvgPool2d(3, 2, 1)
        return model

    monkeypatch.setattr(train_module, "build_invariant_classifier", build_avg)
    over = ["train.max_steps=3", "invariant.eval_every_epochs=0", "invariant.lr=0.05"]
    a = train_invariant(_cfg(tmp_path, shards, "nchw", *over, "invariant.layout=nchw"))
    layouts = []
    forward = InvariantClassifier.forward

    def spy(self, x):
        layouts.append((x.is_contiguous(memory_format=torch.channels_last),
                        self.backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last)))
        return forward(self, x)

    monkeypatch.setattr(InvariantClassifier, "forward", spy)
    over.append("invariant.layout=channels_last")
    b = train_invariant(_cfg(tmp_path, shards, "cl", *over))
    assert layouts and all(x_cl and not w_cl for x_cl, w_cl in layouts), layouts
    wa, wb = _weights(a["run_dir"], 3), _weights(b["run_dir"], 3)
    assert not torch.equal(_weights(a["run_dir"], 1)["heads.bg.weight"], wa["heads.bg.weight"])  # it trained
    for k in wa:
        torch.testing.assert_close(wb[k].contiguous(), wa[k].contiguous(), rtol=1e-4, atol=1e-5)
    # DeepSpeed too (its start-up broadcast refused channels-last weights: "stride(-1) must be 1")
    layouts.clear()
    c = train_invariant(_cfg(tmp_path, shards, "cl_ds", *over, "train.engine=deepspeed", "train.zero_stage=1"))
    assert layouts and all(x_cl for x_cl, _ in layouts), layouts
    wc = _weights(c["run_dir"], 3, "deepspeed")
    for k in wa:
        torch.testing.assert_close(wc[k].to(wa[k].dtype).contiguous(), wa[k].contiguous(), rtol=1e-4, atol=1e-5)


def test_layout_auto_follows_the_cpu_flags_is_recorded_and_kept_on_resume(tmp_path, shards, monkeypatch):
    """auto: channels-last on an AVX-512 BF16 CPU without AMX, NCHW on AMX and on AVX2 (given flags, as
    decided in cgn_dist.precision.decide_channels_last); the run's config.yaml says which, and a resume on a
    CPU of another class keeps it."""
    import yaml

    import cgn_dist.precision as precision

    def flags(**f):
        monkeypatch.setattr(precision, "cpu_capabilities", lambda probe=False: {"avx512_bf16": False, "amx": False, **f})

    def recorded(run_dir):
        return yaml.safe_load((Path(run_dir) / "config.yaml").read_text())["invariant"]["layout"]

    over = ["train.max_steps=1", "invariant.eval_every_epochs=0", "train.precision=fp32"]
    for name, f, want in [("zen4", {"avx512_bf16": True}, "channels_last"), ("amx", {"avx512_bf16": True, "amx": True},
                          "nchw"), ("avx2", {}, "nchw")]:
        flags(**f)
        assert recorded(train_invariant(_cfg(tmp_path, shards, name, *over))["run_dir"]) == want, name
    flags()  # the channels-last run resumed on an AVX2 CPU: it stays channels-last
    out = train_invariant(_cfg(tmp_path, shards, "zen4", *over[1:], "train.max_steps=2"))
    assert out["step"] == 2 and recorded(out["run_dir"]) == "channels_last"


def test_deepspeed_bf16_zero2_trains_and_evaluates(tmp_path, shards, shared_ref):
    out = train_invariant(_cfg(tmp_path, shards, "bf", "train.max_steps=4", "train.engine=deepspeed",
                                "train.precision=bf16", "train.zero_stage=2",
                                f"eval.cue_conflict={shared_ref / 'cue_conflict_sample'}"))
    assert math.isfinite(out["loss/total"])
    doc = json.loads((Path(out["run_dir"]) / "eval" / "shape_bias_epoch001.json").read_text())
    assert doc["details"]["result"]["per_output"]["shape"]["n"] == 32


def _torchrun(out_dir, shards, engine, name):
    from cgn_dist.distributed.env import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "-m", "cgn_dist.cli", "train", str(TINY), f"out_dir={out_dir}",
           f"name={name}", f"train.engine={engine}", "train.max_steps=3", "train.micro_batch_size=2",
           "invariant.eval_every_epochs=0", f"invariant.real_shards={shards['real']}",
           f"invariant.cf_shards={shards['cf']}"]
    proc = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return _weights(Path(out_dir) / name, 3, engine)


@pytest.fixture(scope="module")
def ddp_reference(tmp_path_factory, shards):
    """Two processes (torchrun, gloo), DDP, 3 updates of 2 + 2 images per rank: the uninterrupted reference."""
    return _torchrun(tmp_path_factory.mktemp("ddp"), shards, "torch", "ddp")


@pytest.mark.slow
def test_two_process_ddp_and_deepspeed_agree(tmp_path, shards, ddp_reference):
    ds = _torchrun(tmp_path, shards, "deepspeed", "ds")
    for k in ddp_reference:
        torch.testing.assert_close(ddp_reference[k].float(), ds[k].float(), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_ray_train_killed_worker_resumes_and_matches_uninterrupted(tmp_path, shards, ddp_reference):
    import threading

    from cgn_dist.launchers.ray_train import train_with_ray

    def cfg(name, *extra):
        # DDP (torch engine) inside Ray Train: DeepSpeed's agreement with it is checked above
        return _cfg(tmp_path, shards, name, "train.engine=torch", "distributed.num_workers=2",
                    "distributed.cpus_per_worker=0.5", "train.micro_batch_size=2", "train.max_steps=3",
                    "invariant.eval_every_epochs=0", *extra)

    with two_node_cluster():
        faulty_cfg = cfg("faulty", "distributed.max_failures=2")
        killed, stop = [], threading.Event()
        watcher = threading.Thread(target=kill_a_train_worker_after_first_checkpoint,
                                   args=(faulty_cfg.run_dir.resolve(), killed, stop), daemon=True)
        watcher.start()
        try:
            faulty = train_with_ray(faulty_cfg)
        finally:
            stop.set()
    assert killed, "no Ray Train worker of this test's cluster was found to kill"
    assert faulty["step"] == 3
    assert (Path(faulty["run_dir"]) / "log.txt").read_text().count("resumed from") == 1
    # the same 2-worker DDP job uninterrupted under torchrun: the restarted run ends with the same weights
    b = _weights(faulty["run_dir"], 3)
    for k in ddp_reference:
        torch.testing.assert_close(ddp_reference[k], b[k], rtol=0, atol=0)


def test_imagenet_pipeline_runs_every_stage_then_skips_them(tmp_path, shared_ref):
    from cgn_dist.pipelines.imagenet import run_imagenet_pipeline

    tree = make_imagenet_tree(tmp_path / "ILSVRC2012", copies=2, bad=False)
    over = [f"out_dir={tmp_path}", "name=pipe", f"imagenet_pipeline.train_root={tree.train}",
            f"imagenet_pipeline.val_root={tree.val}", f"imagenet_pipeline.val_labels={tree.val_labels}",
            "imagenet_pipeline.cf_train_samples=8", "imagenet_pipeline.cf_val_samples=4", "imagenet.biggan=tiny",
            "imagenet.u2net=tiny", "generate.shard_size=4", "generate.batch_size=4", "generate.forward_batch=4",
            "shards.shard_size=5", "train.max_steps=2", f"eval.cue_conflict={shared_ref / 'cue_conflict_sample'}"]
    first = run_imagenet_pipeline(load_config(TINY, over))
    assert [first["stages"][s] for s in ("real_train", "real_val", "cf_train", "cf_val", "eval")] == ["ran"] * 5
    assert {"shape_bias/shape", "val/avg/top1", "cf_val/shape/top1"} <= set(first["metrics"])
    doc = json.loads((tmp_path / "pipe" / "imagenet_table.json").read_text())
    assert [r["paper"] for r in doc["rows"]][:5] == [54.8, 16.7, 22.9, 74.0, 91.7]
    again = run_imagenet_pipeline(load_config(TINY, over))
    assert [again["stages"][s] for s in ("real_train", "real_val", "cf_train", "cf_val", "eval")] == ["skipped"] * 5
    assert again["metrics"] == first["metrics"]


def test_bad_data_paths_fail_before_a_run_directory_exists(tmp_path):
    with pytest.raises(FileNotFoundError, match="invariant.real_shards"):
        train_invariant(load_config(TINY, [f"out_dir={tmp_path}", "name=bad",
                                            f"invariant.real_shards={tmp_path / 'nowhere'}"]))
    assert not (tmp_path / "bad").exists()


def test_loop_reads_its_scalars_once_per_logged_update(tmp_path, shards, monkeypatch):
    from test_train_syncs import CountFloatItems

    counter = CountFloatItems(monkeypatch)
    out = train_invariant(_cfg(tmp_path, shards, "syncs", "train.max_steps=4", "invariant.eval_every_epochs=0",
                                "train.log_every=4", "train.checkpoint_every=4"))
    assert out["steps"] == 4 and math.isfinite(out["loss/total"]) and 0 <= out["train_top1/real/avg"] <= 100
    # 9 .item() calls per micro-step (5 loss terms, 4 top-1) were 36 here: now one read at update 4
    assert counter.n < 4, counter.n
