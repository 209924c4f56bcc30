"""Krea 2's 3-axis RoPE positions ``(index, row, col)``: text at (0, 0, 0), the target grid at index 0, reference
image i on its own grid at index i; the rotation tables made from them."""

from __future__ import annotations

import torch


def position_ids(text_len: int, grids) -> torch.Tensor:
    """``(text_len + sum(h*w), 3)`` float64 RoPE positions ``(index, row, col)``: text at (0, 0, 0), then
    one row-major grid per ``(index, grid_h, grid_w)`` in ``grids`` (the target is index 0; reference
    image i is index i, on its own grid counted from 0)."""
    parts = [torch.zeros(text_len, 3, dtype=torch.float64)]
    for index, gh, gw in grids:
        rows = torch.arange(gh, dtype=torch.float64).repeat_interleave(gw)
        cols = torch.arange(gw, dtype=torch.float64).repeat(gh)
        parts.append(torch.stack([torch.full_like(rows, float(index)), rows, cols], dim=-1))
    return torch.cat(parts)


def rope_from_ids(cfg, ids: torch.Tensor, device) -> tuple:
    """``(cos, sin, cis)`` for position ids ``(L, 3)``: cos/sin ``(L, head_dim/2)`` float32, the three
    axes' angles side by side (:attr:`Krea2Config.rope_axes`), ``cis = cos + i sin`` complex64. Angles
    are formed in float64 (as the reference) before the cast."""
    ids = ids.to(torch.float64).cpu()
    angles = []
    for axis, d in enumerate(cfg.rope_axes):
        omega = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
        angles.append(ids[:, axis, None] * omega[None, :])
    a = torch.cat(angles, dim=-1)
    cos, sin = a.cos().float().to(device), a.sin().float().to(device)
    return cos, sin, torch.complex(cos, sin)


def rope_tables(cfg, text_len: int, grid_h: int, grid_w: int, device) -> tuple:
    """:func:`rope_from_ids` for text and one target grid (no references)."""
    return rope_from_ids(cfg, position_ids(text_len, [(0, grid_h, grid_w)]), device)


def insert_text_rows(rope, at: int, n: int):
    """RoPE tables with ``n`` rows at text position (0, 0, 0) (angle 0) inserted before row ``at``."""
    cos, sin, cis = rope
    one = cos.new_ones(n, cos.shape[-1])
    zero = sin.new_zeros(n, sin.shape[-1])
    cos = torch.cat([cos[..., :at, :], one.expand(*cos.shape[:-2], n, -1), cos[..., at:, :]], dim=-2)
    sin = torch.cat([sin[..., :at, :], zero.expand(*sin.shape[:-2], n, -1), sin[..., at:, :]], dim=-2)
    return cos, sin, torch.complex(cos, sin)
