"""Host adapter: our Qwen3-VL text tower with Krea 2 taps as a ComfyUI CLIP.

``comfy.sd.CLIP`` builds ``Krea2ClipModel`` (the ``cond_stage_model``) through ComfyUI's operations
and wraps it in a ModelPatcher, so the encoder is loaded to the GPU to encode and offloaded after,
like core text encoders. Works with core ``CLIPTextEncode`` (default taps) and ``Krea2TextEncode``
(any taps: they travel inside the token dict).
"""

from __future__ import annotations

import logging
import os
import re

import torch

import comfy.model_management as mm
import comfy.ops
import comfy.sd
import comfy.supported_models_base
import comfy.utils

from ...krea2_model.errors import Krea2Error, first_names
from ...krea2_model.formats.text_file import TextCheckpoint
from ...krea2_model.text.prompt import (MAX_TOKENS, SUFFIX_LEN, build_prompt_ids, templated_prompt_span,
                                        warn_truncated)
from ...krea2_model.text.qwen3 import DEFAULT_TAPS, Qwen3TextConfig, Qwen3TextModel
from ...krea2_model.text.tokenizer import find_tokenizer

log = logging.getLogger("krea2")
KEY = "krea2_qwen3vl"


class Krea2ClipModel(torch.nn.Module):
    """``cond_stage_model``: ``transformer`` is our :class:`Qwen3TextModel`; ``encode_token_weights``
    turns our token dict into ``(cond (1, n, taps*hidden), None, {})``."""

    def __init__(self, text_config: dict, device="cpu", dtype=None, model_options=None):
        super().__init__()
        ops = (model_options or {}).get("custom_operations") or comfy.ops.manual_cast
        self.transformer = Qwen3TextModel(Qwen3TextConfig(**text_config), dtype=dtype, device=device, operations=ops)
        self.dtypes = {dtype} if dtype is not None else {torch.float32}
        self.execution_device = None

    def reset_clip_options(self):
        self.execution_device = None

    def set_clip_options(self, options):
        self.execution_device = options.get("execution_device", self.execution_device)

    def load_sd(self, sd):
        """Load a state dict in our canonical names (what ``state_dict()`` gives); a key that is missing or has
        no place in the model is an error naming it, never a silently half-loaded encoder."""
        result = self.transformer.load_state_dict(sd, strict=False)
        if result.missing_keys or result.unexpected_keys:
            parts = []
            if result.missing_keys:
                parts.append(f"{len(result.missing_keys)} missing (first: {first_names(result.missing_keys, 4)})")
            if result.unexpected_keys:
                parts.append(f"{len(result.unexpected_keys)} with no place in the model (first: "
                             f"{first_names(result.unexpected_keys, 4)})")
            raise Krea2Error(f"Krea 2 text encoder: a state dict given to load_sd does not fit the Qwen3-VL tower: "
                             f"{'; '.join(parts)}. Load the text encoder with Krea2TextEncoderLoader.")
        return result

    def memory_estimation_function(self, tokens, device=None):
        n = len(tokens.get(KEY, {}).get("ids", [])) or 512
        return n * self.transformer.config.hidden * 64

    def encode_token_weights(self, tokens):
        t = tokens[KEY]
        taps = tuple(t.get("taps", DEFAULT_TAPS))
        dev = self.execution_device or next(self.transformer.parameters()).device
        ids = torch.tensor([t["ids"]], dtype=torch.long, device=dev)
        cfg = self.transformer.config
        deepest = max(taps)
        pbar = comfy.utils.ProgressBar(deepest) if len(t["ids"]) * deepest > 2048 else None
        hooks = [layer.register_forward_hook(lambda *_: pbar.update(1)) for layer in self.transformer.layers[:deepest]] \
            if pbar is not None else []
        try:
            # float32 activations whatever the storage (ComfyUI's CLIP sets float32 compute for text
            # encoders too); the host's operations cast each weight as it is used
            h = self.transformer.forward_after_prefix(ids, t["prefix_len"], taps, dtype=torch.float32)
        finally:
            for hk in hooks:
                hk.remove()
        cond = h.to(mm.intermediate_device(), torch.float32)
        if cond.shape[-1] != len(taps) * cfg.hidden:
            raise Krea2Error("internal: unexpected conditioning width")
        return cond, None, {}


class Krea2ClipTokenizer:
    """Krea 2's template tokenizer as a ComfyUI tokenizer: ``tokenize_with_weights`` returns
    ``{KEY: {"ids", "prefix_len", "prompt_tokens", "prompt_tokens_total"}}``."""

    tokenizer_source = None  # set on the per-file subclass made by make_target

    def __init__(self, embedding_directory=None, tokenizer_data=None):
        self.tok = find_tokenizer(self.tokenizer_source)
        self.told_literal = False

    def tokenize_with_weights(self, text, return_word_ids=False, max_tokens=MAX_TOKENS, taps=DEFAULT_TAPS, **kwargs):
        if not self.told_literal and uses_weight_syntax(text):
            self.told_literal = True
            log.warning("Krea 2: the prompt uses ComfyUI's weighting / embedding syntax ('(word:1.2)', 'embedding:'); "
                        "Krea 2's text encoder reads the prompt literally, as the reference does, so these are "
                        "encoded as plain text, not as weights or embeddings.")
        p = build_prompt_ids(self.tok, text, max_tokens)
        return {KEY: {"ids": list(p.ids), "prefix_len": p.prefix_len, "prompt_tokens": p.prompt_tokens,
                      "prompt_tokens_total": p.prompt_tokens_total, "taps": tuple(taps)}}

    def untokenize(self, token_weight_pair):
        return token_weight_pair

    def state_dict(self):
        return {}


