#!/usr/bin/env bash
# Install PyTorch into the given venv *before* the project (docs/toolchain.md: an unpinned `torch` resolved by pip
# pulls a multi-GB CUDA build). Where there is no NVIDIA GPU we take the CPU build of 2.13.0.
set -euo pipefail
PY=${1:-.venv/bin/python}
if "$PY" -c "import torch" 2>/dev/null; then
  echo "torch already installed: $("$PY" -c 'import torch; print(torch.__version__)')"
  exit 0
fi
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "NVIDIA GPU found: installing a CUDA build of torch"
  "$PY" -m pip install "torch>=2.4"
elif "$PY" -m pip install "torch==2.13.0+cpu"; then
  echo "installed the CPU build of torch 2.13.0"
else
  echo "CPU wheel not found on the configured indexes; trying the PyTorch CPU index"
  "$PY" -m pip install "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu
fi
