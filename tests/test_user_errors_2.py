"""More of what a user sees when the input or the machine is wrong, driven through cgn_dist.cli.main as a
user would: one line on stderr naming the key or file and the fix, exit code 2; with --debug the
traceback (the exception itself); and a real bug keeps its traceback even without --debug."""
import errno
import logging
import re

import numpy as np
import pytest
import torch

from cgn_dist.cli import main
from cgn_dist.errors import UserError

TINY_GEN = ["generate", "configs/debug/generate_tiny.yaml", "generate.grid_every=0", "train.progress=false"]


@pytest.fixture(autouse=True)
def fresh_console_handler(monkeypatch):
    # cgn_dist's console handler is made once per process; an earlier test's one writes to a closed capture
    monkeypatch.setattr(logging.getLogger("cgn_dist"), "handlers", [])


def _one_line(err: str, prefix: str = "error: ") -> str:
    # Log lines (time, level, logger) may precede the error; torch's hub prints one "Downloading:" line of
    # its own before an offline download fails.
    lines = [ln for ln in err.strip().splitlines()
             if ln.strip() and not re.match(r"^\d\d:\d\d:\d\d (INFO|WARNING) ", ln) and not ln.startswith("Downloading: ")]
    assert len(lines) == 1 and lines[0].startswith(prefix), err
    assert "Traceback" not in err
    return lines[0]


def _fails_in_one_line(args, capsys, *needles, prefix="error: "):
    """exit 2 with one line holding every needle; then the same with --debug raises the project's error."""
    assert main(args) == 2
    line = _one_line(capsys.readouterr().err, prefix)
    for needle in needles:
        assert needle in line, line
    with pytest.raises(UserError):
        main([*args, "--debug"])
    return line


# --------------------------------------------------------------------------- the CLI's rule itself


def test_a_bug_keeps_its_traceback_and_the_machine_s_errors_are_one_line(tmp_path, monkeypatch, capsys):
    import cgn_dist.generate.command as command

    def bug(cfg):  # an error that is no user's mistake: a ValueError from deep inside the code
        raise ValueError("too many values to unpack (expected 2)")

    monkeypatch.setattr(command, "run_generate", bug)
    with pytest.raises(ValueError, match="too many values"):
        main(TINY_GEN + [f"out_dir={tmp_path}"])  # no --debug: the traceback all the same

    def full(cfg):  # the machine: a full disk is no bug of cgn_dist
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x"))

    monkeypatch.setattr(command, "run_generate", full)
    assert main(TINY_GEN + [f"out_dir={tmp_path}"]) == 2
    assert "No space left on device" in _one_line(capsys.readouterr().err)

    def missing(cfg):  # a FileNotFoundError not raised as the project's own type is a bug too
        raise FileNotFoundError(2, "No such file or directory", "/internal/cache.json")

    monkeypatch.setattr(command, "run_generate", missing)
    with pytest.raises(FileNotFoundError):
        main(TINY_GEN + [f"out_dir={tmp_path}"])


# --------------------------------------------------------------------------- checkpoints that are not ones


