"""Tiny random Krea 2 LoRAs in every key style, for tests and demos.

    python -m krea2_model.tiny.lora --out DIR [--config tiny|gqa|mha] [--style STYLE|all] [--seed N] [--rank R]

Reproducible from ``--seed``. The low-rank factors depend only on (config, seed, rank), not on the style,
so the same seed in two styles of one family (e.g. ``comfy`` and ``diffusers``) describes the same update.
Every attention's q / k / v LoRAs share one down factor, so a fused-qkv file and a separate one can match.

:func:`make_lora` also returns :meth:`TinyLora.merge`, which applies the update to a canonical state dict
with its own arithmetic (independent of :mod:`krea2_model.formats.lora`), as the ground truth for tests.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, field

import torch

from ..formats.transformer_file import canonical_to_diffusers, expected_shapes
from .transformer import CONFIGS
from ..model.transformer import Krea2Config

STYLES = {
    "krea": "Krea reference: bare 'blocks.0.attn.wq.lora_A' (no .weight), rank/alpha/scale in metadata",
    "comfy": "'diffusion_model.' + native names, lora_A.weight / lora_B.weight, no alpha",
    "aitoolkit": "'base_model.model.' + native names, lora_A.weight / lora_B.weight",
    "comfy-kohya": "'diffusion_model.' + native names, lora_down.weight / lora_up.weight + .alpha",
    "diffusers": "'transformer.' + diffusers names, lora_A.weight / lora_B.weight, lora_adapter_metadata json",
    "peft": "'base_model.model.' + diffusers names, lora_A.weight / lora_B.weight",
    "kohya": "'lora_unet_blocks_0_attn_wq' flattened native names + .alpha (musubi)",
    "kohya-diffusers": "'lora_unet_transformer_blocks_0_attn_to_q' flattened diffusers names + .alpha",
    "lycoris-fused": "LyCORIS LoCon with fused qkv ('lycoris_transformer_blocks_0_attn_to_qkv', "
                     "'diffusion_model.blocks.1.attn.qkv', 'txtfusion...attn.wqkv')",
    "lokr": "LyCORIS LoKr, lokr_w1 / lokr_w2 full (+ alpha, which full factors ignore)",
    "lokr-factored": "LyCORIS LoKr, lokr_w1 full, lokr_w2_a / lokr_w2_b low-rank + alpha",
    "loha": "LyCORIS LoHa, hada_w1_a/b, hada_w2_a/b + alpha",
    "dora": "LyCORIS DoRA: lora_down/up + alpha + dora_scale, (1, in) and (out, 1) magnitudes",
    "peft-dora": "PEFT DoRA: lora_A/B + lora_magnitude_vector (out,)",
    "diff": "full-size deltas: .diff, .diff_b, .w_norm, param.diff, plain norms / modulation tables / biases",
}

LORA_FAMILY = ("krea", "comfy", "aitoolkit", "comfy-kohya", "diffusers", "peft", "kohya", "kohya-diffusers",
               "lycoris-fused", "dora", "peft-dora")


def lora_targets(cfg: Krea2Config) -> list[str]:
    """Canonical Linear modules the generated LoRAs patch (every kind of Linear, first and last blocks)."""
    last = cfg.layers - 1
    t = [f"blocks.0.attn.{n}" for n in ("wq", "wk", "wv", "wo", "gate")]
    t += [f"blocks.{last}.attn.{n}" for n in ("wq", "wk", "wv")]
    t += [f"blocks.{last}.mlp.{n}" for n in ("gate", "up", "down")]
    t += [f"txtfusion.layerwise_blocks.0.attn.{n}" for n in ("wq", "wk", "wv")]
    t += [f"txtfusion.refiner_blocks.{cfg.text_refiner_blocks - 1}.mlp.down"]
    t += ["first", "last.linear", "tmlp.0", "tmlp.2", "tproj.1", "txtmlp.1", "txtmlp.3", "txtfusion.projector"]
    return t


@dataclass
class TinyLora:
    """A generated LoRA: ``state_dict`` and ``metadata`` as written to the file, and ``updates``
    ``{canonical key: callable(float32 weight) -> new weight at strength 1}`` (the hand-computed truth; see
    :meth:`merge`)."""

    state_dict: dict
    metadata: dict
    updates: dict = field(default_factory=dict)

    def merge(self, sd: dict, strength: float = 1.0) -> dict:
        """Canonical ``sd`` with this LoRA merged at ``strength`` (float32 arithmetic, own implementation)."""
        out = dict(sd)
        for k, fn in self.updates.items():
            w = out[k].to(torch.float32)
            out[k] = (w + strength * (fn(w) - w)).to(sd[k].dtype)
        return out

    def save(self, path: str) -> str:
        from safetensors.torch import save_file
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        save_file({k: v.detach().clone().contiguous() for k, v in self.state_dict.items()}, path,
                  metadata=self.metadata)
        return path


def _add(delta):
    return lambda w: w + delta.reshape(w.shape)


def _diffusers_module(mod: str) -> str:
    return canonical_to_diffusers(mod + ".weight")[: -len(".weight")]


def _factors(cfg, seed, rank):
    """{module: (up, down)} with q / k / v of one attention sharing the down factor."""
    g = torch.Generator().manual_seed(seed)
    shapes = expected_shapes(cfg)
    out, shared = {}, {}
    for mod in lora_targets(cfg):
        o, i = shapes[mod + ".weight"]
        attn = mod.rsplit(".", 1)[0] if mod.endswith((".wq", ".wk", ".wv")) else None
        if attn is not None and attn in shared:
            down = shared[attn]
        else:
            down = torch.randn(rank, i, generator=g) / i ** 0.5
            if attn is not None:
                shared[attn] = down
        up = torch.randn(o, rank, generator=g) * 0.2
        out[mod] = (up, down)
    return out


def make_lora(cfg: Krea2Config, style: str, seed: int = 0, rank: int = 4) -> TinyLora:
    """A random LoRA for ``cfg`` in ``style`` (one of :data:`STYLES`)."""
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; choose from {', '.join(STYLES)}")
    if style in LORA_FAMILY:
        return _lora_family(cfg, style, seed, rank)
    if style in ("lokr", "lokr-factored"):
        return _lokr(cfg, style, seed, rank)
    if style == "loha":
        return _loha(cfg, seed, rank)
    return _diff(cfg, seed)


def _lora_family(cfg, style, seed, rank) -> TinyLora:
    f = _factors(cfg, seed, rank)
    sd, meta, upd = {}, {"format": "pt"}, {}
    alpha = float(2 * rank)
    g = torch.Generator().manual_seed(seed + 1000)
    shapes = expected_shapes(cfg)

    def native_or_diffusers(mod, diffusers):
        return _diffusers_module(mod) if diffusers else mod

    if style == "krea":
        scale = 0.5
        meta.update(lora_rank=str(rank), lora_alpha=str(alpha), scale=str(scale))
        for mod, (up, down) in f.items():
            sd[f"{mod}.lora_A"], sd[f"{mod}.lora_B"] = down, up
            upd[mod + ".weight"] = _add(scale * alpha / rank * up @ down)
        return TinyLora(sd, meta, upd)
    if style in ("comfy", "aitoolkit", "diffusers", "peft"):
        prefix = {"comfy": "diffusion_model.", "aitoolkit": "base_model.model.", "diffusers": "transformer.",
                  "peft": "base_model.model."}[style]
        dif = style in ("diffusers", "peft")
        for mod, (up, down) in f.items():
            name = prefix + native_or_diffusers(mod, dif)
            sd[name + ".lora_A.weight"], sd[name + ".lora_B.weight"] = down, up
            upd[mod + ".weight"] = _add(up @ down)
        if style == "diffusers":
            meta["lora_adapter_metadata"] = json.dumps({"r": rank, "lora_alpha": rank})
        return TinyLora(sd, meta, upd)
    if style in ("comfy-kohya", "kohya", "kohya-diffusers"):
        for n, (mod, (up, down)) in enumerate(f.items()):
            if style == "comfy-kohya":
                name = "diffusion_model." + mod
            else:
                name = "lora_unet_" + native_or_diffusers(mod, style == "kohya-diffusers").replace(".", "_")
            a = alpha if n % 2 == 0 else float(rank) / 2  # per-module alphas differ
            sd[name + ".lora_down.weight"], sd[name + ".lora_up.weight"] = down, up
            sd[name + ".alpha"] = torch.tensor(a)
            upd[mod + ".weight"] = _add(a / rank * up @ down)
        if style == "kohya":
            meta.update(ss_network_dim=str(rank), ss_network_alpha=str(alpha))
        return TinyLora(sd, meta, upd)
    if style == "lycoris-fused":
        last = cfg.layers - 1
        fused_names = {
            "blocks.0.attn": "lycoris_transformer_blocks_0_attn_to_qkv",
            f"blocks.{last}.attn": f"diffusion_model.blocks.{last}.attn.qkv",
            "txtfusion.layerwise_blocks.0.attn": "diffusion_model.txtfusion.layerwise_blocks.0.attn.wqkv",
        }
        done = set()
        for mod, (up, down) in f.items():
            attn, _, leaf = mod.rpartition(".")
            if attn in fused_names and leaf in ("wq", "wk", "wv"):
                if attn not in done:
                    ups = [f[f"{attn}.{n}"][0] for n in ("wq", "wk", "wv")]
                    name = fused_names[attn]
                    sd[name + ".lora_down.weight"] = down
                    sd[name + ".lora_up.weight"] = torch.cat(ups, dim=0)
                    sd[name + ".alpha"] = torch.tensor(alpha)
                    done.add(attn)
            else:
                name = "lycoris_" + _diffusers_module(mod).replace(".", "_")
                sd[name + ".lora_down.weight"], sd[name + ".lora_up.weight"] = down, up
                sd[name + ".alpha"] = torch.tensor(alpha)
            upd[mod + ".weight"] = _add(alpha / rank * up @ down)
        return TinyLora(sd, meta, upd)
    # DoRA
    for n, (mod, (up, down)) in enumerate(f.items()):
        o, i = shapes[mod + ".weight"]
        d = (alpha if style == "dora" else rank) / rank * up @ down
        if style == "dora":
            name = "lycoris_" + _diffusers_module(mod).replace(".", "_")
            sd[name + ".lora_down.weight"], sd[name + ".lora_up.weight"] = down, up
            sd[name + ".alpha"] = torch.tensor(alpha)
            rows = n % 2 == 1
            m = (torch.rand(o, 1, generator=g) + 0.5) if rows else (torch.rand(1, i, generator=g) + 0.5)
            sd[name + ".dora_scale"] = m
        else:
            name = "base_model.model." + _diffusers_module(mod)
            sd[name + ".lora_A.weight"], sd[name + ".lora_B.weight"] = down, up
            rows = True
            m = torch.rand(o, generator=g) + 0.5
            sd[name + ".lora_magnitude_vector"] = m
        upd[mod + ".weight"] = _dora_fn(d, m, rows)
    return TinyLora(sd, meta, upd)


def _dora_fn(d, m, rows):
    def fn(w):
        wc = w + d
        if rows:  # one magnitude per output row: norm over the inputs
            norm = torch.sqrt((wc * wc).sum(dim=1, keepdim=True))
            return m.reshape(-1, 1) * wc / norm
        norm = torch.sqrt((wc * wc).sum(dim=0, keepdim=True))
        return m.reshape(1, -1) * wc / norm
    return fn


def _split(n: int) -> int:
    return 2 if n % 2 == 0 else 1


def _lokr(cfg, style, seed, rank) -> TinyLora:
    g = torch.Generator().manual_seed(seed + 2000)
    shapes = expected_shapes(cfg)
    sd, upd = {}, {}
    alpha = float(rank)
    for mod in lora_targets(cfg):
        o, i = shapes[mod + ".weight"]
        a, b = _split(o), _split(i)
        w1 = torch.randn(a, b, generator=g)
        name = "lycoris_" + _diffusers_module(mod).replace(".", "_")
        sd[name + ".lokr_w1"] = w1
        sd[name + ".alpha"] = torch.tensor(alpha * 3)
        if style == "lokr":
            w2 = torch.randn(o // a, i // b, generator=g) * 0.1 / (i // b) ** 0.5
            sd[name + ".lokr_w2"] = w2
            factor = 1.0  # both factors full: alpha is not used
        else:
            w2a = torch.randn(o // a, rank, generator=g) * 0.2
            w2b = torch.randn(rank, i // b, generator=g) / (i // b) ** 0.5
            sd[name + ".lokr_w2_a"], sd[name + ".lokr_w2_b"] = w2a, w2b
            w2 = w2a @ w2b
            factor = alpha * 3 / rank
        # Kronecker product by hand: block (r, c) of the delta is w1[r, c] * w2
        blocks = [[w1[r, c] * w2 for c in range(b)] for r in range(a)]
        d = torch.cat([torch.cat(row, dim=1) for row in blocks], dim=0)
        upd[mod + ".weight"] = _add(factor * d)
    return TinyLora(sd, {"format": "pt"}, upd)


def _loha(cfg, seed, rank) -> TinyLora:
    g = torch.Generator().manual_seed(seed + 3000)
    shapes = expected_shapes(cfg)
    sd, upd = {}, {}
    for n, mod in enumerate(lora_targets(cfg)):
        o, i = shapes[mod + ".weight"]
        t = [torch.randn(o, rank, generator=g) * 0.5, torch.randn(rank, i, generator=g) / i ** 0.5,
             torch.randn(o, rank, generator=g) * 0.5, torch.randn(rank, i, generator=g) / i ** 0.5]
        name = "diffusion_model." + mod if n % 2 else "lycoris_" + _diffusers_module(mod).replace(".", "_")
        for suf, v in zip(("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"), t):
            sd[f"{name}.{suf}"] = v
        alpha = float(rank * (1 + n % 3))
        sd[name + ".alpha"] = torch.tensor(alpha)
        upd[mod + ".weight"] = _add(alpha / rank * (t[0] @ t[1]) * (t[2] @ t[3]))
    return TinyLora(sd, {"format": "pt"}, upd)


def _diff(cfg, seed) -> TinyLora:
    """Full-size deltas on norms, modulation tables, biases and weights, in every naming ComfyUI knows."""
    g = torch.Generator().manual_seed(seed + 4000)
    shapes = expected_shapes(cfg)
    last = cfg.layers - 1
    sd, upd = {}, {}

    def rnd(key, s=0.05):
        d = torch.randn(shapes[key], generator=g) * s
        upd[key] = _add(d)
        return d

    sd["diffusion_model.blocks.0.prenorm.scale.diff"] = rnd("blocks.0.prenorm.scale")
    sd["diffusion_model.blocks.0.attn.wq.diff"] = rnd("blocks.0.attn.wq.weight")
    sd["diffusion_model.first.diff_b"] = rnd("first.bias")
    sd["diffusion_model.blocks.0.mod.lin.diff"] = rnd("blocks.0.mod.lin")
    sd[f"transformer.transformer_blocks.{last}.scale_shift_table"] = rnd(f"blocks.{last}.mod.lin").reshape(6, -1)
    sd["transformer.final_layer.scale_shift_table"] = rnd("last.modulation.lin")
    sd[f"diffusion_model.blocks.{last}.attn.qknorm.qnorm.scale"] = rnd(f"blocks.{last}.attn.qknorm.qnorm.scale")
    sd["diffusion_model.last.norm.scale"] = rnd("last.norm.scale")
    sd[f"lora_unet_blocks_{last}_postnorm.w_norm"] = rnd(f"blocks.{last}.postnorm.scale")
    sd["diffusion_model.txtmlp.1.bias"] = rnd("txtmlp.1.bias")
    sd["transformer.txt_in.norm.weight"] = rnd("txtmlp.0.scale")
    sd["diffusion_model.txtfusion.refiner_blocks.0.attn.qknorm.knorm.scale"] = \
        rnd("txtfusion.refiner_blocks.0.attn.qknorm.knorm.scale")
    # ai-toolkit: a low-rank weight update with a full bias delta on the same module
    up = torch.randn(shapes["tmlp.2.weight"][0], 2, generator=g) * 0.2
    down = torch.randn(2, shapes["tmlp.2.weight"][1], generator=g) / shapes["tmlp.2.weight"][1] ** 0.5
    sd["diffusion_model.tmlp.2.lora_A.weight"], sd["diffusion_model.tmlp.2.lora_B.weight"] = down, up
    upd["tmlp.2.weight"] = _add(up @ down)
    sd["diffusion_model.tmlp.2.diff_b"] = rnd("tmlp.2.bias")
    return TinyLora(sd, {"format": "pt"}, upd)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m krea2_model.tiny.lora", description=__doc__.split("\n\n")[0],
                                 epilog="styles:\n" + "\n".join(f"  {k:16s}{v}" for k, v in STYLES.items()),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--config", default="tiny", choices=sorted(k for k in CONFIGS if k != "full"),
                    help="model size (default tiny)")
    ap.add_argument("--style", default="all", choices=list(STYLES) + ["all"], help="key style (default all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--name", default="krea2_{config}_lora_{style}", help="file name pattern")
    a = ap.parse_args(argv)
    cfg = CONFIGS[a.config]
    for style in (list(STYLES) if a.style == "all" else [a.style]):
        path = os.path.join(a.out, a.name.format(config=a.config, style=style) + ".safetensors")
        print(make_lora(cfg, style, a.seed, a.rank).save(path))


if __name__ == "__main__":
    main()
