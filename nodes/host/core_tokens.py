"""Host adapter: core's own Krea 2 CLIP (CLIPLoader type krea2) and its token lists, which Krea2TextEncode also
takes: recognised by class, and its prompts cut to the reference's token limit."""

from __future__ import annotations

from ...krea2_model.errors import Krea2Error
from ...krea2_model.text.prompt import MAX_TOKENS, SUFFIX_LEN, templated_prompt_span, warn_truncated


def is_core_krea2(clip) -> bool:
    """True for a CLIP of core's native Krea 2 text encoder (its own class, where the host has one)."""
    from .internals import native_krea2_text_class
    native = native_krea2_text_class()
    return native is not None and isinstance(getattr(clip, "cond_stage_model", None), native)


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
