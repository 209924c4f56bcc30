"""The Qwen3-VL vision tower: images -> vision tokens for the language tower, plus DeepStack features.

Architecture (Qwen3-VL's, as ``transformers``' ``Qwen3VLVisionModel`` computes it):

* ``patch_embed.proj``: one linear map of each ``3 x 2 x 16 x 16`` patch (a still image is its own second
  frame), stored as Qwen's Conv3d weight ``(hidden, 3, 2, 16, 16)`` with bias;
* ``pos_embed``: a learned ``side x side`` grid of position vectors (``side**2`` = 2304 for Qwen3-VL),
  resampled bilinearly (corner-aligned) to each image's patch grid and added;
* ``blocks.N``: pre-LayerNorm blocks: full (non-causal) attention within one image, 2-D rotary on the
  patch's (row, col), tanh-GELU MLP;
* ``merger``: LayerNorm, then each 2 x 2 group of neighbouring patches concatenated and mapped by a
  two-layer GELU MLP to the language tower's width: one vision token per group;
* ``deepstack_merger_list.K``: the same merge on the output of block ``deepstack[K]`` (LayerNorm after the
  concatenation); its tokens are *added* to the language tower's hidden states at the image positions
  after decoder layer ``K`` (see :meth:`~krea2_model.text.qwen3.Qwen3TextModel.forward`).

Patches are ordered group by group (row of groups, column of groups, then the 2 x 2 patches inside), the
order of the pixel values Qwen's image processor emits, so the merge is a reshape. Sizes come from the
weights' shapes (:func:`infer_vision_config`); the head count (16 in every Qwen3-VL) and the DeepStack
layers (a property of the checkpoint, not of any shape) from an HF ``config.json`` when there is one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..model.attention import attention
from ..model.layers import cast_param, ops_or_default

#: Qwen3-VL's image normalisation: pixels in [0, 1] to [-1, 1].
IMAGE_MEAN = IMAGE_STD = 0.5
#: The DeepStack layers of the published Qwen3-VL vision towers, by (depth, number of DeepStack mergers).
KNOWN_DEEPSTACK = {(24, 3): (5, 11, 17), (27, 3): (8, 16, 24)}


@dataclass(frozen=True)
class Qwen3VisionConfig:
    """Sizes of the vision tower. Defaults are Qwen3-VL-4B's."""
    hidden: int = 1024
    depth: int = 24
    heads: int = 16
    mlp_hidden: int = 4096
    out_hidden: int = 2560
    patch: int = 16
    temporal_patch: int = 2
    merge: int = 2
    in_channels: int = 3
    positions: int = 2304
    deepstack: tuple = (5, 11, 17)
    eps: float = 1e-6
    rope_theta: float = 10000.0

    @property
    def grid(self) -> int:
        """Pixels per side of one merged group (32 for Qwen3-VL): image sides are multiples of it."""
        return self.patch * self.merge


def default_deepstack(depth: int, count: int) -> tuple:
    """The DeepStack layers for a tower of ``depth`` blocks with ``count`` mergers: Qwen's published
    choice where known, else evenly spaced (``round((k + 1) * depth / (count + 1)) - 1``)."""
    known = KNOWN_DEEPSTACK.get((depth, count))
    if known is not None:
        return known
    return tuple(max(0, round((k + 1) * depth / (count + 1)) - 1) for k in range(count))


class VisionLayerNorm(nn.Module):
    """LayerNorm with weight and bias (keys ``weight``, ``bias``), cast to the input per call so a host may
    keep it offloaded or in another dtype."""

    def __init__(self, dim: int, eps: float, dtype=None, device=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(dim, dtype=dtype, device=device), requires_grad=False)

    def forward(self, x):
        return F.layer_norm(x, (x.shape[-1],), cast_param(self.weight, x), cast_param(self.bias, x), self.eps)


class PatchEmbed(nn.Module):
    """``proj``: Qwen's Conv3d over one ``(C, T, P, P)`` patch, applied as the linear map it is."""

    def __init__(self, cfg: Qwen3VisionConfig, dtype=None, device=None):
        super().__init__()
        self.proj = nn.Module()
        shape = (cfg.hidden, cfg.in_channels, cfg.temporal_patch, cfg.patch, cfg.patch)
        self.proj.weight = nn.Parameter(torch.zeros(shape, dtype=dtype, device=device), requires_grad=False)
        self.proj.bias = nn.Parameter(torch.zeros(cfg.hidden, dtype=dtype, device=device), requires_grad=False)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """``(N, C*T*P*P)`` -> ``(N, hidden)``."""
        w = cast_param(self.proj.weight, patches)
        return F.linear(patches, w.reshape(w.shape[0], -1), cast_param(self.proj.bias, patches))


