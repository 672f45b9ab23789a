"""Ctrl-C and SIGTERM with real signals: `cgn-dist train` saves the update it finishes and resumes to the
uninterrupted weights; `cgn-dist generate` keeps its committed shards, leaves no temporaries and a rerun gives
the uninterrupted bytes; a second signal stops at once. Every run is the CLI in a subprocess, as a user runs it."""
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cgn_dist import interrupts
from cgn_dist.config import load_config
from cgn_dist.train.checkpoint import list_checkpoints
from cgn_dist.train.mnist import train_mnist

REPO = Path(__file__).resolve().parents[1]
MNIST = "configs/debug/mnist_tiny.yaml"
GENERATE = "configs/debug/generate_tiny.yaml"
# Long enough to be interrupted, short enough for a test: no sheets, no periodic checkpoints.
TRAIN_ARGS = ["train.max_steps=30", "train.checkpoint_every=1000", "train.sample_every=1000", "train.log_every=1"]
GEN_ARGS = ["generate.n_samples=600", "generate.shard_size=10", "generate.batch_size=2", "generate.grid_every=0"]
TRAIN_LINE = re.compile(r"^interrupted at update (\d+) of 30; checkpoint saved in (\S+); "
                        r"rerun the same command to resume$")
GEN_LINE = re.compile(r"^interrupted: (\d+) of 60 shards committed in (\S+); rerun the same command to finish$")


