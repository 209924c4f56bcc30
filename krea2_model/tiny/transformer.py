"""Tiny random Krea 2 checkpoints in every layout, for tests, demos and benchmarks.

    python -m krea2_model.tiny --out DIR [--config tiny|gqa|bench|...] [--layout original|comfy|diffusers|diffusers-folder|all]

Weights are random but well scaled (outputs of order 1), reproducible from ``--seed``.
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from ..formats.transformer_file import canonical_to_diffusers, expected_shapes
from ..model.transformer import Krea2Config

CONFIGS = {
    # 4:1 GQA, text heads 2/2
    "tiny": Krea2Config(hidden=64, heads=4, kv_heads=1, head_dim=16, mlp_hidden=96, layers=2, time_dim=32,
                        text_dim=32, text_taps=3, text_heads=2, text_kv_heads=2, text_head_dim=16,
                        text_mlp_hidden=64),
    # 2:1 GQA, wider heads, GQA in the text fusion as well, 3 blocks
    "gqa": Krea2Config(hidden=96, heads=6, kv_heads=3, head_dim=16, mlp_hidden=128, layers=3, time_dim=64,
                       text_dim=48, text_taps=4, text_heads=3, text_kv_heads=1, text_head_dim=16,
                       text_mlp_hidden=96),
    # no GQA, head 32 (rope axes 8/12/12), one fusion block each side
    "mha": Krea2Config(hidden=64, heads=2, kv_heads=2, head_dim=32, mlp_hidden=128, layers=2, time_dim=32,
                       text_dim=64, text_taps=2, text_heads=2, text_kv_heads=2, text_head_dim=32,
                       text_mlp_hidden=128, text_layerwise_blocks=1, text_refiner_blocks=1),
    # Krea-proportioned CPU benchmark model (docs/architecture.md, "Performance method")
    "bench": Krea2Config(hidden=1024, heads=8, kv_heads=2, head_dim=128, mlp_hidden=2816, layers=4, time_dim=256,
                         text_dim=640, text_taps=12, text_heads=5, text_kv_heads=5, text_head_dim=128,
                         text_mlp_hidden=1792),
    "full": Krea2Config(),
}

LAYOUTS = ("original", "comfy", "diffusers", "diffusers-folder")


def random_state_dict(cfg: Krea2Config, seed: int = 0, dtype=torch.float32) -> dict:
    """Canonical-layout random weights for ``cfg`` (fan-in scaled; norms and tables small, nonzero)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, shape in expected_shapes(cfg).items():
        if k.endswith(".scale") or k.endswith(".lin"):
            t = torch.randn(shape, generator=g) * 0.1
        elif k.endswith(".bias"):
            t = torch.randn(shape, generator=g) * 0.02
        else:
            t = torch.randn(shape, generator=g) / (shape[-1] ** 0.5)
        out[k] = t.to(dtype).contiguous()
    return out


def to_layout(sd: dict, layout: str) -> dict:
    """Canonical state dict -> the keys (and shapes) of ``layout`` (``diffusers-folder`` = ``diffusers``)."""
    if layout == "original":
        return dict(sd)
    if layout == "comfy":
        return {"model.diffusion_model." + k: v for k, v in sd.items()}
    if layout in ("diffusers", "diffusers-folder"):
        out = {}
        for k, v in sd.items():
            if k.startswith("blocks.") and k.endswith(".mod.lin"):
                v = v.reshape(6, -1)
            out[canonical_to_diffusers(k)] = v
        return out
    raise ValueError(f"unknown layout {layout!r}; choose from {LAYOUTS}")


def diffusers_config(cfg: Krea2Config) -> dict:
    """``Krea2Transformer2DModel`` config kwargs for ``cfg``."""
    return dict(in_channels=cfg.in_channels, num_layers=cfg.layers, attention_head_dim=cfg.head_dim,
                num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads, intermediate_size=cfg.mlp_hidden,
                timestep_embed_dim=cfg.time_dim, text_hidden_dim=cfg.text_dim, num_text_layers=cfg.text_taps,
                text_num_attention_heads=cfg.text_heads, text_num_key_value_heads=cfg.text_kv_heads,
                text_intermediate_size=cfg.text_mlp_hidden, num_layerwise_text_blocks=cfg.text_layerwise_blocks,
                num_refiner_text_blocks=cfg.text_refiner_blocks, axes_dims_rope=list(cfg.rope_axes),
                rope_theta=cfg.rope_theta, norm_eps=cfg.eps)


def write_shards(tensors: dict, folder: str, stem: str, shards: int = 2) -> dict:
    """``tensors`` as ``folder/<stem>-0000i-of-0000n.safetensors`` plus ``<stem>.safetensors.index.json``
    (the Hugging Face sharded layout); returns the weight map."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    keys = sorted(tensors)
    per = -(-len(keys) // shards)
    weight_map = {}
    for i in range(shards):
        name = f"{stem}-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: tensors[k].contiguous() for k in keys[i * per:(i + 1) * per]}
        save_file(part, os.path.join(folder, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    with open(os.path.join(folder, stem + ".safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": sum(v.numel() * v.element_size() for v in tensors.values())},
                   "weight_map": weight_map}, f, indent=1)
    return weight_map


def write(sd: dict, path: str, layout: str, cfg: Krea2Config | None = None, shards: int = 2) -> str:
    """Write canonical ``sd`` at ``path`` in ``layout``; returns the file or folder written."""
    from safetensors.torch import save_file

    data = to_layout(sd, layout)
    if layout != "diffusers-folder":
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        save_file(data, path, metadata={"format": "pt"})
        return path
    write_shards(data, path, "diffusion_pytorch_model", shards)
    if cfg is not None:
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump({"_class_name": "Krea2Transformer2DModel", **diffusers_config(cfg)}, f, indent=1)
    return path


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m krea2_model.tiny", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--config", default="tiny", choices=sorted(CONFIGS), help="model size (default tiny)")
    ap.add_argument("--layout", default="all", choices=LAYOUTS + ("all",), help="checkpoint layout (default all)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default="krea2_{config}_{layout}", help="file name pattern")
    a = ap.parse_args(argv)
    cfg = CONFIGS[a.config]
    sd = random_state_dict(cfg, a.seed, getattr(torch, a.dtype))
    for layout in (LAYOUTS if a.layout == "all" else (a.layout,)):
        name = a.name.format(config=a.config, layout=layout)
        target = os.path.join(a.out, name if layout == "diffusers-folder" else name + ".safetensors")
        print(write(sd, target, layout, cfg))


if __name__ == "__main__":
    main()
