"""Building blocks shared by the Krea 2 transformer and the Qwen3-VL text tower.

Every layer takes ``dtype=None, device=None, operations=None`` and builds its Linears through
``operations.Linear`` (default: ``torch.nn``). That one seam lets a host substitute its own Linear
(ComfyUI's manual cast, fp8 storage, low-VRAM offload) without touching the maths.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import attention


def ops_or_default(operations):
    return nn if operations is None else operations


def cast_param(p: torch.Tensor, like: torch.Tensor, dtype=None) -> torch.Tensor:
    """``p`` on ``like``'s device in ``dtype`` (default ``like.dtype``); a no-op when already there.
    Hosts may keep small parameters offloaded or in another dtype; this brings them in per call."""
    dtype = like.dtype if dtype is None else dtype
    if p.device != like.device or p.dtype != dtype:
        p = p.to(device=like.device, dtype=dtype)
    return p


class RMSNorm(nn.Module):
    """RMSNorm with Krea's zero-centred weight: ``y = x / rms(x) * (1 + scale)``, computed in float32.

    The parameter is called ``scale`` (Krea's checkpoint key); it is kept in float32 whatever the model
    dtype, because ``1 + scale`` loses most of ``scale``'s bits in bf16.
    """

    def __init__(self, dim: int, eps: float = 1e-5, dtype=None, device=None, operations=None):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.zeros(dim, dtype=torch.float32, device=device), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = cast_param(self.scale, x, torch.float32) + 1.0
        return F.rms_norm(x.float(), (x.shape[-1],), weight=w, eps=self.eps).to(x.dtype)


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))``; keys ``gate``, ``up``, ``down``."""

    def __init__(self, dim: int, hidden: int, dtype=None, device=None, operations=None):
        super().__init__()
        ops = ops_or_default(operations)
        self.gate = ops.Linear(dim, hidden, bias=False, dtype=dtype, device=device)
        self.up = ops.Linear(dim, hidden, bias=False, dtype=dtype, device=device)
        self.down = ops.Linear(hidden, dim, bias=False, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class QKNorm(nn.Module):
    def __init__(self, head_dim: int, eps: float, dtype=None, device=None, operations=None):
        super().__init__()
        self.qnorm = RMSNorm(head_dim, eps, dtype=dtype, device=device)
        self.knorm = RMSNorm(head_dim, eps, dtype=dtype, device=device)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs ``(x[2i], x[2i+1])`` of ``x (B, H, L, D)`` by the angles whose
    cos/sin are given as ``(L, D/2)`` float32 tables. Computed in float32, returned in ``x.dtype``."""
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).to(x.dtype)


class Attention(nn.Module):
    """Grouped-query self-attention with q/k RMSNorm, optional RoPE and a sigmoid output gate.

    Keys: ``wq (H*D, C)``, ``wk``/``wv (Hkv*D, C)``, ``gate (C, C)``, ``wo (C, H*D)``,
    ``qknorm.qnorm.scale``/``qknorm.knorm.scale (D,)``.
    """

    def __init__(self, dim: int, heads: int, kv_heads: int, head_dim: int, eps: float = 1e-5,
                 dtype=None, device=None, operations=None):
        super().__init__()
        ops = ops_or_default(operations)
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.wq = ops.Linear(dim, heads * head_dim, bias=False, dtype=dtype, device=device)
        self.wk = ops.Linear(dim, kv_heads * head_dim, bias=False, dtype=dtype, device=device)
        self.wv = ops.Linear(dim, kv_heads * head_dim, bias=False, dtype=dtype, device=device)
        self.gate = ops.Linear(dim, heads * head_dim, bias=False, dtype=dtype, device=device)
        self.qknorm = QKNorm(head_dim, eps, dtype=dtype, device=device)
        self.wo = ops.Linear(heads * head_dim, dim, bias=False, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor, rope=None, mask=None) -> torch.Tensor:
        b, l, _ = x.shape
        q = self.qknorm.qnorm(self.wq(x).view(b, l, self.heads, self.head_dim)).transpose(1, 2)
        k = self.qknorm.knorm(self.wk(x).view(b, l, self.kv_heads, self.head_dim)).transpose(1, 2)
        v = self.wv(x).view(b, l, self.kv_heads, self.head_dim).transpose(1, 2)
        if rope is not None:
            q = apply_rope(q, *rope)
            k = apply_rope(k, *rope)
        out = attention(q.contiguous(), k.contiguous(), v.contiguous(), mask)
        return self.wo(out * torch.sigmoid(self.gate(x)))
