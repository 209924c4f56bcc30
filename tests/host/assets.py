"""Tiny generated assets for the host tier: the demo's (:mod:`krea2_model.tiny.host_assets`, re-exported
here under the names the tests use) plus the test-only ones (native interop models, scaled-fp8 copies).
"""

from __future__ import annotations

import os

import torch
from safetensors.torch import load_file, save_file

from krea2_model import Krea2Config
from krea2_model.text.qwen3 import Qwen3TextConfig
from krea2_model.tiny import text as tiny_text, transformer as tiny
from krea2_model.tiny.host_assets import (HOST_CFG, HOST_TEXT_CFG, LORA, LORA_DIFFUSERS, LORA_FUSED,  # noqa: F401
                                          RAW, REFERENCE_IMAGE, STYLE_LORA, TEXT, TURBO, VAE, _VAE_SCRIPT,
                                          make_assets, text_state, transformer_state, write_reference_image)

# Native ComfyUI's Krea 2 reads its size from a few shapes and assumes the rest (head size 128, 20 text
# heads, 256-wide time embedding, SwiGLU width from its formula); this config satisfies those rules.
INTEROP_CFG = Krea2Config(hidden=256, heads=2, kv_heads=1, head_dim=128, mlp_hidden=768, layers=2, time_dim=256,
                          text_dim=160, text_taps=12, text_heads=20, text_kv_heads=20, text_head_dim=8,
                          text_mlp_hidden=512)
INTEROP_TEXT_CFG = Qwen3TextConfig(hidden=160, layers=36, heads=2, kv_heads=1, head_dim=80, mlp_hidden=64,
                                   vocab=151936)
INTEROP = "krea2_interop.safetensors"
INTEROP_TEXT = "qwen3vl_interop.safetensors"


def make_interop_assets(models_dir: str) -> dict:
    """A transformer native ComfyUI can build and a text encoder whose taps fit it (0.33 interop tests)."""
    return {
        "model": tiny.write(tiny.random_state_dict(INTEROP_CFG, 11), os.path.join(models_dir, "diffusion_models",
                                                                                  INTEROP), "comfy"),
        "text": tiny_text.write(tiny_text.random_state_dict(INTEROP_TEXT_CFG, 12),
                                os.path.join(models_dir, "text_encoders", INTEROP_TEXT), "full", INTEROP_TEXT_CFG),
    }


def scaled_fp8_copy(src, dst):
    """``src`` (ComfyUI layout) as ComfyUI's scaled-fp8 file: block Linear weights in float8_e4m3fn with a
    per-tensor ``scale_weight`` and the ``scaled_fp8`` marker (what newer hosts convert to quantized tensors)."""
    q = {}
    for k, v in load_file(src).items():
        if k.startswith("model.diffusion_model.blocks.") and k.endswith(".weight") and v.ndim == 2:
            scale = v.float().abs().max() / 448.0
            q[k] = (v.float() / scale).to(torch.float8_e4m3fn)
            q[k[:-len("weight")] + "scale_weight"] = scale.reshape(())
        else:
            q[k] = v
    q["model.diffusion_model.scaled_fp8"] = torch.zeros(0, dtype=torch.float8_e4m3fn)
    save_file(q, dst)
    return dst
