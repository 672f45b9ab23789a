"""cgn-dist doctor on a simulated two-node Ray cluster (loopback) and on one machine without Ray.

The second node is started with its own CGN_DIST_CACHE and TORCH_HOME, as a real node's environment would
set them: its weights cache and torch hub are what those names point at *on that node*. Pointing them at
a symlink to the head's folders gives both nodes one view (healthy); pointing them at a folder of their own
is a node that does not share the cache (the driver's marker is not there; a weights file is missing).
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cgn_dist import cli
from cgn_dist.distributed.ray_utils import LoopbackCluster, patched_environ, shutdown_ray

sys.path.insert(0, str(Path(__file__).parent))
from ray_helpers import node_with_own_mounts  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("doctor")
    views = {"cache": root / "cache", "torch": root / "torch", "cache2": root / "node2_cache",
             "torch2": root / "node2_torch"}
    for k in ("cache", "torch"):
        views[k].mkdir()
    shutdown_ray()
    with patched_environ({"CGN_DIST_CACHE": str(views["cache"]), "TORCH_HOME": str(views["torch"])}):
        c = LoopbackCluster(num_nodes=1, cpus_per_node=1, object_store_mb=80).start()
        with patched_environ({"CGN_DIST_CACHE": str(views["cache2"]), "TORCH_HOME": str(views["torch2"])}):
            c.add_node()
    try:
        c.connect()
        yield c, views, root
    finally:
        shutdown_ray()
        c.shutdown()


def _view(link: Path, target: Path | None) -> None:
    """The second node's folder: a symlink to the head's (the same storage) or a folder of its own."""
    if link.is_symlink() or link.is_file():
        link.unlink()
    elif link.is_dir():
        for p in link.iterdir():
            p.unlink()
        link.rmdir()
    if target is None:
        link.mkdir()
    else:
        link.symlink_to(target)


def _doctor(capsys, monkeypatch, views, *overrides) -> tuple[int, list[str]]:
    monkeypatch.setenv("CGN_DIST_CACHE", str(views["cache"]))
    monkeypatch.setenv("TORCH_HOME", str(views["torch"]))
    capsys.readouterr()
    rc = cli.main(["doctor", *overrides])
    lines = capsys.readouterr().out.splitlines()
    with capsys.disabled():  # the report, for whoever runs the tests with -s
        print("\n".join(lines))
    return rc, lines


def _line(lines: list[str], check: str) -> str:
    found = [ln for ln in lines if ln.split(":", 1)[0].split(None, 1)[-1] == check]
    assert len(found) == 1, (check, lines)
    return found[0]


def _weights_file(views) -> bytes:
    data = os.urandom(4096)
    (views["cache"] / "u2net.pth").write_bytes(data)
    return data


def test_healthy_cluster_every_check_ok_on_both_nodes(cluster, capsys, monkeypatch):
    c, views, root = cluster
    _view(views["cache2"], views["cache"])
    _view(views["torch2"], views["torch"])
    _weights_file(views)
    rc, lines = _doctor(capsys, monkeypatch, views, "task=imagenet", "imagenet.biggan=tiny", "imagenet.u2net=u2net",
                        f"out_dir={root / 'runs'}", f"ray.address={c.address}")
    assert rc == 0, lines
    assert lines[0].endswith("(2 nodes)") and lines[-1].endswith(" 0 failed")
    assert all(ln.startswith("ok   ") for ln in lines[1:-1])
    assert sum(ln.startswith("ok   torch [node ") for ln in lines) == 2  # one probe per node
    assert "marker seen and writable from 2 node(s)" in _line(lines, "path out_dir")
    assert "from 2 node(s)" in _line(lines, "path weights cache (CGN_DIST_CACHE)")
    assert "4,096 bytes" in _line(lines, "weights u2net") and "on 2 node(s)" in _line(lines, "weights u2net")
    assert not list(root.glob("**/.cgn_dist_doctor*")), "the markers are removed"


def test_node_that_does_not_see_the_markers_folder_fails_with_the_path_and_the_fix(cluster, capsys, monkeypatch):
    c, views, root = cluster
    _view(views["cache2"], None)  # node 2's CGN_DIST_CACHE: a folder of its own
    _view(views["torch2"], views["torch"])
    _weights_file(views)
    rc, lines = _doctor(capsys, monkeypatch, views, "task=imagenet", "imagenet.biggan=tiny", "imagenet.u2net=u2net",
                        f"out_dir={root / 'runs'}", f"ray.address={c.address}")
    assert rc == 1
    bad = _line(lines, "path weights cache (CGN_DIST_CACHE)")
    assert bad.startswith("FAIL ") and f"looks in {views['cache2']} and does not see the marker the driver wrote in " \
        f"{views['cache']}" in bad
    assert "fix: point CGN_DIST_CACHE at one shared folder" in bad
    assert bad.count("does not see") == 1, "only the second node is named"
    assert _line(lines, "path out_dir").startswith("ok   ")  # a shared path stays ok


def test_weights_file_missing_on_one_node(cluster, capsys, monkeypatch):
    c, views, root = cluster
    _view(views["cache2"], views["cache"])
    _view(views["torch2"], None)  # node 2's torch hub: empty
    ckpt = views["torch"] / "hub" / "checkpoints"
    ckpt.mkdir(parents=True, exist_ok=True)
    (ckpt / "resnet50-0676ba61.pth").write_bytes(b"x" * 100)
    rc, lines = _doctor(capsys, monkeypatch, views, "task=invariant", "invariant.weights=resnet50",
                        f"out_dir={root / 'runs'}", f"ray.address={c.address}")
    assert rc == 1
    bad = _line(lines, "weights resnet50")
    assert bad.startswith("FAIL ") and str(views["torch2"] / "hub" / "checkpoints" / "resnet50-0676ba61.pth") in bad
    assert bad.count("not at ") == 1 and "fix: `cgn-dist weights fetch resnet50` with TORCH_HOME" in bad
    assert [ln for ln in lines if ln.startswith("FAIL")] == [bad]


def test_resources_that_do_not_fit_fail_the_doctor_and_stop_train_before_it_starts(cluster, capsys, monkeypatch,
                                                                                    tmp_path):
    c, views, _ = cluster
    _view(views["cache2"], views["cache"])
    args = ["task=mnist", f"out_dir={tmp_path / 'runs'}", f"ray.address={c.address}", "distributed.num_workers=2",
            "distributed.cpus_per_worker=1.5"]
    rc, lines = _doctor(capsys, monkeypatch, views, *args)
    bad = _line(lines, "resources")
    assert rc == 1 and bad.startswith("FAIL resources: 2 Ray Train workers of {CPU 1.5} each: only 0 fit")
    assert "fix: lower distributed.num_workers" in bad
    assert cli.main(["train", "configs/debug/mnist_tiny.yaml", *args, "name=nofit"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: preflight: FAIL resources: 2 Ray Train workers") and err.count("\n") == 1
    assert not (tmp_path / "runs" / "nofit").exists()
    rc, lines = _doctor(capsys, monkeypatch, views, *args[:-1], "distributed.cpus_per_worker=1")
    assert rc == 0 and "2 Ray Train workers of {CPU 1} each fit on 2 node(s)" in _line(lines, "resources")
    # generation actors on GPUs, on a cluster without any: refused before the first actor waits for one
    assert cli.main(["generate", "configs/generate/mnist_colored.yaml", f"out_dir={tmp_path / 'gen'}",
                     f"ray.address={c.address}", "generate.backend=ray", "generate.device=cuda"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: preflight: FAIL resources: 1 generation actors (device=cuda: one GPU each) of "
                          "{GPU 1} each: only 0 fit"), err
    assert not (tmp_path / "gen").exists()


def test_single_machine_without_ray(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "CGN_DIST_CACHE": str(tmp_path / "cache")}
    run = [sys.executable, "-m", "cgn_dist.cli", "doctor", "configs/debug/imagenet_tiny.yaml",
           f"out_dir={tmp_path / 'runs'}"]
    ok = subprocess.run(run, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert ok.stdout.splitlines()[0].endswith("on this machine")
    assert f"ok   path out_dir: {tmp_path / 'runs'}: marker seen and writable from 1 node(s)" in ok.stdout
    assert "ok   matrix units: " in ok.stdout and "ok   nccl: " in ok.stdout
    bad = subprocess.run(run + ["task=invariant", f"invariant.cf_shards={tmp_path / 'nothing'}",
                                "invariant.weights=resnet50"],
                         cwd=REPO, env={**env, "TORCH_HOME": str(tmp_path / "torch")},
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1
    assert f"FAIL path invariant.cf_shards: {tmp_path / 'nothing'} does not exist on the driver" in bad.stdout
    assert "FAIL weights resnet50: node local" in bad.stdout


def test_matrix_units_line_follows_the_cpu_flags_and_the_onednn_cap(tmp_path):
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("ONEDNN_MAX_CPU_ISA", None)
    run = [sys.executable, "-m", "cgn_dist.cli", "doctor", f"out_dir={tmp_path}"]

    def line(**extra):
        out = subprocess.run(run, cwd=REPO, env={**env, **extra}, capture_output=True, text=True, timeout=300).stdout
        return next(ln for ln in out.splitlines() if ln.startswith("ok   matrix units: "))

    free = line()
    assert ("avx512_bf16" in free) == ("avx512_bf16" in flags) and ("avx2" in free) == ("avx2" in flags)
    # bf16 with AMX, from the flags; with AVX-512 BF16 alone where the probe measured it faster (its figure shown)
    probed = "a bf16 convolution measured" in free
    assert probed == ("avx512_bf16" in free and "amx," not in free), free
    if not probed:
        assert ("cpu precision=auto: bf16" in free) == ("amx," in free), free
    else:
        speedup = float(free.split("a bf16 convolution measured ", 1)[1].split("x", 1)[0])
        assert ("cpu precision=auto: bf16" in free) == (speedup >= 1.25), free
    capped = line(ONEDNN_MAX_CPU_ISA="AVX2")
    assert "amx" not in capped and "avx512_bf16" not in capped and "ONEDNN_MAX_CPU_ISA=AVX2" in capped
    assert "cpu precision=auto: fp32 (CPU without AMX (oneDNN capped at AVX2" in capped


def _unshare_works() -> bool:
    try:
        return subprocess.run(["unshare", "-m", "true"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.skipif(not _unshare_works(), reason="needs `unshare -m` (root or CAP_SYS_ADMIN) to give one node its own "
                                                 "mounts")
@pytest.mark.timeout(300)
def test_node_whose_mount_hides_the_shared_folder(tmp_path, capsys):
    """A worker node started in its own mount namespace with an empty tmpfs over the run's folder: what a
    node sees when /shared is a local mkdir there instead of the shared mount."""
    shared = tmp_path / "shared"
    (shared / "cf").mkdir(parents=True)
    (shared / "cf" / "index.json").write_text("{}")
    shutdown_ray()
    c = LoopbackCluster(num_nodes=1, cpus_per_node=1, object_store_mb=80).start()
    try:
        c.connect()
        with node_with_own_mounts(c, shared, tmp_path / "node.log"):
            _hidden_folder_checks(c, shared, capsys)
    finally:
        shutdown_ray()
        c.shutdown()


def _hidden_folder_checks(c, shared, capsys):
    args = ["task=invariant", "invariant.weights=random", f"invariant.cf_shards={shared / 'cf'}",
            f"out_dir={shared / 'runs'}", f"ray.address={c.address}"]
    capsys.readouterr()
    rc = cli.main(["doctor", *args])
    lines = capsys.readouterr().out.splitlines()
    with capsys.disabled():  # the report, for whoever runs the tests with -s
        print("\n".join(lines))
    assert rc == 1 and lines[0].endswith("(2 nodes)")
    out = _line(lines, "path out_dir")
    assert out.startswith(f"FAIL path out_dir: node ") and \
        f"looks in {shared} and does not see the marker the driver wrote in {shared}" in out
    assert "fix: mount shared storage at the same path on every node" in out and "s3://" in out
    cf = _line(lines, "path invariant.cf_shards")
    assert cf.startswith("FAIL ") and f"sees nothing at {shared / 'cf'}" in cf
    # the cheap part stops a Ray Train run before it starts
    assert cli.main(["train", "configs/debug/classifier_tiny.yaml", *args, "distributed.num_workers=1",
                     "distributed.cpus_per_worker=0.5", "name=hidden"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: preflight: FAIL path out_dir: node ") and "cgn-dist doctor shows" in err
    assert not (shared / "runs" / "hidden").exists()


def _software(smi, torch_gpus, cvd=None):
    from cgn_dist.precision import decide_precision

    caps = {"type": "cpu", "amx": False, "avx512_bf16": True, "avx2": True, "isa_cap": None, "torch_isa": "AVX512"}
    picked = {"cpu": decide_precision("auto", caps)}
    if torch_gpus:
        picked["cuda"] = decide_precision("auto", {"type": "cuda", "cuda_bf16": True})
    return {"node_id": "n1", "host": "gpu-1", "software": {"picked": picked,
        "torch": "2.14.1+cu130", "torch_cuda": "13.0", "cuda_available": bool(torch_gpus), "torch_gpus": torch_gpus,
        "nvidia_smi": smi, "cuda_visible_devices": cvd, "nccl": True, "nccl_version": "2.27.3" if torch_gpus else None,
        "python": "3.11.7", "caps": caps}}


def test_gpus_nvidia_smi_lists_but_torch_does_not_see_fail_with_the_torch_build_fix():
    # The CPU half of the GPU check: a node's answers as a CUDA-13 torch on a 570 driver gives them.
    from cgn_dist.config import load_config
    from cgn_dist.doctor_checks import software_lines

    cfg = load_config(None, [])
    smi = ["NVIDIA H200, 570.86.15", "NVIDIA H200, 570.86.15"]
    lines = [str(ln) for ln in software_lines(cfg, [_software(smi, [])], many=False)]
    assert lines[0] == "ok   torch: torch 2.14.1+cu130 (CUDA build 13.0), python 3.11.7, driver 570.86.15"
    assert lines[1].startswith("FAIL gpus: nvidia-smi lists 2 GPU(s) (NVIDIA H200), torch sees 0; fix: install the "
                               "torch build for this driver")
    # CUDA_VISIBLE_DEVICES hides GPUs on purpose: not a fault; all seen: ok, and the precision follows the GPU
    hidden = [str(ln) for ln in software_lines(cfg, [_software(smi, [], cvd="")], many=False)]
    assert hidden[1] == "ok   gpus: torch sees 0 GPU(s) (CPU run)"
    seen = [str(ln) for ln in software_lines(cfg, [_software(smi, ["NVIDIA H200"] * 2)], many=False)]
    assert seen[1] == "ok   gpus: torch sees 2 GPU(s): NVIDIA H200, NVIDIA H200" and seen[2] == "ok   nccl: NCCL 2.27.3"
    assert seen[3].startswith("ok   matrix units: avx512_bf16, avx2 (torch ISA AVX512); cpu precision=auto: fp32")
    assert seen[3].endswith("; cuda precision=auto: bf16 (CUDA device with bf16 support)")
    cuda_cfg = load_config(None, ["distributed.use_gpu=true"])
    none = [str(ln) for ln in software_lines(cuda_cfg, [_software(None, [])], many=False)]
    assert none[1].startswith("FAIL gpus: the config asks for CUDA") and "(no nvidia-smi here)" in none[1]
