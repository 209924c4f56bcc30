"""Host adapter: our layers attend with the attention ComfyUI chose, as its native models do.

ComfyUI picks one attention function at start (``--use-pytorch-cross-attention``, ``--use-sage-attention``,
``--use-flash-attention``, xformers, split or sub-quadratic; PyTorch's on NVIDIA by default, sub-quadratic
on the CPU) and lets a node replace it per call through ``transformer_options["optimized_attention_override"]``.
Native Krea 2 calls ``optimized_attention_masked(q, k, v, heads, mask=..., skip_reshape=True,
transformer_options=...)`` with K/V heads repeated to the query heads; :func:`host_attention` does the same,
so every choice and override acts on our MODEL too and the numbers are the host's own.

Two exceptions, both without an override set. When the host's choice is its PyTorch attention, our
:func:`krea2_model.model.attention.sdpa_attention` runs instead, through the host's SDPA entry (its kernel
priority on CUDA): the same SDPA call without copying K/V heads
(query heads sharing a K/V head are stacked along the sequence; softmax rows are independent), equal bit for
bit to repeat + SDPA on the CPU (``tests/unit/test_hooks.py``). And under torch.compile, ComfyUI's
memory-chunked fallbacks (sub-quadratic, split, basic: the CPU default) give way to SDPA too, since they query
the free memory on every call, a graph break each; compiled sums are reordered anyway (within 1e-4 of native
compiled, tested). The rotation, likewise, is ours while compiling (one graph; the host's kernel is eager).
"""

from __future__ import annotations

import torch

import comfy.ldm.flux.math as host_math
import comfy.ops
import comfy.ldm.modules.attention as host_att

from ...krea2_model.model.attention import sdpa_attention


#: the host's SDPA entry (on CUDA it sets ComfyUI's kernel priority), where this host has one
_HOST_SDPA = getattr(comfy.ops, "scaled_dot_product_attention", None)
#: ComfyUI's fallbacks that size their chunks from the free memory on every call: under torch.compile each call
#: is a graph break (native Krea 2 compiles to 31 graphs on the CPU), so a compiled forward uses SDPA instead
_MEMORY_CHUNKED = tuple(f for f in (getattr(host_att, n, None) for n in ("attention_sub_quad", "attention_split",
                                                                         "attention_basic")) if f is not None)


def _additive(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A boolean key mask (True = attend) as the additive float mask every host attention function takes."""
    return torch.zeros(mask.shape, dtype=like.dtype, device=like.device).masked_fill_(
        ~mask.to(like.device), -torch.finfo(like.dtype).max)


def host_attention(q, k, v, mask, transformer_options):
    """``q (B, H, L, D)``, ``k, v (B, Hkv, L, D)``, ``mask`` None or boolean ``(B, 1, 1, L)`` ->
    ``(B, L, H*D)``, computed by the host's current attention function (looked up per call: a host may
    swap it) with the forward's ``transformer_options`` (its override, ``block_index``, ...)."""
    fn = host_att.optimized_attention_masked
    opts = transformer_options if transformer_options is not None else {}
    if "optimized_attention_override" not in opts and (
            fn is getattr(host_att, "attention_pytorch", None)
            or (torch.compiler.is_compiling() and fn in _MEMORY_CHUNKED)):
        return sdpa_attention(q, k, v, mask, sdpa=_HOST_SDPA)
    heads = q.shape[1]
    if k.shape[1] != heads:
        rep = heads // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    if mask is not None and mask.dtype == torch.bool:
        mask = _additive(mask, q)
    return fn(q, k, v, heads, mask=mask, skip_reshape=True, transformer_options=opts)


def host_rope(q, k, pe):
    """RoPE with the host's own rotation (``comfy.ldm.flux.math.apply_rope``, native Krea 2's), whose kernel
    differs by device and version: the rotated q/k are the host's bits."""
    return host_math.apply_rope(q, k, pe)


def _current():
    return host_att.optimized_attention_masked


#: the text-stage cache compares this: text tokens computed under one attention choice are not reused under another
host_attention.cache_key = _current
