"""Tiny generated assets for a real ComfyUI, under the file names the example workflows use (the demo and
the host tier of the tests).

The transformer and text encoder are tiny but keep Krea 2's interfaces: 12 taps of a 36-layer
Qwen3-VL-shaped tower with Qwen's full 151936-token vocabulary (so the host's real Qwen tokenizer
works), and a transformer whose text fusion reads those 12 taps. The VAE is a tiny random Wan 2.1
VAE built by the host's own code (``comfy.ldm.wan.vae``) in the host's Python, since core's VAELoader
must detect it; this module itself never imports comfy.
"""

from __future__ import annotations

import os
import subprocess
import textwrap

from safetensors.torch import save_file

from ..model.transformer import Krea2Config
from ..text.qwen3 import Qwen3TextConfig
from . import text as tiny_text, transformer as tiny

HOST_CFG = Krea2Config(hidden=64, heads=4, kv_heads=1, head_dim=16, mlp_hidden=96, layers=2, time_dim=32,
                       text_dim=32, text_taps=12, text_heads=2, text_kv_heads=2, text_head_dim=16, text_mlp_hidden=64)
HOST_TEXT_CFG = Qwen3TextConfig(hidden=32, layers=36, heads=2, kv_heads=1, head_dim=16, mlp_hidden=64, vocab=151936)

TURBO = "krea2_turbo_bf16.safetensors"
RAW = "krea2_raw_bf16.safetensors"
TEXT = "qwen3vl_4b_bf16.safetensors"
VAE = "qwen_image_vae.safetensors"
LORA = "krea2_style_lora.safetensors"            # the LoRA example's file name (native names)
LORA_DIFFUSERS = "krea2_style_lora_diffusers.safetensors"  # the same LoRA in diffusers names
LORA_FUSED = "krea2_fused_qkv_lora.safetensors"  # LyCORIS with fused qkv
STYLE_LORA = "krea2_style_reference.safetensors"  # the style-reference example's LoRA slot
REFERENCE_IMAGE = "krea2_reference.png"           # the style-reference example's LoadImage file (input/)

_VAE_SCRIPT = textwrap.dedent("""
    import math, sys, torch
    out, root = sys.argv[1], sys.argv[2]
    sys.path.insert(0, root)
    sys.argv = [sys.argv[0], "--cpu"]
    import importlib, inspect
    # the host's modules, imported in the host's process through `host`: this text sits in krea2_model,
    # whose own code never imports comfy (tests/unit/test_transformer.py reads every line for it)
    host = importlib.import_module
    host("comfy.options").enable_args_parsing()
    WanVAE = host("comfy.ldm.wan.vae").WanVAE
    host_sd = host("comfy.sd")
    # hosts that read the width from the file take a tiny VAE; older ones build the real 96-wide one
    dim = 8 if 'sd["decoder.head.0.gamma"].shape[0]' in inspect.getsource(host_sd) else 96
    from safetensors.torch import save_file
    m = WanVAE(dim=dim, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
               temperal_downsample=[False, True, True], dropout=0.0)
    g = torch.Generator().manual_seed(0)
    sd = {}
    for k, v in m.state_dict().items():  # the host builds it uninitialised: fill every tensor
        if k.endswith("gamma"):
            sd[k] = torch.ones(v.shape)
        elif k.endswith("bias"):
            sd[k] = torch.zeros(v.shape)
        else:
            sd[k] = torch.randn(v.shape, generator=g) / math.sqrt(max(1, v[0].numel()))
        sd[k] = sd[k].to(torch.bfloat16 if dim > 8 else torch.float32)
    save_file(sd, out)
""")



def transformer_state(seed: int) -> dict:
    return tiny.random_state_dict(HOST_CFG, seed)


def text_state(seed: int = 0) -> dict:
    return tiny_text.random_state_dict(HOST_TEXT_CFG, seed)


def write_reference_image(path: str) -> str:
    """A 96 x 160 RGB PNG of smooth colour bands (seeded noise on top), for the reference examples."""
    import numpy as np
    from PIL import Image
    os.makedirs(os.path.dirname(path), exist_ok=True)
    y, x = np.mgrid[0:96, 0:160]
    rng = np.random.default_rng(5)
    rgb = np.stack([x / 160.0, y / 96.0, 0.5 + 0.5 * np.sin(x / 9.0)], axis=-1) + rng.normal(0, 0.05, (96, 160, 3))
    Image.fromarray((rgb.clip(0, 1) * 255).astype(np.uint8)).save(path)
    return path


def make_assets(models_dir: str, host_python: str, comfy_root: str) -> dict:
    """Write every asset under ``models_dir/{diffusion_models,text_encoders,vae,loras}``; returns their paths."""
    paths = {}
    for sub in ("diffusion_models", "text_encoders", "vae", "loras"):
        os.makedirs(os.path.join(models_dir, sub), exist_ok=True)
    paths["turbo"] = tiny.write(transformer_state(1), os.path.join(models_dir, "diffusion_models", TURBO), "comfy")
    paths["raw"] = tiny.write(transformer_state(2), os.path.join(models_dir, "diffusion_models", RAW), "original")
    # with a complete (tiny) vision tower, so image prompts and the reference example run on it too
    paths["text"] = tiny_text.write(text_state(0), os.path.join(models_dir, "text_encoders", TEXT), "full-vl",
                                    HOST_TEXT_CFG)
    from . import lora as tiny_lora
    for key, name, style in (("lora", LORA, "comfy"), ("lora_diffusers", LORA_DIFFUSERS, "diffusers"),
                             ("lora_fused", LORA_FUSED, "lycoris-fused"), ("style_lora", STYLE_LORA, "aitoolkit")):
        lo = tiny_lora.make_lora(HOST_CFG, style, seed=7, rank=4)
        paths[key] = os.path.join(models_dir, "loras", name)
        save_file({k: v.clone().contiguous() for k, v in lo.state_dict.items()}, paths[key], metadata=lo.metadata or None)
    paths["reference_image"] = write_reference_image(os.path.join(os.path.dirname(models_dir), "input",
                                                                  REFERENCE_IMAGE))
    paths["vae"] = os.path.join(models_dir, "vae", VAE)
    r = subprocess.run([host_python, "-c", _VAE_SCRIPT, paths["vae"], comfy_root], capture_output=True, text=True,
                       timeout=300)
    if r.returncode != 0:
        raise RuntimeError(f"could not build the tiny Wan VAE with the host's code:\n{r.stderr[-3000:]}")
    return paths