def _truncated_checkpoint(path):
    torch.save({"w": torch.zeros(4096)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.mark.parametrize("args, key", [
    ([*TINY_GEN, "generate.checkpoint={ckpt}"], "generate.checkpoint="),
    (["train", "configs/debug/mnist_tiny.yaml", "mnist.init_from={ckpt}"], ""),
])
def test_a_truncated_checkpoint_says_it_is_truncated(tmp_path, capsys, args, key):
    ckpt = _truncated_checkpoint(tmp_path / "cgn.pth")
    argv = [a.format(ckpt=ckpt) for a in args] + [f"out_dir={tmp_path / 'out'}"]
    _fails_in_one_line(argv, capsys, f"{key}{ckpt}", "it is truncated or corrupt")
    assert not list((tmp_path / "out").glob("*"))  # nothing left of either run


def test_a_zip_of_photos_as_the_generate_checkpoint(tmp_path, capsys):
    import zipfile

    photos = tmp_path / "cgn.pth"  # a zip, as torch's own files are, but of something else
    with zipfile.ZipFile(photos, "w") as z:
        z.writestr("holiday/a.jpg", b"\xff\xd8\xff")
    _fails_in_one_line([*TINY_GEN, f"generate.checkpoint={photos}", f"out_dir={tmp_path / 'out'}"], capsys,
                       f"generate.checkpoint={photos} is not a CGN checkpoint: it is a zip archive of something else "
                       "(holiday/a.jpg)")
    assert not list((tmp_path / "out").glob("*"))


def test_a_web_page_as_the_mnist_init_checkpoint(tmp_path, capsys):
    page = tmp_path / "ckp.pth"
    page.write_text("<!DOCTYPE html><html><head><title>Sign in</title></head></html>")
    _fails_in_one_line(["train", "configs/debug/mnist_tiny.yaml", f"mnist.init_from={page}", f"out_dir={tmp_path}"],
                       capsys, str(page), "it is a web page")


@pytest.mark.parametrize("args, says", [
    (["train", "configs/debug/mnist_tiny.yaml", "mnist.vgg_weights={notes}"], "VGG16 weights (mnist/imagenet.vgg_weights)"),
    ([*TINY_GEN, "generate.mode=interpolation", "generate.interp_noise={notes}"], "generate.interp_noise"),
])
def test_a_text_file_for_other_file_keys(tmp_path, capsys, args, says):
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes about the run\n")
    _fails_in_one_line([a.format(notes=notes) for a in args] + [f"out_dir={tmp_path / 'out'}"], capsys,
                       f"{says}: {notes} cannot be loaded: it is a text file")


# --------------------------------------------------------------------------- the machine and the network


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA device")
def test_train_on_cuda_without_a_gpu(tmp_path, capsys):
    _fails_in_one_line(["train", "configs/debug/mnist_tiny.yaml", "train.device=cuda", f"out_dir={tmp_path}"],
                       capsys, "train.device=cuda but no CUDA device is visible", "train.device=cpu or auto")
    assert not (tmp_path / "mnist_tiny").exists()  # failed before its first checkpoint: nothing left


def test_imagenet_weights_offline_is_one_line_naming_the_key(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # an empty hub cache; conftest: no network
    cue = _stimuli(tmp_path / "cue", "cat1-dog2.png")
    _fails_in_one_line(["eval", "shape-bias", "eval.model=torchvision:resnet18", "eval.weights=imagenet",
                        f"eval.cue_conflict={cue}", f"out_dir={tmp_path}"], capsys,
                       "eval.weights=imagenet: resnet18 weights: ImageNet weights unavailable",
                       "download failed", "use 'random'")


def _stimuli(root, *names):
    from PIL import Image

    (root / "cat").mkdir(parents=True)
    for name in names:
        Image.new("RGB", (32, 32)).save(root / "cat" / name)
    return root


def test_a_text_file_as_eval_weights_and_a_non_image_among_the_stimuli(tmp_path, capsys):
    cue = _stimuli(tmp_path / "cue", "cat1-dog2.png")
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes about the run\n")
    base = ["eval", "shape-bias", "eval.model=torchvision:resnet18", f"eval.cue_conflict={cue}", f"out_dir={tmp_path}"]
    _fails_in_one_line([*base, f"eval.weights={notes}"], capsys, f"weights file {notes} is not a state dict",
                       "it is a text file")
    _fails_in_one_line(["eval", "shape-bias", f"eval.decisions_csv={tmp_path / 'nope.csv'}", f"out_dir={tmp_path}"],
                       capsys, f"eval.decisions_csv: {tmp_path / 'nope.csv'} does not exist")
    (cue / "cat" / "cat2-dog3.png").write_text("not a picture")  # e.g. a failed download kept its name
    _fails_in_one_line([*base, "eval.weights=random"], capsys, f"{cue / 'cat' / 'cat2-dog3.png'} cannot be read as "
                       "an image", "remove or replace it")


# --------------------------------------------------------------------------- damaged shards


def _shards(root, n_shards=2, per_shard=4):
    from cgn_dist.data.shard_index import build_wids_index
    from cgn_dist.data.shards import encode_jpeg, write_json_atomic, write_tar

    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    entries = []
    for s in range(n_shards):
        samples = [(f"{s:06d}_{i:06d}", {"jpg": encode_jpeg(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)),
                                         "json": {"label": i}}) for i in range(per_shard)]
        write_tar(root / f"shard-{s:06d}.tar", samples)
        entries.append({"url": f"shard-{s:06d}.tar", "nsamples": per_shard})
    write_json_atomic(root / "index.json", build_wids_index(entries))
    bad = root / "shard-000001.tar"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2 + 100])  # cut inside a member, as an interrupted copy leaves it
    return root, bad


