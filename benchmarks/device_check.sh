#!/usr/bin/env bash
# Generation speed on one GPU, from a fresh checkout, set-up included, in <= 8 minutes (DEVICE_CHECK_BUDGET_S).
# Prints the GPU, forward-only images/s and MFU (against the card's dense bf16 peak) for fp32 / bf16 /
# bf16+compile at forward batch 16, 64, 128 on the full 256-px model (random weights), and the engine's
# images/s writing real WebDataset shards (JPEG, overlapped) at the largest batch.
#
#   bash benchmarks/device_check.sh                 # results also in $OUT/device_check.json (OUT default /tmp)
#
# Without a GPU it runs the same code paths on the tiny 32-px model at batches 2 and 4 (a smoke test of the
# script, not a measurement; VARIANTS=fp32,bf16,bf16+compile adds compile, minutes on a small CPU).
set -uo pipefail
T0=$(date +%s)
cd "$(dirname "$0")/.." || exit 2
BUDGET_ALL=${DEVICE_CHECK_BUDGET_S:-480}

PY=${PYTHON:-}
if [ -z "$PY" ]; then
  for c in .venv/bin/python python3 python; do
    if command -v "$c" >/dev/null 2>&1; then PY=$c; break; fi
  done
fi
[ -n "$PY" ] || { echo "device_check: no python found (set PYTHON=/path/to/python)"; exit 2; }

# Set-up: only what the generation path imports (torch comes with the machine's CUDA build).
need() { "$PY" -c "import torch, torchvision, numpy, PIL, scipy, yaml, tqdm, webdataset, pytorch_pretrained_biggan" 2>/dev/null; }
if ! need; then
  echo "set-up: installing the generation dependencies with pip"
  timeout 240 "$PY" -m pip install -q torchvision==0.29.1 pytorch-pretrained-biggan scipy pillow pyyaml tqdm webdataset numpy \
    || { echo "device_check: set-up failed (pip); install torch, torchvision, pytorch-pretrained-biggan, scipy, pillow,"\
              "pyyaml, tqdm, webdataset, numpy into $PY and rerun"; exit 2; }
  need || { echo "device_check: the dependencies still do not import with $PY"; exit 2; }
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
echo "set-up: $(( $(date +%s) - T0 )) s; python $("$PY" -c 'import sys; print(sys.version.split()[0])')"

if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  ARGS=(--device-check --batches "${BATCHES:-16,64,128}" --n "${N_IMAGES:-128}")
elif [ "${DEVICE_CHECK_CPU_SMOKE:-0}" = 1 ]; then
  echo "no CUDA device: smoke run on the tiny 32-px model (not a measurement)"
  ARGS=(--device-check --tiny --batches 2,4 --n 4 --threads 1 --variants "${VARIANTS:-fp32,bf16}")
else
  # A device check that cannot see the device has failed: a CPU run here would read as a pass.
  echo "device_check: torch $("$PY" -c 'import torch; print(torch.__version__)') sees no CUDA device" \
       "— fix: install the torch build for this driver (README), or DEVICE_CHECK_CPU_SMOKE=1 for a CPU smoke run"
  exit 4
fi
LEFT=$(( BUDGET_ALL - ($(date +%s) - T0) ))
# The benchmark starts no new measurement after BUDGET s; the hard limit leaves room for the one running.
BUDGET=$(( LEFT - 90 ))
[ "$BUDGET" -gt 30 ] || { echo "device_check: no time left after set-up"; exit 3; }
timeout $(( LEFT - 10 )) "$PY" benchmarks/bench_generate_speed.py "${ARGS[@]}" --budget-s "$BUDGET" \
  --json "${OUT:-/tmp}/device_check.json"
rc=$?
echo "device check: exit $rc, $(( $(date +%s) - T0 )) s in all (budget ${BUDGET_ALL} s)"
exit $rc
