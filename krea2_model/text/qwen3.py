"""The Qwen3-VL language tower (text only) that Krea 2 taps for its conditioning.

Architecture (``Qwen3VLTextModel`` of ``transformers``): token embedding, ``layers`` pre-norm decoder
layers (grouped-query causal self-attention with per-head RMSNorm on q and k, rotary embedding,
SwiGLU MLP), final RMSNorm. Qwen3-VL-4B: hidden 2560, 36 layers, 32 query / 8 key-value heads of
128, MLP 9728, vocabulary 151936, RMSNorm eps 1e-6, rope theta 5e6.

Qwen3-VL uses interleaved multimodal RoPE (mRoPE, sections 24/20/20 over the time, height and width
axes). For text all three position axes are equal, so every frequency sees the same position and
mRoPE is exactly ordinary 1-D RoPE in the "rotate half" layout; that is what is implemented here.

Module attribute names are the canonical checkpoint names (``embed_tokens``,
``layers.N.self_attn.q_proj``, ``layers.N.self_attn.q_norm``, ``layers.N.mlp.gate_proj``,
``layers.N.input_layernorm``, ``layers.N.post_attention_layernorm``, ``norm``), i.e. a text-only
Qwen3 file's keys without their ``model.`` prefix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..model.attention import attention
from ..model.layers import cast_param, ops_or_default

#: Krea 2's taps: HF ``hidden_states`` indices (0 = embedding output) of Qwen3-VL-4B.
DEFAULT_TAPS = (2, 5, 8, 11, 14, 17, 20, 23, 26, 29, 32, 35)


@dataclass(frozen=True)
class Qwen3TextConfig:
    """Sizes of the language tower. Defaults are Qwen3-VL-4B's."""
    hidden: int = 2560
    layers: int = 36
    heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    mlp_hidden: int = 9728
    vocab: int = 151936
    eps: float = 1e-6
    rope_theta: float = 5_000_000.0


