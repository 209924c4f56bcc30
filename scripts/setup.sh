#!/usr/bin/env bash
# Set-up: a virtual environment in .venv with the pack's runtime and test dependencies (the test venv
# only: installing the pack into ComfyUI never touches the host's torch).
#
# torch: TORCH_SPEC (default torch==2.13.0, the version the tests are run with) from pip's configured
# index. What that gives depends on the index: PyPI's Linux x86_64 build of torch is the CUDA one
# (a download of several GB; it runs on the CPU too). For the CPU-only build, point the torch install
# at an index that has it, e.g. PyTorch's own:
#     TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu bash scripts/setup.sh
# (only torch comes from that index; everything else from pip's usual one).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if [ -n "${TORCH_INDEX_URL:-}" ]; then
    .venv/bin/python -m pip install -q "$TORCH_SPEC" --index-url "$TORCH_INDEX_URL"
else
    .venv/bin/python -m pip install -q "$TORCH_SPEC"
fi
# torch is installed: the pack's unpinned "torch" requirement is satisfied and never replaced
.venv/bin/python -m pip install -q -e ".[test]"
echo "set-up done: .venv ($(.venv/bin/python -c 'import torch, diffusers; print("torch", torch.__version__, "(CUDA build)" if torch.version.cuda else "(CPU build)", "diffusers", diffusers.__version__)'))"
