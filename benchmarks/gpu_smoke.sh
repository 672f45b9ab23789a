#!/usr/bin/env bash
# The first run on a lent GPU, set-up included, in <= 10 minutes (GPU_SMOKE_BUDGET_S) on one H100/H200:
# 2 full-size CGN-ImageNet updates under DeepSpeed bf16 (fp32 accumulation, batch 1 x 8), 2 generated
# shards in bf16 + channels-last with nvJPEG checked image by image against Pillow's encoder (PSNR), and
# 10 classifier steps + evaluations on a "cpu:gloo,cuda:nccl" group of one, then the device check's forward
# images/s + MFU table (fp32, bf16 at batch 16 and 64). Random weights: no downloads.
#
#   bash benchmarks/gpu_smoke.sh          # rows in $OUT/gpu_smoke.json (OUT default /tmp), written after each
#   GPU_SMOKE_COMPILE=1 bash benchmarks/gpu_smoke.sh   # also torch.compile the generation forward
#
# Never a false pass: without a CUDA device torch can see it exits 4 (GPU_SMOKE_CPU=1 runs the same rows at
# tiny sizes on the CPU instead: a smoke test of this script, not of the GPU).
set -uo pipefail
T0=$(date +%s)
cd "$(dirname "$0")/.." || exit 2
BUDGET_ALL=${GPU_SMOKE_BUDGET_S:-600}

PY=${PYTHON:-}
if [ -z "$PY" ]; then
  for c in .venv/bin/python python3 python; do
    if command -v "$c" >/dev/null 2>&1; then PY=$c; break; fi
  done
fi
[ -n "$PY" ] || { echo "gpu_smoke: no python found (set PYTHON=/path/to/python)"; exit 2; }

# Set-up: what the three rows import; the torchvision==0.29.1 pin keeps the machine's torch (its CUDA build).
need() { "$PY" -c "import torch, torchvision, deepspeed, numpy, PIL, scipy, yaml, tqdm, webdataset, tensorboard, pytorch_pretrained_biggan" 2>/dev/null; }
if ! need; then
  echo "set-up: installing the missing dependencies with pip"
  timeout 300 "$PY" -m pip install -q torchvision==0.29.1 "deepspeed>=0.15" pytorch-pretrained-biggan scipy pillow pyyaml \
    tqdm webdataset tensorboard numpy \
    || { echo "gpu_smoke: set-up failed (pip); install torchvision==0.29.1, deepspeed, pytorch-pretrained-biggan, scipy,"\
              "pillow, pyyaml, tqdm, webdataset, tensorboard, numpy into $PY and rerun"; exit 2; }
  need || { echo "gpu_smoke: the dependencies still do not import with $PY"; exit 2; }
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
echo "set-up: $(( $(date +%s) - T0 )) s; python $("$PY" -c 'import sys; print(sys.version.split()[0])')"

ARGS=(--json "${OUT:-/tmp}/gpu_smoke.json" --min-psnr "${GPU_SMOKE_MIN_PSNR:-40}")
[ "${GPU_SMOKE_COMPILE:-0}" = 1 ] && ARGS+=(--compile)
if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
elif [ "${GPU_SMOKE_CPU:-0}" = 1 ]; then
  echo "no CUDA device: the rows at tiny sizes on the CPU (a smoke test of the script, not a measurement)"
  ARGS+=(--cpu)
else
  # A GPU check that cannot see the GPU has failed: a CPU run here would read as a pass.
  echo "gpu_smoke: torch $("$PY" -c 'import torch; print(torch.__version__)') sees no CUDA device" \
       "— fix: install the torch build for this driver (README), or GPU_SMOKE_CPU=1 for a CPU smoke run"
  exit 4
fi
LEFT=$(( BUDGET_ALL - ($(date +%s) - T0) ))
[ "$LEFT" -gt 60 ] || { echo "gpu_smoke: no time left after set-up"; exit 3; }
timeout "$LEFT" "$PY" benchmarks/gpu_smoke.py "${ARGS[@]}"
rc=$?
[ "$rc" = 124 ] && echo "gpu_smoke: stopped at the ${BUDGET_ALL} s budget; the rows so far are in ${OUT:-/tmp}/gpu_smoke.json"
echo "gpu smoke: exit $rc, $(( $(date +%s) - T0 )) s in all (budget ${BUDGET_ALL} s)"
exit $rc
