"""A plain Euler loop over ``krea2_model`` (no ComfyUI sampling code), run with the host's python.

    python reference_loop.py SPEC.json OUT.safetensors

SPEC: transformer, text_encoder, tokenizer (folder), prompt, negative (null = zeroed negative),
seed, steps, cfg, variant, width, height, loras ([[path, strength], ...], merged by hand), weight_dtype
(optional, e.g. "float8_e4m3fn": Linear weights stored in that dtype and cast per call, as ComfyUI's
``weight_dtype`` does; the loop still computes in float32). Noise is drawn the way ComfyUI draws it for a seed
(``torch.manual_seed(seed)`` then one ``randn`` of the 5-D Wan latent shape); the result is mapped
out of the Wan 2.1 latent space with the host's latent format, as KSampler returns it.
"""

import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", ".."))

from krea2_model import load_text_encoder, load_transformer, sampling  # noqa: E402


def main(spec_path, out_path):
    s = json.load(open(spec_path))
    source = s["transformer"]
    if s.get("loras"):  # merge each LoRA's delta into the weights by hand
        from krea2_model import CanonicalCheckpoint
        from krea2_model.formats.lora import merge_into, parse_lora
        ck = CanonicalCheckpoint(source)
        source = {k: ck.load(k).float() for k in ck.keys()}
        for path, strength in s["loras"]:
            source = merge_into(source, parse_lora(path, ck.config)[0], strength)
    if s.get("weight_dtype"):
        from krea2_model.model.ops import CastOps
        model = load_transformer(source, dtype=getattr(torch, s["weight_dtype"]), operations=CastOps)
    else:
        model = load_transformer(source, dtype=torch.float32)
    te = load_text_encoder(s["text_encoder"], tokenizer=s.get("tokenizer"), dtype=torch.float32)
    cond = te.encode(s["prompt"]).float()
    uncond = te.encode(s["negative"]).float() if s.get("negative") is not None else torch.zeros_like(cond)
    h, w = s["height"] // 8, s["width"] // 8
    g = torch.manual_seed(s["seed"])
    x = torch.randn((1, 16, 1, h, w), generator=g, device="cpu")
    sig = sampling.sigmas(s["steps"], sampling.mu(s["width"], s["height"], s["variant"]))
    with torch.no_grad():
        for i in range(s["steps"]):
            t = sig[i:i + 1]
            v = model(x, t, cond).float()
            if s["cfg"] != 1.0:
                vu = model(x, t, uncond).float()
                v = vu + s["cfg"] * (v - vu)
            x = x + (sig[i + 1] - sig[i]) * v
    if s.get("comfy_root"):
        sys.path.insert(0, s["comfy_root"])
        import comfy.latent_formats
        x = comfy.latent_formats.Wan21().process_out(x)
    from safetensors.torch import save_file
    save_file({"latent": x.contiguous()}, out_path)


if __name__ == "__main__":
    main(*sys.argv[1:3])
