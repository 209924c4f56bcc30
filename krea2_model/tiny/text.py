"""Tiny random Qwen3-VL text encoders in every accepted layout, plus a tiny Qwen-style tokenizer.

    python -m krea2_model.tiny.text --out DIR [--config tiny|tiny-qwen-vocab|bench] [--layout all|full|...]

Writes (``NAME`` = ``qwen3vl_<config>``):

* ``NAME_full.safetensors``: ComfyUI's full Qwen3-VL layout (``model.language_model.*``, ``model.visual.*``,
  ``lm_head.weight``), like ``qwen3vl_4b_bf16``;
* ``NAME_full_fp8_scaled.safetensors``: the same with float8 Linear weights + ``weight_scale`` +
  ``comfy_quant`` (``qwen3vl_4b_fp8_scaled``), other tensors bf16;
* ``NAME_full_legacy.safetensors``: ``model.layers.*`` + ``visual.*``;
* ``NAME_text.safetensors``: text-only (``model.layers.*``, ``model.embed_tokens.weight``, ``lm_head.weight``);
* ``NAME_bare.safetensors``: canonical keys (no prefix);
* ``NAME_hf/``: an HF folder (two shards, ``model.safetensors.index.json``, ``config.json``, tokenizer);
* ``tokenizer/``: the tiny tokenizer (``vocab.json``, ``merges.txt``, ``tokenizer_config.json``,
  ``tokenizer.json``), found by the loader beside every single file in ``DIR``.

The tiny tokenizer is a byte-level BPE trained (with the ``tokenizers`` library) on the Krea 2 template,
with Qwen's pre-tokenizer and special tokens (``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>`` after the
BPE vocabulary), so the template prefix is 34 tokens and the suffix 5, as with Qwen's real vocabulary.
Config ``tiny-qwen-vocab`` has Qwen's 151936-entry embedding, for use with a host's real tokenizer.
All weights are exactly representable in bf16 and Linear weights in fp8 (times a power-of-two scale), so
every layout holds identical values.
"""

from __future__ import annotations

import argparse
import json
import math
import os

import torch

from ..formats.text_file import expected_text_shapes, infer_text_config
from ..text.prompt import PREFIX
from ..formats.tensors import module_shapes
from ..text.qwen3 import Qwen3TextConfig, mrope_section
from ..text.vision import Qwen3VisionConfig, Qwen3VisionModel
from ..text.tokenizer import ENDOFTEXT, IM_END, IM_START, IMAGE_PAD, QWEN_SPLIT, VISION_END, VISION_START
from .transformer import write_shards

CONFIGS = {
    # 2:1 GQA, 6 layers, fits the tiny tokenizer (434 ids)
    "tiny": Qwen3TextConfig(hidden=64, layers=6, heads=4, kv_heads=2, head_dim=16, mlp_hidden=96, vocab=448),
    # no GQA, other head size
    "tiny-mha": Qwen3TextConfig(hidden=48, layers=3, heads=2, kv_heads=2, head_dim=24, mlp_hidden=80, vocab=448),
    # the tiny tower with Qwen's real vocabulary size, for hosts' real tokenizer
    "tiny-qwen-vocab": Qwen3TextConfig(hidden=32, layers=6, heads=2, kv_heads=1, head_dim=16, mlp_hidden=64,
                                       vocab=151936),
    # CPU benchmark: Qwen3-VL-4B's head layout (128-wide heads, 4:1 GQA) at 1024 width, 12 layers
    "bench": Qwen3TextConfig(hidden=1024, layers=12, heads=8, kv_heads=2, head_dim=128, mlp_hidden=3072, vocab=1024),
    "full": Qwen3TextConfig(),
}
#: taps that fit each tiny config (the deepest below the last layer, so a later layer is skipped)
TAPS = {"tiny": (1, 3, 4), "tiny-mha": (0, 2), "tiny-qwen-vocab": (1, 3, 4), "bench": (2, 5, 8, 11),
        "full": None}
LAYOUTS = ("full", "full-fp8", "full-legacy", "text", "bare", "hf-folder", "full-vl")
SPECIALS = (ENDOFTEXT, IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD)
_EXTRA_WORDS = ("a cat sits on red mat under the blue sky with two dogs and a small house near green trees photo "
                "of portrait woman man city street night light water mountain river").split()


def hf_text_config(cfg: Qwen3TextConfig) -> dict:
    """``transformers.Qwen3VLTextConfig`` kwargs for ``cfg``."""
    return dict(vocab_size=cfg.vocab, hidden_size=cfg.hidden, intermediate_size=cfg.mlp_hidden,
                num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads,
                head_dim=cfg.head_dim, rms_norm_eps=cfg.eps, tie_word_embeddings=True,
                rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta,
                                 "mrope_section": list(mrope_section(cfg.head_dim)), "mrope_interleaved": True})


