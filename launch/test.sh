#!/usr/bin/env bash
# Install if needed, then run the whole test suite (slow tests included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
source launch/env.sh
status=0
.venv/bin/python -m pytest tests -q "$@" || status=$?
.venv/bin/ray stop --force >/dev/null 2>&1 || true
exit $status
