"""Text generation with the Qwen3-VL language tower (prompt enhancement: ComfyUI's TextGenerate node).

One prefill pass over the prompt (image tokens, M-RoPE and DeepStack included) writes every layer's keys and
values into a :class:`~krea2_model.text.qwen3.KVCache` allocated once per call; each new token then runs alone
against that cache, written in place (no per-token concatenation). The output head is the token embedding
(Qwen3-VL-4B ties them), brought to the compute dtype and device once per call by :func:`output_head` (a GGUF
table is dequantized once, a 16-bit table used as it is when that is the compute dtype), so each token costs
one matrix product. The layers of a GGUF tower are dequantized once per call too, as many as the free memory
allows (:func:`default_copy_budget`, or ``copy_budget`` bytes; :class:`~krea2_model.formats.gguf_ops.call_copies`):
dequantizing every layer for every token costs several times the product itself; layers beyond the budget still
dequantize per token. Decoding stops after any of ``stop_ids`` (``<|im_end|>``, kept in the output) or after
``max_new`` tokens.

Sampling (``do_sample``; :func:`sample_next`) follows ComfyUI's TextGenerate as its documentation gives the
options: repetition penalty on the tokens generated so far (a logit divided by the penalty when positive,
multiplied when negative; 1.0 = none), presence penalty (subtracted once from every generated token), then
temperature, top-k (0 = off), min-p (tokens below ``min_p`` times the best token's probability dropped), top-p
(only tokens whose cumulative probability, best first, stays within ``top_p``; the best token always stays),
then one draw from a generator seeded with ``seed`` on the logits' device, so a seed gives the same text every
time. Without sampling, or at temperature 0, the most likely token is taken (greedy).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from ..formats.gguf_ops import call_copies
from .qwen3 import KVCache, Qwen3TextModel, VisionInputs, rope_tables

#: positions a cache is first allocated for beyond the prompt (it doubles when a call needs more)
FIRST_CAPACITY = 1024
#: memory left free when the per-call layer copies are sized: at least this, and a quarter of what is free
COPY_RESERVE = 1 << 30


def default_copy_budget(device) -> int:
    """Bytes the per-call dequantized layer copies of a GGUF tower may take on ``device``: what is free now, less
    :data:`COPY_RESERVE` or a quarter of it, whichever is more (0 where the free memory is unknown)."""
    from ..formats.gguf_ops import available_memory
    free = available_memory(device)
    return max(0, free - max(COPY_RESERVE, free // 4))


def default_dtype(model: Qwen3TextModel) -> torch.dtype:
    """The compute dtype of ``model`` when none is given: the token embedding's float dtype (16 bits or more),
    else (GGUF blocks, fp8) the final norm's, else float32."""
    for t in (model.embed_tokens.weight, model.norm.weight):
        if t.dtype.is_floating_point and t.dtype.itemsize >= 2:
            return t.dtype
    return torch.float32


def output_head(model: Qwen3TextModel, dtype, device) -> torch.Tensor:
    """The tied output head ``(vocab, hidden)`` in ``dtype`` on ``device``: the stored table itself when it is
    already there, else one copy for the whole call (a GGUF table dequantized once, not once per token)."""
    emb = model.embed_tokens
    if getattr(emb, "gguf_qtype", None) is not None:
        from ..formats.gguf_ops import gguf_weight
        return gguf_weight(emb, device, dtype)
    w = emb.weight
    if w.dtype == dtype and w.device == torch.device(device):
        return w
    return w.to(device=device, dtype=dtype)


def head_copy_bytes(model: Qwen3TextModel, dtype, device) -> int:
    """Bytes :func:`output_head` allocates for one call (0 when it uses the stored table)."""
    emb = model.embed_tokens
    w = emb.weight
    if getattr(emb, "gguf_qtype", None) is None and w.dtype == dtype and w.device == torch.device(device):
        return 0
    return model.config.vocab * model.config.hidden * torch.empty((), dtype=dtype).element_size()


def cache_bytes(model: Qwen3TextModel, positions: int, dtype) -> int:
    """Bytes of a :class:`KVCache` holding ``positions`` positions of every layer in ``dtype``."""
    c = model.config
    return 2 * c.layers * c.kv_heads * c.head_dim * positions * torch.empty((), dtype=dtype).element_size()