def _fp8_quant(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q float8_e4m3fn, scale float32 scalar)`` with ``scale`` a power of two and ``q * scale`` = ``w``
    for fp8-exact ``w``."""
    amax = w.abs().max().clamp(min=1e-12)
    scale = torch.exp2(torch.ceil(torch.log2(amax / 448.0)))
    return (w / scale).to(torch.float8_e4m3fn), scale.to(torch.float32)


def _is_linear(key: str) -> bool:
    return key.startswith("layers.") and key.endswith("_proj.weight")


def random_state_dict(cfg: Qwen3TextConfig, seed: int = 0, dtype=torch.float32) -> dict:
    """Canonical random weights for ``cfg`` (fan-in scaled; norms near 1): bf16-exact, Linear weights also
    fp8-exact (so every layout, the fp8 one included, holds the same values)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, shape in expected_text_shapes(cfg).items():
        if k.endswith("norm.weight") or k == "norm.weight":
            t = 1.0 + 0.2 * torch.randn(shape, generator=g)
        elif k == "embed_tokens.weight":
            t = torch.randn(shape, generator=g)
        else:
            t = torch.randn(shape, generator=g) / (shape[-1] ** 0.5)
        t = t.to(torch.bfloat16).float()
        if _is_linear(k):
            q, s = _fp8_quant(t)
            t = q.float() * s
        out[k] = t.to(dtype).contiguous()
    return out


def vision_state_dict(cfg: Qwen3TextConfig, seed: int = 1) -> dict:
    """A few tensors named like Qwen3-VL's vision tower (unused by Krea 2; loaders must skip them)."""
    g = torch.Generator().manual_seed(seed)
    v = 32
    shapes = {"patch_embed.proj.weight": (v, 3, 2, 4, 4), "blocks.0.attn.qkv.weight": (3 * v, v),
              "blocks.0.norm1.weight": (v,), "merger.linear_fc1.weight": (4 * v, 4 * v),
              "merger.linear_fc2.weight": (cfg.hidden, 4 * v), "deepstack_merger_list.0.norm.weight": (4 * v,)}
    return {k: torch.randn(s, generator=g).to(torch.bfloat16) for k, s in shapes.items()}


def tiny_vision_config(cfg: Qwen3TextConfig) -> Qwen3VisionConfig:
    """A complete tiny Qwen3-VL vision tower feeding ``cfg``'s width (Qwen's patch, frames and merge; a 4 x 4
    learned position grid; DeepStack after block 0)."""
    return Qwen3VisionConfig(hidden=64, depth=2, heads=16, mlp_hidden=96, out_hidden=cfg.hidden, positions=16,
                             deepstack=(0,))