class PositionGrid(nn.Module):
    """``weight (side*side, hidden)``: the learned position grid, resampled to each image."""

    def __init__(self, cfg: Qwen3VisionConfig, dtype=None, device=None):
        super().__init__()
        self.side = math.isqrt(cfg.positions)
        self.weight = nn.Parameter(torch.zeros(cfg.positions, cfg.hidden, dtype=dtype, device=device),
                                   requires_grad=False)

    def forward(self, gh: int, gw: int, merge: int, like: torch.Tensor) -> torch.Tensor:
        """Position vectors ``(gh*gw, hidden)`` for a ``gh x gw`` patch grid, in merge-group order."""
        table = cast_param(self.weight, like, torch.float32).t().reshape(1, -1, self.side, self.side)
        grid = F.interpolate(table, size=(gh, gw), mode="bilinear", align_corners=True)[0]  # (hidden, gh, gw)
        return to_group_order(grid.permute(1, 2, 0), merge).to(like.dtype)


def to_group_order(x: torch.Tensor, merge: int) -> torch.Tensor:
    """``(gh, gw, ...)`` row-major patches -> ``(gh*gw, ...)`` in merge-group order (group row, group column,
    row in the group, column in the group)."""
    gh, gw = x.shape[:2]
    rest = x.shape[2:]
    x = x.reshape(gh // merge, merge, gw // merge, merge, *rest).transpose(1, 2)
    return x.reshape(gh * gw, *rest)


def rotary_tables(gh: int, gw: int, merge: int, head_dim: int, theta: float, device) -> tuple:
    """``(cos, sin)`` ``(gh*gw, head_dim)`` float32 for the vision blocks: the first half of each head turns
    with the patch's row and column (a quarter each, frequencies ``theta ** -(2i / (head_dim/2))``), the
    second half repeats the first ("rotate half" layout). Patches in merge-group order."""
    spatial = head_dim // 2  # rows and columns share these frequencies, each over a quarter of the head
    inv = 1.0 / (theta ** (torch.arange(0, spatial, 2, dtype=torch.float32, device=device) / spatial))
    rows = torch.arange(gh, device=device, dtype=torch.float32)[:, None].expand(gh, gw)
    cols = torch.arange(gw, device=device, dtype=torch.float32)[None, :].expand(gh, gw)
    pos = to_group_order(torch.stack([rows, cols], dim=-1), merge)  # (N, 2)
    half = torch.cat([pos[:, :1] * inv, pos[:, 1:] * inv], dim=-1)
    ang = torch.cat([half, half], dim=-1)
    return ang.cos(), ang.sin()


def _turn(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-b, a), dim=-1) * sin


class VisionAttention(nn.Module):
    """``qkv (3*hidden, hidden)`` + bias, ``proj``; full attention over one image's patches."""

    def __init__(self, cfg: Qwen3VisionConfig, dtype=None, device=None, operations=None):
        super().__init__()
        ops = ops_or_default(operations)
        self.heads = cfg.heads
        self.qkv = ops.Linear(cfg.hidden, 3 * cfg.hidden, bias=True, dtype=dtype, device=device)
        self.proj = ops.Linear(cfg.hidden, cfg.hidden, bias=True, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor, rope: tuple, lengths: list) -> torch.Tensor:
        """``x (N, hidden)`` for the patches of several images (``lengths`` of each, in order)."""
        n = x.shape[0]
        q, k, v = self.qkv(x).view(n, 3, self.heads, -1).unbind(1)   # each (N, heads, D)
        cos, sin = rope[0][:, None, :], rope[1][:, None, :]
        q = _turn(q.float(), cos, sin).to(x.dtype)
        k = _turn(k.float(), cos, sin).to(x.dtype)
        outs, start = [], 0
        for length in lengths:  # images never attend to each other
            sl = slice(start, start + length)
            outs.append(attention(q[sl].transpose(0, 1)[None].contiguous(), k[sl].transpose(0, 1)[None].contiguous(),
                                  v[sl].transpose(0, 1)[None].contiguous())[0])
            start += length
        return self.proj(torch.cat(outs, dim=0))


class VisionMLP(nn.Module):
    def __init__(self, cfg: Qwen3VisionConfig, dtype=None, device=None, operations=None):
        super().__init__()
        ops = ops_or_default(operations)
        self.linear_fc1 = ops.Linear(cfg.hidden, cfg.mlp_hidden, bias=True, dtype=dtype, device=device)
        self.linear_fc2 = ops.Linear(cfg.mlp_hidden, cfg.hidden, bias=True, dtype=dtype, device=device)

    def forward(self, x):
        return self.linear_fc2(F.gelu(self.linear_fc1(x), approximate="tanh"))


