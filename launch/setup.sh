#!/usr/bin/env bash
# Create .venv and install cgn_dist with its test extras. Idempotent: a second run is quick.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import cgn_dist, deepspeed, ray, webdataset, pytorch_pretrained_biggan, mlxtend, psutil, skimage, sklearn, pytest, fsspec, s3fs, moto.server; assert int(s3fs.__version__.split('.')[0]) >= 2024, 'old s3fs'" 2>/dev/null; then
  .venv/bin/pip install -q --upgrade pip
  # torch 2.14.1 / torchvision 0.29.1 are pinned: on the project's machines pip takes them from local disk.
  .venv/bin/pip install -q torch==2.14.1 torchvision==0.29.1
  # DeepSpeed is an sdist: build it without compiling its CUDA/CPU ops (they JIT-build if ever needed).
  DS_BUILD_OPS=0 .venv/bin/pip install -q -e ".[dev]"
fi
# GPUs that torch cannot see would make device=auto train on the CPU without a word: stop here instead.
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q GPU; then
  if ! .venv/bin/python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    driver=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -1)
    echo "setup: nvidia-smi lists GPUs (driver $driver) but torch $(.venv/bin/python -c 'import torch; print(torch.__version__)') cannot use them." >&2
    echo "  torch 2.14.1 is built for CUDA 13 and needs driver >= 580. With an older driver (CUDA 12.x) install:" >&2
    echo "  .venv/bin/pip install torch==2.14.1 torchvision==0.29.1 --index-url https://download.pytorch.org/whl/cu12X" >&2
    echo "  with the cu12X index that PyTorch's install matrix lists for 2.14.1" >&2
    echo "  (README, 'torch builds per driver'); or update the driver." >&2
    exit 1
  fi
fi
