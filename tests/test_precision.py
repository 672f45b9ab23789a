"""precision=auto: the decision on given capabilities, the capabilities under a capped oneDNN (child
processes: oneDNN reads its cap once), the choice recorded in a run and kept by its resume elsewhere."""
from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cgn_dist.precision import BF16_MIN_SPEEDUP, cpu_flags, decide_precision

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "debug" / "mnist_tiny.yaml"
HAS_AMX = "amx_bf16" in cpu_flags()


@pytest.mark.parametrize("requested,caps,want", [
    ("auto", {"type": "cuda", "cuda_bf16": True}, "bf16"),
    ("auto", {"type": "cuda", "cuda_bf16": False}, "fp32"),                  # e.g. a V100
    ("auto", {"type": "cpu", "amx": True, "avx512_bf16": True}, "bf16"),     # Sapphire Rapids and later
    ("auto", {"type": "cpu", "amx": False, "avx512_bf16": True}, "fp32"),    # no probe figure: fp32
    # AVX-512 BF16 without AMX: the probe decides, with a margin (figures measured on two such CPUs)
    ("auto", {"type": "cpu", "amx": False, "avx512_bf16": True, "bf16_speedup": 0.65}, "fp32"),  # Xeon, AMX hidden
    ("auto", {"type": "cpu", "amx": False, "avx512_bf16": True, "bf16_speedup": 2.0}, "bf16"),   # EPYC Zen 4
    ("auto", {"type": "cpu", "amx": False, "avx512_bf16": True, "bf16_speedup": 1.2}, "fp32"),   # under the margin
    ("auto", {"type": "cpu", "amx": False, "avx512_bf16": False, "bf16_speedup": 3.0}, "fp32"),  # capped below it
    ("auto", {"type": "cpu", "amx": False, "avx512_bf16": False, "avx2": True}, "fp32"),  # a laptop
    ("fp32", {"type": "cpu", "amx": True}, "fp32"),                          # an explicit choice stands
    ("bf16", {"type": "cpu", "amx": False}, "bf16"),
])
def test_decision_on_given_capabilities(requested, caps, want):
    name, reason = decide_precision(requested, caps)
    assert name == want and reason


def test_unknown_precision_names_the_key():
    with pytest.raises(ValueError, match="generate.precision must be one of auto, fp32, bf16, fp16"):
        decide_precision("fp8", {"type": "cpu"}, "generate.precision")


_CHILD = ("import json, logging, sys; logging.basicConfig(level=logging.INFO, stream=sys.stdout)\n"
          "from cgn_dist.precision import cpu_capabilities, resolve_precision\n"
          "print('CAPS', json.dumps(cpu_capabilities()))\n"
          "print('CHOICE', resolve_precision(sys.argv[1], 'cpu', 'mnist.precision'))\n")
# an independent timing of the same question (torch's own benchmark timer, a larger convolution, forward
# only, median): the probe's answer must agree with it wherever this one is far from the margin
_TIMER = ("import json, torch, torch.utils.benchmark as tb\n"
          "x = torch.randn(8, 128, 32, 32).contiguous(memory_format=torch.channels_last)\n"
          "w = torch.randn(128, 128, 3, 3).contiguous(memory_format=torch.channels_last)\n"
          "t = {d: tb.Timer('torch.nn.functional.conv2d(x, w, padding=1)', globals={'torch': torch, 'x': x.to(dt),"
          " 'w': w.to(dt)}).blocked_autorange(min_run_time=0.5).median for d, dt in (('fp32', torch.float32),"
          " ('bf16', torch.bfloat16))}\n"
          "print(json.dumps(t))\n")


def _env(isa: str | None) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.pop("ONEDNN_MAX_CPU_ISA", None)
    env.pop("DNNL_MAX_CPU_ISA", None)
    if isa:
        env["ONEDNN_MAX_CPU_ISA"] = isa
    return env


def _child(isa: str | None, requested: str = "auto") -> tuple[dict, str, str]:
    out = subprocess.run([sys.executable, "-c", _CHILD, requested], env=_env(isa), capture_output=True,
                         text=True, timeout=120, check=True)
    text = out.stdout + out.stderr
    caps = json.loads(text.split("CAPS ", 1)[1].splitlines()[0])
    return caps, text.split("CHOICE ", 1)[1].split()[0], text


def _independent_bf16_speedup(isa: str | None) -> float:
    out = subprocess.run([sys.executable, "-c", _TIMER], env=_env(isa), capture_output=True, text=True,
                         timeout=300, check=True)
    t = json.loads(out.stdout.strip().splitlines()[-1])
    return t["fp32"] / t["bf16"]


@functools.lru_cache(maxsize=1)
def bf16_is_auto_here() -> bool:
    """Whether precision=auto resolves to bf16 on this CPU uncapped (AMX, or AVX-512 BF16 that the probe
    measures faster): the tests below need a machine where an uncapped and a capped process differ."""
    return _child(None)[1] == "bf16"


def test_avx2_is_fp32_whatever_cpuinfo_says():
    """The cap is what a laptop gives oneDNN (no AVX-512): fp32, from the flags, with no probe run."""
    caps, choice, out = _child("AVX2")
    assert caps["amx"] is False and caps["avx512_bf16"] is False and caps["isa_cap"] == "AVX2", out
    assert caps["bf16_speedup"] is None, out  # the flags decide: nothing timed
    assert choice == "fp32" and "CPU without AMX" in out, out