@pytest.mark.parametrize("workers", [0, 1])  # in a DataLoader worker torch re-raises it with a traceback text
def test_a_truncated_shard_in_eval_val_shards(tmp_path, capsys, workers):
    root, bad = _shards(tmp_path / "val")
    line = _fails_in_one_line(["eval", "accuracy", "eval.model=torchvision:resnet18", "eval.weights=random",
                               f"eval.val_shards={root}", "eval.image_size=32", "eval.batch_size=2",
                               f"eval.num_workers={workers}", f"out_dir={tmp_path}"], capsys,
                              f"shard {bad} cannot be read: unexpected end of data",
                              f"cgn-dist verify {root}", "rerun the command that made it")
    assert "_io.BufferedReader" not in line


def test_make_loader_and_the_plain_reader_name_the_damaged_shard(tmp_path):
    from cgn_dist.data.shards import ShardFormatError, read_tar_samples
    from cgn_dist.data.stream import make_loader

    root, bad = _shards(tmp_path / "s")
    with pytest.raises(ShardFormatError, match=f"shard {re.escape(str(bad))} cannot be read.*cgn-dist verify"):
        list(make_loader(root, 2, train=False, image_size=16, resize=20))
    with pytest.raises(ShardFormatError, match="cannot be read: unexpected end of data"):
        read_tar_samples(bad)
    assert len(read_tar_samples(root / "shard-000000.tar")) == 4  # the intact one reads as before


# --------------------------------------------------------------------------- config values


@pytest.mark.parametrize("override, says", [
    ("mnist.lr=-1", "mnist.lr: got -1.0; a learning rate must be > 0"),
    ("imagenet.lr_bg=-1e-5", "imagenet.lr_bg: got -1e-05; must be >= 0"),
    ("mnist.betas=[0.5,1.5]", "mnist.betas: got [0.5, 1.5]; Adam betas must lie in [0, 1)"),
    ("invariant.momentum=1", "invariant.momentum: got 1.0; must lie in [0, 1)"),
    ("imagenet.w_perceptual=[4,4,-4,4]", "imagenet.w_perceptual: got [4.0, 4.0, -4.0, 4.0]; weights must be >= 0"),
])
def test_bad_optimizer_values_name_their_key(tmp_path, capsys, override, says):
    # torch's own check says only "Invalid learning rate: -1.0", after the run has started
    _fails_in_one_line(["train", "configs/debug/mnist_tiny.yaml", override, f"out_dir={tmp_path}"], capsys, says,
                       prefix="config error: ")
    assert not (tmp_path / "mnist_tiny").exists()


# --------------------------------------------------------------------------- what a failed run leaves


MNIST_GEN = ["generate", "configs/generate/mnist_colored.yaml", "generate.n_samples=20", "generate.shard_size=10",
             "generate.no_cfs=2", "train.progress=false"]


def test_a_generation_that_fails_before_its_first_shard_leaves_no_folder(tmp_path, capsys, shared_ref):
    # The MNIST generator is loaded in the workers, after the run folder has its lock, config, plan and log.
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    out = tmp_path / "out"
    _fails_in_one_line([*MNIST_GEN, f"out_dir={out}", f"generate.checkpoint={notes}"], capsys, "it is a text file")
    assert not (out / "cf_mnist_colored").exists()  # nothing left to look like a run
    # the corrected command starts afresh (not "a run made with other settings") and logs into a new log.txt
    released = shared_ref / "original_mnist_checkpoints" / "cgn_colored_MNIST.pth"
    assert main([*MNIST_GEN, f"out_dir={out}", f"generate.checkpoint={released}"]) == 0
    run = out / "cf_mnist_colored"
    assert (run / "manifest.json").is_file() and (run / "log.txt").stat().st_size > 0