class VisionBlock(nn.Module):
    def __init__(self, cfg: Qwen3VisionConfig, dtype=None, device=None, operations=None):
        super().__init__()
        self.norm1 = VisionLayerNorm(cfg.hidden, cfg.eps, dtype=dtype, device=device)
        self.norm2 = VisionLayerNorm(cfg.hidden, cfg.eps, dtype=dtype, device=device)
        self.attn = VisionAttention(cfg, dtype=dtype, device=device, operations=operations)
        self.mlp = VisionMLP(cfg, dtype=dtype, device=device, operations=operations)

    def forward(self, x, rope, lengths):
        x = x + self.attn(self.norm1(x), rope, lengths)
        return x + self.mlp(self.norm2(x))


class Merger(nn.Module):
    """2 x 2 patch groups -> one token of the language tower's width. ``after_concat``: the LayerNorm runs on
    the concatenated group (DeepStack mergers) instead of on each patch (the main merger)."""

    def __init__(self, cfg: Qwen3VisionConfig, after_concat: bool, dtype=None, device=None, operations=None):
        super().__init__()
        ops = ops_or_default(operations)
        wide = cfg.hidden * cfg.merge ** 2
        self.after_concat = after_concat
        self.norm = VisionLayerNorm(wide if after_concat else cfg.hidden, cfg.eps, dtype=dtype, device=device)
        self.linear_fc1 = ops.Linear(wide, wide, bias=True, dtype=dtype, device=device)
        self.linear_fc2 = ops.Linear(wide, cfg.out_hidden, bias=True, dtype=dtype, device=device)
        self.wide = wide

    def forward(self, x):
        x = self.norm(x.reshape(-1, self.wide)) if self.after_concat else self.norm(x).reshape(-1, self.wide)
        return self.linear_fc2(F.gelu(self.linear_fc1(x)))


class Qwen3VisionModel(nn.Module):
    """The tower; module names are the checkpoint's (``visual.`` stripped)."""

    def __init__(self, cfg: Qwen3VisionConfig, dtype=None, device=None, operations=None):
        super().__init__()
        self.config = cfg
        kw = dict(dtype=dtype, device=device)
        self.patch_embed = PatchEmbed(cfg, **kw)
        self.pos_embed = PositionGrid(cfg, **kw)
        self.blocks = nn.ModuleList(VisionBlock(cfg, operations=operations, **kw) for _ in range(cfg.depth))
        self.merger = Merger(cfg, False, operations=operations, **kw)
        self.deepstack_merger_list = nn.ModuleList(Merger(cfg, True, operations=operations, **kw)
                                                   for _ in cfg.deepstack)

    def forward(self, patches: torch.Tensor, grids: list, dtype=None) -> tuple:
        """``patches (N, C*T*P*P)`` (see :func:`krea2_model.text.images.patchify`) of images with patch grids
        ``grids`` (``[(1, gh, gw), ...]``) -> ``(tokens (N/4, out_hidden), [deepstack (N/4, out_hidden), ...])``.
        ``dtype``: the compute dtype (default: the patch embedding's)."""
        cfg = self.config
        w = self.patch_embed.proj.weight
        dt = dtype or (w.dtype if w.dtype.is_floating_point and w.dtype.itemsize >= 2 else torch.float32)
        x = patches.to(dt)
        lengths = [t * gh * gw for t, gh, gw in grids]
        if sum(lengths) != x.shape[0]:
            raise ValueError(f"{x.shape[0]} patches for grids {grids} ({sum(lengths)} patches)")
        x = self.patch_embed(x)
        x = x + torch.cat([self.pos_embed(gh, gw, cfg.merge, x).repeat(t, 1) for t, gh, gw in grids])
        tables = [rotary_tables(gh, gw, cfg.merge, cfg.hidden // cfg.heads, cfg.rope_theta, x.device)
                  for _, gh, gw in grids]
        rope = (torch.cat([c.repeat(t, 1) for c, (t, _, _) in zip((tb[0] for tb in tables), grids)]),
                torch.cat([s.repeat(t, 1) for s, (t, _, _) in zip((tb[1] for tb in tables), grids)]))
        deep = []
        for i, blk in enumerate(self.blocks):
            x = blk(x, rope, lengths)
            if i in cfg.deepstack:
                deep.append(self.deepstack_merger_list[cfg.deepstack.index(i)](x))
        return self.merger(x), deep
