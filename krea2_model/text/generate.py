"""Text generation with the Qwen3-VL language tower (prompt enhancement: ComfyUI's TextGenerate node).

One prefill pass over the prompt (image tokens, M-RoPE and DeepStack included) keeps every layer's keys and
values; each new token then runs alone against that cache. The output head is the token embedding itself
(Qwen3-VL-4B ties them). Decoding stops at any of ``stop_ids`` (``<|im_end|>``) or after ``max_new`` tokens.

Sampling (``do_sample``) applies, in this order: repetition penalty (a seen token's logit divided by the
penalty when positive, multiplied when negative), presence penalty (subtracted once from every seen token),
temperature, top-k, top-p (the smallest set whose probability reaches ``top_p``), min-p (tokens below
``min_p`` times the best token's probability dropped), then draws from a generator seeded with ``seed``, so
a seed gives the same text every time. Without sampling the most likely token is taken (greedy).
"""

from __future__ import annotations

import torch

from ..model.layers import cast_param
from .qwen3 import Qwen3TextModel, VisionInputs, rope_tables


def _next_token(logits: torch.Tensor, seen: torch.Tensor, do_sample: bool, temperature: float, top_k: int,
                top_p: float, min_p: float, repetition_penalty: float, presence_penalty: float,
                gen: torch.Generator | None) -> int:
    """``logits (vocab,)`` float32 -> the next token id. ``seen``: ids so far (prompt and output)."""
    if not do_sample:
        return int(torch.argmax(logits))
    logits = logits.clone()
    uniq = torch.unique(seen)
    if repetition_penalty != 1.0:
        picked = logits[uniq]
        logits[uniq] = torch.where(picked > 0, picked / repetition_penalty, picked * repetition_penalty)
    if presence_penalty:
        logits[uniq] -= presence_penalty
    logits = logits / max(temperature, 1e-5)
    if top_k and top_k > 0 and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits[logits < kth] = float("-inf")
    probs = torch.softmax(logits, dim=-1)
    if 0.0 < top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        before = torch.cumsum(sorted_p, dim=0) - sorted_p  # mass of the better tokens
        drop = order[before >= top_p]
        probs[drop] = 0.0
    if min_p and min_p > 0.0:
        probs[probs < min_p * probs.max()] = 0.0
    probs = probs / probs.sum()
    return int(torch.multinomial(probs, 1, generator=gen))


@torch.no_grad()
def generate(model: Qwen3TextModel, ids: list, *, vision: VisionInputs | None = None, max_new: int = 256,
             stop_ids=(), do_sample: bool = False, temperature: float = 1.0, top_k: int = 50, top_p: float = 1.0,
             min_p: float = 0.0, repetition_penalty: float = 1.0, presence_penalty: float = 0.0,
             seed: int | None = None, dtype=None, device=None) -> list:
    """New token ids after prompt ``ids`` (a list of ints; image tokens described by ``vision``), at most
    ``max_new``, the stop token included when one was produced. See the module docstring for sampling."""
    if max_new <= 0:
        return []
    w = model.embed_tokens.weight
    dev = device if device is not None else (w.device if w.device.type != "meta" else "cpu")
    cfg = model.config
    gen = None
    if do_sample:
        gen = torch.Generator(device="cpu").manual_seed(int(seed) if seed is not None else torch.seed())
    prompt = torch.tensor([ids], dtype=torch.long, device=dev)
    x = model.embed(prompt, dtype, vision)
    if vision is not None:
        positions = vision.positions.to(dev)
        next_pos = int(positions.max()) + 1
    else:
        positions = torch.arange(len(ids), device=dev)
        next_pos = len(ids)
    cache = None
    out, seen = [], prompt[0].tolist()
    stop = set(int(s) for s in stop_ids)
    for step in range(max_new):
        rope = rope_tables(positions, cfg.head_dim, cfg.rope_theta, x.dtype)
        keep: list = []
        h = x
        for i, layer in enumerate(model.layers):
            h = layer(h, rope, cache[i] if cache else None, keep)
            if step == 0 and vision is not None and i < len(vision.deepstack):
                h = h.clone()
                h[0, vision.mask] += vision.deepstack[i].to(h.dtype)
        cache = keep if cache is None else [(torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2))
                                            for (pk, pv), (k, v) in zip(cache, keep)]
        last = model.norm(h[:, -1])
        logits = torch.nn.functional.linear(last, cast_param(model.embed_tokens.weight, last))[0].float()
        tok = _next_token(logits, torch.tensor(seen), do_sample, temperature, top_k, top_p, min_p,
                          repetition_penalty, presence_penalty, gen)
        out.append(tok)
        seen.append(tok)
        if tok in stop:
            break
        x = model.embed_tokens(torch.tensor([[tok]], device=dev)).to(h.dtype)
        positions = torch.tensor([next_pos], device=dev)
        next_pos += 1
    return out