_WEIGHTED = re.compile(r"\([^()]*:\s*[-+]?(\d+\.?\d*|\.\d+)\s*\)")


def uses_weight_syntax(text: str) -> bool:
    """Whether ``text`` holds ComfyUI prompt-weight groups ``(words:1.2)`` or ``embedding:name``."""
    return bool(_WEIGHTED.search(text)) or "embedding:" in text


def load_clip(path: str):
    """A ComfyUI CLIP for a Qwen3-VL file or HF folder (validated with clear errors first)."""
    ck = TextCheckpoint(path)
    tok_cls = type("Krea2ClipTokenizerFor", (Krea2ClipTokenizer,), {"tokenizer_source": path})
    tok_cls(None)  # tokenizer errors now, at load time, naming the file
    target = comfy.supported_models_base.ClipTarget(tok_cls, Krea2ClipModel)
    target.params = {"text_config": dict(ck.config.__dict__)}
    n_params = sum(int(torch.Size(ck.shape(k)).numel()) for k in ck.keys())
    if ck.layout == "gguf":  # weights stay quantized, dequantized at cast time: see nodes.host.gguf
        from .gguf import load_gguf_clip
        return load_gguf_clip(ck, target, n_params)
    clip = comfy.sd.CLIP(target=target, embedding_directory=None, tokenizer_data={}, parameters=n_params,
                         model_options={})  # fresh dicts: the host keeps and may fill them
    # one tensor at a time straight into the host-built parameters: peak memory = model + one tensor
    params = dict(clip.cond_stage_model.transformer.named_parameters())
    missing = [k for k in ck.keys() if k not in params]
    if missing:
        raise Krea2Error(f"{path}: text encoder tensors without a place in the model: {missing[:5]}")
    fp8 = (torch.float8_e4m3fn, torch.float8_e5m2)
    pbar = comfy.utils.ProgressBar(len(ck.keys()))
    with torch.no_grad():
        for k in ck.keys():
            p = params[k]
            p.copy_(ck.dequantized(k, keep_fp8=p.dtype in fp8))
            pbar.update(1)
    log.info("Krea 2: text encoder %s (%s layout, %d layers, hidden %d)", os.path.basename(path.rstrip('/')),
             ck.layout, ck.config.layers, ck.config.hidden)
    return clip


def is_ours(clip) -> bool:
    return isinstance(getattr(clip, "cond_stage_model", None), Krea2ClipModel)


def is_core_krea2(clip) -> bool:
    m = getattr(clip, "cond_stage_model", None)
    return m is not None and "krea2" in type(m).__module__ + type(m).__name__.lower() and not is_ours(clip)


def limit_core_tokens(tokens: dict, max_tokens: int = MAX_TOKENS) -> dict:
    """Core's Krea 2 tokens cut to the reference's limit: at most ``max_tokens - 5`` prompt tokens, then the
    assistant suffix (core itself passes any length, which the model was never trained on). Logs the same
    warning as our encoder; token lists of another shape are returned as they are."""
    if max_tokens < SUFFIX_LEN:
        raise Krea2Error(f"Krea2TextEncode: max_tokens {max_tokens} is below the {SUFFIX_LEN}-token assistant suffix.")
    out = {}
    for key, batches in tokens.items():
        cut = []
        for seq in batches:
            ids = [t[0] if isinstance(t, (tuple, list)) and isinstance(t[0], int) else None for t in seq]
            span = templated_prompt_span(ids)
            budget = max_tokens - SUFFIX_LEN
            if span is not None and span[1] - span[0] > budget:
                warn_truncated(span[1] - span[0], max_tokens, SUFFIX_LEN)
                seq = list(seq[:span[0] + budget]) + list(seq[span[1]:])
            cut.append(seq)
        out[key] = cut
    return out


def encode(clip, text: str, taps=DEFAULT_TAPS, max_tokens: int = MAX_TOKENS):
    """CONDITIONING for ``text`` from our CLIP (any taps) or core's Krea 2 CLIP (default taps only)."""
    taps = tuple(int(t) for t in taps)
    if is_ours(clip):
        tokens = clip.tokenizer.tokenize_with_weights(text, max_tokens=max_tokens, taps=taps)
        return clip.encode_from_tokens_scheduled(tokens)
    if is_core_krea2(clip):
        if taps != tuple(DEFAULT_TAPS):
            raise Krea2Error("Krea2TextEncode: core's Krea 2 CLIP (CLIPLoader type krea2) only encodes the default "
                             f"taps {','.join(map(str, DEFAULT_TAPS))}. Load the text encoder with "
                             "Krea2TextEncoderLoader to choose other taps.")
        return clip.encode_from_tokens_scheduled(limit_core_tokens(clip.tokenize(text), max_tokens))
    name = type(getattr(clip, "cond_stage_model", clip)).__name__
    raise Krea2Error(f"Krea2TextEncode: the clip input is a {name} text encoder, not Krea 2's Qwen3-VL-4B. Load "
                     "qwen3vl_4b with Krea2TextEncoderLoader (or CLIPLoader type krea2).")
