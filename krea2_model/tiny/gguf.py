"""Tiny random Krea 2 transformers and Qwen3-VL text encoders as GGUF files, in any of the types we read.

    python -m krea2_model.tiny.gguf --out DIR [--kind transformer|text|both] [--qtype Q4_K] [--config gguf]

Writes ``krea2_<config>_<QTYPE>.gguf`` (Krea's original names, ``general.architecture`` ``krea2``) and
``qwen3vl_<config>_<QTYPE>.gguf`` (llama.cpp names, architecture ``qwen3vl``, plus the tiny tokenizer in
``DIR/tokenizer``), with the ``gguf`` package's ``GGUFWriter``.

How each tensor is stored: ``--qtype`` for every tensor whose rows (the innermost dimension) are a
multiple of the type's block (32 or 256 elements), else ``--fallback`` (default F32; F32 where the fallback does not fit either),
as llama.cpp's quantizer falls back; ``--qtype mixed`` cycles through every type we read, tensor by tensor. Types the
``gguf`` package can quantize (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) are quantized from the random
float weights. For the K and IQ types, which it cannot quantize, each block is written as random bytes
whose float16 scale fields (d, and dmin where the type has one) are set so the block's values are of the
order of the float weight's scale (fan-in scaled), so the model's outputs stay of order 1. The written
bytes are then the model: tests compare with the same file dequantized by ``gguf.quants.dequantize``.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch

from ..formats.gguf import canonical_to_llama_cpp
from ..formats.gguf_dequant import QTYPES
from ..model.transformer import Krea2Config
from ..text.qwen3 import Qwen3TextConfig
from . import text as tiny_text
from . import transformer as tiny_transformer

#: transformer sizes whose Linear rows are multiples of 256 (so the K / IQ4_XS types apply)
CONFIGS = {
    "gguf": Krea2Config(hidden=256, heads=8, kv_heads=2, head_dim=32, mlp_hidden=512, layers=2, time_dim=256,
                        text_dim=256, text_taps=3, text_heads=8, text_kv_heads=2, text_head_dim=32,
                        text_mlp_hidden=512),
    "tiny": tiny_transformer.CONFIGS["tiny"],
    "bench": tiny_transformer.CONFIGS["bench"],
}
TEXT_CONFIGS = {
    "gguf": Qwen3TextConfig(hidden=256, layers=4, heads=4, kv_heads=2, head_dim=64, mlp_hidden=512, vocab=448),
    "tiny": tiny_text.CONFIGS["tiny"],
}
TEXT_TAPS = {"gguf": (1, 3, 4), "tiny": tiny_text.TAPS["tiny"]}

#: gguf.quants.quantize handles these
QUANTIZABLE = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")
#: float16 scale fields of the other block types: (byte offset, largest |integer factor| it multiplies)
RANDOM_SCALES = {
    "Q2_K": ((80, 45), (82, 15)), "Q3_K": ((108, 128),), "Q4_K": ((0, 945), (2, 63)),
    "Q5_K": ((0, 1953), (2, 63)), "Q6_K": ((208, 4064),), "IQ4_NL": ((0, 127),), "IQ4_XS": ((0, 4064),),
}
MIXED = tuple(QTYPES)


def _gguf():
    import gguf
    return gguf


def random_blocks(rows: int, row_elems: int, qtype: str, amplitude: float, rng: np.random.Generator) -> np.ndarray:
    """``(rows, row_bytes) uint8``: random blocks of ``qtype`` with finite scale fields giving values of
    magnitude up to about ``amplitude`` (see the module docstring)."""
    q = QTYPES[qtype]
    n = rows * row_elems // q.block_elems
    blocks = rng.integers(0, 256, (n, q.block_bytes), dtype=np.uint8)
    for off, factor in RANDOM_SCALES[qtype]:
        d = (amplitude / factor * rng.uniform(0.5, 1.0, n)).astype(np.float16)
        blocks[:, off:off + 2] = d.view(np.uint8).reshape(n, 2)
    return blocks.reshape(rows, -1)


def encode_tensor(t: torch.Tensor, qtype: str, rng: np.random.Generator, fallback: str = "F32"):
    """``(array, raw_dtype, qtype_used)`` for ``GGUFWriter.add_tensor``: ``t`` in ``qtype`` when its rows fit
    the type's block, else in ``fallback``."""
    gguf = _gguf()
    x = t.detach().to(torch.float32).contiguous().numpy()
    row = x.shape[-1] if x.ndim else 1
    if row % QTYPES[qtype].block_elems:
        qtype = fallback if row % QTYPES[fallback].block_elems == 0 else "F32"
    gt = gguf.GGMLQuantizationType[qtype]
    if qtype == "F32":
        return x, None, qtype
    if qtype == "F16":
        return x.astype(np.float16), None, qtype
    if qtype in QUANTIZABLE:
        return gguf.quants.quantize(x, gt), gt, qtype
    amp = 2.0 * float(np.sqrt(np.mean(x.astype(np.float64) ** 2)) or 0.05)
    rows = int(np.prod(x.shape[:-1])) if x.ndim > 1 else 1
    blocks = random_blocks(rows, row, qtype, amp, rng).reshape(*x.shape[:-1], -1) if x.ndim > 1 else \
        random_blocks(1, row, qtype, amp, rng).reshape(-1)
    return blocks, gt, qtype


def _choose(qtype, i: int, name: str) -> str:
    if callable(qtype):
        return qtype(name)
    if isinstance(qtype, dict):
        return qtype.get(name, qtype.get("*", "F32"))
    if qtype == "mixed":
        return MIXED[i % len(MIXED)]
    return qtype


