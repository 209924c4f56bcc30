"""Qwen3-VL text-encoder files in every layout, seen through canonical names, and loading the tower.

Accepted files (the vision tower and ``lm_head`` are ignored when present):

* ComfyUI's full Qwen3-VL files (``qwen3vl_4b_bf16``, ``qwen3vl_4b_fp8_scaled``) and HF's naming in one file:
  ``model.language_model.layers.N...``, ``model.visual.*``, ``lm_head.weight``;
* text-only Qwen3-VL files: ``model.layers.N...``/``model.embed_tokens.weight`` (or no prefix at all);
* HF folders: ``model-0000X-of-0000Y.safetensors`` + ``model.safetensors.index.json`` (+ ``config.json``,
  whose ``rms_norm_eps`` and ``rope_theta`` are used).

Canonical keys are the module names of :class:`~krea2_model.text.qwen3.Qwen3TextModel` (a text-only
file's keys without ``model.``). Anything else is refused with a message saying what the file is.
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Callable

import torch

from ..errors import NotKrea2Error, ShapeMismatchError, WrongTextEncoderError, first_names
from ..text.qwen3 import Qwen3TextConfig, Qwen3TextModel
from ..text.vision import KNOWN_DEEPSTACK, Qwen3VisionConfig, Qwen3VisionModel, default_deepstack
from .quant import FP8, MARKER_KEYS, QUANT_SUFFIXES, dequantize
from .safetensors_io import TensorSource, open_source
from .tensors import check_tensors, count_indices, module_shapes, set_tensor, shape_getter

log = logging.getLogger("krea2")

_ANCHOR = "layers.0.self_attn.q_proj.weight"

__all__ = ["TextCheckpoint", "load_text_model", "find_tower_prefix", "describe_text_foreign", "infer_text_config"]


def _is_vision(key: str) -> bool:
    return key.startswith(("visual.", "model.visual.", "vision_tower.", "model.vision_tower.", "vision_model."))


def find_tower_prefix(keys) -> str | None:
    """The prefix before ``layers.0.self_attn.q_proj.weight`` of the language tower (``''``,
    ``'model.'``, ``'model.language_model.'``, ...), preferring one with ``embed_tokens``; None if absent."""
    keys = set(keys)
    found = sorted({k[:-len(_ANCHOR)] for k in keys if k.endswith(_ANCHOR) and not _is_vision(k)
                    and (k == _ANCHOR or k[:-len(_ANCHOR)].endswith("."))}, key=len)
    with_emb = [p for p in found if p + "embed_tokens.weight" in keys]
    return (with_emb or found or [None])[0]


def describe_text_foreign(keys, where: str = "checkpoint", config: dict | None = None) -> str | None:
    """A sentence saying what a file that is not a Qwen3-VL language tower looks like; None if it is one
    (as far as its keys tell)."""
    keys = list(keys)
    ks = set(keys)
    joined = " ".join(keys[:4000])
    tail = (" Krea 2 needs the Qwen3-VL-4B text encoder (ComfyUI's qwen3vl_4b_bf16 / qwen3vl_4b_fp8_scaled, a "
            "text-only export of it, or the Qwen/Qwen3-VL-4B-Instruct folder) in models/text_encoders.")
    sample = f" {len(keys)} tensors, e.g. {first_names(keys, 3)}."
    mt = (config or {}).get("model_type")
    if mt and mt not in ("qwen3_vl", "qwen3_vl_text"):
        return f"{where}: config.json says model_type '{mt}', not Qwen3-VL: another model ({mt}).{tail}"
    prefix = find_tower_prefix(keys)
    if prefix is None:
        if any("linear_attn." in k for k in keys):
            return f"{where}: this is another Qwen: Qwen3.5 (hybrid linear-attention layers), not Qwen3-VL.{sample}{tail}"
        if keys and all(_is_vision(k) for k in keys):
            return (f"{where}: this is a vision tower only (image encoder tensors, no language model), so it cannot "
                    f"encode text.{sample}{tail}")
        guesses = [
            ("txtfusion." in joined or "text_fusion." in joined, "a Krea 2 transformer (load it with Krea2ModelLoader "
                                                                   "from models/diffusion_models)"),
            ("text_model.encoder.layers." in joined, "a CLIP text encoder"),
            ("encoder.block." in joined and "SelfAttention" in joined, "a T5 text encoder"),
            ("double_blocks." in joined, "a Flux-family transformer"),
            ("transformer_blocks." in joined and "img_mod." in joined, "a Qwen-Image transformer"),
            ("input_blocks." in joined or "down_blocks." in joined, "a UNet (Stable Diffusion family)"),
            ("encoder.down." in joined or "decoder.up." in joined or "decoder.conv_in" in joined, "a VAE"),
            ("lora_" in joined or "lora_A" in joined, "a LoRA"),
            ("layers.0." in joined and "attn" in joined, "a language model of another architecture"),
        ]
        what = next((g for ok, g in guesses if ok), None)
        return (f"{where}: this is not a Qwen text model: it has no language-model layers "
                f"('...layers.0.self_attn.q_proj.weight').{(' It looks like ' + what + '.') if what else ''}"
                f"{sample}{tail}")
    a = prefix + "layers.0."
    if a + "self_attn.k_proj.bias" in ks:
        return (f"{where}: this is another Qwen: Qwen2 / Qwen2.5(-VL) (attention biases, no q/k norm; the text encoder "
                f"of Qwen-Image and others), not Qwen3-VL.{sample}{tail}")
    if a + "post_feedforward_layernorm.weight" in ks:
        return f"{where}: this is a Gemma language model, not Qwen3-VL.{sample}{tail}"
    if any(k.startswith(a + "mlp.experts.") or k.startswith(a + "mlp.gate.") for k in keys):
        return f"{where}: this is a mixture-of-experts Qwen3 model, not the dense Qwen3-VL-4B.{sample}{tail}"
    if a + "self_attn.q_norm.weight" not in ks:
        return (f"{where}: this language model has no q/k norm, so it is not Qwen3 (a Llama / Mistral-style model?)."
                f"{sample}{tail}")
    return None


def _read_hf_config(source) -> dict:
    """``config.json`` of an HF folder as a flat dict of the text tower's settings (``{}`` if none)."""
    if not isinstance(source, (str, os.PathLike)) or not os.path.isdir(source):
        return {}
    p = os.path.join(os.fspath(source), "config.json")
    if not os.path.isfile(p):
        return {}
    try:
        with open(p, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise NotKrea2Error(f"{p}: unreadable config.json ({e}).")
    text = dict(cfg.get("text_config") or {})
    text["model_type"] = cfg.get("model_type") or text.get("model_type")
    for k in ("rms_norm_eps", "rope_theta", "rope_parameters", "rope_scaling"):
        if k not in text and k in cfg:
            text[k] = cfg[k]
    return text


def infer_text_config(shapes: dict, where: str = "checkpoint", hf: dict | None = None) -> Qwen3TextConfig:
    """A :class:`Qwen3TextConfig` from canonical ``{key: shape}``; eps and rope theta from ``hf`` (an HF
    ``config.json``'s text settings) when given, else Qwen3-VL-4B's. Head size comes from ``q_norm``."""
    need = shape_getter(shapes, where, "text-encoder")

    hf = hf or {}
    vocab, hidden = need("embed_tokens.weight")
    head_dim = need("layers.0.self_attn.q_norm.weight")[0]
    theta = hf.get("rope_theta")
    for k in ("rope_parameters", "rope_scaling"):
        if theta is None and isinstance(hf.get(k), dict):
            theta = hf[k].get("rope_theta")
    cfg = Qwen3TextConfig(
        hidden=hidden, layers=count_indices(shapes, r"^layers\.(\d+)\."), heads=need("layers.0.self_attn.q_proj.weight")[0] // head_dim,
        kv_heads=need("layers.0.self_attn.k_proj.weight")[0] // head_dim, head_dim=head_dim,
        mlp_hidden=need("layers.0.mlp.gate_proj.weight")[0], vocab=vocab,
        eps=float(hf.get("rms_norm_eps", Qwen3TextConfig.eps)),
        rope_theta=float(theta if theta is not None else Qwen3TextConfig.rope_theta))
    if cfg.head_dim % 2 or cfg.heads == 0 or cfg.kv_heads == 0 or cfg.heads % cfg.kv_heads:
        raise ShapeMismatchError(f"{where}: inferred head size {cfg.head_dim} with {cfg.heads} query / {cfg.kv_heads} "
                                 "key-value heads does not fit Qwen3 (even head size, query heads a multiple of "
                                 "key-value heads).")
    return cfg


def expected_text_shapes(cfg: Qwen3TextConfig) -> dict:
    return module_shapes(lambda: Qwen3TextModel(cfg))


class TextCheckpoint:
    """A text-encoder file seen through canonical names: ``keys()``, ``shape(k)``, ``load(k)``
    (dequantised by :meth:`load`'s caller, see :func:`load_text_model`), ``config``, ``layout``
    (``'full'`` when a vision tower is present, ``'hf-folder'``, ``'text'``), ``prefix``, ``ignored``."""

    def __init__(self, source):
        from .gguf import is_gguf, open_gguf_text  # the gguf package is needed only for .gguf files
        gguf = is_gguf(source)
        self.src: TensorSource = open_gguf_text(source) if gguf else open_source(source)
        self.where = self.src.where
        keys = list(self.src.keys())
        hf = self.src.hf_config if gguf else _read_hf_config(source)
        msg = describe_text_foreign(keys, self.where, hf)
        if msg:
            raise WrongTextEncoderError(msg)
        self.prefix = find_tower_prefix(keys)
        has_vision = any(_is_vision(k) for k in keys)
        self.layout = "gguf" if gguf else "hf-folder" if hf or (isinstance(source, (str, os.PathLike)) and
                                                                os.path.isdir(source)) \
            else ("full" if has_vision else "text")
        self.keymap, self.aux, ignored = {}, {}, []
        n = len(self.prefix)
        for k in keys:
            if k in MARKER_KEYS:
                self.aux[k] = k
            elif k.startswith(self.prefix) and not _is_vision(k):
                c = k[n:]
                (self.aux if c.endswith(QUANT_SUFFIXES) else self.keymap)[c] = k
            else:
                ignored.append(k)
        shapes = {c: self.src.shape(s) for c, s in self.keymap.items()}
        self.config = infer_text_config(shapes, self.where, hf)
        want = expected_text_shapes(self.config)
        check_tensors(shapes, want, self.where, "text-encoder", lambda k: self.keymap.get(k, self.prefix + k),
                      f"hidden {self.config.hidden}, head size {self.config.head_dim}, "
                      f"{self.config.heads}/{self.config.kv_heads} heads")
        self.ignored = ignored + [self.keymap[k] for k in shapes if k not in want]
        self._shapes = {k: shapes[k] for k in want}
        #: the vision tower (:class:`VisionCheckpoint`) when the file has a complete one, else None and
        #: ``vision_problem`` says what is missing (text encoding never needs it)
        self.vision, self.vision_problem = find_vision(self.src, keys, self.where, self.config.hidden,
                                                       _read_hf_vision_config(source) if not gguf else {})
        if self.vision is not None:
            self.ignored = [k for k in self.ignored if k not in self.vision.keymap.values()
                            and k not in self.vision.aux.values()]

    def keys(self):
        return list(self._shapes)

    def shape(self, k):
        return self._shapes[k]

    def load(self, k) -> torch.Tensor:
        return self.src[self.keymap[k]]

    def dequantized(self, k: str, keep_fp8: bool = False) -> torch.Tensor:
        """Tensor ``k`` with its real values: scaled / quantized weights dequantized exactly (float32), see
        :mod:`krea2_model.formats.quant`; an unscaled fp8 weight kept as fp8 when ``keep_fp8``."""
        t = self.load(k)
        base = k.rsplit(".", 1)[0]
        side = {suf[1:]: self.src[self.aux[base + suf]] for suf in QUANT_SUFFIXES if base + suf in self.aux}
        if not side and t.dtype not in FP8:
            return t
        return dequantize(t, side, self.where, self.keymap[k], keep_fp8=keep_fp8)


_VISION_PREFIXES = ("model.visual.", "visual.", "model.vision_tower.", "vision_tower.", "vision_model.")


def _read_hf_vision_config(source) -> dict:
    """``vision_config`` of an HF folder's ``config.json`` (``{}`` if none)."""
    if not isinstance(source, (str, os.PathLike)) or not os.path.isdir(source):
        return {}
    p = os.path.join(os.fspath(source), "config.json")
    try:
        with open(p, encoding="utf-8") as f:
            return dict(json.load(f).get("vision_config") or {})
    except (OSError, ValueError):
        return {}


def infer_vision_config(shapes: dict, hf: dict | None = None) -> Qwen3VisionConfig:
    """A :class:`Qwen3VisionConfig` from canonical vision ``{key: shape}`` (KeyError when a sizing tensor is
    absent). Head count and DeepStack layers are no tensor's shape: from ``hf`` (``config.json``'s
    ``vision_config``) when given, else Qwen3-VL's (16 heads; the published DeepStack layers)."""
    hf = hf or {}
    hidden, cin, tp, p, _ = shapes["patch_embed.proj.weight"]
    wide = shapes["merger.linear_fc2.weight"][1]
    depth = count_indices(shapes, r"^blocks\.(\d+)\.")
    n_deep = count_indices(shapes, r"^deepstack_merger_list\.(\d+)\.")
    deep = hf.get("deepstack_visual_indexes")
    return Qwen3VisionConfig(
        hidden=hidden, depth=depth, heads=int(hf.get("num_heads", 16)),
        mlp_hidden=shapes["blocks.0.mlp.linear_fc1.weight"][0], out_hidden=shapes["merger.linear_fc2.weight"][0],
        patch=p, temporal_patch=tp, merge=math.isqrt(wide // hidden), in_channels=cin,
        positions=shapes["pos_embed.weight"][0],
        deepstack=tuple(int(i) for i in deep) if deep else default_deepstack(depth, n_deep))


class VisionCheckpoint:
    """The vision tower inside a text-encoder file: ``keymap`` (canonical -> file key), ``aux`` (quantization
    side tensors), ``config``, ``dequantized(k)``."""

    def __init__(self, src, keymap: dict, aux: dict, config: Qwen3VisionConfig, where: str):
        self.src, self.keymap, self.aux, self.config, self.where = src, keymap, aux, config, where

    def keys(self):
        return list(self.keymap)

    def dequantized(self, k: str, keep_fp8: bool = False) -> torch.Tensor:
        t = self.src[self.keymap[k]]
        base = k.rsplit(".", 1)[0]
        side = {suf[1:]: self.src[self.aux[base + suf]] for suf in QUANT_SUFFIXES if base + suf in self.aux}
        if not side and t.dtype not in FP8:
            return t
        return dequantize(t, side, self.where, self.keymap[k], keep_fp8=keep_fp8)


def _vision_head_problem(cfg: Qwen3VisionConfig, hf: dict) -> str | None:
    """Why ``cfg.heads`` cannot be this tower's head count, or None. The count is in no tensor's shape; what the
    shapes allow: the width splits into that many heads, each a multiple of 4 wide (the 2-D rotary embedding turns
    a quarter of each head with the row, a quarter with the column)."""
    size = cfg.hidden // cfg.heads if cfg.heads > 0 else 0
    if cfg.heads > 0 and cfg.hidden % cfg.heads == 0 and size % 4 == 0:
        return None
    if "num_heads" in hf:
        whence = f"config.json's vision_config.num_heads is {cfg.heads}"
    else:
        whence = (f"a single file does not record the head count, and Qwen3-VL's {cfg.heads} was assumed; a Hugging "
                  "Face folder's config.json (vision_config.num_heads) gives the real one")
    return (f"its vision tower is {cfg.hidden} wide, which does not split into {cfg.heads} attention heads of a size "
            f"that is a multiple of 4, as its rotary embedding needs ({whence}). Use the model as its Hugging Face "
            "folder, with its config.json")


def _say_assumed_vision_sizes(cfg: Qwen3VisionConfig, hf: dict, where: str) -> None:
    """One log line for a tower Qwen never published whose DeepStack layers (or head count) are guesses."""
    if hf.get("deepstack_visual_indexes") or not cfg.deepstack or (cfg.depth, len(cfg.deepstack)) in KNOWN_DEEPSTACK:
        return
    heads = "" if "num_heads" in hf else f" and {cfg.heads} attention heads (Qwen3-VL's)"
    log.warning("Krea 2: %s: a vision tower of %d blocks with %d DeepStack mergers is not a published Qwen3-VL one; "
                "assuming DeepStack layers %s (evenly spaced)%s. If images come out wrong, load the model as its "
                "Hugging Face folder: its config.json (vision_config) gives the real ones.", where, cfg.depth,
                len(cfg.deepstack), list(cfg.deepstack), heads)


def find_vision(src, keys, where: str, text_hidden: int, hf: dict) -> tuple:
    """``(VisionCheckpoint, None)`` for a complete vision tower, else ``(None, reason)``."""
    prefix = next((p for p in _VISION_PREFIXES if any(k.startswith(p) for k in keys)), None)
    if prefix is None:
        return None, "it has no vision tower (a text-only export: no 'visual.' tensors)"
    keymap, aux = {}, {}
    for k in keys:
        if k.startswith(prefix):
            c = k[len(prefix):]
            (aux if c.endswith(QUANT_SUFFIXES) else keymap)[c] = k
    shapes = {c: tuple(src.shape(k)) for c, k in keymap.items()}
    try:
        cfg = infer_vision_config(shapes, hf)
    except KeyError as e:
        return None, f"its vision tower is incomplete (no '{prefix}{e.args[0]}')"
    problem = _vision_head_problem(cfg, hf)
    if problem:
        return None, problem
    _say_assumed_vision_sizes(cfg, hf, where)
    want = module_shapes(lambda: Qwen3VisionModel(cfg))
    missing = [k for k in want if k not in shapes]
    if missing:
        return None, (f"its vision tower is incomplete: {len(missing)} of {len(want)} tensors missing (first: "
                      f"{first_names([prefix + k for k in missing], 3)})")
    bad = [k for k in want if shapes[k] != want[k]]
    if bad:
        return None, (f"its vision tower has tensor '{prefix}{bad[0]}' of shape {list(shapes[bad[0]])}, expected "
                      f"{list(want[bad[0]])}")
    if cfg.out_hidden != text_hidden:
        return None, f"its vision tower feeds width {cfg.out_hidden}, but the language tower is {text_hidden} wide"
    return VisionCheckpoint(src, {k: keymap[k] for k in want}, aux, cfg, where), None


def load_vision_model(ck: "TextCheckpoint", *, dtype=None, device="cpu", operations=None) -> Qwen3VisionModel:
    """The vision tower of ``ck`` (which must have one: see ``ck.vision_problem``), weights as
    :func:`load_text_model` places them."""
    v = ck.vision
    with torch.device("meta"):
        model = Qwen3VisionModel(v.config, dtype=dtype, operations=operations)
    params = dict(model.named_parameters())
    for k in v.keys():
        stored = v.src.dtype(v.keymap[k]) or torch.float32
        if dtype is not None:
            target = params[k].dtype
        else:
            target = stored if stored.is_floating_point and stored.itemsize >= 2 else torch.bfloat16
        set_tensor(model, k, v.dequantized(k, keep_fp8=target in FP8).to(device=device, dtype=target))
    return model.eval()


def load_text_model(source, *, dtype=None, device="cpu", operations=None,
                    progress: Callable[[int, int], None] | None = None) -> Qwen3TextModel:
    """Any accepted layout -> :class:`Qwen3TextModel` in eval mode.

    ``dtype`` None keeps each weight's stored floating dtype (fp8/int8 weights become bf16). Tensors stream
    from the file one at a time; the vision tower and ``lm_head`` are never read."""
    ck = source if isinstance(source, TextCheckpoint) else TextCheckpoint(source)
    if ck.layout == "gguf":  # block-quantized weights stay packed; see formats.gguf
        from .gguf import load_gguf_text_model
        return load_gguf_text_model(ck, dtype=dtype, device=device, operations=operations, progress=progress)
    if ck.ignored:
        log.info("Krea 2: %s: text tower at '%s' (%d layers, hidden %d); %d other tensors ignored (vision tower, "
                 "lm_head, ...): %s", ck.where, ck.prefix, ck.config.layers, ck.config.hidden, len(ck.ignored),
                 first_names(ck.ignored, 4))
    with torch.device("meta"):
        model = Qwen3TextModel(ck.config, dtype=dtype, operations=operations)
    params = dict(model.named_parameters())
    keys = ck.keys()
    for i, k in enumerate(keys):
        stored = ck.src.dtype(ck.keymap[k]) or torch.float32
        if dtype is not None:
            target = params[k].dtype  # what the (host's) modules were built to store
        else:
            target = stored if stored.is_floating_point and stored.itemsize >= 2 else torch.bfloat16
        t = ck.dequantized(k, keep_fp8=target in FP8)
        set_tensor(model, k, t.to(device=device, dtype=target))
        if progress:
            progress(i + 1, len(keys))
    model.eval()
    return model


