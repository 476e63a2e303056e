#!/usr/bin/env bash
# The test command: install everything the suite needs, then run it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install.sh all,test
exec python -m pytest -q -ra "$@"
