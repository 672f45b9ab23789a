#!/usr/bin/env bash
# Submit a cgn-dist command as a Ray job to an existing cluster.
#   RAY_ADDRESS=http://HEAD:8265 launch/submit.sh train configs/imagenet/authors_code.yaml \
#       distributed.num_workers=8 distributed.use_gpu=true train.engine=deepspeed out_dir=/shared/runs
#   RAY_ADDRESS=http://HEAD:8265 launch/submit.sh generate configs/generate/imagenet_random.yaml \
#       generate.backend=ray generate.num_workers=8 out_dir=/shared/cf
# Inside the job, Ray is reached with ray.address=auto (added below), so the cluster's own settings apply.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${RAY_ADDRESS:?set RAY_ADDRESS to the cluster's job server, e.g. http://HEAD:8265}"
exec ray job submit --address "$RAY_ADDRESS" --working-dir . \
  --runtime-env-json '{"excludes": [".venv", "runs", "data", ".git"]}' \
  -- cgn-dist "$@" ray.address=auto
