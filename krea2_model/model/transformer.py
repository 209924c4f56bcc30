"""The Krea 2 single-stream MMDiT in plain PyTorch.

Module attribute names equal the keys of Krea's original checkpoint (``first``, ``tmlp.0``,
``blocks.N.attn.wq``, ``blocks.N.mod.lin``, ``txtfusion.*``, ``txtmlp.*``, ``last.*``), so a state
dict in that layout loads with ``load_state_dict`` and hosts' LoRA loaders find the weights by name.

Calling convention (native ComfyUI Krea 2's order): ``model(x, sigma, context, attention_mask=None,
ref_latents=None, transformer_options=None, ref_latents_method=None)``

* ``x``: latent ``(B, C, H, W)`` or ``(B, C, 1, H, W)`` (Wan21 latents are 5-D). Sides that are not
  a multiple of the patch size are padded (circularly, as ComfyUI's DiTs do) and cropped back.
* ``sigma``: ``(B,)`` flow time in [0, 1] (1 = noise); the embedding multiplies it by 1000.
* ``context``: ``(B, seq, taps * text_dim)``, layer-major per token (token t holds tap 0's
  ``text_dim`` values, then tap 1's, ...), holding only real tokens; or with ``attention_mask``
  ``(B, seq)`` bool marking the real ones when a batch mixes prompt lengths.
* ``ref_latents``: optional list of reference latents, each ``(b, C, H, W)`` or ``(b, C, T, H, W)`` of any
  size, with ``ref_latents_method`` one of :data:`~.references.REF_METHODS`. The sequence is ``[text | target |
  ref_1 .. ref_N]``; reference i sits at RoPE positions ``(i, row, col)`` on its own grid;
  "index_timestep_zero" modulates reference tokens with t = 0 in every block. Only the target is returned.
* ``transformer_options``: ComfyUI's dict; the host hooks it may carry are read in one place, the top of
  :meth:`Krea2Transformer._forward` (attention patches: :class:`AttentionHooks`).
* returns the velocity (``noise - x0``) in ``x``'s shape and dtype.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, asdict

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConditioningError
from . import hooks as host_hooks
from . import references
from .hooks import AttentionHooks
from .layers import Attention, RMSNorm, SwiGLU, cast_param, ops_or_default
from .positions import insert_text_rows, position_ids, rope_from_ids
from .text_cache import TextCache, caching_enabled, stage_weights
from .text_widths import guess_text_encoder

log = logging.getLogger("krea2")


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

    def forward(self, x, mask=None, hooks=None):
        x = x + self.attn(self.prenorm(x), mask=mask, hooks=hooks)
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

    def forward(self, x: torch.Tensor, mask=None, hooks=None) -> torch.Tensor:
        """``x (B, seq, taps, text_dim)`` -> ``(B, seq, text_dim)``; ``mask`` a key mask for the refiner;
        ``hooks`` an :class:`AttentionHooks` whose attention function every block uses (or None)."""
        b, s, n, d = x.shape
        h = x.reshape(b * s, n, d)
        for blk in self.layerwise_blocks:
            h = blk(h, hooks=hooks)
        h = self.projector(h.view(b, s, n, d).transpose(2, 3)).squeeze(-1)
        for blk in self.refiner_blocks:
            h = blk(h, mask=mask, hooks=hooks)
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

    def forward(self, x, vec, rope, mask=None, hooks=None, vec_ref=None, ref_start=None, inplace=True):
        """``x (B, L, hidden)`` -> the same shape. ``vec (B, 1, 6*hidden)`` modulates every token, or with
        ``vec_ref`` (the same for t = 0) only tokens before ``ref_start``, the reference tokens taking
        ``vec_ref``. ``hooks``: the host's attention patches (:class:`AttentionHooks`) or None.
        ``inplace=False`` leaves ``x`` untouched (a block replacement may still read its input)."""
        m = (vec + cast_param(self.mod.lin, vec)).chunk(6, dim=-1)
        if vec_ref is None:
            parts = ((slice(None), m),)
        else:  # text and target take vec, the reference tokens [ref_start:] vec_ref
            m_ref = (vec_ref + cast_param(self.mod.lin, vec_ref)).chunk(6, dim=-1)
            parts = ((slice(None, ref_start), m), (slice(ref_start, None), m_ref))
        # Eager inference updates the residual stream in place (the caller's `x` is the transformer's own running
        # sequence) and modulates over the norm's output: no fresh (L, hidden) buffers. Same numbers either way.
        fresh = not inplace or torch.is_grad_enabled() or torch.compiler.is_compiling()
        x = _gated_add(x, 2, self.attn(_modulate(self.prenorm(x), 0, 1, parts, fresh), rope, mask, hooks), parts, fresh)
        return _gated_add(x, 5, self.mlp(_modulate(self.postnorm(x), 3, 4, parts, fresh)), parts, fresh)


# The block's arithmetic, written as native ComfyUI Krea 2's, rounding for rounding (a multiply, then an add; never a
# fused multiply-add): on quantized files whose layers quantize their input on the fly, a last bit of difference
# upstream flips a rounding there, so both models must feed every layer the same bits. ``parts``: ``(tokens,
# terms)`` pairs, the six modulation terms (prescale, preshift, pregate, postscale, postshift, postgate, each
# ``(B, 1, hidden)``) for a slice of the sequence; ``fresh``: new tensors instead of in-place updates.
def _modulate(h, scale: int, shift: int, parts, fresh: bool):
    """``(1 + scale) * h + shift`` per part."""
    if fresh:
        if len(parts) == 1:
            t = parts[0][1]
            return (1 + t[scale]) * h + t[shift]
        return torch.cat([(1 + t[scale]) * h[:, sl] + t[shift] for sl, t in parts], dim=1)
    if len(parts) == 1:
        t = parts[0][1]
        return h.mul_(1 + t[scale]).add_(t[shift])
    for sl, t in parts:
        h[:, sl].mul_(1 + t[scale]).add_(t[shift])
    return h


def _gated_add(x, gate: int, y, parts, fresh: bool):
    """``x + gate * y`` per part (``y``, the layer's own output, takes the gate in place when not ``fresh``)."""
    if fresh:
        if len(parts) == 1:
            return x + parts[0][1][gate] * y
        return x + torch.cat([t[gate] * y[:, sl] for sl, t in parts], dim=1)
    if len(parts) == 1:
        return x.add_(y.mul_(parts[0][1][gate]))
    for sl, t in parts:
        y[:, sl].mul_(t[gate])
    return x.add_(y)


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
        return self.linear((1 + scale) * self.norm(x) + shift)


def timestep_embedding(sigma: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of ``1000 * sigma``, cos first; ``(B,)`` -> ``(B, 1, dim)`` float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(1e4) * torch.arange(half, dtype=torch.float32, device=sigma.device) / half)
    args = (sigma.float() * 1000.0)[:, None, None] * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


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
        #: the reference method used when a call gives none (native Krea 2's attribute of the same name, which
        #: hosts patch: ComfyUI's FluxKVCache sets "index_timestep_zero")
        self.default_ref_method = None
        #: the attention every layer calls: None for :func:`krea2_model.model.attention.attention`, or
        #: ``fn(q, k, v, mask, transformer_options)`` (same contract, plus the forward's options) through which a
        #: host runs its own attention choice and per-call overrides (``nodes.host.model`` sets it)
        self.attention_backend = None
        #: the RoPE rotation: None for ours, or ``fn(q, k, pe) -> (q, k)`` (q ``(B, H, L, D)``, k ``(B, Hkv, L, D)``,
        #: ``pe`` the rotation matrices ``(B, 1, L, D/2, 2, 2)``) through which a host rotates with its own kernel
        self.rope_backend = None
        #: the file the weights came from (set by the loaders), named in messages
        self.source_name = None
        self._warned_inputs: set = set()
        self._nonfinite_step = None  # the step of the last non-finite warning: one per sample

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

    def encode_text(self, context: torch.Tensor, mask: torch.Tensor | None = None, transformer_options=None
                    ) -> torch.Tensor:
        """Text fusion + projection: conditioning -> ``(B, seq, hidden)`` text tokens. Independent of
        the timestep, so callers may compute it once per prompt and reuse it. ``transformer_options`` go to
        :attr:`attention_backend` when one is set."""
        ctx = self.unpack_context(context)
        dt = self._compute_dtype(context)
        hooks = None
        if self.attention_backend is not None:
            hooks = AttentionHooks({}, {} if transformer_options is None else transformer_options,
                                   self.attention_backend)
        h = self.txtfusion(ctx.to(dt), mask=mask, hooks=hooks)
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
        opts = transformer_options
        if not caching_enabled(self.cache_text, opts, self.attention_backend is not None):
            return self.encode_text(context, mask, opts)
        # keyed on the attention backend too: the host's attention choice is part of what was computed
        key = (self._compute_dtype(context), self.attention_backend_key())
        weights = stage_weights((self.txtfusion, self.txtmlp))
        hit = self._text_cache.get(context, mask, key, weights)
        if hit is not None:
            return hit
        out = self.encode_text(context, mask, opts)
        self._text_cache.put(context, mask, key, weights, out)
        return out

    def attention_backend_key(self):
        """What identifies the attention the layers run (compared with ``==`` by the text cache)."""
        fn = self.attention_backend
        return getattr(fn, "cache_key", lambda: fn)() if fn is not None else None

    def clear_text_cache(self) -> None:
        self._text_cache.clear()

    def _compute_dtype(self, x: torch.Tensor | None = None):
        """The dtype activations run in: under host operations (which cast weights per call) the
        input's, as the host chose it; otherwise the stored weights' dtype."""
        if self._host_ops and x is not None:
            return x.dtype
        w = self.first.weight.dtype
        return w if w.is_floating_point and w.itemsize >= 2 else torch.bfloat16

    def rope(self, text_len: int, grid_h: int, grid_w: int, device, refs=()):
        """RoPE tables for text + a ``grid_h x grid_w`` target, then reference grids ``refs``
        (``[(grid_h, grid_w), ...]``, reference i at index i); cached per layout."""
        grids = ((0, grid_h, grid_w),) + tuple((i, gh, gw) for i, (gh, gw) in enumerate(refs, 1))
        key = (text_len, grids, str(device))
        tab = self._rope_cache.get(key)
        if tab is None:
            if len(self._rope_cache) > 8:
                self._rope_cache.clear()
            tab = self._rope_cache[key] = rope_from_ids(self.config, position_ids(text_len, grids), device)
        return tab

    def patchify(self, lat: torch.Tensor, what: str = "latent"):
        """``(B, C, H, W)`` -> ``(tokens (B, gh*gw, C*p*p), gh, gw)``. Sides that are not a multiple of the
        patch are padded circularly (as ComfyUI's DiTs pad); ``what`` names the input in errors."""
        cfg, p = self.config, self.config.patch
        if lat.ndim != 4 or lat.shape[1] != cfg.channels:
            raise ConditioningError(f"Krea 2 {what} must have {cfg.channels} channels (Wan21 latent format, "
                                    f"(batch, {cfg.channels}, height, width)), got shape {tuple(lat.shape)}.")
        B, C, H, W = lat.shape
        ph, pw = (-H) % p, (-W) % p
        if ph or pw:
            lat = F.pad(lat, (0, pw, 0, ph), mode="circular")
        gh, gw = (H + ph) // p, (W + pw) // p
        return lat.reshape(B, C, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5).reshape(B, gh * gw, C * p * p), gh, gw

    def reference_tokens(self, ref_latents, batch: int):
        """:func:`references.reference_tokens` with this model's patchify."""
        return references.reference_tokens(self.patchify, self.config.channels, ref_latents, batch)

    # -- forward ----------------------------------------------------------------------------------
    def forward(self, x, sigma, context, attention_mask=None, transformer_options=None, *, ref_latents=None,
                **kwargs):
        """The velocity; see the module docstring. The public order of docs/architecture.md
        (``x, sigma, context, attention_mask, transformer_options``); references by keyword
        (``ref_latents``, ``ref_latents_method``). :meth:`_forward` takes native ComfyUI Krea 2's order
        (``..., attention_mask, ref_latents, transformer_options``), so a host wrapper around it sees ``x``
        first and ``transformer_options`` last (``nodes.host.model`` runs it through the host's
        DIFFUSION_MODEL wrapper chain with that order)."""
        out = self._forward(x, sigma, context, attention_mask, ref_latents, transformer_options, **kwargs)
        return self.check_finite(out, transformer_options)

    def ignored_inputs(self, kwargs: dict) -> None:
        """Keyword inputs the forward does not read (a host passes ``control=None`` on every call: None is no
        input): one warning per model naming each new one. ``control`` is what ControlNet nodes send."""
        new = sorted(k for k, v in kwargs.items() if v is not None and k not in self._warned_inputs)
        if not new:
            return
        self._warned_inputs.update(new)
        note = ""
        if "control" in new:
            note = (" 'control' comes from a ControlNet: Krea 2 has no ControlNet inputs (native ComfyUI Krea 2 "
                    "ignores it too), so the ControlNet does nothing here; take it out of the graph.")
        log.warning("Krea 2: model input(s) %s are ignored: the Krea 2 transformer does not read them.%s",
                    ", ".join(repr(k) for k in new), note)

    def check_finite(self, out: torch.Tensor, transformer_options: dict | None = None) -> torch.Tensor:
        """``out`` unchanged; the first non-finite velocity of a sample gets one warning naming the model file, the
        step and the likely causes. Costs one reduction per call (a sum over the velocity, no extra buffer): a
        NaN or inf anywhere makes the sum non-finite, and finite velocities cannot overflow a float32 sum."""
        if torch.compiler.is_compiling() or bool(torch.isfinite(out.sum(dtype=torch.float32))):
            return out
        opts = transformer_options or {}
        sched, now = opts.get("sample_sigmas"), opts.get("sigmas")
        i, step = 0, ""
        if sched is not None and now is not None and len(sched) > 1:
            i = int((sched.flatten().float().cpu() - float(now.flatten()[0])).abs().argmin())
            step = f" at step {i + 1} of {len(sched) - 1} (sigma {float(now.flatten()[0]):.4g})"
        last, self._nonfinite_step = self._nonfinite_step, i
        if last is not None and i >= last:
            return out  # said already for this sample: a later step (or the other half of a CFG batch)
        name = self.source_name or "(a model built in memory)"
        log.warning("Krea 2: the model %s returned NaN or infinite values%s; the image will come out black or as noise. "
                    "Likely causes: a damaged weights file (flipped bytes in its data: download it again and compare "
                    "its checksum), fp16 overflow (compute in bf16 or fp32 instead: ComfyUI's --bf16-unet or "
                    "--fp32-unet, or a bf16 file), or NaN already in the inputs (latent, conditioning).", name, step)
        return out

    def _forward(self, x, sigma, context, attention_mask=None, ref_latents=None, transformer_options=None,
                 ref_latents_method=None, krea2_regions=None, **kwargs):
        """The forward as the maths reads: inputs to tokens, time, text stage, the sequence ``[text | target |
        references]`` with its mask and positions, the blocks, the final layer on the target."""
        cfg = self.config
        if kwargs:
            self.ignored_inputs(kwargs)
        opts, patches, replace = host_hooks.read(transformer_options)  # every host hook, read here only

        frames = None
        if x.ndim == 5:  # Wan21 latents (B, C, T, H, W): each of the T frames is one image
            frames = (x.shape[0], x.shape[2])
            x = x.transpose(1, 2).flatten(0, 1)
        B, C, H, W = x.shape
        in_dtype, dt = x.dtype, self._compute_dtype(x)
        img, gh, gw = self.patchify(x)                                     # (B, gh*gw, C*p*p)
        n_target = img.shape[1]
        refs, ref_grids, t0 = self._references(x, ref_latents, ref_latents_method, B, opts)
        if refs is not None:
            img = torch.cat([img, refs], dim=1)
        sigma, context, attention_mask = _per_image(sigma, context, attention_mask, B, frames)

        # time: the shared modulation vector (and the one for t = 0, for "index_timestep_zero" references)
        img = self.first(img.to(dt))
        t = self.tmlp(timestep_embedding(sigma.to(x.device), cfg.time_dim).to(dt))
        vec = self.tproj(t)
        vec_ref = self.tproj(self.tmlp(timestep_embedding(torch.zeros_like(sigma, device=x.device),
                                                          cfg.time_dim).to(dt))) if t0 else None

        # text stage (cached per conditioning), the host's post_input, regional prompts' own text
        am = None
        if attention_mask is not None:
            am = attention_mask.to(device=x.device, dtype=torch.bool)
            am = None if bool(am.all()) else am
        txt = self.text_tokens(context.to(x.device), None if am is None else am[:, None, None, :], opts).to(dt)
        rope = None
        if "post_input" in patches:
            rope = self.rope(txt.shape[1], gh, gw, x.device, ref_grids)
            img, txt, rope = host_hooks.post_input(cfg, patches["post_input"], img, txt.clone(), rope, gh, gw,
                                                   ref_grids, opts)
        L_base = txt.shape[1]
        region_lens = ()
        if krea2_regions:  # regional prompts (regions.py): each prompt through its own text stage, after the base
            parts = [self.text_tokens(r.context.to(x.device).expand(B, -1, -1), None, opts).to(dt)
                     for r in krea2_regions]
            region_lens = tuple(t.shape[1] for t in parts)
            txt = torch.cat([txt, *parts], dim=1)
            if rope is not None:  # a post_input patch gave positions: region text sits at text's (0, 0, 0)
                rope = insert_text_rows(rope, L_base, sum(region_lens))
        L_txt = txt.shape[1]
        if rope is None:
            rope = self.rope(L_txt, gh, gw, x.device, ref_grids)

        # the sequence [text | target | references] and who attends to whom
        h = torch.cat([txt, img], dim=1)
        del txt, img
        mask = None
        if am is not None:
            if am.shape[1] != L_base:
                raise ConditioningError(f"attention_mask covers {am.shape[1]} text tokens, the sequence has {L_base}.")
            mask = torch.cat([am, am.new_ones(B, h.shape[1] - L_base)], dim=1)[:, None, None, :]
        if krea2_regions:
            rm = krea2_regions.attention_mask(L_base, region_lens, gh, gw, h.shape[1] - L_txt - n_target, x.device)
            mask = rm if mask is None else rm & mask

        h = self._blocks(h, vec, rope, mask, vec_ref, L_txt + n_target if t0 else None, L_txt, patches, replace, opts)
        out = self.last(h[:, L_txt:L_txt + n_target], t)   # the target only: references are inputs
        return self._unpatchify(out, B, C, H, W, gh, gw, frames).to(in_dtype)

    def _references(self, x, ref_latents, method, batch, opts):
        """``(tokens or None, grids, t0)`` for the reference latents (see :mod:`.references`); ``t0``: whether
        they are modulated at t = 0."""
        if method is None:
            method = self.default_ref_method
        if ref_latents is None or len(ref_latents) == 0:
            return None, (), False
        if method is None:
            self.references_without_method(ref_latents)
            return None, (), False
        self._warned_method = references.warn_placement(method, getattr(self, "_warned_method", None))
        tokens, grids = self.reference_tokens([r.to(x.device) for r in ref_latents], batch)
        opts["reference_image_num_tokens"] = [a * b for a, b in grids]
        return tokens, grids, method == "index_timestep_zero"

    def _blocks(self, h, vec, rope, mask, vec_ref, ref_start, L_txt, patches, replace, opts):
        """Every block over the sequence ``h (B, L, hidden)``, with the host's attention patches and block
        replacements (:mod:`.hooks`)."""
        opts["total_blocks"] = len(self.blocks)
        opts["block_type"] = "single"
        opts["img_slice"] = [L_txt, h.shape[1]]
        hooks = host_hooks.attention_hooks(patches, opts, self.attention_backend, self.rope_backend)
        # a block replacement may keep the tensors it is given or returns (a cache): with any replacement set, every
        # block updates out of place (as native does); the in-place residual is only for a forward without one
        inplace = not host_hooks.replaces_blocks(replace)
        for i, blk in enumerate(self.blocks):
            opts["block_index"] = i
            fn = replace.get(("single_block", i))
            if fn is None:
                h = blk(h, vec, rope, mask, hooks, vec_ref, ref_start, inplace=inplace)
            else:
                h = host_hooks.replaced_block(fn, blk, h, vec, rope, mask, hooks, vec_ref, ref_start, opts)
        return h

    def _unpatchify(self, out, B, C, H, W, gh, gw, frames):
        """Target tokens ``(B, gh*gw, C*p*p)`` -> the latent ``(B, C, H, W)`` (padding cropped), or 5-D again."""
        p = self.config.patch
        out = out.view(B, gh, gw, C, p, p).permute(0, 3, 1, 4, 2, 5).reshape(B, C, gh * p, gw * p)[:, :, :H, :W]
        return out.unflatten(0, frames).transpose(1, 2) if frames is not None else out

    def references_without_method(self, ref_latents) -> None:
        """Reference latents came with no method and there is no :attr:`default_ref_method`: an error here;
        a host adapter may instead ignore them with a warning, as its native model ignores them."""
        raise references.without_method(ref_latents)


def _per_image(sigma, context, attention_mask, B: int, frames):
    """``sigma``, ``context`` and ``attention_mask`` spread to the ``B`` images of the flattened batch. Per-sample
    inputs of a 5-D latent follow its flattening (sample-major: sample b's frames are rows b*T .. b*T+T-1), so each
    frame keeps its own sample's time, prompt and mask; a single prompt or time serves every image."""
    if frames is not None and frames[1] > 1:
        n, T = frames
        sigma = sigma.repeat_interleave(T) if sigma.ndim == 1 and sigma.shape[0] == n else sigma
        if context.shape[0] == n and n > 1:
            context = context.repeat_interleave(T, dim=0)
        if attention_mask is not None and attention_mask.shape[0] == n and n > 1:
            attention_mask = attention_mask.repeat_interleave(T, dim=0)
    if sigma.ndim == 0:
        sigma = sigma.expand(B)
    elif sigma.shape[0] != B:  # one time per sample of a 5-D latent: one per frame
        sigma = sigma.repeat_interleave(B // sigma.shape[0])
    if context.shape[0] != B:
        context = context.expand(B, *context.shape[1:]) if context.shape[0] == 1 else context.repeat(
            B // context.shape[0], *[1] * (context.ndim - 1))
        if attention_mask is not None and attention_mask.shape[0] != B:
            attention_mask = attention_mask.repeat(B // attention_mask.shape[0], 1)
    return sigma, context, attention_mask
