"""Start-up shared by the in-process host scripts (``lora_patch_check.py``, ``core_clip_check.py``), which a
ComfyUI host's python runs with the ComfyUI folder as working directory and a JSON spec as argument."""

import importlib
import json
import os
import sys


def boot():
    """Read the spec (``sys.argv[1]``), import ComfyUI for the CPU device (``--cpu``) and make the pack
    importable; returns ``(spec, pack)`` where ``pack(name)`` imports ``<pack>.<name>``."""
    spec = json.load(open(sys.argv[1]))
    sys.argv = ["main.py", "--cpu"]
    sys.path.insert(0, os.getcwd())
    sys.path.insert(0, spec["pack_parent"])
    import comfy.options
    comfy.options.enable_args_parsing()
    import torch
    torch.set_grad_enabled(False)
    return spec, lambda name: importlib.import_module(spec["pack_name"] + "." + name)
