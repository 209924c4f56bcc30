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
    dtype, because ``1 + scale`` loses most of ``scale``'s bits in bf16. The result is ``F.rms_norm``'s, bit for
    bit (native ComfyUI Krea 2 and diffusers call it): quantized layers that quantize their input on the fly
    must see native's bits.
    """

    def __init__(self, dim: int, eps: float = 1e-5, dtype=None, device=None, operations=None):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.zeros(dim, dtype=torch.float32, device=device), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = cast_param(self.scale, x, torch.float32) + 1.0
        xf = x.float()
        if xf.device.type != "cpu" or torch.is_grad_enabled() or torch.compiler.is_compiling():
            return F.rms_norm(xf, (x.shape[-1],), weight=w, eps=self.eps).to(x.dtype)
        # Eager CPU inference: F.rms_norm's own steps (mean of squares, + eps, rsqrt, two multiplies), giving its
        # bits (unit-tested), in four passes: its own CPU path takes 1.3x to 1.8x as long at Krea 2's shapes
        # (benchmarks/bench_rmsnorm.py, torch 2.13, 2 threads: 1.38x block norm, 1.35x q/k norm; 1.8x in review).
        r = xf.square().mean(-1, keepdim=True).add_(self.eps).rsqrt_()
        return torch.mul(xf, r).mul_(w).to(x.dtype)


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))``; keys ``gate``, ``up``, ``down``."""

    def __init__(self, dim: int, hidden: int, dtype=None, device=None, operations=None):
        super().__init__()
        ops = ops_or_default(operations)
        self.gate = ops.Linear(dim, hidden, bias=False, dtype=dtype, device=device)
        self.up = ops.Linear(dim, hidden, bias=False, dtype=dtype, device=device)
        self.down = ops.Linear(hidden, dim, bias=False, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.gate(x)
        if torch.is_grad_enabled():
            return self.down(F.silu(h) * self.up(x))
        # Inference: reuse the gate's buffer (a fresh (L, mlp_hidden) tensor costs page faults on CPU).
        return self.down(F.silu(h, inplace=True).mul_(self.up(x)))


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


def rope_to_heads(x: torch.Tensor, rope) -> torch.Tensor:
    """RoPE on ``x (B, L, H, D)`` (token-major, as the projection leaves it), returned as a contiguous
    ``(B, H, L, D)`` in ``x.dtype``: the rotation and the layout change are one pass.

    ``rope`` is ``(cos, sin)`` or ``(cos, sin, cis)`` with ``cis = cos + i sin`` complex64 ``(L, D/2)``.
    Eager mode multiplies complex numbers (pair ``(a, b)`` times ``cos + i sin`` is exactly
    ``(a cos - b sin, a sin + b cos)``) writing straight into the head-major buffer; under
    ``torch.compile`` the real form is traced so the compiler can fuse it.
    """
    b, l, h, d = x.shape
    if rope[0].shape[-2] != l:
        # fewer tokens than positions (a host patch dropped tokens from the end of the sequence, as
        # ComfyUI's FluxKVCache drops cached reference tokens from the queries): the leading positions
        rope = tuple(t[..., :l, :] for t in rope)
    cos, sin = rope[0], rope[1]
    if len(rope) < 3 or torch.compiler.is_compiling() or torch.is_grad_enabled():
        return apply_rope(x.transpose(1, 2), cos, sin).contiguous()
    cis = rope[2].unsqueeze(1)                                              # (L, 1, D/2)
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))            # (B, L, H, D/2)
    if x.dtype == torch.float32:
        out = torch.empty(b, h, l, d, dtype=x.dtype, device=x.device)
        torch.mul(xc, cis, out=torch.view_as_complex(out.unflatten(-1, (-1, 2))).transpose(1, 2))
        return out
    rot = torch.view_as_real(xc.mul_(cis)).flatten(-2)                     # float32 (B, L, H, D)
    out = torch.empty(b, h, l, d, dtype=x.dtype, device=x.device)
    out.transpose(1, 2).copy_(rot)
    return out


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

    def forward(self, x: torch.Tensor, rope=None, mask=None, hooks=None) -> torch.Tensor:
        """``x (B, L, dim)`` -> ``(B, L, dim)``. ``hooks`` (or None): an object with ``qkv`` and ``out``
        lists and methods ``on_qkv(q, k, v, rope, mask) -> (q, k, v, rope, mask)`` (q ``(B, H, L, D)``,
        k, v ``(B, Hkv, L, D)``, after the q/k norms, before RoPE and without repeating K/V heads) and
        ``on_out(out) -> out`` (``(B, L, H*D)``, before the output gate), and ``attend(q, k, v, mask)``, the
        attention itself (the :func:`attention` contract); the transformer's ``AttentionHooks`` runs the
        host's attention patches and attention function through them."""
        b, l, _ = x.shape
        q = self.qknorm.qnorm(self.wq(x).view(b, l, self.heads, self.head_dim))
        k = self.qknorm.knorm(self.wk(x).view(b, l, self.kv_heads, self.head_dim))
        v = self.wv(x).view(b, l, self.kv_heads, self.head_dim).transpose(1, 2).contiguous()
        if hooks is not None and hooks.qkv:
            # patches see heads-major views; an unchanged q/k comes back as the same view of the same
            # token-major tensor, so RoPE below runs on exactly what it would have run on
            q, k, v, rope, mask = hooks.on_qkv(q.transpose(1, 2), k.transpose(1, 2), v, rope, mask)
            q, k = q.transpose(1, 2), k.transpose(1, 2)
        if rope is not None and hooks is not None and hooks.rope_fn is not None and not torch.compiler.is_compiling():
            q, k = hooks.apply_rope(q.transpose(1, 2), k.transpose(1, 2), rope)
        elif rope is not None:
            q, k = rope_to_heads(q, rope), rope_to_heads(k, rope)
        else:
            q, k = q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous()
        out = attention(q, k, v, mask) if hooks is None else hooks.attend(q, k, v, mask)
        if hooks is not None and hooks.out:
            out = hooks.on_out(out)
        g = self.gate(x)
        if torch.is_grad_enabled():
            return self.wo(out * torch.sigmoid(g))
        return self.wo(g.sigmoid_().mul_(out))