def sample_next(logits: torch.Tensor, generated, do_sample: bool = False, temperature: float = 1.0,
                top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0, repetition_penalty: float = 1.0,
                presence_penalty: float = 0.0, generator: torch.Generator | None = None) -> int:
    """The next token id from ``logits (vocab,)`` or ``(1, vocab)``; ``generated``: ids generated so far (what the
    penalties look at). See the module docstring for the order of the options."""
    logits = logits.reshape(1, -1)
    if not do_sample or temperature == 0.0:
        return int(torch.argmax(logits[0]))
    logits = logits.float().clone()
    if len(generated) and (repetition_penalty != 1.0 or presence_penalty):
        seen = torch.tensor(sorted(set(int(t) for t in generated)), device=logits.device)
        picked = logits[:, seen]
        if repetition_penalty != 1.0:
            picked = torch.where(picked > 0, picked / repetition_penalty, picked * repetition_penalty)
        if presence_penalty:
            picked = picked - presence_penalty
        logits[:, seen] = picked
    if temperature != 1.0:
        logits = logits / temperature
    ids = None
    if top_k and top_k > 0:
        logits, ids = torch.topk(logits, min(int(top_k), logits.shape[-1]))  # best first
    if min_p and min_p > 0.0:
        probs = torch.softmax(logits, dim=-1)
        logits = logits.masked_fill(probs < min_p * probs.max(dim=-1, keepdim=True).values, float("-inf"))
    if top_p < 1.0:
        ordered, order = torch.sort(logits, descending=True)
        over = torch.cumsum(torch.softmax(ordered, dim=-1), dim=-1) > top_p
        over[:, 0] = False  # the best token always stays
        logits = logits.masked_fill(torch.zeros_like(over).scatter_(1, order, over), float("-inf"))
    pick = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)
    return int(ids.gather(1, pick) if ids is not None else pick)


def _step(model: Qwen3TextModel, x: torch.Tensor, positions: torch.Tensor, cache: KVCache,
          vision: VisionInputs | None) -> torch.Tensor:
    """Run ``x (1, l, hidden)`` at ``positions`` through every layer against ``cache`` (extended by ``l``);
    returns the final-normed state of the last position ``(1, hidden)``."""
    cfg = model.config
    rope = rope_tables(positions, cfg.head_dim, cfg.rope_theta, x.dtype)
    cache.reserve(x.shape[1])
    h = x
    for i, layer in enumerate(model.layers):
        h = layer(h, rope, cache.slot(i))
        if vision is not None and i < len(vision.deepstack):
            h = h.clone()
            h[0, vision.mask] += vision.deepstack[i].to(h.dtype)
    cache.length += x.shape[1]
    return model.norm(h[:, -1])


@torch.no_grad()
def generate(model: Qwen3TextModel, ids: list, *, vision: VisionInputs | None = None, max_new: int = 256,
             stop_ids=(), do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             min_p: float = 0.0, repetition_penalty: float = 1.0, presence_penalty: float = 0.0,
             seed: int | None = None, dtype=None, device=None, head: torch.Tensor | None = None,
             copy_budget: int | None = None, progress: Callable[[int], None] | None = None) -> list:
    """New token ids after prompt ``ids`` (a list of ints; image tokens described by ``vision``), at most
    ``max_new``, the stop token included when one was produced. See the module docstring for sampling.

    ``dtype``: the compute dtype (default :func:`default_dtype`); ``head``: the output head ``(vocab, hidden)``
    already in that dtype on ``device`` (a host's own cast of the embedding; default :func:`output_head`);
    ``copy_budget``: bytes for the per-call copies of a GGUF tower's layers (default :func:`default_copy_budget`;
    0 = dequantize per token); ``progress(n)``: called after each new token with the count so far (a host's
    progress bar; it may raise to interrupt)."""
    if max_new <= 0:
        return []
    w = model.embed_tokens.weight
    dev = torch.device(device if device is not None else (w.device if w.device.type != "meta" else "cpu"))
    dtype = dtype or default_dtype(model)
    prompt = torch.tensor([ids], dtype=torch.long, device=dev)
    if vision is not None:
        positions = vision.positions.to(dev)
        next_pos = int(positions.max()) + 1
    else:
        positions = torch.arange(len(ids), device=dev)
        next_pos = len(ids)
    cache = KVCache(model.config, len(ids) + min(int(max_new), FIRST_CAPACITY), dtype, dev)
    head = output_head(model, dtype, dev) if head is None else head
    gen = None
    if do_sample:
        gen = torch.Generator(device=dev).manual_seed(int(seed) if seed is not None else torch.seed())
    stop = set(int(s) for s in stop_ids)
    budget = default_copy_budget(dev) if copy_budget is None else copy_budget
    with call_copies(model.layers, dev, dtype, budget):
        return _decode(model, prompt, positions, next_pos, cache, vision, head, max_new, stop, dev, dtype,
                       lambda logits, out: sample_next(logits, out, do_sample, temperature, top_k, top_p, min_p,
                                                       repetition_penalty, presence_penalty, gen), progress)


def _decode(model, prompt, positions, next_pos, cache, vision, head, max_new, stop, dev, dtype, pick, progress):
    """The prefill, then one token at a time until a stop token or ``max_new`` (see :func:`generate`)."""
    out: list = []
    last = _step(model, model.embed(prompt, dtype, vision), positions, cache, vision)
    while True:
        tok = pick(F.linear(last, head)[0], out)
        out.append(tok)
        if progress is not None:
            progress(len(out))
        if tok in stop or len(out) >= max_new:
            return out
        x = model.embed_tokens(torch.tensor([[tok]], device=dev)).to(dtype)
        last = _step(model, x, torch.tensor([next_pos], device=dev), cache, None)
        next_pos += 1
