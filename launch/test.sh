#!/usr/bin/env bash
# Install if needed, then run the whole test suite (slow tests included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
source launch/env.sh
# The tests start their Ray instances under a temp dir of their own and stop exactly those when they end
# (tests/conftest.py); other Ray instances on this machine are left running.
exec .venv/bin/python -m pytest tests -q "$@"
