"""The Krea 2 single-stream MMDiT in plain PyTorch.

Module attribute names equal the keys of Krea's original checkpoint (``first``, ``tmlp.0``,
``blocks.N.attn.wq``, ``blocks.N.mod.lin``, ``txtfusion.*``, ``txtmlp.*``, ``last.*``), so a state
dict in that layout loads with ``load_state_dict`` and hosts' LoRA loaders find the weights by name.

Calling convention (ComfyUI's): ``model(x, sigma, context, attention_mask=None, transformer_options=None)``

* ``x``: latent ``(B, C, H, W)`` or ``(B, C, 1, H, W)`` (Wan21 latents are 5-D). Sides that are not
  a multiple of the patch size are padded (circularly, as ComfyUI's DiTs do) and cropped back.
* ``sigma``: ``(B,)`` flow time in [0, 1] (1 = noise); the embedding multiplies it by 1000.
* ``context``: ``(B, seq, taps * text_dim)``, layer-major per token (token t holds tap 0's
  ``text_dim`` values, then tap 1's, ...), holding only real tokens; or with ``attention_mask``
  ``(B, seq)`` bool marking the real ones when a batch mixes prompt lengths.
* returns the velocity (``noise - x0``) in ``x``'s shape and dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, asdict

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConditioningError
from .layers import Attention, RMSNorm, SwiGLU, cast_param, ops_or_default
from .text_cache import TextCache, stage_weights


@dataclass(frozen=True)
class Krea2Config:
    """Every size of the model. Inferred from a state dict by
    :func:`krea2_model.formats.transformer_file.infer_config`."""

    hidden: int = 6144
    heads: int = 48
    kv_heads: int = 12
    head_dim: int = 128
    mlp_hidden: int = 16384
    layers: int = 28
    in_channels: int = 64          # latent channels * patch**2
    patch: int = 2
    time_dim: int = 256
    text_dim: int = 2560
    text_taps: int = 12
    text_heads: int = 20
    text_kv_heads: int = 20
    text_head_dim: int = 128
    text_mlp_hidden: int = 6912
    text_layerwise_blocks: int = 2
    text_refiner_blocks: int = 2
    rope_theta: float = 1000.0
    eps: float = 1e-5

    @property
    def channels(self) -> int:
        return self.in_channels // (self.patch * self.patch)

    @property
    def rope_axes(self) -> tuple[int, int, int]:
        """(t, h, w) split of the head dim: 32/48/48 of 128, the same proportions at any head size."""
        unit = self.head_dim // 16
        return (self.head_dim - 12 * unit, 6 * unit, 6 * unit)

    def to_dict(self) -> dict:
        return asdict(self)


class TextFusionBlock(nn.Module):
    """Pre-norm block without modulation or RoPE: ``prenorm``, ``attn``, ``postnorm``, ``mlp``."""

    def __init__(self, dim, heads, kv_heads, head_dim, mlp_hidden, eps, dtype=None, device=None, operations=None):
        super().__init__()
        self.prenorm = RMSNorm(dim, eps, dtype=dtype, device=device)
        self.postnorm = RMSNorm(dim, eps, dtype=dtype, device=device)
        self.attn = Attention(dim, heads, kv_heads, head_dim, eps, dtype=dtype, device=device, operations=operations)
        self.mlp = SwiGLU(dim, mlp_hidden, dtype=dtype, device=device, operations=operations)

    def forward(self, x, mask=None):
        x = x + self.attn(self.prenorm(x), mask=mask)
        return x + self.mlp(self.postnorm(x))


class TextFusion(nn.Module):
    """Collapses the tap axis: ``layerwise_blocks`` attend across the taps of each token,
    ``projector (1, taps)`` mixes them into one vector, ``refiner_blocks`` attend across tokens."""

    def __init__(self, cfg: Krea2Config, dtype=None, device=None, operations=None):
        super().__init__()
        ops = ops_or_default(operations)
        args = (cfg.text_dim, cfg.text_heads, cfg.text_kv_heads, cfg.text_head_dim, cfg.text_mlp_hidden, cfg.eps)
        kw = dict(dtype=dtype, device=device, operations=operations)
        self.layerwise_blocks = nn.ModuleList([TextFusionBlock(*args, **kw) for _ in range(cfg.text_layerwise_blocks)])
        self.projector = ops.Linear(cfg.text_taps, 1, bias=False, dtype=dtype, device=device)
        self.refiner_blocks = nn.ModuleList([TextFusionBlock(*args, **kw) for _ in range(cfg.text_refiner_blocks)])

    def forward(self, x: torch.Tensor, mask=None) -> torch.Tensor:
        """``x (B, seq, taps, text_dim)`` -> ``(B, seq, text_dim)``; ``mask`` a key mask for the refiner."""
        b, s, n, d = x.shape
        h = x.reshape(b * s, n, d)
        for blk in self.layerwise_blocks:
            h = blk(h)
        h = self.projector(h.view(b, s, n, d).transpose(2, 3)).squeeze(-1)
        for blk in self.refiner_blocks:
            h = blk(h, mask=mask)
        return h


class Modulation(nn.Module):
    """A learned additive table ``lin``: flat ``(6*hidden,)`` in blocks, ``(2, hidden)`` in ``last``."""

    def __init__(self, shape, dtype=None, device=None):
        super().__init__()
        if dtype is not None and dtype.itemsize < 2:
            dtype = torch.float32  # tables are tiny: never store them in fp8
        self.lin = nn.Parameter(torch.zeros(shape, dtype=dtype, device=device), requires_grad=False)


class Block(nn.Module):
    """Single-stream block with AdaLN-single modulation: the shared ``vec (B, 1, 6*hidden)`` plus
    this block's ``mod.lin`` gives prescale, preshift, pregate, postscale, postshift, postgate."""

    def __init__(self, cfg: Krea2Config, dtype=None, device=None, operations=None):
        super().__init__()
        self.mod = Modulation((6 * cfg.hidden,), dtype=dtype, device=device)
        self.prenorm = RMSNorm(cfg.hidden, cfg.eps, dtype=dtype, device=device)
        self.postnorm = RMSNorm(cfg.hidden, cfg.eps, dtype=dtype, device=device)
        self.attn = Attention(cfg.hidden, cfg.heads, cfg.kv_heads, cfg.head_dim, cfg.eps,
                              dtype=dtype, device=device, operations=operations)
        self.mlp = SwiGLU(cfg.hidden, cfg.mlp_hidden, dtype=dtype, device=device, operations=operations)

    def forward(self, x, vec, rope, mask=None):
        m = vec + cast_param(self.mod.lin, vec)
        prescale, preshift, pregate, postscale, postshift, postgate = m.chunk(6, dim=-1)
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            x = x + pregate * self.attn(torch.addcmul(preshift, self.prenorm(x), 1 + prescale), rope, mask)
            return x + postgate * self.mlp(torch.addcmul(postshift, self.postnorm(x), 1 + postscale))
        # Eager inference: the same arithmetic without fresh (L, hidden) buffers. The modulation is
        # written over the norm's output and the residual stream is updated in place (the caller's
        # `x` is the transformer's own running sequence).
        h = self.prenorm(x)
        x.addcmul_(pregate, self.attn(torch.addcmul(preshift, h, 1 + prescale, out=h), rope, mask))
        h = self.postnorm(x)
        return x.addcmul_(postgate, self.mlp(torch.addcmul(postshift, h, 1 + postscale, out=h)))