def random_vision_state_dict(vcfg: Qwen3VisionConfig, seed: int = 2) -> dict:
    """Random weights for a complete vision tower (fan-in scaled, LayerNorms near 1), bf16-exact."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, shape in module_shapes(lambda: Qwen3VisionModel(vcfg)).items():
        if "norm" in k and k.endswith(".weight"):
            t = 1.0 + 0.2 * torch.randn(shape, generator=g)
        elif k.endswith(".bias") or k == "pos_embed.weight":
            t = 0.2 * torch.randn(shape, generator=g)
        else:
            t = torch.randn(shape, generator=g) / (math.prod(shape[1:]) ** 0.5)
        out[k] = t.to(torch.bfloat16).float().contiguous()
    return out


def to_layout(sd: dict, layout: str, cfg: Qwen3TextConfig | None = None) -> dict:
    """Canonical ``sd`` -> the tensors of ``layout`` (``hf-folder`` gives the folder's combined dict).
    ``full-vl``: the full layout with a complete (tiny) vision tower, for image prompts."""
    cfg = cfg or _cfg_of(sd)
    if layout == "full-vl":
        out = {"model.language_model." + k: v for k, v in sd.items()}
        out.update({"model.visual." + k: v for k, v in random_vision_state_dict(tiny_vision_config(cfg)).items()})
        out["lm_head.weight"] = sd["embed_tokens.weight"].clone()
        return out
    vision = vision_state_dict(cfg)
    if layout in ("full", "hf-folder"):
        out = {"model.language_model." + k: v for k, v in sd.items()}
        out.update({"model.visual." + k: v for k, v in vision.items()})
        if layout == "full":
            out["lm_head.weight"] = sd["embed_tokens.weight"].clone()
        return out
    if layout == "full-fp8":
        out = {}
        for k, v in sd.items():
            key = "model.language_model." + k
            if _is_linear(k):
                q, s = _fp8_quant(v.float())
                base = key[:-len(".weight")]
                out[key] = q
                out[base + ".weight_scale"] = s
                out[base + ".input_scale"] = torch.tensor(1.0)
                out[base + ".comfy_quant"] = torch.tensor(list(json.dumps({"format": "float8_e4m3fn"}).encode()),
                                                          dtype=torch.uint8)
            else:
                out[key] = v.to(torch.bfloat16)
        out.update({"model.visual." + k: v for k, v in vision.items()})
        out["lm_head.weight"] = sd["embed_tokens.weight"].to(torch.bfloat16)
        return out
    if layout == "full-legacy":
        out = {"model." + k: v for k, v in sd.items()}
        out.update({"visual." + k: v for k, v in vision.items()})
        return out
    if layout == "text":
        out = {"model." + k: v for k, v in sd.items()}
        out["lm_head.weight"] = sd["embed_tokens.weight"].clone()
        return out
    if layout == "bare":
        return dict(sd)
    raise ValueError(f"unknown layout {layout!r}; choose from {LAYOUTS}")


def _cfg_of(sd: dict) -> Qwen3TextConfig:
    return infer_text_config({k: tuple(v.shape) for k, v in sd.items()})


def build_tokenizer(folder: str):
    """Train the tiny Qwen-style tokenizer and write it to ``folder`` as ``vocab.json`` + ``merges.txt`` +
    ``tokenizer_config.json`` (Qwen's host layout) and ``tokenizer.json``. Returns the ``tokenizers.Tokenizer``."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, trainers
    from tokenizers.models import BPE

    tok = Tokenizer(BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    body = PREFIX.replace(IM_START, "").replace(IM_END, "") + "user\nassistant\n"
    corpus = [body] * 50 + [" ".join(_EXTRA_WORDS)] * 20
    # a vocabulary budget above every pair seen twice: training runs to completion, so the result does not
    # depend on how ties at a size cut-off are broken (that order varies between processes)
    trainer = trainers.BpeTrainer(vocab_size=4000, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False, min_frequency=2)
    tok.train_from_iterator(corpus, trainer)
    n = tok.get_vocab_size()
    tok.add_special_tokens(list(SPECIALS))
    os.makedirs(folder, exist_ok=True)
    tok.model.save(folder)  # vocab.json, merges.txt
    tok.save(os.path.join(folder, "tokenizer.json"))
    conf = {
        "add_bos_token": False, "add_prefix_space": False, "bos_token": None, "clean_up_tokenization_spaces": False,
        "eos_token": IM_END, "pad_token": ENDOFTEXT, "unk_token": None, "errors": "replace",
        "model_max_length": 131072, "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer",
        "additional_special_tokens": [IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD],
        "added_tokens_decoder": {str(n + i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                              "single_word": False, "special": True}
                                 for i, t in enumerate(SPECIALS)},
    }
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(conf, f, indent=1)
    return tok


def _save(tensors: dict, path: str) -> None:
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in tensors.items()}, path)


def write(sd: dict, path: str, layout: str, cfg: Qwen3TextConfig | None = None, tokenizer_dir: str | None = None,
          shards: int = 2) -> str:
    """Write canonical ``sd`` at ``path`` in ``layout`` (a folder for ``hf-folder``, with ``config.json`` and,
    when ``tokenizer_dir`` is given, a copy of its files). Returns the file or folder written."""
    cfg = cfg or _cfg_of(sd)
    tensors = to_layout(sd, layout, cfg)
    if layout != "hf-folder":
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        _save(tensors, path)
        return path
    write_shards(tensors, path, "model", shards)
    text = dict(hf_text_config(cfg), model_type="qwen3_vl_text")
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"architectures": ["Qwen3VLForConditionalGeneration"], "model_type": "qwen3_vl",
                   "text_config": text, "tie_word_embeddings": True}, f, indent=1)
    if tokenizer_dir:
        for fn in os.listdir(tokenizer_dir):
            with open(os.path.join(tokenizer_dir, fn), "rb") as src, open(os.path.join(path, fn), "wb") as dst:
                dst.write(src.read())
    return path


def file_name(config: str, layout: str) -> str:
    base = "qwen3vl_" + config.replace("-", "_")
    return {"full": f"{base}_full.safetensors", "full-fp8": f"{base}_full_fp8_scaled.safetensors",
            "full-legacy": f"{base}_full_legacy.safetensors", "text": f"{base}_text.safetensors",
            "bare": f"{base}_bare.safetensors", "hf-folder": f"{base}_hf", "full-vl": f"{base}_full_vl.safetensors"}[layout]


def write_all(out: str, config: str = "tiny", layouts=LAYOUTS, seed: int = 0, dtype=torch.float32) -> dict:
    """Write the tokenizer (``out/tokenizer``) and ``config`` in each of ``layouts``; ``{layout: path}``."""
    cfg = CONFIGS[config]
    tok_dir = os.path.join(out, "tokenizer")
    build_tokenizer(tok_dir)
    sd = random_state_dict(cfg, seed, dtype)
    return {lay: write(sd, os.path.join(out, file_name(config, lay)), lay, cfg,
                       tokenizer_dir=tok_dir if lay == "hf-folder" else None) for lay in layouts}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--config", default="tiny", choices=sorted(CONFIGS))
    ap.add_argument("--layout", default="all", choices=("all",) + LAYOUTS)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    a = ap.parse_args(argv)
    layouts = LAYOUTS if a.layout == "all" else (a.layout,)
    paths = write_all(a.out, a.config, layouts, a.seed, getattr(torch, a.dtype))
    print(json.dumps({"tokenizer": os.path.join(a.out, "tokenizer"), **paths, "taps": TAPS[a.config]}, indent=1))


if __name__ == "__main__":
    main()
