"""Images for the Qwen3-VL text encoder, prepared the way Krea 2's edit / style LoRAs were trained.

A ComfyUI IMAGE (float ``(H, W, C)`` or ``(1, H, W, C)`` in [0, 1]) becomes the vision tower's input:

1. channels: RGB as is; RGBA loses its alpha channel (ComfyUI keeps masks apart; a transparent pixel is
   encoded as its colour); grayscale (one channel, or a 2-D tensor) is repeated to RGB. Anything else is
   refused.
2. size (:func:`vision_size`): downscaled, never upscaled, to at most ``384 * 384`` pixels keeping the
   aspect ratio, each side on the vision grid (32 px: patch 16, 2 x 2 merge) and at least one grid cell;
   only an image with a side under 32 px grows (to 32), and an extreme aspect ratio whose short side had
   to grow loses length on the long side to stay within the pixel budget.
3. bicubic resampling with antialiasing, clamped to [0, 1], normalised to [-1, 1] (mean = std = 0.5).
4. :func:`patchify`: ``(N, 3 * 2 * 16 * 16)`` patches in merge-group order, each still image repeated as
   its own second frame (temporal patch 2), and the patch grid ``(1, H/16, W/16)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import ConditioningError
from .vision import IMAGE_MEAN, IMAGE_STD

#: The largest image the vision tower sees, in pixels (384 x 384), and its grid (patch 16 x merge 2).
MAX_PIXELS = 384 * 384
GRID = 32
MAX_IMAGES = 3


def as_rgb(image: torch.Tensor, name: str = "image") -> torch.Tensor:
    """``(H, W, C)`` / ``(1, H, W, C)`` / ``(H, W)`` float -> ``(3, H, W)`` float32 (see the module docstring)."""
    if not isinstance(image, torch.Tensor):
        raise ConditioningError(f"{name}: expected an image tensor (ComfyUI IMAGE), got {type(image).__name__}.")
    x = image
    if x.ndim == 4:
        if x.shape[0] != 1:
            raise ConditioningError(f"{name}: a batch of {x.shape[0]} images where one image is expected; give "
                                    "each reference image its own input (or split the batch first).")
        x = x[0]
    if x.ndim == 2:
        x = x[..., None]
    if x.ndim != 3 or x.shape[-1] not in (1, 3, 4):
        raise ConditioningError(f"{name}: shape {tuple(image.shape)} is not an image (H, W, 3) with RGB, RGBA or "
                                "grayscale channels.")
    if x.shape[0] < 1 or x.shape[1] < 1:
        raise ConditioningError(f"{name}: the image is empty ({tuple(image.shape)}).")
    if not x.is_floating_point():
        raise ConditioningError(f"{name}: pixel values must be floats in [0, 1] (ComfyUI IMAGE), got {x.dtype}.")
    c = x.shape[-1]
    x = x[..., :3] if c == 4 else (x.expand(*x.shape[:2], 3) if c == 1 else x)
    return x.permute(2, 0, 1).to(torch.float32)


def vision_size(height: int, width: int, max_pixels: int = MAX_PIXELS, grid: int = GRID) -> tuple[int, int]:
    """``(h, w)`` the vision tower sees an ``height x width`` image at (module docstring, step 2): the size
    scaled to fit ``max_pixels``, each side rounded to the nearest grid multiple but never above the image's
    own side (rounded down) nor below one grid cell, then trimmed a cell at a time (the side furthest above
    its exact value first) until within ``max_pixels``."""
    scale = min(1.0, (max_pixels / (height * width)) ** 0.5)
    exact = (height * scale, width * scale)
    caps = (max(grid, height // grid * grid), max(grid, width // grid * grid))
    h, w = (min(cap, max(grid, round(e / grid) * grid)) for e, cap in zip(exact, caps))
    while h * w > max_pixels and (h > grid or w > grid):
        if (h / exact[0] >= w / exact[1] and h > grid) or w == grid:
            h -= grid
        else:
            w -= grid
    return h, w


def resize(rgb: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``(3, H, W)`` -> ``(3, h, w)``: bicubic with antialiasing (a no-op at the same size), clamped to [0, 1]."""
    if tuple(rgb.shape[1:]) == tuple(size):
        return rgb.clamp(0.0, 1.0)
    return F.interpolate(rgb[None], size=size, mode="bicubic", antialias=True, align_corners=False)[0].clamp(0.0, 1.0)


def patchify(pixels: torch.Tensor, patch: int = 16, merge: int = 2, temporal: int = 2) -> tuple[torch.Tensor, tuple]:
    """Normalised ``(3, h, w)`` -> ``(patches (gh*gw, 3*temporal*patch*patch), (1, gh, gw))``, patches in
    merge-group order (group row, group column, row, column), each patch's values channel, frame, row,
    column (the still image repeated as every frame)."""
    c, h, w = pixels.shape
    gh, gw = h // patch, w // patch
    x = pixels.reshape(c, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.permute(1, 4, 2, 5, 0, 3, 6)                       # (GH, GW, m, m, C, P, P)
    x = x.unsqueeze(5).expand(*x.shape[:5], temporal, patch, patch)
    return x.reshape(gh * gw, c * temporal * patch * patch), (1, gh, gw)


def prepare(image: torch.Tensor, name: str = "image", max_pixels: int = MAX_PIXELS) -> tuple:
    """A ComfyUI IMAGE -> ``(patches, grid, (h, w))`` for the vision tower (the whole recipe, steps 1-4).

    Large images are downscaled before anything else is allocated at full size: the only full-size
    buffer is the channel-first view the resampler reads."""
    rgb = as_rgb(image, name)
    size = vision_size(rgb.shape[1], rgb.shape[2], max_pixels)
    pixels = (resize(rgb, size) - IMAGE_MEAN) / IMAGE_STD
    patches, grid = patchify(pixels)
    return patches, grid, size


#: Reference latents: images downscaled (never upscaled) to at most 1 megapixel with sides on a 16 px grid
#: (VAE factor 8 x patch 2), as ai-toolkit prepares Krea 2's edit / style training pairs.
REFERENCE_PIXELS = 1024 * 1024
REFERENCE_GRID = 16


def reference_pixels(image: torch.Tensor, name: str = "image") -> torch.Tensor:
    """A ComfyUI IMAGE -> the ``(1, h, w, 3)`` IMAGE a VAE encodes into the image's reference latent: RGB
    (as :func:`as_rgb`), at the size :func:`vision_size` gives for 1 MP on the 16 px grid, bicubic with
    antialiasing."""
    rgb = as_rgb(image, name)
    size = vision_size(rgb.shape[1], rgb.shape[2], REFERENCE_PIXELS, REFERENCE_GRID)
    return resize(rgb, size).permute(1, 2, 0)[None].contiguous()
