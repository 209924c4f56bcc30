#!/usr/bin/env bash
# Set-up: a virtual environment in .venv with the pack's runtime and test dependencies.
# torch is pinned to 2.13.0 here (the test venv only): pip then takes the local CPU wheel instead of
# a multi-GB CUDA build. Installing the pack into ComfyUI never touches the host's torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[test]"
echo "set-up done: .venv ($(.venv/bin/python -c 'import torch, diffusers; print("torch", torch.__version__, "diffusers", diffusers.__version__)'))"
