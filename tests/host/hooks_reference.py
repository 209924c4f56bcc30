"""A hand-written Euler loop with skip-layer guidance over ``krea2_model`` (no ComfyUI sampling code), run
with the host's python: what core's SkipLayerGuidanceDiT should give on our MODEL.

    python hooks_reference.py SPEC.json OUT.safetensors

SPEC: transformer, text_encoder, tokenizer, prompt, negative, seed, steps, cfg, variant, width, height,
skip (block indices), scale. ComfyUI applies SLG in denoised space, ``cfg_result + (cond - cond_skipped) *
scale``; with ``denoised = x - sigma * v`` that is ``v_cfg + scale * (v_cond - v_skipped)`` for the velocity.
The skipped model is our model with those blocks taken out of its block list (not a patches_replace hook).
Start/end percent are taken as 0 and 1 (every step guided).
"""

import copy
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", ".."))

from krea2_model import load_text_encoder, load_transformer, sampling  # noqa: E402


def main(spec_path, out_path):
    s = json.load(open(spec_path))
    model = load_transformer(s["transformer"], dtype=torch.float32)
    skipped = copy.deepcopy(model)
    skipped.blocks = torch.nn.ModuleList([b for i, b in enumerate(skipped.blocks) if i not in set(s["skip"])])
    te = load_text_encoder(s["text_encoder"], tokenizer=s.get("tokenizer"), dtype=torch.float32)
    cond, uncond = te.encode(s["prompt"]).float(), te.encode(s["negative"]).float()
    torch.manual_seed(s["seed"])
    x = torch.randn((1, 16, 1, s["height"] // 8, s["width"] // 8), device="cpu")
    sig = sampling.sigmas(s["steps"], sampling.mu(s["width"], s["height"], s["variant"]))
    with torch.no_grad():
        for i in range(s["steps"]):
            t = sig[i:i + 1]
            vc, vu = model(x, t, cond), model(x, t, uncond)
            v = vu + s["cfg"] * (vc - vu) + s["scale"] * (vc - skipped(x, t, cond))
            x = x + (sig[i + 1] - sig[i]) * v
    sys.path.insert(0, s["comfy_root"])
    import comfy.latent_formats
    x = comfy.latent_formats.Wan21().process_out(x)
    from safetensors.torch import save_file
    save_file({"latent": x.contiguous()}, out_path)


if __name__ == "__main__":
    main(*sys.argv[1:3])