class QwenRMSNorm(nn.Module):
    """Qwen's RMSNorm: ``y = weight * (x / rms(x))``, normalised in float32, cast back to ``x.dtype``
    before the weight multiplies (as ``transformers`` does). Not zero-centred: the weight multiplies
    directly (unlike Krea's ``1 + scale`` norm in :mod:`.layers`). Parameter key ``weight``."""

    def __init__(self, dim: int, eps: float = 1e-6, dtype=None, device=None, operations=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
        return cast_param(self.weight, y) * y


def mrope_section(head_dim: int) -> tuple[int, int, int]:
    """Qwen3-VL's split of a head's ``head_dim / 2`` frequencies over the (time, height, width) position axes:
    24 / 20 / 20 for head 128, the same proportions at other sizes."""
    half = head_dim // 2
    hw = half * 20 // 64
    return half - 2 * hw, hw, hw


def rope_axes(head_dim: int) -> torch.Tensor:
    """Which position axis (0 time, 1 height, 2 width) drives each of the head's ``head_dim / 2`` frequencies.
    Qwen3-VL interleaves them: frequency ``j`` follows height when ``j % 3 == 1`` and width when ``j % 3 == 2``,
    for the first ``3 * sections`` frequencies; all others follow time."""
    _, sh, sw = mrope_section(head_dim)
    axes = torch.zeros(head_dim // 2, dtype=torch.long)
    axes[1:3 * sh:3] = 1
    axes[2:3 * sw:3] = 2
    return axes


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin)``, each ``(L, head_dim)`` in ``dtype``, for integer ``positions``: ``(L,)`` for text (all
    three axes equal: plain 1-D RoPE) or ``(3, L)`` (time, height, width) for sequences with image tokens.

    Angles are computed in float32 (``inv_freq = theta ** -(2i / D)``, frequency ``i`` taking its position
    from the axis :func:`rope_axes` gives it) and duplicated over both halves of the head ("rotate half")."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim))
    pos = positions.to(torch.float32)
    if pos.ndim == 1:
        freqs = pos[:, None] * inv_freq[None, :]
    else:
        freqs = pos[rope_axes(head_dim).to(pos.device)].t() * inv_freq[None, :]  # (L, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` for ``x (B, H, L, D)`` and tables ``(L, D)`` in ``x.dtype``,
    where ``rotate_half([a, b]) = [-b, a]`` over the two halves of the head."""
    a, b = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-b, a), dim=-1) * sin


class Qwen3Attention(nn.Module):
    """Causal GQA self-attention with q/k RMSNorm over the head dimension and RoPE.

    Keys: ``q_proj (H*D, C)``, ``k_proj``/``v_proj (Hkv*D, C)``, ``o_proj (C, H*D)``,
    ``q_norm``/``k_norm (D,)``. No biases."""

    def __init__(self, cfg: Qwen3TextConfig, dtype=None, device=None, operations=None):
        super().__init__()
        ops = ops_or_default(operations)
        self.heads, self.kv_heads, self.head_dim = cfg.heads, cfg.kv_heads, cfg.head_dim
        c, d = cfg.hidden, cfg.head_dim
        self.q_proj = ops.Linear(c, cfg.heads * d, bias=False, dtype=dtype, device=device)
        self.k_proj = ops.Linear(c, cfg.kv_heads * d, bias=False, dtype=dtype, device=device)
        self.v_proj = ops.Linear(c, cfg.kv_heads * d, bias=False, dtype=dtype, device=device)
        self.o_proj = ops.Linear(cfg.heads * d, c, bias=False, dtype=dtype, device=device)
        self.q_norm = QwenRMSNorm(d, cfg.eps, dtype=dtype, device=device)
        self.k_norm = QwenRMSNorm(d, cfg.eps, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], past=None,
                keep: list | None = None) -> torch.Tensor:
        """``x (B, L, C)``, ``rope`` = ``(cos, sin)`` from :func:`rope_tables` -> ``(B, L, C)``.

        ``past``: ``(k, v)`` ``(B, Hkv, P, D)`` of ``P`` earlier tokens (after norm and RoPE) that ``x``'s
        tokens also attend to, or a :class:`KVSlot` of a preallocated cache (batch 1) that this call's keys and
        values are written into; ``keep``: a list this layer's own ``(k, v)`` is appended to."""
        b, l, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(b, l, self.heads, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(b, l, self.kv_heads, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(b, l, self.kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = rope
        q = apply_rope_half(q, cos, sin)
        k = apply_rope_half(k, cos, sin)
        if keep is not None:
            keep.append((k, v))
        if isinstance(past, KVSlot):  # a preallocated cache (generation): written in place, never re-copied
            start = past.start
            k_all, v_all = past.put(k, v)
            if start == 0:
                out = attention(q.contiguous(), k, v, None, is_causal=True)
            elif l == 1:  # the new token sees every cached token and itself: no mask
                out = attention(q.contiguous(), k_all, v_all, None)
            else:
                allowed = torch.ones(l, start + l, dtype=torch.bool, device=x.device).tril_(start)
                out = attention(q.contiguous(), k_all, v_all, allowed.view(1, 1, l, start + l))
            return self.o_proj(out)
        if past is None:
            out = attention(q.contiguous(), k.contiguous(), v.contiguous(), None, is_causal=True)
        else:  # query i sits at position P + i: it sees every earlier token and itself
            p = past[0].shape[2]
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
            allowed = torch.ones(l, p + l, dtype=torch.bool, device=x.device).tril_(p).view(1, 1, l, p + l)
            out = attention(q.contiguous(), k.contiguous(), v.contiguous(), allowed)
        return self.o_proj(out)


class KVSlot:
    """One layer's view of a :class:`KVCache`: ``put(k, v)`` writes ``(1, Hkv, l, D)`` keys and values at
    positions ``start..start+l-1`` and returns views of all ``start + l`` cached positions."""

    __slots__ = ("cache", "layer", "start")

    def __init__(self, cache: "KVCache", layer: int, start: int):
        self.cache, self.layer, self.start = cache, layer, start

    def put(self, k: torch.Tensor, v: torch.Tensor):
        end = self.start + k.shape[2]
        kb, vb = self.cache.k[self.layer], self.cache.v[self.layer]
        kb[:, :, self.start:end].copy_(k)
        vb[:, :, self.start:end].copy_(v)
        return kb[:, :, :end], vb[:, :, :end]


class KVCache:
    """Keys and values of every layer for one generation call, in buffers ``(1, Hkv, capacity, D)`` allocated
    once and filled in place (``length`` positions valid). :meth:`reserve` doubles the capacity when a call
    outgrows it, so the copying stays linear in the final length (concatenating per token is quadratic)."""

    def __init__(self, cfg: Qwen3TextConfig, capacity: int, dtype, device, layers: int | None = None):
        n = cfg.layers if layers is None else layers
        shape = (1, cfg.kv_heads, max(1, int(capacity)), cfg.head_dim)
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(n)]
        self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(n)]
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.k[0].shape[2] if self.k else 0

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def reserve(self, extra: int) -> None:
        """Room for ``extra`` more positions (capacity at least doubled when it must grow)."""
        need = self.length + extra
        if need <= self.capacity:
            return
        cap = max(need, 2 * self.capacity)
        for buf in (self.k, self.v):
            for i, t in enumerate(buf):
                grown = t.new_empty(t.shape[0], t.shape[1], cap, t.shape[3])
                grown[:, :, :self.length].copy_(t[:, :, :self.length])
                buf[i] = grown

    def slot(self, layer: int) -> KVSlot:
        return KVSlot(self, layer, self.length)


class Qwen3MLP(nn.Module):
    """``down_proj(silu(gate_proj(x)) * up_proj(x))``."""

    def __init__(self, cfg: Qwen3TextConfig, dtype=None, device=None, operations=None):
        super().__init__()
        ops = ops_or_default(operations)
        self.gate_proj = ops.Linear(cfg.hidden, cfg.mlp_hidden, bias=False, dtype=dtype, device=device)
        self.up_proj = ops.Linear(cfg.hidden, cfg.mlp_hidden, bias=False, dtype=dtype, device=device)
        self.down_proj = ops.Linear(cfg.mlp_hidden, cfg.hidden, bias=False, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Qwen3DecoderLayer(nn.Module):
    """``x + attn(norm(x))`` then ``x + mlp(norm(x))``."""

    def __init__(self, cfg: Qwen3TextConfig, dtype=None, device=None, operations=None):
        super().__init__()
        self.self_attn = Qwen3Attention(cfg, dtype=dtype, device=device, operations=operations)
        self.mlp = Qwen3MLP(cfg, dtype=dtype, device=device, operations=operations)
        self.input_layernorm = QwenRMSNorm(cfg.hidden, cfg.eps, dtype=dtype, device=device)
        self.post_attention_layernorm = QwenRMSNorm(cfg.hidden, cfg.eps, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor, rope, past=None, keep: list | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, past, keep)
        return x + self.mlp(self.post_attention_layernorm(x))


@dataclass
class VisionInputs:
    """What the image tokens of one sequence bring to the language tower: ``mask (L,)`` bool (the image-pad
    positions), ``tokens (n, hidden)`` (the vision tower's merged tokens, in sequence order), ``deepstack``
    (one ``(n, hidden)`` per DeepStack layer) and ``positions (3, L)`` (M-RoPE time / height / width)."""
    mask: torch.Tensor
    tokens: torch.Tensor
    deepstack: list
    positions: torch.Tensor


class Qwen3TextModel(nn.Module):
    """The Qwen3-VL language tower, returning hidden states at tap indices.

    Tap ``t`` is the HF ``hidden_states[t]``: 0 = embedding output, ``t`` = output of decoder layer
    ``t - 1``. Every tap is taken *before* the final norm (for ``t = layers`` HF's last entry is the
    normed state; ours is not). Layers after the deepest tap are never run.
    """

    def __init__(self, cfg: Qwen3TextConfig, dtype=None, device=None, operations=None):
        super().__init__()
        ops = ops_or_default(operations)
        self.config = cfg
        emb_cls = getattr(ops, "Embedding", nn.Embedding)
        self.embed_tokens = emb_cls(cfg.vocab, cfg.hidden, dtype=dtype, device=device)
        self.layers = nn.ModuleList(Qwen3DecoderLayer(cfg, dtype=dtype, device=device, operations=operations)
                                    for _ in range(cfg.layers))
        self.norm = QwenRMSNorm(cfg.hidden, cfg.eps, dtype=dtype, device=device)

    def check_taps(self, taps: Sequence[int]) -> tuple[int, ...]:
        taps = tuple(int(t) for t in taps)
        if not taps:
            raise ValueError("taps must name at least one hidden state")
        bad = [t for t in taps if t < 0 or t > self.config.layers]
        if bad:
            raise ValueError(f"tap indices {bad} are outside 0..{self.config.layers}: this text encoder has "
                             f"{self.config.layers} layers (tap 0 is the embedding output). Krea 2 needs Qwen3-VL-4B "
                             f"(36 layers, taps {DEFAULT_TAPS[0]}..{DEFAULT_TAPS[-1]}).")
        return taps

    def forward(self, input_ids: torch.Tensor, taps: Sequence[int] = DEFAULT_TAPS,
                positions: torch.Tensor | None = None, dtype=None, past: list | None = None,
                keep: list | None = None, vision: "VisionInputs | None" = None) -> torch.Tensor:
        """``input_ids (B, L)`` int -> ``(B, L, len(taps) * hidden)``, layer-major per token (token ``l``
        holds tap 0's ``hidden`` values, then tap 1's, ...).

        ``positions (L,)`` are the RoPE positions (default ``0..L-1``). Every token attends causally to
        every earlier token: feed real tokens only, no padding. ``dtype`` is the compute dtype
        (default: the embedding's). ``past``: per-layer ``(k, v)`` of earlier tokens (positions then
        default to following them); ``keep``: a list each layer's ``(k, v)`` is appended to.

        ``vision``: image tokens (:class:`VisionInputs`): their embeddings replace the token embeddings at
        ``vision.mask``, ``positions`` is then ``(3, L)`` (M-RoPE), and DeepStack feature ``k`` is added at the
        image positions to the output of decoder layer ``k`` (after its tap is taken, as HF records it)."""
        taps = self.check_taps(taps)
        deepest = max(taps)
        x = self.embed(input_ids, dtype, vision)
        l = input_ids.shape[1]
        if positions is None and vision is not None:
            positions = vision.positions
        if positions is None:
            start = past[0][0].shape[2] if past else 0
            positions = torch.arange(start, start + l, device=x.device)
        rope = rope_tables(positions.to(x.device), self.config.head_dim, self.config.rope_theta, x.dtype)
        got = {0: x} if 0 in taps else {}
        for i in range(deepest):
            x = self.layers[i](x, rope, past[i] if past else None, keep)
            if i + 1 in taps:
                got[i + 1] = x
            if vision is not None and i < len(vision.deepstack):
                x = x.clone()
                x[0, vision.mask] += vision.deepstack[i].to(x.dtype)
        return torch.cat([got[t] for t in taps], dim=-1)

    def embed(self, input_ids: torch.Tensor, dtype=None, vision: "VisionInputs | None" = None) -> torch.Tensor:
        """Token embeddings ``(1, L, hidden)`` in ``dtype``, the image positions holding ``vision``'s tokens."""
        x = self.embed_tokens(input_ids)
        if dtype is not None:
            x = x.to(dtype)
        if vision is not None:
            x = x.clone()
            x[0, vision.mask] = vision.tokens.to(x.dtype)
        return x

    @torch.no_grad()
    def forward_after_prefix(self, input_ids: torch.Tensor, prefix_len: int, taps: Sequence[int] = DEFAULT_TAPS,
                             dtype=None) -> torch.Tensor:
        """:meth:`forward` rows ``prefix_len:`` of ``input_ids (1, L)``, reusing the prefix's keys and
        values from the previous call when the prefix ids, dtype, device, depth and weights are the same.

        The text tower is causal, so a prompt never changes its system prefix's states: Krea 2's
        34-token template prefix is computed once, and each prompt then costs only its own tokens."""
        taps = self.check_taps(taps)
        deepest = max(taps)
        prefix = input_ids[:, :prefix_len]
        key = (tuple(prefix.reshape(-1).tolist()), dtype, str(input_ids.device), self._weights_key())
        cached = getattr(self, "_prefix_cache", None)
        if cached is not None and cached[0] == key and len(cached[1]) >= deepest:
            return self.forward(input_ids[:, prefix_len:], taps, dtype=dtype, past=cached[1])
        # miss: one ordinary pass over all tokens, keeping the prefix's keys/values on the way
        kv: list = []
        h = self.forward(input_ids, taps, dtype=dtype, keep=kv)
        self._prefix_cache = (key, [(k[:, :, :prefix_len].clone(), v[:, :, :prefix_len].clone()) for k, v in kv])
        return h[:, prefix_len:]

    def _weights_key(self) -> tuple:
        """Identity, version and storage of every weight, and any host weight hooks: a changed or patched
        weight (ComfyUI LoRA patches replace or rewrite parameters, or hook them) invalidates the cache."""
        out = []
        for mod in self.modules():
            for p in mod._parameters.values():
                if p is not None:
                    try:
                        ver = p._version
                    except RuntimeError:
                        ver = -1
                    out.append((id(p), ver, p.data_ptr(), p.device.type))
            for attr in ("weight_function", "bias_function"):
                fns = getattr(mod, attr, None)
                if fns:
                    out.append(tuple(id(f) for f in fns))
        return tuple(out)