class LastLayer(nn.Module):
    def __init__(self, cfg: Krea2Config, dtype=None, device=None, operations=None):
        super().__init__()
        ops = ops_or_default(operations)
        self.norm = RMSNorm(cfg.hidden, cfg.eps, dtype=dtype, device=device)
        self.linear = ops.Linear(cfg.hidden, cfg.in_channels, bias=True, dtype=dtype, device=device)
        self.modulation = Modulation((2, cfg.hidden), dtype=dtype, device=device)

    def forward(self, x, t):
        m = t + cast_param(self.modulation.lin, t)          # (B, 2, hidden)
        scale, shift = m[:, 0:1], m[:, 1:2]
        return self.linear(torch.addcmul(shift, self.norm(x), 1 + scale))


def timestep_embedding(sigma: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of ``1000 * sigma``, cos first; ``(B,)`` -> ``(B, 1, dim)`` float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(1e4) * torch.arange(half, dtype=torch.float32, device=sigma.device) / half)
    args = (sigma.float() * 1000.0)[:, None, None] * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def rope_tables(cfg: Krea2Config, text_len: int, grid_h: int, grid_w: int, device) -> tuple:
    """``(cos, sin, cis)``: cos/sin ``(text_len + grid_h*grid_w, head_dim/2)`` float32 for positions
    text (0,0,0) and image (0, row, col), and ``cis = cos + i sin`` complex64. Angles are formed in
    float64 (as the reference) before the cast."""
    pos_h = torch.arange(grid_h, dtype=torch.float64).repeat_interleave(grid_w)
    pos_w = torch.arange(grid_w, dtype=torch.float64).repeat(grid_h)
    zeros_t = torch.zeros(text_len, dtype=torch.float64)
    pos = [torch.cat([zeros_t, torch.zeros(grid_h * grid_w, dtype=torch.float64)]),
           torch.cat([zeros_t, pos_h]), torch.cat([zeros_t, pos_w])]
    angles = []
    for p, d in zip(pos, cfg.rope_axes):
        omega = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
        angles.append(p[:, None] * omega[None, :])
    a = torch.cat(angles, dim=-1)
    cos, sin = a.cos().float().to(device), a.sin().float().to(device)
    return cos, sin, torch.complex(cos, sin)