def test_avx512_bf16_without_amx_is_decided_by_the_probe():
    """Under the no-AMX cap (or on such a CPU), AVX-512 BF16 CPUs differ: the probe decides, and its answer
    agrees with an independent timing of a bf16 and an fp32 convolution wherever that one is clear."""
    caps, choice, out = _child("AVX512_CORE_BF16")
    assert caps["amx"] is False and caps["isa_cap"] == "AVX512_CORE_BF16", out
    if "avx512_bf16" not in cpu_flags():
        assert caps["avx512_bf16"] is False and caps["bf16_speedup"] is None and choice == "fp32", out
        return
    assert caps["bf16_speedup"] is not None, out
    assert choice == ("bf16" if caps["bf16_speedup"] >= BF16_MIN_SPEEDUP else "fp32"), out
    assert "a bf16 convolution measured" in out, out
    other = _independent_bf16_speedup("AVX512_CORE_BF16")
    if other > 1.6:
        assert choice == "bf16", (other, out)
    elif other < 1.0:
        assert choice == "fp32", (other, out)


def test_the_uncapped_answer_follows_the_cpu():
    caps, choice, out = _child(None)
    assert caps["amx"] is HAS_AMX and caps["isa_cap"] is None, out
    fast = HAS_AMX or (caps["avx512_bf16"] and caps["bf16_speedup"] >= BF16_MIN_SPEEDUP)
    assert choice == ("bf16" if fast else "fp32"), out


def test_an_explicit_bf16_without_amx_runs_with_one_warning_saying_how_much_slower():
    caps, choice, out = _child("AVX2", "bf16")
    assert choice == "bf16", out
    assert out.count("mnist.precision=bf16 on a CPU without AMX: a bf16 convolution measured") == 1, out


def _train(run_root: Path, isa: str | None, steps: int) -> tuple[dict, str]:
    cmd = [sys.executable, "-m", "cgn_dist.cli", "train", str(TINY), f"out_dir={run_root}", "name=p",
           "mnist.fast_update=true", f"train.max_steps={steps}", "train.checkpoint_every=1"]
    out = subprocess.run(cmd, env=_env(isa), capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    run = run_root / "p"
    return yaml.safe_load((run / "config.yaml").read_text()), (run / "log.txt").read_text()


def test_a_run_records_its_choice_and_a_resume_elsewhere_keeps_it(tmp_path):
    """Started where auto means fp32 (capped oneDNN), resumed where it means bf16: the resume keeps fp32, so
    its bytes are those of an uninterrupted run on the first machine. A fresh run uncapped picks bf16."""
    if not bf16_is_auto_here():
        pytest.skip("needs a CPU where auto resolves to bf16 uncapped (AMX, or AVX-512 BF16 measured faster)")
    saved, log = _train(tmp_path / "a", "AVX2", 1)
    assert saved["mnist"]["precision"] == "fp32", saved["mnist"]
    assert "fast update in fp32" in log
    saved, log = _train(tmp_path / "a", None, 2)
    assert saved["mnist"]["precision"] == "fp32" and "resuming at update 1" in log, log
    fresh, log = _train(tmp_path / "b", None, 1)
    assert fresh["mnist"]["precision"] == "bf16" and "fast update in bf16" in log


def test_generation_records_its_choice_and_a_rerun_elsewhere_keeps_it(tmp_path, monkeypatch, caplog):
    """generate.precision=auto is resolved in the worker and recorded in the provenance. A rerun where auto
    means something else continues the folder in the recorded precision: the bytes of an uninterrupted run
    (a worker that cannot match the committed shards is refused when it starts: test_generate_workers)."""
    from cgn_dist.generate.imagenet.factory import ImagenetCounterfactualFactory
    from cgn_dist.sharding.regenerate import regenerate_sample
    from cgn_dist.sharding.run import generate_dataset

    tiny = dict(biggan="tiny", u2net="tiny", model_seed=0, forward_batch=4, truncation=0.5)
    kw = dict(n_samples=8, shard_size=4, run_seed=3, progress=False)
    # two machines in one process: the capabilities the decision reads are given (setting ONEDNN_MAX_CPU_ISA
    # here would cap this process's oneDNN for good if it had not run yet); the kernels are this CPU's
    import cgn_dist.precision as precision
    laptop = {"type": "cpu", "cuda_bf16": False, "amx": False, "avx512_bf16": False, "avx2": True,
              "isa_cap": None, "bf16_speedup": None}
    monkeypatch.setattr(precision, "device_capabilities", lambda device: laptop)
    manifest = generate_dataset(ImagenetCounterfactualFactory(**tiny), tmp_path / "a", **kw)
    assert manifest["sampler_info"]["precision"] == "fp32"
    whole = (tmp_path / "a" / "shard-000001.tar").read_bytes()
    for p in (tmp_path / "a").glob("shard-000001*"):
        p.unlink()
    monkeypatch.setattr(precision, "device_capabilities", lambda device: {**laptop, "amx": True})  # bf16 here
    with caplog.at_level("INFO"):
        again = generate_dataset(ImagenetCounterfactualFactory(**tiny), tmp_path / "a", **kw)
    assert "generate.precision=auto: fp32, as this run's committed shards were made" in caplog.text
    assert (tmp_path / "a" / "shard-000001.tar").read_bytes() == whole and again == manifest
    fresh = generate_dataset(ImagenetCounterfactualFactory(**tiny), tmp_path / "b", **kw)
    assert fresh["sampler_info"]["precision"] == "bf16"
    # regenerate on this machine gives the fp32 run's bytes too
    stored = regenerate_sample(tmp_path / "a" / "manifest.json", "000001_000002")
    from cgn_dist.data.shards import read_tar_samples
    ref = {s["__key__"]: s for s in read_tar_samples(tmp_path / "a" / "shard-000001.tar")}["000001_000002"]
    assert stored["jpg"] == ref["jpg"]
