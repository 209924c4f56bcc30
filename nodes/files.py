"""Model files and folders as ComfyUI lists them: ``folder_paths`` entries plus ``.gguf`` files and diffusers / HF
folders."""

from __future__ import annotations

import os

import folder_paths

from ..krea2_model import Krea2Error

DIFFUSERS_MARKERS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json",
                     "model.safetensors.index.json", "model.safetensors")


def _is_loop(path: str, base: str) -> bool:
    """Whether folder ``path`` (inside ``base``) resolves to ``base`` itself or one of its parents (a symlink
    cycle: walking it would list the same tree again and again)."""
    real, top = os.path.realpath(path), os.path.realpath(base)
    return real == top or top.startswith(real.rstrip(os.sep) + os.sep)


def _folder_entries(kind: str) -> list[str]:
    """Model folders (diffusers / HF layouts) directly inside ``kind``'s search paths, as ``name/``: one level, never
    a walk; folders that loop back (symlinks to a parent) and unreadable ones are skipped."""
    out = []
    for base in folder_paths.get_folder_paths(kind):
        try:
            entries = sorted(os.scandir(base), key=lambda e: e.name)
        except OSError:  # absent or unreadable search path
            continue
        for e in entries:
            try:
                if not e.is_dir() or (e.is_symlink() and _is_loop(e.path, base)):
                    continue
            except OSError:
                continue
            inner = os.path.join(e.path, "transformer") if kind == "diffusion_models" else e.path
            if any(os.path.exists(os.path.join(cand, m)) for cand in (e.path, inner) for m in DIFFUSERS_MARKERS):
                out.append(e.name + "/")
    return out


_GGUF = ".gguf"
_unique_cache: dict = {}


def _gguf_key(kind: str) -> str:
    """A ``folder_paths`` entry listing ``.gguf`` files in ``kind``'s search paths (the host lists only its own
    extensions), kept in step with those paths; the host then lists and caches it like its own folders (its
    file list is rebuilt only when a folder's modification time changes)."""
    key = "krea2_gguf_" + kind
    paths = list(folder_paths.get_folder_paths(kind))
    entry = folder_paths.folder_names_and_paths.get(key)
    if entry is None or list(entry[0]) != paths:
        folder_paths.folder_names_and_paths[key] = (paths, {_GGUF})
    return key


def _unique(kind: str, names: list[str]) -> list[str]:
    """``names`` without the copies a symlink cycle adds (``loop/x.gguf`` for ``x.gguf``): one name per real file,
    the shortest. Computed again only when the host's list changes."""
    key = tuple(names)
    hit = _unique_cache.get(kind)
    if hit is not None and hit[0] == key:
        return hit[1]
    bases = folder_paths.get_folder_paths(kind)
    best: dict = {}
    for n in names:
        full = next((os.path.join(b, n) for b in bases if os.path.exists(os.path.join(b, n))), None)
        real = os.path.realpath(full) if full is not None else (None, n)
        if real not in best or (n.count("/"), n) < (best[real].count("/"), best[real]):
            best[real] = n
    out = sorted(best.values())
    _unique_cache[kind] = (key, out)  # the current list of each kind only
    return out


def list_files(kind: str) -> list[str]:
    """Every file the host lists for ``kind`` (pickles included: choosing one gets a clear refusal, not a silent
    gap), its ``.gguf`` files and the model folders: the files from the host's own cached lists, no walk of ours."""
    gguf = folder_paths.get_filename_list(_gguf_key(kind))
    names = sorted(set(folder_paths.get_filename_list(kind)) | set(gguf))
    return _unique(kind, names) + _folder_entries(kind)


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