def _start(args: list[str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as f:  # a file, as a log is: the child writes, the test reads it as it grows
        # its own process group, as a shell gives a command: a "terminal" Ctrl-C is os.killpg on it
        return subprocess.Popen([sys.executable, "-m", "cgn_dist.cli", *args], cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=f, start_new_session=True)


def _signal(proc: subprocess.Popen, sig: int, group: bool = False) -> None:
    """``group``: to every process of the command (its workers too), as Ctrl-C at a terminal does."""
    if group:
        os.killpg(proc.pid, sig)
    else:
        proc.send_signal(sig)


def _wait_for(proc: subprocess.Popen, done, what: str, log: Path, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert proc.poll() is None, f"exited ({proc.returncode}) before {what}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.02)


def _last_line(log: Path) -> str:
    return log.read_text().strip().splitlines()[-1]


def _weights(run_dir: Path, step: int, name: str) -> dict:
    return torch.load(run_dir / "checkpoints" / f"step_{step:07d}" / f"{name}.pt", weights_only=True)


def test_a_second_signal_raises_at_once_and_handlers_come_back():
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        with interrupts.deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)  # the handler runs between bytecodes of this thread
            assert interrupts.requested() == signal.SIGTERM
            with pytest.raises(interrupts.Interrupted) as e:
                interrupts.check()
            assert e.value.exit_code == 143
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # never reached: the second signal raises here
    assert signal.getsignal(signal.SIGINT) is before and interrupts.requested() is None


def test_train_interrupted_saves_then_resumes_to_the_uninterrupted_weights(tmp_path):
    log = tmp_path / "stderr.txt"
    args = ["train", MNIST, f"out_dir={tmp_path}", "name=cut", *TRAIN_ARGS]
    proc = _start(args, log)
    _wait_for(proc, lambda: "update 2/30" in log.read_text(), "update 2", log)
    _signal(proc, signal.SIGINT, group=True)
    assert proc.wait(timeout=120) == 130, log.read_text()[-3000:]
    text = log.read_text()
    assert "Traceback" not in text
    m = TRAIN_LINE.match(_last_line(log))
    assert m, _last_line(log)
    step, where = int(m.group(1)), Path(m.group(2))
    assert 2 <= step < 30
    run = tmp_path / "cut"
    assert [(s, p) for s, p in list_checkpoints(run)] == [(step, where)]
    assert not list((run / "checkpoints").glob("*.tmp"))

    again = subprocess.run([sys.executable, "-m", "cgn_dist.cli", *args], cwd=REPO, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming at update {step}" in again.stderr
    full = Path(train_mnist(load_config(REPO / MNIST, [f"out_dir={tmp_path}", "name=full", *TRAIN_ARGS]))["run_dir"])
    for name in ("generator", "discriminator"):
        a, b = _weights(full, 30, name), _weights(run, 30, name)
        assert all(torch.equal(a["module"][k], b["module"][k]) for k in a["module"]), name
        sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
        assert all(torch.equal(sa[i]["exp_avg"], sb[i]["exp_avg"]) for i in sa), name


def test_imagenet_cgn_sigterm_saves_then_resumes_to_the_uninterrupted_weights(tmp_path):
    from cgn_dist.train.imagenet import train_imagenet

    cfg_file = "configs/debug/imagenet_tiny.yaml"
    log = tmp_path / "stderr.txt"
    args = ["train", cfg_file, f"out_dir={tmp_path}", "name=cut", *TRAIN_ARGS]
    proc = _start(args, log)
    _wait_for(proc, lambda: "update 2/30" in log.read_text(), "update 2", log)
    _signal(proc, signal.SIGTERM)  # as a batch scheduler stops a job
    assert proc.wait(timeout=120) == 143, log.read_text()[-3000:]
    assert "Traceback" not in log.read_text()
    m = TRAIN_LINE.match(_last_line(log))
    assert m, _last_line(log)
    step, run = int(m.group(1)), tmp_path / "cut"
    assert [s for s, _ in list_checkpoints(run)] == [step]

    again = subprocess.run([sys.executable, "-m", "cgn_dist.cli", *args], cwd=REPO, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    full = train_imagenet(load_config(REPO / cfg_file, [f"out_dir={tmp_path}", "name=full", *TRAIN_ARGS]))
    a = torch.load(Path(full["run_dir"]) / "checkpoints" / "step_0000030" / "mechanisms.pt", weights_only=True)
    b = torch.load(run / "checkpoints" / "step_0000030" / "mechanisms.pt", weights_only=True)
    assert all(torch.equal(a["module"][k], b["module"][k]) for k in a["module"])


def test_train_two_signals_stop_at_once_without_a_traceback(tmp_path):
    log = tmp_path / "stderr.txt"
    proc = _start(["train", MNIST, f"out_dir={tmp_path}", "name=twice", *TRAIN_ARGS], log)
    _wait_for(proc, lambda: "update 2/30" in log.read_text(), "update 2", log)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130
    assert "Traceback" not in log.read_text()
    assert _last_line(log).startswith("interrupted")
    for _, ckpt in list_checkpoints(tmp_path / "twice"):  # whatever was saved is complete
        assert (ckpt / "generator.pt").is_file() and (ckpt / "discriminator.pt").is_file()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gen_ref")
    proc = subprocess.run([sys.executable, "-m", "cgn_dist.cli", "generate", GENERATE, f"out_dir={out}", "name=g",
                           *GEN_ARGS], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out / "g"


RAY_BACKEND = ["generate.backend=ray", "generate.num_workers=2", "ray.num_cpus=2"]


@pytest.mark.parametrize("sig, backend, group", [
    (signal.SIGINT, ["generate.num_workers=1"], False),
    (signal.SIGTERM, ["generate.num_workers=2"], False),
    (signal.SIGINT, ["generate.num_workers=2"], True),
    pytest.param(signal.SIGINT, RAY_BACKEND, False, marks=[pytest.mark.slow, pytest.mark.timeout(420)]),
], ids=["sigint-inprocess", "sigterm-pool", "ctrl-c-pool", "sigint-ray"])
def test_generate_interrupted_keeps_committed_shards_and_rerun_finishes_identical(tmp_path, uninterrupted, sig,
                                                                                  backend, group):
    log = tmp_path / "stderr.txt"
    args = ["generate", GENERATE, f"out_dir={tmp_path}", "name=g", *GEN_ARGS, *backend]
    run = tmp_path / "g"
    proc = _start(args, log)
    # two markers, whichever shards: with two workers shard 1 may commit before shard 0
    _wait_for(proc, lambda: len(list(run.glob("shard-*_stats.json"))) >= 2, "2 shards committed", log)
    _signal(proc, sig, group)
    assert proc.wait(timeout=120) == 128 + sig, log.read_text()[-3000:]
    assert "Traceback" not in log.read_text()
    m = GEN_LINE.match(_last_line(log))
    assert m, _last_line(log)
    committed = int(m.group(1))
    assert 2 <= committed < 60 and Path(m.group(2)) == run
    assert len(list(run.glob("shard-*_stats.json"))) == committed
    assert len(list(run.glob("shard-*.tar"))) == committed  # no tar without its commit marker
    assert not list(run.glob(".tmp*")) and not (run / "manifest.json").exists()

    again = subprocess.run([sys.executable, "-m", "cgn_dist.cli", *args], cwd=REPO, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"wrote {60 - committed} of 60 shards" in again.stderr
    tars = sorted(p.name for p in uninterrupted.glob("shard-*.tar"))
    assert sorted(p.name for p in run.glob("shard-*.tar")) == tars and len(tars) == 60
    for name in tars + ["index.json"]:
        assert (run / name).read_bytes() == (uninterrupted / name).read_bytes(), name


RAY_TRAIN = ["train.engine=deepspeed", "distributed.num_workers=2", "distributed.cpus_per_worker=0.5",
             "ray.num_cpus=2", "train.max_steps=30", "train.checkpoint_every=1000", "train.sample_every=1000"]


def _ds_generator(run_dir: Path, step: int) -> dict:
    f = run_dir / "checkpoints" / f"step_{step:07d}" / "generator" / "mp_rank_00_model_states.pt"
    return torch.load(f, weights_only=False)["module"]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ray_train_interrupted_at_the_driver_saves_and_resumes_to_the_uninterrupted_weights(tmp_path):
    """Ctrl-C reaches the driver only (Ray Train would abort the run): the workers finish their update, save it
    together, and the rerun resumes from it to the weights of a run never interrupted."""
    log = tmp_path / "stderr.txt"
    args = ["train", MNIST, f"out_dir={tmp_path}", "name=cut", *RAY_TRAIN]
    proc = _start(args, log)
    _wait_for(proc, lambda: "update 2/30" in log.read_text(), "update 2", log, timeout=300)
    _signal(proc, signal.SIGINT, group=True)  # Ray's daemons and workers block it: the driver decides
    assert proc.wait(timeout=200) == 130, log.read_text()[-3000:]
    assert "Traceback" not in log.read_text()
    m = TRAIN_LINE.match(_last_line(log))
    assert m, _last_line(log)
    step = int(m.group(1))
    run = tmp_path / "cut"
    assert 2 <= step < 30 and [s for s, _ in list_checkpoints(run)] == [step]
    assert not list(run.glob(".stop*"))

    again = subprocess.run([sys.executable, "-m", "cgn_dist.cli", *args], cwd=REPO, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming at update {step}" in again.stderr
    full = subprocess.run([sys.executable, "-m", "cgn_dist.cli", "train", MNIST, f"out_dir={tmp_path}", "name=full",
                           *RAY_TRAIN], cwd=REPO, capture_output=True, text=True)
    assert full.returncode == 0, full.stderr[-3000:]
    a, b = _ds_generator(tmp_path / "full", 30), _ds_generator(run, 30)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def classifier_shards(tmp_path_factory):
    sys.path.insert(0, str(Path(__file__).parent))
    from test_train_classifier import shards  # the photo-fixture shards of the classifier's own tests

    return shards.__wrapped__(tmp_path_factory)


def test_classifier_with_loader_workers_survives_a_terminal_ctrl_c_and_resumes_exactly(tmp_path,
                                                                                        classifier_shards):
    """Ctrl-C at a terminal reaches the data loader's worker processes too: they must not quit before the
    loop has read the batch of the update it finishes."""
    data = [f"invariant.real_shards={classifier_shards['real']}", f"invariant.cf_shards={classifier_shards['cf']}",
            "invariant.num_workers=2", "invariant.eval_every_epochs=0", "train.max_steps=40",
            "train.checkpoint_every=1000"]
    cfg_file = "configs/debug/classifier_tiny.yaml"
    log = tmp_path / "stderr.txt"
    args = ["train", cfg_file, f"out_dir={tmp_path}", "name=cut", *data, "train.checkpoint_every=3"]
    proc = _start(args, log)
    run = tmp_path / "cut"
    _wait_for(proc, lambda: bool(list_checkpoints(run)), "a first checkpoint", log)
    _signal(proc, signal.SIGINT, group=True)
    assert proc.wait(timeout=120) == 130, log.read_text()[-3000:]
    assert "Traceback" not in log.read_text()
    m = re.match(r"^interrupted at update (\d+) of 40; checkpoint saved in (\S+); rerun", _last_line(log))
    assert m, _last_line(log)
    step = int(m.group(1))
    assert list_checkpoints(run)[-1] == (step, Path(m.group(2)))

    again = subprocess.run([sys.executable, "-m", "cgn_dist.cli", *args], cwd=REPO, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    from cgn_dist.classifier.imagenet.train import train_invariant

    full = train_invariant(load_config(REPO / cfg_file, [f"out_dir={tmp_path}", "name=full", *data]))
    a = torch.load(Path(full["run_dir"]) / "checkpoints" / "step_0000040" / "classifier.pt", weights_only=True)
    b = torch.load(run / "checkpoints" / "step_0000040" / "classifier.pt", weights_only=True)
    assert all(torch.equal(a["module"][k], b["module"][k]) for k in a["module"])


def test_close_waits_for_killed_ray_workers_to_exit(caplog):
    """ray.kill only asks; the sweep of temporaries after it must not run while a killed worker still writes.
    A child killed here stays a zombie (unreaped): exited all the same, its files closed."""
    import socket
    import threading

    from cgn_dist.sharding.ray_backend import wait_for_exit

    host = socket.gethostname()
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    killer = threading.Timer(0.5, worker.kill)
    t0 = time.monotonic()
    killer.start()
    wait_for_exit([(host, worker.pid)], timeout_s=20)
    waited = time.monotonic() - t0
    assert 0.4 < waited < 10 and worker.poll() == -signal.SIGKILL

    stuck = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        t0 = time.monotonic()
        with caplog.at_level("WARNING", logger="cgn_dist.sharding.backends"):
            wait_for_exit([(host, stuck.pid), ("another-host", stuck.pid + 1)], timeout_s=0.3)
        assert 0.3 <= time.monotonic() - t0 < 5 and stuck.poll() is None
        assert f"Ray workers [{stuck.pid}] still running" in caplog.text
    finally:
        stuck.kill()
        stuck.wait()
