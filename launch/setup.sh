#!/usr/bin/env bash
# Create .venv and install cgn_dist with its test extras. Idempotent: a second run is quick.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import cgn_dist, deepspeed, ray, webdataset, pytorch_pretrained_biggan, mlxtend, psutil, skimage, sklearn, pytest, fsspec, s3fs, moto.server" 2>/dev/null; then
  .venv/bin/pip install -q --upgrade pip
  # torch 2.14.1 / torchvision 0.29.1 are pinned: on the project's machines pip takes them from local disk.
  .venv/bin/pip install -q torch==2.14.1 torchvision==0.29.1
  # DeepSpeed is an sdist: build it without compiling its CUDA/CPU ops (they JIT-build if ever needed).
  DS_BUILD_OPS=0 .venv/bin/pip install -q -e ".[dev]"
fi
