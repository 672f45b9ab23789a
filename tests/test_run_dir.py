"""Runs that say what they do: complete runs say so, changed settings are refused with a diff (or kept
beside with the explicit flag), log.txt holds the console's lines, a run that never checkpointed leaves
no directory behind."""
import json
from pathlib import Path

import pytest
import yaml

from cgn_dist.cli import main
from cgn_dist.config import ConfigError, load_config
from cgn_dist.train.mnist import train_mnist

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "debug" / "mnist_tiny.yaml"


def _cfg(tmp_path, *extra):
    return load_config(TINY, [f"out_dir={tmp_path}", "name=r", *extra])


def test_complete_rerun_changed_settings_and_log(tmp_path):
    first = train_mnist(_cfg(tmp_path, "train.max_steps=2", "train.checkpoint_every=1"))
    run = Path(first["run_dir"])
    assert json.loads((run / "summary.json").read_text()) == first
    assert first["step"] == 2 and first["checkpoint"].endswith("step_0000002")

    # Same settings again: complete, nothing trained, the same summary.
    assert train_mnist(_cfg(tmp_path, "train.max_steps=2")) == first
    log_txt = (run / "log.txt").read_text()
    assert "is complete (update 2 of 2): nothing to do" in log_txt and "resumed from" not in log_txt

    # What the console showed is in log.txt: the start line, a progress line per log interval, the result.
    assert "CGN-MNIST colored" in log_txt and "2 updates of 4 samples" in log_txt
    assert "update 1/2: loss/g_adv" in log_txt and "update 2/2: loss/g_adv" in log_txt
    assert f"finished {run}" in log_txt

    # Changed hyperparameters on resume: refused, naming what changed.
    with pytest.raises(ConfigError, match=r"mnist.lr: 0.0002 -> 0.001.*train.allow_config_change=true"):
        train_mnist(_cfg(tmp_path, "train.max_steps=3", "mnist.lr=0.001"))
    # Longer training is not a change of settings: it resumes.
    assert train_mnist(_cfg(tmp_path, "train.max_steps=3"))["step"] == 3
    # With the flag: resumes, the earlier config kept beside the new one.
    out = train_mnist(_cfg(tmp_path, "train.max_steps=4", "mnist.lr=0.001", "train.allow_config_change=true"))
    assert out["step"] == 4
    kept = list(run.glob("config.*.yaml"))
    assert len(kept) == 1 and yaml.safe_load(kept[0].read_text())["mnist"]["lr"] == 0.0002
    assert yaml.safe_load((run / "config.yaml").read_text())["mnist"]["lr"] == 0.001


def test_a_run_that_fails_before_its_first_checkpoint_leaves_nothing(tmp_path, capsys):
    # data.textures names a folder that does not exist: fails while building the data set
    assert main(["train", str(TINY), f"out_dir={tmp_path}", "name=f", "data.dataset=wildlife",
                 f"data.textures={tmp_path / 'no_textures'}"]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    assert not (tmp_path / "f").exists()


def test_generation_rerun_says_complete_and_the_dry_run_counts_tar_overhead(tmp_path, capsys):
    args = ["generate", "configs/debug/generate_tiny.yaml", f"out_dir={tmp_path}", "generate.grid_every=0",
            "train.progress=false"]
    assert main(args + ["generate.dry_run=true"]) == 0
    out = capsys.readouterr().out
    est = json.loads(out[out.index("\n{") + 1:])["est_bytes"]  # the summary after the plan's lines
    assert main(args) == 0
    written = sum(p.stat().st_size for p in (tmp_path / "gen_tiny").glob("shard-*.tar"))
    assert abs(est - written) <= 0.1 * written, (est, written)
    assert main(args) == 0
    log_txt = (tmp_path / "gen_tiny" / "log.txt").read_text()
    assert "wrote 2 of 2 shards" in log_txt
    assert "is complete: 16 samples in 2 shards, all committed and checked; nothing to generate" in log_txt
