"""Model files and folders as ComfyUI lists them: ``folder_paths`` entries plus ``.gguf`` files and diffusers / HF
folders."""

from __future__ import annotations

import os

import folder_paths

from ..krea2_model import Krea2Error

DIFFUSERS_MARKERS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json",
                     "model.safetensors.index.json", "model.safetensors")


def _folder_entries(kind: str) -> list[str]:
    """Model folders (diffusers / HF layouts) directly inside ``kind``'s search paths, as ``name/``."""
    out = []
    for base in folder_paths.get_folder_paths(kind):
        if not os.path.isdir(base):
            continue
        for name in sorted(os.listdir(base)):
            p = os.path.join(base, name)
            if os.path.isdir(p):
                inner = os.path.join(p, "transformer") if kind == "diffusion_models" else p
                for cand in (p, inner):
                    if any(os.path.exists(os.path.join(cand, m)) for m in DIFFUSERS_MARKERS):
                        out.append(name + "/")
                        break
    return out


def _gguf_files(kind: str) -> list[str]:
    """``.gguf`` files under ``kind``'s search paths (the host lists only its own extensions; for
    ``diffusion_models`` these paths include ``models/unet``), as paths relative to their folder."""
    out = []
    for base in folder_paths.get_folder_paths(kind):
        if not os.path.isdir(base):
            continue
        for root, _dirs, files in os.walk(base, followlinks=True):
            for f in files:
                if f.lower().endswith(".gguf"):
                    out.append(os.path.relpath(os.path.join(root, f), base).replace(os.sep, "/"))
    return out


def list_files(kind: str) -> list[str]:
    # every file the host lists, pickles included: choosing one gets a clear refusal, not a silent gap
    return sorted(set(folder_paths.get_filename_list(kind)) | set(_gguf_files(kind))) + _folder_entries(kind)


def resolve(kind: str, name: str) -> str:
    """Full path of a file or ``folder/`` from ``kind``; a clear error naming the input otherwise."""
    if name.endswith("/"):
        for base in folder_paths.get_folder_paths(kind):
            p = os.path.join(base, name.rstrip("/"))
            if os.path.isdir(p):
                t = os.path.join(p, "transformer")
                return t if kind == "diffusion_models" and os.path.isdir(t) else p
    else:
        p = folder_paths.get_full_path(kind, name)
        if p is not None:
            return p
    raise Krea2Error(f"'{name}' was not found in models/{kind} (searched: "
                     f"{', '.join(folder_paths.get_folder_paths(kind))}). Put the file there and refresh the page.")
