"""The single attention function every Krea 2 layer calls.

Contract: ``attention(q, k, v, mask=None)`` with ``q (B, H, L, D)``, ``k, v (B, Hkv, L, D)`` where
``H % Hkv == 0`` and query head ``h`` uses key/value head ``h // (H // Hkv)`` (the
repeat-interleave grouping of the reference). ``mask`` is ``None`` or a boolean key mask
broadcastable to ``(B, 1, 1, L)`` (True = attend). Returns ``(B, L, H*D)``.

``is_causal=True`` (keyword only; the Qwen3-VL text tower) adds the causal constraint: query ``i``
attends keys ``j <= i`` (and the key mask, if any).

This is PyTorch SDPA. A host's own attention is chosen per model, never process-wide: the transformer's
``attention_backend`` attribute (``fn(q, k, v, mask, transformer_options)``, the same contract plus the forward's
options), which ComfyUI's adapter sets (``nodes.host.attention``).

Which SDPA kernel each call reaches on CUDA (PyTorch >= 2.5). SDPA's flash kernel takes fp16 / bf16 without a
mask (``is_causal`` and GQA included), the memory-efficient kernel any dtype and any mask; everything else falls
to the math kernel, which materialises the (L, L) scores (grouped-query attention with a mask through
``enable_gqa`` is the known trap: other Krea 2 implementations measured it 3x slower). None of ours reaches it:

=====================================  ===================================  ======================================
call                                   what SDPA gets                       kernel
=====================================  ===================================  ======================================
transformer joint attention, bf16      ``Hkv`` heads, query groups stacked  flash
                                       along the sequence, no mask
the same with a key mask (references,  stacked, boolean mask (B, 1, 1, L)   memory-efficient
regions), or in float32                or (B, 1, rep*L, L)
Qwen3 text tower (causal), bf16 /      ``is_causal`` + ``enable_gqa``       flash
fp16, no mask
text tower in float32 (ComfyUI's       stacked, explicit causal mask        memory-efficient
CLIP computes in float32) or with a
key mask / a generation cache
vision tower (one call per image)      plain multi-head, no mask            flash (bf16) / memory-efficient (fp32)
=====================================  ===================================  ======================================

``benchmarks/gpu_check.py`` runs these calls at full size under ``sdpa_kernel`` restricted to the flash and
memory-efficient kernels, so a change that reaches the math kernel fails there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


#: SDPA's ``enable_gqa`` (K/V heads shared inside the kernel) exists from torch 2.5 on. Decided once from
#: the version: a TypeError raised inside a call is a real error, never a reason to switch paths.
SDPA_HAS_GQA = _torch_version() >= (2, 5)


def causal_mask(l: int, device, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean ``(1, 1, L, L)`` lower-triangular mask (True = attend), and-ed with a key mask
    broadcastable to ``(B, 1, 1, L)`` when given (result ``(B, 1, L, L)``)."""
    c = torch.ones(l, l, dtype=torch.bool, device=device).tril_().view(1, 1, l, l)
    return c if mask is None else c & mask.to(device=device, dtype=torch.bool)


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None, *,
                   is_causal: bool = False, sdpa=None) -> torch.Tensor:
    """:func:`attention` by PyTorch SDPA; ``sdpa`` replaces ``F.scaled_dot_product_attention`` (a host's
    wrapper of it that picks kernels, same signature)."""
    sdpa_fn = F.scaled_dot_product_attention if sdpa is None else sdpa
    b, h, l, d = q.shape
    hkv = k.shape[1]
    if is_causal:
        out = None
        if mask is None and h == hkv:
            out = sdpa_fn(q, k, v, is_causal=True)
        elif mask is None and SDPA_HAS_GQA and not (q.is_cuda and q.dtype == torch.float32):
            # K/V heads shared in the kernel, and the causal flag stays fast (flash). On CUDA in float32 only the
            # math kernel takes enable_gqa: there the stacked layout below with an explicit mask is used instead
            out = sdpa_fn(q, k, v, is_causal=True, enable_gqa=True)
        if out is not None:
            return out.transpose(1, 2).reshape(b, l, h * d)
        # Stacked GQA query rows (below) are no longer aligned with their key positions, so SDPA's
        # own causal flag would be wrong there: give the causal constraint as an explicit mask.
        mask = causal_mask(l, q.device, mask)
    if h != hkv:
        # Grouped-query attention without materialising repeated K/V: the `rep` query heads that
        # share one K/V head are stacked along the sequence axis, so every SDPA kernel sees plain
        # multi-head attention with Hkv heads. Rows of a softmax are independent, so this is exact.
        rep = h // hkv
        qg = q.reshape(b, hkv, rep * l, d)
        if mask is not None and mask.shape[-2] != 1:
            # a per-query mask (..., L, L) must follow its rows into the stacked (rep*L) layout
            mask = mask.unsqueeze(-3).expand(*mask.shape[:-2], rep, l, mask.shape[-1]).flatten(-3, -2)
        out = sdpa_fn(qg, k, v, attn_mask=mask)
        out = out.view(b, hkv, rep, l, d).view(b, h, l, d)
    else:
        out = sdpa_fn(q, k, v, attn_mask=mask)
    return out.transpose(1, 2).reshape(b, l, h * d)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None, *,
              is_causal: bool = False) -> torch.Tensor:
    """See the module docstring for the contract."""
    return sdpa_attention(q, k, v, mask, is_causal=is_causal)
