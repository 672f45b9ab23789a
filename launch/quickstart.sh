#!/usr/bin/env bash
# Fresh machine -> the main job on the embedded default (local, CPU, offline 5,000 MNIST digits).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
source launch/env.sh
exec .venv/bin/cgn-dist mnist-pipeline configs/main.yaml "$@"