class Krea2Transformer(nn.Module):
    """Krea 2 transformer; see the module docstring for the calling convention."""

    def __init__(self, cfg: Krea2Config, dtype=None, device=None, operations=None):
        super().__init__()
        ops = ops_or_default(operations)
        self.config = cfg
        self.dtype = dtype
        self._host_ops = operations is not None
        F_, kw = cfg.hidden, dict(dtype=dtype, device=device)
        self.first = ops.Linear(cfg.in_channels, F_, bias=True, **kw)
        self.tmlp = nn.Sequential(ops.Linear(cfg.time_dim, F_, bias=True, **kw), nn.GELU(approximate="tanh"),
                                  ops.Linear(F_, F_, bias=True, **kw))
        self.tproj = nn.Sequential(nn.GELU(approximate="tanh"), ops.Linear(F_, 6 * F_, bias=True, **kw))
        self.txtfusion = TextFusion(cfg, operations=operations, **kw)
        self.txtmlp = nn.Sequential(RMSNorm(cfg.text_dim, cfg.eps, **kw), ops.Linear(cfg.text_dim, F_, bias=True, **kw),
                                    nn.GELU(approximate="tanh"), ops.Linear(F_, F_, bias=True, **kw))
        self.blocks = nn.ModuleList([Block(cfg, operations=operations, **kw) for _ in range(cfg.layers)])
        self.last = LastLayer(cfg, operations=operations, **kw)
        self._rope_cache: dict = {}
        #: reuse the text stage (txtfusion + txtmlp) for a conditioning seen before; see `text_tokens`
        self.cache_text = True
        self._text_cache = TextCache()

    # -- pieces -----------------------------------------------------------------------------------
    def unpack_context(self, context: torch.Tensor) -> torch.Tensor:
        """``(B, seq, taps*text_dim)`` -> ``(B, seq, taps, text_dim)``, with a clear error on a mismatch."""
        cfg = self.config
        if context.ndim == 4:
            return context
        want = cfg.text_taps * cfg.text_dim
        if context.ndim != 3 or context.shape[-1] != want:
            width = context.shape[-1] if context.ndim >= 1 else 0
            raise ConditioningError(
                f"Krea 2 conditioning must be (batch, tokens, {want}) = {cfg.text_taps} text-encoder taps x "
                f"{cfg.text_dim}, but got shape {tuple(context.shape)}. {guess_text_encoder(width)} "
                "Encode the prompt with Krea2TextEncode from a Krea2TextEncoderLoader (Qwen3-VL-4B) CLIP.")
        return context.view(*context.shape[:2], cfg.text_taps, cfg.text_dim)

    def encode_text(self, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Text fusion + projection: conditioning -> ``(B, seq, hidden)`` text tokens. Independent of
        the timestep, so callers may compute it once per prompt and reuse it."""
        ctx = self.unpack_context(context)
        dt = self._compute_dtype(context)
        h = self.txtfusion(ctx.to(dt), mask=mask)
        return self.txtmlp(h)

    def text_tokens(self, context: torch.Tensor, mask: torch.Tensor | None = None,
                    transformer_options: dict | None = None) -> torch.Tensor:
        """:meth:`encode_text`, reused across sampling steps when the same conditioning comes back.

        The text stage never depends on the timestep, so it is computed once per conditioning. A
        hit needs the same conditioning *content* (ComfyUI builds a new cond tensor every step, so
        identity would never match) and mask, the same compute dtype and device, and unchanged
        text-stage weights: the same Parameter objects at the same version and storage, the same
        sampled values (catches in-place copies that bypass the version counter), and the same
        host weight hooks (ComfyUI's per-module ``weight_function``/``bias_function`` lists, through
        which low-VRAM mode applies LoRA at cast time). A new prompt, LoRA or weight patch therefore
        recomputes. Never cached under autograd or while compiling. Off with ``model.cache_text =
        False`` or ``transformer_options["krea2_cache_text"] = False``.
        """
        enabled = self.cache_text
        if transformer_options is not None and "krea2_cache_text" in transformer_options:
            enabled = bool(transformer_options["krea2_cache_text"])
        if not enabled or torch.is_grad_enabled() or torch.compiler.is_compiling():
            return self.encode_text(context, mask)
        dt = self._compute_dtype(context)
        weights = stage_weights((self.txtfusion, self.txtmlp))
        hit = self._text_cache.get(context, mask, dt, weights)
        if hit is not None:
            return hit
        out = self.encode_text(context, mask)
        self._text_cache.put(context, mask, dt, weights, out)
        return out

    def clear_text_cache(self) -> None:
        self._text_cache.clear()

    def _compute_dtype(self, x: torch.Tensor | None = None):
        """The dtype activations run in: under host operations (which cast weights per call) the
        input's, as the host chose it; otherwise the stored weights' dtype."""
        if self._host_ops and x is not None:
            return x.dtype
        w = self.first.weight.dtype
        return w if w.is_floating_point and w.itemsize >= 2 else torch.bfloat16

    def rope(self, text_len: int, grid_h: int, grid_w: int, device):
        key = (text_len, grid_h, grid_w, str(device))
        tab = self._rope_cache.get(key)
        if tab is None:
            if len(self._rope_cache) > 8:
                self._rope_cache.clear()
            tab = self._rope_cache[key] = rope_tables(self.config, text_len, grid_h, grid_w, device)
        return tab

    # -- forward ----------------------------------------------------------------------------------
    def forward(self, x, sigma, context, attention_mask=None, transformer_options=None, **kwargs):
        cfg = self.config
        five_d = x.ndim == 5
        if five_d:
            b5, c5, t5, h5, w5 = x.shape
            x = x.movedim(2, 1).reshape(b5 * t5, c5, h5, w5)
        B, C, H, W = x.shape
        p = cfg.patch
        if C != cfg.channels:
            raise ConditioningError(f"Krea 2 latent must have {cfg.channels} channels (Wan21 latent format), "
                                    f"got shape {tuple(x.shape)}.")
        in_dtype = x.dtype
        dt = self._compute_dtype(x)

        ph, pw = (-H) % p, (-W) % p
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode="circular")
        gh, gw = (H + ph) // p, (W + pw) // p
        img = x.view(B, C, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5).reshape(B, gh * gw, C * p * p)

        if sigma.ndim == 0:
            sigma = sigma.expand(B)
        if context.shape[0] != B:
            context = context.expand(B, *context.shape[1:]) if context.shape[0] == 1 else context.repeat(
                B // context.shape[0], *[1] * (context.ndim - 1))
            if attention_mask is not None and attention_mask.shape[0] != B:
                attention_mask = attention_mask.repeat(B // attention_mask.shape[0], 1)

        mask_txt = mask_all = None
        if attention_mask is not None:
            am = attention_mask.to(device=x.device, dtype=torch.bool)
            if not bool(am.all()):
                mask_txt = am[:, None, None, :]
                mask_all = torch.cat([am, am.new_ones(B, gh * gw)], dim=1)[:, None, None, :]

        txt = self.text_tokens(context.to(x.device), mask_txt, transformer_options)
        t = self.tmlp(timestep_embedding(sigma.to(x.device), cfg.time_dim).to(dt))
        vec = self.tproj(t)

        h = torch.cat([txt.to(dt), self.first(img.to(dt))], dim=1)
        L_txt = txt.shape[1]
        rope = self.rope(L_txt, gh, gw, x.device)
        for blk in self.blocks:
            h = blk(h, vec, rope, mask_all)
        out = self.last(h[:, L_txt:], t)

        out = out.view(B, gh, gw, C, p, p).permute(0, 3, 1, 4, 2, 5).reshape(B, C, gh * p, gw * p)
        out = out[:, :, :H, :W].to(in_dtype)
        if five_d:
            out = out.view(b5, t5, c5, h5, w5).movedim(1, 2)
        return out


_KNOWN_TEXT_WIDTHS = {
    768: "a CLIP-L encoder (SD1.x / Flux pooled)",
    1024: "an SD2 / OpenCLIP-H encoder",
    1280: "an OpenCLIP-G encoder (SDXL)",
    2048: "an SDXL dual CLIP encoder",
    2304: "a Gemma-2 2B encoder (Lumina 2)",
    2560: "a single Qwen3 4B layer (Z-Image, or a Qwen3-VL encoder without Krea's layer taps)",
    3584: "a Qwen2.5-VL 7B encoder (Qwen-Image)",
    4096: "a T5-XXL encoder (Flux, SD3) or an 8B LLM",
    4608: "the Hunyuan Video text encoder",
    12288: "a Flux.2 / Mistral encoder",
}


def guess_text_encoder(width: int) -> str:
    """One sentence on which text encoder a conditioning of this width probably came from."""
    name = _KNOWN_TEXT_WIDTHS.get(int(width))
    if name:
        return f"A width of {width} looks like {name}."
    if width and width % 2560 == 0:
        return f"A width of {width} is {width // 2560} Qwen3-VL-4B taps, not this model's tap count."
    return f"A width of {width} matches no text encoder Krea 2 knows."
