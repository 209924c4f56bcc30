"""The single attention function every Krea 2 layer calls.

Contract: ``attention(q, k, v, mask=None)`` with ``q (B, H, L, D)``, ``k, v (B, Hkv, L, D)`` where
``H % Hkv == 0`` and query head ``h`` uses key/value head ``h // (H // Hkv)`` (the
repeat-interleave grouping of the reference). ``mask`` is ``None`` or a boolean key mask
broadcastable to ``(B, 1, 1, L)`` (True = attend). Returns ``(B, L, H*D)``.

A host can swap the backend with :func:`set_attention_backend` (ComfyUI's optimized attention,
for example); the default is PyTorch SDPA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_backend = None


def set_attention_backend(fn) -> None:
    """Route all Krea 2 attention through ``fn(q, k, v, mask)`` (same contract); ``None`` restores SDPA."""
    global _backend
    _backend = fn


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    b, h, l, d = q.shape
    hkv = k.shape[1]
    if h != hkv:
        # Grouped-query attention without materialising repeated K/V: the `rep` query heads that
        # share one K/V head are stacked along the sequence axis, so every SDPA kernel sees plain
        # multi-head attention with Hkv heads. Rows of a softmax are independent, so this is exact.
        rep = h // hkv
        qg = q.reshape(b, hkv, rep * l, d)
        out = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask)
        out = out.view(b, hkv, rep, l, d).view(b, h, l, d)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2).reshape(b, l, h * d)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """See the module docstring for the contract."""
    if _backend is not None:
        return _backend(q, k, v, mask)
    return sdpa_attention(q, k, v, mask)
