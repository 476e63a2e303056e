#!/usr/bin/env bash
# The test command: install everything the suite needs, then run it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install.sh all,test
# Idle OpenMP threads spin by default and starve the model servers and trainers that the tests run
# beside each other on a small CPU (one request 5-10x slower); passive waiting fixes that.
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
exec python -m pytest -q -ra "$@"
