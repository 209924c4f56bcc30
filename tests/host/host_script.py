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


def sampling_inputs(ctx_width: int) -> dict:
    """The seeded inputs the side-by-side scripts sample with (``hooks_check.py``, ``compile_check.py``): a
    9-token ``ctx`` and ``unc`` of ``ctx_width``, one 6 x 10 reference latent, an 8 x 8 empty latent with
    its noise, and ``with_ref`` (the reference and the index_timestep_zero method, as conditioning keys)."""
    import torch
    g = torch.Generator().manual_seed(3)
    out = {"ctx": torch.randn(1, 9, ctx_width, generator=g), "unc": torch.randn(1, 9, ctx_width, generator=g),
           "ref": torch.randn(1, 16, 1, 6, 10, generator=g), "latent": torch.zeros(1, 16, 1, 8, 8)}
    out["noise"] = torch.randn(out["latent"].shape, generator=g)
    out["with_ref"] = {"reference_latents": [out["ref"]], "reference_latents_method": "index_timestep_zero"}
    return out
