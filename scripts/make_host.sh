#!/usr/bin/env bash
# Set up the Python environment of a ComfyUI you already have (a git clone or an unpacked release of
# ComfyUI), CPU only, so the pack's host-tier tests (tests/host/) can start it. It never replaces torch
# in an environment that already has one.
#
#   scripts/make_host.sh COMFYUI_DIR [DEST_DIR]
#
# COMFYUI_DIR: the ComfyUI checkout (it holds main.py and requirements.txt).
# DEST_DIR:    optional; a copy of the checkout is made there first (an existing venv in it is kept).
#              Without it the checkout itself is set up in place.
# The venv is <host>/.venv. The tests find the host through COMFYUI_PATH, else the pack's grandparent
# when the pack sits in ComfyUI/custom_nodes, else ~/comfy/ComfyUI (and an older one for the
# compatibility checks through COMFYUI_PATH_OLD, else ~/comfy/ComfyUI-0.3.64).
#
# Example, for a clone of ComfyUI's repository:
#   git clone https://github.com/comfyanonymous/ComfyUI ~/comfy/ComfyUI && scripts/make_host.sh ~/comfy/ComfyUI
#
# Downloads only from pip's configured indexes. The torch combination, and why:
#  * an unconstrained install of ComfyUI's requirements.txt pulls the newest torch build and replaces the
#    one in the venv, so torch/torchvision/torchaudio are filtered out of it and held by a constraints file;
#  * ComfyUI imports torchvision and, from 0.3x on, torchaudio at start, so both must import beside torch;
#  * the pins (torch 2.14.1 + torchvision 0.29.1, torchaudio 2.11.0 without dependencies: its abi3
#    libraries load beside that torch) import together on x86_64 Linux with Python 3.11 and run on the CPU.
#    A venv that already has a working torch keeps it (set TORCH_PIN etc. to change the pins, e.g. on
#    aarch64: TORCH_PIN=torch==2.9.1 TORCHVISION_PIN=torchvision==0.24.1 TORCHAUDIO_PIN=torchaudio==2.9.1).
set -euo pipefail

if [ $# -lt 1 ] || [ $# -gt 2 ]; then
    echo "usage: $0 COMFYUI_DIR [DEST_DIR]" >&2
    exit 2
fi
SRC=$(cd "$1" && pwd)
mkdir -p "${2:-$1}"
DEST=$(cd "${2:-$1}" && pwd)
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

# 1) torch + torchvision first, then torchaudio without dependencies (its metadata would otherwise try to
#    move torch). Skipped when the venv already imports all three: its torch is never replaced.
if "$VENV/bin/python" -c "import torch, torchvision, torchaudio" >/dev/null 2>&1; then
    echo "keeping the venv's torch: $("$VENV/bin/python" -c 'import torch; print(torch.__version__)')"
    # held at their public versions (a local tag such as +cu130 is not on the index; == ignores it)
    "$VENV/bin/python" -c 'import torch, torchvision, torchaudio
for m in (torch, torchvision, torchaudio): print(m.__name__ + "==" + m.__version__.split("+")[0])' > "$CONS"
else
    "${PIP[@]}" install "$TORCH_PIN" "$TORCHVISION_PIN"
    "${PIP[@]}" install --no-deps "$TORCHAUDIO_PIN"
fi
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
