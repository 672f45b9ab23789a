"""benchmarks/device_check.sh on a machine without CUDA: a failure, never a pass."""
import os
import subprocess
import sys
from pathlib import Path

import torch
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA path")
def test_device_check_without_cuda_exits_non_zero(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path)}
    env.pop("DEVICE_CHECK_CPU_SMOKE", None)
    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "device_check.sh")], env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 4, r.stdout + r.stderr
    assert "sees no CUDA device" in r.stdout
    assert not (tmp_path / "device_check.json").exists()


def test_device_check_pins_torchvision():
    text = (ROOT / "benchmarks" / "device_check.sh").read_text()
    assert "torchvision==0.29.1" in text and " torchvision " not in text.replace("torchvision==", "")