def test_a_failed_generation_keeps_a_folder_it_did_not_make(tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    run = tmp_path / "cf_mnist_colored"
    run.mkdir()
    (run / "results.txt").write_text("someone's earlier results\n")
    assert main([*MNIST_GEN, f"out_dir={tmp_path}", f"generate.checkpoint={notes}"]) == 2
    capsys.readouterr()
    assert (run / "results.txt").read_text() == "someone's earlier results\n"


# --------------------------------------------------------------------------- configs outside the checkout


def test_base_in_a_config_outside_the_checkout(tmp_path, monkeypatch, capsys):
    import yaml

    monkeypatch.chdir(tmp_path)  # not the checkout: configs/ is found under the project root
    (tmp_path / "mine.yaml").write_text("base: configs/debug/mnist_tiny.yaml\nname: mine\n")
    assert main(["config", "mine.yaml"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["name"] == "mine" and cfg["train"]["max_steps"] == 3  # mnist_tiny's own value
    (tmp_path / "bad.yaml").write_text("base: configs/debug/nope.yaml\n")
    _fails_in_one_line(["config", "bad.yaml"], capsys, "config bad.yaml: base: 'configs/debug/nope.yaml' does not "
                       "exist", "fix that base: line", prefix="config error: ")


# --------------------------------------------------------------------------- help


def test_a_command_without_its_config_says_a_config_is_required(capsys):
    for cmd, example in (("train", "configs/main.yaml"), ("generate", "configs/generate/mnist_colored.yaml")):
        with pytest.raises(SystemExit) as stop:
            main([cmd])
        assert stop.value.code == 2
        usage, line = capsys.readouterr().err.strip().splitlines()
        assert usage == f"usage: cgn-dist {cmd} [-h] [--debug] CONFIG [key=value ...]"
        assert line == (f"cgn-dist {cmd}: error: a CONFIG is required: cgn-dist {cmd} CONFIG [key=value ...], "
                        f"e.g. cgn-dist {cmd} {example}")


def test_every_command_describes_itself_and_lists_debug(capsys):
    for cmd, says in (("eval", "evaluate a classifier"), ("regenerate", "recompute sample KEY"),
                      ("import", "convert the authors' released"), ("train", "train a CGN"),
                      ("weights", "list the weight files")):
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
        assert says in out and "--debug show the traceback of an error" in out, out
    with pytest.raises(SystemExit):
        main(["import", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "src the authors' checkpoint: MNIST ckp.pth" in out and "dst the cgn_dist weights file to write" in out
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "--debug" in capsys.readouterr().out


def test_config_doc_keeps_a_group_header_off_the_previous_key(capsys):
    assert main(["config", "--doc"]) == 0
    lines = capsys.readouterr().out.splitlines()
    (interp,) = [ln for ln in lines if ln.startswith("generate.interp_noise:")]
    assert interp.endswith('"" = from seed')  # its own doc, and nothing after it
    (spectral,) = [ln for ln in lines if ln.startswith("imagenet.spectral_norm_updates:")]
    assert "False keeps the pretrained estimates" in spectral  # a continued doc line still joins its key


def test_debug_in_a_real_process_prints_the_traceback(repo_root):
    import subprocess
    import sys

    def run(*extra):
        return subprocess.run([sys.executable, "-m", "cgn_dist.cli", "config", "configs/debug/mnist_tiny.yaml",
                               "mnist.lr=-1", *extra], cwd=repo_root, capture_output=True, text=True, timeout=120)

    says = "mnist.lr: got -1.0; a learning rate must be > 0 (e.g. the default 0.0002)"
    plain, debug = run(), run("--debug")
    assert plain.returncode == 2 and plain.stderr.strip() == f"config error: {says}", plain.stderr
    assert debug.returncode == 1 and debug.stderr.startswith("Traceback (most recent call last):")
    assert debug.stderr.strip().endswith(f"cgn_dist.config.ConfigError: {says}")
