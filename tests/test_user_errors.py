"""What a user sees when the input or the machine is wrong: one line on stderr, exit code 2, no traceback
(unless --debug), and nothing half-written left behind."""
import errno
import json
import re

import pytest

from cgn_dist.cli import main
from cgn_dist.data.shards import AtomicTarWriter

TINY_GEN = ["generate", "configs/debug/generate_tiny.yaml", "generate.grid_every=0", "train.progress=false"]


def _one_line(err: str) -> str:
    # Log lines (time, level, logger) may precede the error, e.g. the tiny model's once-per-process warning.
    lines = [ln for ln in err.strip().splitlines()
             if ln.strip() and not re.match(r"^\d\d:\d\d:\d\d (INFO|WARNING) ", ln)]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def test_disk_full_stops_at_once_and_the_rerun_resumes(tmp_path, monkeypatch, capsys):
    real_add = AtomicTarWriter.add
    calls = []

    def full_disk(self, key, sample):  # the environment: the second shard's first write finds the disk full
        calls.append(key)
        if key.startswith("000001_"):
            raise OSError(errno.ENOSPC, "No space left on device", str(self.tmp))
        return real_add(self, key, sample)

    monkeypatch.setattr(AtomicTarWriter, "add", full_disk)
    args = TINY_GEN + [f"out_dir={tmp_path}", "generate.max_retries=3"]
    assert main(args) == 2
    line = _one_line(capsys.readouterr().err)
    assert "No space left on device" in line and "shard 1" in line
    assert "1 of 2 shards are committed" in line and "rerun the same command" in line
    assert [k for k in calls if k.startswith("000001_")] == ["000001_000000"]  # no retries
    run = tmp_path / "gen_tiny"
    assert sorted(p.name for p in run.glob("shard-*")) == ["shard-000000.tar", "shard-000000_stats.json"]
    assert not list(run.glob(".tmp*")) and not (run / "manifest.json").exists()
    stats0 = (run / "shard-000000_stats.json").read_text()

    monkeypatch.setattr(AtomicTarWriter, "add", real_add)  # space freed
    assert main(args) == 0
    assert (run / "shard-000000_stats.json").read_text() == stats0  # kept, not redone
    assert json.loads((run / "manifest.json").read_text())["total_samples"] == 16


def test_a_file_that_is_not_a_checkpoint(tmp_path, capsys):
    page = tmp_path / "cgn.pth"
    page.write_text("<!DOCTYPE html><html><head><title>Google Drive - Virus scan warning</title></head></html>")
    assert main(TINY_GEN + [f"out_dir={tmp_path}", f"generate.checkpoint={page}"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert f"generate.checkpoint={page} is not a CGN checkpoint: it is a web page" in line
    assert line.endswith("then generate.checkpoint=cgn-imagenet)")  # the whole help, Drive id included
    assert "12yVFHPUjKmUFGnO2D4xVlTSpF8CUj136" in line


def test_regenerate_names_what_is_wrong_with_the_folder(tmp_path, capsys):
    assert main(["regenerate", str(tmp_path / "nowhere"), "000000_000001"]) == 2
    assert "the folder does not exist" in _one_line(capsys.readouterr().err)
    assert main(["regenerate", str(tmp_path), "000000_000001"]) == 2
    assert "is not a generation run folder" in _one_line(capsys.readouterr().err)
    (tmp_path / "plan.json").write_text("{}")
    assert main(["regenerate", str(tmp_path), "000000_000001"]) == 2
    assert "has not finished" in _one_line(capsys.readouterr().err)


def test_offline_biggan_is_one_line_naming_the_config_key(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CGN_DIST_CACHE", str(tmp_path / "cache"))
    # conftest routes HTTP(S) to a dead loopback proxy: this is the offline machine
    assert main(["train", "configs/debug/imagenet_tiny.yaml", f"out_dir={tmp_path}",
                 "imagenet.biggan=biggan-deep-256"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert "cannot download BigGAN 'biggan-deep-256'" in line and "imagenet.biggan=biggan-deep-256" in line
    assert "cgn-dist weights fetch biggan-deep-256" in line and "biggan_source" not in line
    assert not (tmp_path / "imagenet_tiny").exists()  # failed before its first checkpoint: nothing left


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(FileNotFoundError, match="the folder does not exist"):
        main(["regenerate", str(tmp_path / "nowhere"), "000000_000001", "--debug"])


def test_help_says_how_to_see_every_key(capsys):
    for cmd in ("train", "generate", "mnist-pipeline", "config"):
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        assert "cgn-dist config --doc" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_mistake_in_a_ray_train_worker_reads_as_in_process(tmp_path, monkeypatch, capsys):
    from cgn_dist.distributed.ray_utils import shutdown_ray

    monkeypatch.setenv("CGN_DIST_CACHE", str(tmp_path / "cache"))  # inherited by the workers Ray starts here
    try:
        assert main(["train", "configs/debug/imagenet_tiny.yaml", f"out_dir={tmp_path}", "ray.num_cpus=1",
                     "distributed.num_workers=1", "imagenet.biggan=biggan-deep-256"]) == 2
    finally:
        shutdown_ray()
    err = capsys.readouterr().err
    ours = [ln for ln in err.splitlines() if ln.startswith("error: ")]  # Ray forwards its workers' stderr too
    assert len(ours) == 1 and ours[0].startswith("error: cannot download BigGAN 'biggan-deep-256'"), ours
    assert "imagenet.biggan=" in ours[0]
    assert not (tmp_path / "imagenet_tiny").exists() and not (tmp_path / "ray" / "imagenet_tiny").exists()


@pytest.mark.parametrize("args", [
    ["generate", "configs/generate/mnist_colored.yaml", "generate.n_samples=10", "generate.shard_size=10",
     "train.progress=false", "generate.checkpoint={notes}"],
    [*TINY_GEN, "generate.checkpoint={notes}"],
    ["train", "configs/debug/mnist_tiny.yaml", "mnist.init_from={notes}"],
])
def test_a_text_file_as_a_checkpoint_says_it_is_text(tmp_path, capsys, monkeypatch, args):
    # torch.load on a text file ends in "IndexError: pop from empty list" deep in its unpickler.
    import logging
    # cgn_dist's console handler is made once per process; an earlier test's one writes to a closed capture
    monkeypatch.setattr(logging.getLogger("cgn_dist"), "handlers", [])
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes about the run\nsecond line\n")
    code = main([a.format(notes=notes) for a in args] + [f"out_dir={tmp_path / 'out'}"])
    line = _one_line(capsys.readouterr().err)
    assert code == 2 and "it is a text file (it begins 'my notes about the run')" in line and str(notes) in line


def test_the_notebook_api_says_the_same_of_a_text_file(tmp_path):
    from cgn_dist.api import MnistCGN

    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    with pytest.raises(ValueError, match="it is a text file"):
        MnistCGN.from_pretrained(str(notes))


def test_a_zip_of_something_else_and_an_empty_file_are_named(tmp_path):
    import zipfile

    from cgn_dist.weights import unreadable_reason

    with zipfile.ZipFile(tmp_path / "photos.zip", "w") as z:
        z.writestr("a.jpg", b"\xff\xd8")
    assert unreadable_reason(tmp_path / "photos.zip", RuntimeError("x")) == "it is a zip archive of something else (a.jpg)"
    (tmp_path / "empty.pt").write_bytes(b"")
    assert unreadable_reason(tmp_path / "empty.pt", EOFError()) == "it is an empty file"