def write_gguf(tensors: dict, path: str, arch: str | None, qtype="Q8_0", fallback: str = "F32", seed: int = 0,
               metadata: dict | None = None) -> dict:
    """Write ``{name: tensor}`` to ``path`` with ``arch`` (None: no ``general.architecture`` key); ``qtype`` is a
    type name, ``'mixed'``, a dict ``{name: type, '*': default}`` or a function of the name. Returns
    ``{name: type written}``."""
    gguf = _gguf()
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    w = gguf.GGUFWriter(path, arch or "unset")
    if arch is None:
        for kv in w.kv_data:
            kv.pop(gguf.Keys.General.ARCHITECTURE, None)
    for k, v in (metadata or {}).items():
        if isinstance(v, (list, tuple)):
            w.add_array(k, list(v))
        elif isinstance(v, float):
            w.add_float32(k, v)
        elif isinstance(v, int):
            w.add_uint32(k, v)
        else:
            w.add_string(k, str(v))
    used = {}
    for i, (name, t) in enumerate(tensors.items()):
        arr, raw, q = encode_tensor(t, _choose(qtype, i, name), rng, fallback)
        w.add_tensor(name, arr, raw_dtype=raw)
        used[name] = q
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return used


def write_transformer(path: str, config: str = "gguf", qtype="Q8_0", seed: int = 0, prefix: bool = False,
                      arch: str | None = "krea2", fallback: str = "F32") -> dict:
    """A tiny Krea 2 transformer GGUF (Krea's original names; ``prefix`` adds ``model.diffusion_model.``)."""
    sd = tiny_transformer.random_state_dict(CONFIGS[config], seed)
    if prefix:
        sd = {"model.diffusion_model." + k: v for k, v in sd.items()}
    return write_gguf(sd, path, arch, qtype, fallback, seed)


def write_text(path: str, config: str = "gguf", qtype="Q8_0", seed: int = 0, arch: str | None = "qwen3vl",
               fallback: str = "F32", tokenizer: bool = True, vocab=True) -> dict:
    """A tiny Qwen3-VL text-model GGUF under llama.cpp's names, with eps / rope theta in its metadata and (when
    ``tokenizer``) the tiny tokenizer in ``tokenizer/`` beside it. ``vocab``: the token strings recorded in the file
    as llama.cpp does (``tokenizer.ggml.tokens``, padded to the embedding's rows with ``[PADn]``, and
    ``tokenizer.ggml.eos_token_id`` = ``<|im_end|>``): True for the tiny tokenizer's, a list for those, False for
    none."""
    cfg = TEXT_CONFIGS[config]
    sd = tiny_text.random_state_dict(cfg, seed)
    tensors = {canonical_to_llama_cpp(k): v for k, v in sd.items()}
    a = arch or "qwen3vl"
    meta = {f"{a}.attention.layer_norm_rms_epsilon": float(cfg.eps), f"{a}.rope.freq_base": float(cfg.rope_theta),
            f"{a}.block_count": int(cfg.layers), f"{a}.embedding_length": int(cfg.hidden)}
    tok_dir = os.path.join(os.path.dirname(os.path.abspath(path)), "tokenizer")
    if (tokenizer or vocab is True) and not os.path.isfile(os.path.join(tok_dir, "tokenizer.json")):
        tiny_text.build_tokenizer(tok_dir)
    if vocab is True:
        from tokenizers import Tokenizer
        tk = Tokenizer.from_file(os.path.join(tok_dir, "tokenizer.json"))
        got = tk.get_vocab(with_added_tokens=True)
        vocab = [None] * cfg.vocab
        for t, i in got.items():
            vocab[i] = t
    if vocab:
        names = [t if t is not None else f"[PAD{i}]" for i, t in enumerate(vocab)]
        names += [f"[PAD{i}]" for i in range(len(names), cfg.vocab)]
        meta["tokenizer.ggml.model"] = "gpt2"
        meta["tokenizer.ggml.tokens"] = names
        if "<|im_end|>" in names:
            meta["tokenizer.ggml.eos_token_id"] = names.index("<|im_end|>")
    return write_gguf(tensors, path, arch, qtype, fallback, seed, meta)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m krea2_model.tiny.gguf", description=__doc__.split("\n\n")[0],
                                 epilog="Types: " + ", ".join(QTYPES) + ", or 'mixed' (one type after another).")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--kind", default="both", choices=("transformer", "text", "both"))
    ap.add_argument("--qtype", default="Q8_0", choices=tuple(QTYPES) + ("mixed",), help="storage type (default Q8_0)")
    ap.add_argument("--fallback", default="F32", choices=("F32", "F16", "BF16", "Q8_0", "Q4_0"),
                    help="type for tensors whose rows do not fit --qtype's block (default F32)")
    ap.add_argument("--config", default="gguf", help=f"transformer {sorted(CONFIGS)}; text {sorted(TEXT_CONFIGS)}")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prefix", action="store_true", help="transformer names under model.diffusion_model.")
    a = ap.parse_args(argv)
    out = {}
    if a.kind in ("transformer", "both"):
        p = os.path.join(a.out, f"krea2_{a.config}_{a.qtype}.gguf")
        used = write_transformer(p, a.config, a.qtype, a.seed, a.prefix, fallback=a.fallback)
        out["transformer"] = {"path": p, "types": sorted(set(used.values()))}
    if a.kind in ("text", "both"):
        p = os.path.join(a.out, f"qwen3vl_{a.config}_{a.qtype}.gguf")
        used = write_text(p, a.config, a.qtype, a.seed, fallback=a.fallback)
        out["text"] = {"path": p, "types": sorted(set(used.values())), "taps": TEXT_TAPS.get(a.config),
                       "tokenizer": os.path.join(a.out, "tokenizer")}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
