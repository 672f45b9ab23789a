"""benchmarks/gpu_smoke.sh: a failure without CUDA (never a pass), and its rows end to end on the CPU at tiny
sizes (GPU_SMOKE_CPU=1), each recorded in the JSON; a row that misses its threshold fails the run."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_smoke.sh"


def _env(tmp_path, **extra):
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path), "OMP_NUM_THREADS": "1", **extra}
    env.pop("GPU_SMOKE_CPU", None) if "GPU_SMOKE_CPU" not in extra else None
    return env


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA path")
def test_without_cuda_it_exits_4_and_writes_nothing(tmp_path):
    r = subprocess.run(["bash", str(SCRIPT)], env=_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert r.returncode == 4, r.stdout + r.stderr
    assert "sees no CUDA device" in r.stdout and "GPU_SMOKE_CPU=1" in r.stdout
    assert not (tmp_path / "gpu_smoke.json").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU half; on a GPU the script runs the real rows")
@pytest.mark.timeout(600)
def test_cpu_smoke_runs_every_row_and_writes_the_json(tmp_path):
    r = subprocess.run(["bash", str(SCRIPT)], env=_env(tmp_path, GPU_SMOKE_CPU="1"), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    doc = json.loads((tmp_path / "gpu_smoke.json").read_text())
    assert doc["mode"].startswith("cpu-smoke") and doc["device"].startswith("CPU")
    rows = {row["row"]: row for row in doc["rows"]}
    assert list(rows) == ["train", "generate", "classifier", "forward"] and all(row["ok"] for row in rows.values())
    assert rows["train"]["steps"] == 2 and rows["train"]["grad_accum_dtype"] == {"grad_accum_dtype": "fp32"}
    assert rows["train"]["bf16"] == {"enabled": True}
    assert rows["generate"]["images_compared"] == 8 and rows["generate"]["provenance_ok"]
    assert rows["classifier"]["steps"] == 10 and rows["classifier"]["evaluations"][0] == "accuracy_epoch000.json"
    assert rows["classifier"]["process_group"] == "gloo" and rows["classifier"]["all_reduce_ok"]
    assert [(t["variant"], t["batch"]) for t in rows["forward"]["table"]] == [("fp32", 2), ("bf16", 2)]
    assert "gpu_smoke: 4 ok, 0 failed" in r.stdout


def test_a_row_below_its_threshold_fails_the_run_and_is_recorded(tmp_path):
    out = tmp_path / "s.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_smoke.py"), "--cpu", "--rows", "generate",
                        "--min-psnr", "inf", "--json", str(out)], env=_env(tmp_path), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 1, r.stdout + r.stderr
    (row,) = json.loads(out.read_text())["rows"]
    assert row["row"] == "generate" and row["ok"] is False and row["images_compared"] == 8
    assert "1 failed: generate" in r.stdout


def test_gpu_smoke_pins_torchvision():
    text = SCRIPT.read_text()
    assert "torchvision==0.29.1" in text and " torchvision " not in text.replace("torchvision==", "")
