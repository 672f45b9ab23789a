"""launch/setup.sh stops with the install line per driver when nvidia-smi lists GPUs that torch cannot use
(a torch build for a newer CUDA than the driver), instead of letting device=auto train on the CPU."""
import os
import subprocess
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

FAKE_SMI = """#!/bin/sh
# stands in for the driver's tool on a node whose driver is too old for the installed torch
case "$*" in
  *query-gpu*) echo "550.54.15" ;;
  *) echo "GPU 0: NVIDIA H200 (UUID: GPU-00000000-0000-0000-0000-000000000000)" ;;
esac
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="torch sees a GPU here: the stop cannot be provoked")
@pytest.mark.skipif(not (REPO / ".venv" / "bin" / "python").exists(), reason="needs the set-up .venv")
def test_setup_stops_when_nvidia_smi_lists_gpus_torch_cannot_use(tmp_path):
    smi = tmp_path / "nvidia-smi"
    smi.write_text(FAKE_SMI)
    smi.chmod(0o755)
    env = dict(os.environ, PATH=f"{tmp_path}:{os.environ['PATH']}")
    p = subprocess.run(["bash", "launch/setup.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 1, p.stdout + p.stderr
    assert "driver 550.54.15" in p.stderr and "cannot use them" in p.stderr
    assert "--index-url https://download.pytorch.org/whl/cu12" in p.stderr  # the install line for CUDA 12.x


@pytest.mark.skipif(not (REPO / ".venv" / "bin" / "python").exists(), reason="needs the set-up .venv")
def test_setup_passes_without_gpus(tmp_path):
    # no nvidia-smi on PATH's front and none listing GPUs: the check has nothing to say
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'No devices were found'\nexit 6\n")
    smi.chmod(0o755)
    env = dict(os.environ, PATH=f"{tmp_path}:{os.environ['PATH']}")
    p = subprocess.run(["bash", "launch/setup.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
