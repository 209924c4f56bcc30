"""Krea 2 sigma schedules (the reference pipeline's, exactly).

``sigma(t) = e^mu / (e^mu + 1/t - 1)`` on ``t = linspace(1, 1/steps, steps)`` plus a final 0.
Turbo uses ``mu = 1.15``; Raw interpolates ``mu`` linearly in image tokens ``(H/16)(W/16)`` from
``(256, 0.5)`` to ``(6400, 1.15)``, without clamping.
"""

from __future__ import annotations

import math

import torch

TURBO_MU = 1.15
BASE_SEQ, MAX_SEQ = 256, 6400
BASE_SHIFT, MAX_SHIFT = 0.5, 1.15


def image_tokens(width: int, height: int) -> int:
    """Transformer image tokens for a pixel size: one per 16x16 pixels (VAE f8, patch 2), rounded up."""
    return math.ceil(height / 16) * math.ceil(width / 16)


def mu(width: int, height: int, variant: str = "raw", base_shift: float = BASE_SHIFT,
       max_shift: float = MAX_SHIFT) -> float:
    """Time shift for ``variant`` ``'raw'`` (resolution-aware) or ``'turbo'`` (fixed 1.15)."""
    if variant == "turbo":
        return TURBO_MU
    if variant != "raw":
        raise ValueError(f"variant must be 'raw' or 'turbo', got {variant!r}")
    m = (max_shift - base_shift) / (MAX_SEQ - BASE_SEQ)
    return image_tokens(width, height) * m + (base_shift - m * BASE_SEQ)


def shift(t, mu_: float):
    """``e^mu / (e^mu + 1/t - 1)``; works on floats and tensors; t = 0 maps to 0."""
    if isinstance(t, torch.Tensor):
        e = math.exp(mu_)
        out = e / (e + (1.0 / t.double() - 1.0))
        return torch.where(t > 0, out, torch.zeros_like(out))
    if t <= 0:
        return 0.0
    e = math.exp(mu_)
    return e / (e + (1.0 / t - 1.0))


def sigmas(steps: int, mu_: float) -> torch.Tensor:
    """``steps + 1`` float32 sigmas, the last 0, as the reference scheduler produces them."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    t = torch.linspace(1.0, 1.0 / steps, steps, dtype=torch.float64)
    s = shift(t, mu_)
    return torch.cat([s, s.new_zeros(1)]).float()
