"""Precision per device: the decision on given capabilities, the probe under a capped oneDNN, the record."""
from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cgn_dist.config import load_config
from cgn_dist.precision import cpu_flags, decide_precision

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("requested,device,cuda_bf16,amx,probe,want", [
    ("auto", "cuda", True, False, None, "bf16"),
    ("auto", "cuda", False, False, None, "fp32"),
    ("auto", "cpu", False, False, None, "fp32"),                              # AVX-512 BF16 / AVX2 flags
    ("auto", "cpu", False, True, None, "bf16"),                               # AMX, not measured
    ("auto", "cpu", False, True, {"fp32": 10.7, "bf16": 3.0}, "bf16"),        # AMX that oneDNN uses
    ("auto", "cpu", False, True, {"fp32": 10.7, "bf16": 16.4}, "fp32"),       # AMX flag, ISA capped below it
    ("fp32", "cpu", False, True, {"fp32": 10.7, "bf16": 3.0}, "fp32"),        # explicit choices stand
    ("bf16", "cpu", False, False, {"fp32": 10.7, "bf16": 16.4}, "bf16"),
])
def test_decision_on_given_capabilities(requested, device, cuda_bf16, amx, probe, want):
    name, reason, ratio = decide_precision(requested, device, cuda_bf16, amx, probe)
    assert name == want and reason
    if probe:
        assert ratio == pytest.approx(probe["bf16"] / probe["fp32"])


def test_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="precision must be one of"):
        decide_precision("fp8", "cpu")


_CHILD = ("import logging, sys; logging.basicConfig(level=logging.INFO, stream=sys.stdout)\n"
          "from cgn_dist.precision import choose_precision, probe_cpu_conv\n"
          "print('CHOICE', choose_precision('cpu', sys.argv[1])[0], probe_cpu_conv())\n")


def _child(isa: str | None, requested: str = "auto") -> str:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.pop("ONEDNN_MAX_CPU_ISA", None)
    if isa:
        env["ONEDNN_MAX_CPU_ISA"] = isa
    out = subprocess.run([sys.executable, "-c", _CHILD, requested], env=env, capture_output=True, text=True,
                         timeout=120, check=True)
    return out.stdout + out.stderr


def test_probe_honours_a_capped_onednn_in_a_child_process():
    """AVX2 (a laptop): bf16 convolutions are emulated and several times slower, whatever the CPU flag says."""
    out = _child("AVX2")
    assert "CHOICE fp32" in out, out
    if "amx_bf16" in cpu_flags():  # the flag says AMX, so only the measurement can have said fp32
        assert "measured" in out and "slower" in out, out
    warned = _child("AVX2", "bf16")
    assert "CHOICE bf16" in warned, warned  # an explicit choice runs, with one warning saying how much slower
    assert warned.count("precision=bf16 on this CPU: a bf16 convolution measured") == 1, warned


@pytest.mark.skipif("amx_bf16" not in cpu_flags(), reason="needs a CPU with AMX")
def test_probe_picks_bf16_where_amx_is_used():
    assert "CHOICE bf16" in _child(None)


def test_resolved_config_records_the_choice(tmp_path):
    import yaml

    from cgn_dist.train.mnist import train_mnist

    tiny = ROOT / "configs" / "debug" / "mnist_tiny.yaml"
    cfg = load_config(tiny, [f"out_dir={tmp_path}", "mnist.fast_update=true", "train.max_steps=1",
                             "mnist.precision=auto"])
    run_dir = Path(train_mnist(copy.deepcopy(cfg))["run_dir"])
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    from cgn_dist.precision import choose_precision
    assert saved["mnist"]["precision"] in ("fp32", "bf16")
    assert saved["mnist"]["precision"] == choose_precision("cpu", "auto")[0]
    assert f"fast update in {saved['mnist']['precision']}, " in (run_dir / "log.txt").read_text()
