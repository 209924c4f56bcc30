#!/usr/bin/env bash
# Build a ComfyUI host for the pack's host-tier tests (tests/host/), CPU only.
#
#   scripts/make_host.sh SRC_DIR DEST_DIR
#
# SRC_DIR: an exported ComfyUI source tree (e.g. from a git snapshot:
#          git -C SNAPSHOT_GIT_DIR archive HEAD -- . ':(exclude)BIG_MISSING_FILE' | tar -x -C SRC_DIR).
#          May equal DEST_DIR (then nothing is copied).
# DEST_DIR: where the host goes (tests look in ~/comfy/ComfyUI and ~/comfy/ComfyUI-0.3.64);
#          its venv is DEST_DIR/.venv.
#
# Downloads only from PyPI (pip's configured indexes). Why this torch combination:
#  * an unconstrained install of ComfyUI's requirements.txt pulls the newest CUDA torch (several GB)
#    and replaces whatever torch is there, so torch/torchvision/torchaudio are filtered out of it and
#    pinned through a constraints file;
#  * ComfyUI imports torchvision (comfy/sd.py -> cascade) and, from 0.3x on, torchaudio
#    (comfy/sd.py -> lightricks audio_vae) at start, so both must import;
#  * PyPI's torchvision is a CUDA build that fails beside the local CPU torch 2.13.0
#    ("operator torchvision::nms does not exist"); torch 2.14.1 + torchvision 0.29.1 (CUDA builds,
#    on this machine's local wheel store for Python 3.11, runs on the CPU) import fine together;
#  * torchaudio 2.11.0 (PyPI, 1.7 MB) ships stable-ABI (abi3) libraries and loads beside torch 2.14.1,
#    so the big torch 2.9.1 fallback is not needed.
# Override the pins with TORCH_PIN / TORCHVISION_PIN / TORCHAUDIO_PIN if another machine needs others
# (e.g. aarch64: torch==2.9.1 torchvision==0.24.1 torchaudio==2.9.1).
set -euo pipefail

if [ $# -ne 2 ]; then
    echo "usage: $0 SRC_DIR DEST_DIR" >&2
    exit 2
fi
SRC=$(cd "$1" && pwd)
mkdir -p "$2"
DEST=$(cd "$2" && pwd)
PY=${PYTHON:-python3}
TORCH_PIN=${TORCH_PIN:-torch==2.14.1}
TORCHVISION_PIN=${TORCHVISION_PIN:-torchvision==0.29.1}
TORCHAUDIO_PIN=${TORCHAUDIO_PIN:-torchaudio==2.11.0}

[ -f "$SRC/main.py" ] && [ -f "$SRC/requirements.txt" ] || { echo "$SRC is not a ComfyUI source tree" >&2; exit 1; }

if [ "$SRC" != "$DEST" ]; then
    # Copy the tree; never touch an existing venv in DEST.
    (cd "$SRC" && tar --exclude=./.venv --exclude=./venv -cf - .) | (cd "$DEST" && tar -xf -)
fi

VENV="$DEST/.venv"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip)

CONS=$(mktemp)
REQS=$(mktemp)
trap 'rm -f "$CONS" "$REQS"' EXIT
printf '%s\n%s\n%s\n' "$TORCH_PIN" "$TORCHVISION_PIN" "$TORCHAUDIO_PIN" > "$CONS"
# requirements.txt without its torch lines (the constraints decide those).
grep -viE '^[[:space:]]*(torch|torchvision|torchaudio)[[:space:]]*([<>=~!;].*)?$' "$DEST/requirements.txt" > "$REQS"

# 1) torch + torchvision first (from the local wheel store where pip finds them), then torchaudio
#    without dependencies (its metadata would otherwise try to move torch).
"${PIP[@]}" install "$TORCH_PIN" "$TORCHVISION_PIN"
"${PIP[@]}" install --no-deps "$TORCHAUDIO_PIN"
# 2) the rest of ComfyUI's requirements, torch held where it is. `requests` is imported at start
#    (app/frontend_management.py) but 0.3.64's requirements.txt does not list it.
"${PIP[@]}" install -r "$REQS" requests -c "$CONS"

# 3) check: the host's own imports that ComfyUI needs at start.
"$VENV/bin/python" - <<'PY'
import torch, torchvision, torchaudio
print("host python ok: torch", torch.__version__, "torchvision", torchvision.__version__,
      "torchaudio", torchaudio.__version__)
PY
(cd "$DEST" && "$VENV/bin/python" -c "import comfyui_version; print('ComfyUI', comfyui_version.__version__)") || true
echo "host ready: $DEST (start: $VENV/bin/python main.py --cpu --listen 127.0.0.1 --port 8188 --disable-auto-launch)"
