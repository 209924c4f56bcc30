"""Krea 2's prompt layout, without padding.

The reference (diffusers ``Krea2Pipeline.get_text_hidden_states``) tokenizes
``PREFIX + prompt`` truncated to ``512 + 34 - 5`` tokens and padded to that length, appends the
5-token ``SUFFIX`` after the padding, masks the padding, gives real tokens consecutive positions
(``cumsum(mask) - 1``) and drops the first 34 rows (the system prefix). Padding is masked as a key
and never moves a position, so running only the real tokens, ``[prefix | prompt | suffix]`` at
positions ``0..n-1``, gives the same rows; :func:`build_prompt_ids` builds exactly those ids.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from ..errors import Krea2Error
from .tokenizer import IM_START, IMAGE_PAD, VISION_END, VISION_START, QwenTokenizer

log = logging.getLogger("krea2")

#: The Qwen-Image system template Krea 2 was trained with; everything up to the user turn is dropped.
PREFIX = ("<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
          "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n")
SUFFIX = "<|im_end|>\n<|im_start|>assistant\n"
#: The reference's ``max_sequence_length``: prompt tokens + suffix tokens after the prefix.
MAX_TOKENS = 512


@dataclass(frozen=True)
class PromptIds:
    """``ids``: ``[prefix | prompt | suffix]`` token ids (real tokens only); ``prefix_len``: rows to drop;
    ``prompt_tokens``: prompt tokens kept; ``prompt_tokens_total``: before truncation."""
    ids: list
    prefix_len: int
    prompt_tokens: int
    prompt_tokens_total: int

    @property
    def real_tokens(self) -> int:
        """Rows of the conditioning: kept prompt tokens + suffix tokens."""
        return len(self.ids) - self.prefix_len


def prefix_length(tok: QwenTokenizer, ids: list) -> int:
    """Index of the first token after ``<|im_start|>user\\n``, found by token ids: the second
    ``<|im_start|>`` then the tokens of ``user\\n`` (34 with Qwen's vocabulary).

    The newline is counted as one token even when it merges with the prompt's leading whitespace,
    so the rows dropped are those the reference drops."""
    start = tok.token_id(IM_START)
    seen = [i for i, t in enumerate(ids) if t == start][:2]
    user = tok.encode("user\n")
    if start is None or len(seen) < 2 or ids[seen[1] + 1:seen[1] + len(user)] != user[:-1]:
        raise Krea2Error(f"{tok.where}: the Krea 2 template did not tokenize as the Qwen chat format ('<|im_start|>' "
                         "is not a special token of this tokenizer?); use the Qwen tokenizer.")
    return seen[1] + 1 + len(user)


def build_prompt_ids(tok: QwenTokenizer, text: str, max_tokens: int = MAX_TOKENS, warn: bool = True) -> PromptIds:
    """Token ids of ``PREFIX + text`` (truncated to ``max_tokens - len(suffix)`` prompt tokens) + ``SUFFIX``.

    Tokenized together like the reference, so the prompt's first token may merge with the prefix's
    closing newline exactly as it did in training. Truncation logs a warning with the counts."""
    suffix = tok.encode(SUFFIX)
    budget = max_tokens - len(suffix)
    if budget < 0:
        raise ValueError(f"max_tokens {max_tokens} is below the {len(suffix)}-token assistant suffix")
    full = tok.encode(PREFIX + text)
    n = prefix_length(tok, full)
    total = len(full) - n
    kept = min(total, budget)
    if total > budget and warn:
        warn_truncated(total, max_tokens, len(suffix))
    return PromptIds(full[:n + kept] + suffix, n, kept, total)


def warn_truncated(total: int, max_tokens: int, suffix_len: int = 5, images: int = 0) -> None:
    budget = max_tokens - suffix_len
    extra = (f" (text tokens only: the {images} image(s) and their 'Picture N:' labels are not counted)"
             if images else "")
    log.warning("Krea 2: the prompt is %d tokens; Krea 2 reads at most %d%s (%d minus the %d-token assistant "
                "suffix), so the last %d tokens are dropped.", total, budget, extra, max_tokens, suffix_len,
                total - budget)


def image_labels(count: int) -> str:
    """The user turn's image part for ``count`` images, as Krea 2's edit / style LoRAs were trained:
    ``Picture 1: <|vision_start|><|image_pad|><|vision_end|>Picture 2: ...`` (one pad stands for each image's
    tokens until :func:`build_image_prompt_ids` expands it)."""
    return "".join(f"Picture {i + 1}: {VISION_START}{IMAGE_PAD}{VISION_END}" for i in range(count))


@dataclass(frozen=True)
class ImagePromptIds(PromptIds):
    """:class:`PromptIds` of a prompt with images; ``image_spans``: ``(start, length)`` of each image's tokens
    in ``ids``, in order."""
    image_spans: tuple = ()


def build_image_prompt_ids(tok: QwenTokenizer, text: str, image_tokens, max_tokens: int = MAX_TOKENS,
                           warn: bool = True, prefix: str = PREFIX, suffix_text: str = SUFFIX,
                           labels: bool = True) -> ImagePromptIds:
    """Token ids of ``prefix + image_labels(n) + text`` (+ ``suffix_text``) with each image's pad repeated
    ``image_tokens[i]`` times (one per merged vision token). The ``max_tokens - 5`` budget applies to the
    prompt text's tokens only (those after the last image); truncation warns with the counts.

    ``prefix`` / ``suffix_text``: another chat template around the user turn (a host's, e.g. Qwen-Image-Edit's
    system prompt); ``labels=False`` when ``text`` already holds the ``Picture N: <|vision_start|>...``
    blocks itself (as ComfyUI's TextEncodeQwenImageEditPlus writes them)."""
    image_tokens = [int(n) for n in image_tokens]
    pad = tok.token_id(IMAGE_PAD)
    if pad is None or tok.token_id(VISION_START) is None or tok.token_id(VISION_END) is None:
        raise Krea2Error(f"{tok.where}: this tokenizer has no {VISION_START} / {IMAGE_PAD} / {VISION_END} special "
                         "tokens, so it cannot place images in a prompt; use the Qwen3-VL tokenizer.")
    suffix = tok.encode(suffix_text)
    budget = max_tokens - len(suffix)
    if budget < 0:
        raise ValueError(f"max_tokens {max_tokens} is below the {len(suffix)}-token assistant suffix")
    full = tok.encode(prefix + (image_labels(len(image_tokens)) if labels else "") + text)
    n = prefix_length(tok, full)
    pads = [i for i, t in enumerate(full) if t == pad]
    if len(pads) != len(image_tokens):
        raise Krea2Error(f"{tok.where}: the prompt holds {len(pads)} '{IMAGE_PAD}' tokens for {len(image_tokens)} "
                         f"images; give each image exactly one '{VISION_START}{IMAGE_PAD}{VISION_END}' block (and no "
                         "other image-pad tokens in the text).")
    text_start = full.index(tok.token_id(VISION_END), pads[-1]) + 1 if pads else n
    total = len(full) - text_start
    kept = min(total, budget)
    if total > budget and warn:
        warn_truncated(total, max_tokens, len(suffix), len(image_tokens))
    ids, spans = expand_image_pads(full[:text_start + kept] + suffix, pad, image_tokens)
    return ImagePromptIds(ids, n, kept, total, tuple(spans))


def expand_image_pads(ids: list, pad: int, counts) -> tuple[list, list]:
    """``ids`` with its ``i``-th ``pad`` token repeated ``counts[i]`` times (one per merged vision token, as
    Qwen's processor expands them) and the ``(start, count)`` span of each image in the result."""
    counts = list(counts)
    where = [i for i, t in enumerate(ids) if t == pad]
    if len(where) != len(counts):
        raise Krea2Error(f"{len(where)} '{IMAGE_PAD}' tokens in the prompt for {len(counts)} images: each image "
                         f"needs exactly one '{VISION_START}{IMAGE_PAD}{VISION_END}' block.")
    out, spans, last = [], [], 0
    for p, count in zip(where, counts):
        out += ids[last:p]
        spans.append((len(out), count))
        out += [pad] * count
        last = p + 1
    return out + ids[last:], spans


def mrope_positions(length: int, spans, grids, device=None):
    """``(3, length)`` M-RoPE positions (time, height, width) for a sequence with image tokens at ``spans``
    (``(start, count)``) of merged grids ``grids`` (``(rows, cols)``): text tokens count on along all three
    axes; an image's tokens sit at ``(s, s + row, s + col)`` with ``s`` the next position, and the text after
    it starts at ``s + max(rows, cols)``."""
    import torch
    pos = torch.empty(3, length, dtype=torch.long)
    cur, i = 0, 0
    for (start, count), (rows, cols) in zip(list(spans) + [(length, 0)], list(grids) + [(0, 0)]):
        pos[:, i:start] = torch.arange(cur, cur + start - i)
        cur += start - i
        if count:
            r = torch.arange(rows).repeat_interleave(cols)
            c = torch.arange(cols).repeat(rows)
            pos[0, start:start + count] = cur
            pos[1, start:start + count] = cur + r
            pos[2, start:start + count] = cur + c
            cur += max(rows, cols)
        i = start + count
    return pos.to(device) if device is not None else pos


IM_START_ID, IM_END_ID, USER_ID, NEWLINE_ID = 151644, 151645, 872, 198  # Qwen's ids
SUFFIX_LEN = 5  # <|im_end|> \n <|im_start|> assistant \n


def templated_prompt_span(ids: list) -> tuple[int, int] | None:
    """``(start, end)`` of the prompt inside the token ids of the whole chat template (system turn, user turn
    with the prompt, assistant opening) as another tokenizer produced them, e.g. ComfyUI's own Krea 2
    tokenizer; ``None`` if ``ids`` do not have that shape. The prompt starts after ``<|im_start|>user\n`` (or
    after ``user`` where the newline merged with the prompt's first token, as :func:`prefix_length` counts it)
    and ends before the 5-token assistant suffix."""
    if len(ids) < 3 + SUFFIX_LEN or ids[-SUFFIX_LEN] != IM_END_ID or ids[-3] != IM_START_ID:
        return None
    starts = [i for i, v in enumerate(ids[:-SUFFIX_LEN]) if v == IM_START_ID]
    if len(starts) < 2 or ids[starts[1] + 1] != USER_ID:
        return None
    u = starts[1]
    start = u + 3 if ids[u + 2] == NEWLINE_ID else u + 2
    end = len(ids) - SUFFIX_LEN
    return (start, end) if start <= end else None
