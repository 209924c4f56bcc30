"""Regional prompts in one forward: a prompt per masked region, given to that region through joint attention.

Krea 2 is single-stream: text and image tokens share one attention, so a region's prompt can reach exactly its
region's image tokens inside one forward, with a boolean attention mask. The sequence is

    [base text | region 1 text | ... | region R text | target image | reference images]

and the rule (:func:`regional_attention_mask`, True = attend):

* base text and every image token see the base text and all image tokens (references included);
* an image token inside region r also sees region r's text;
* region r's text sees itself and region r's image tokens (nothing else).

Each prompt keeps its own text stage (layer-wise fusion and refiner over its own tokens), as if it were encoded
alone. With no regions the forward is the plain one, bit for bit. A region's mask is resized to the latent's
token grid (area average) and a token is inside where the average is at least 0.5.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import ConditioningError

#: regions one conditioning may carry (each one adds its prompt's tokens to every forward)
MAX_REGIONS = 8


@dataclass(frozen=True, eq=False)
class Region:
    """One regional prompt: ``context (1, seq, taps*text_dim)`` (a Krea 2 conditioning tensor) and ``mask (H, W)``
    float in [0, 1] at any resolution (1 = inside). ``name`` says which input it came from, for errors."""

    context: torch.Tensor
    mask: torch.Tensor
    name: str = "region"


class RegionalPrompts:
    """The regions a conditioning carries (a host passes it to the model as one constant). Compared by identity,
    so a host batches two conditionings together only when they carry the very same regions."""

    def __init__(self, regions):
        self.regions = tuple(regions)
        if not self.regions:
            raise ConditioningError("Krea 2 regional prompt: no region given.")
        if len(self.regions) > MAX_REGIONS:
            raise ConditioningError(f"Krea 2 regional prompt: {len(self.regions)} regions; at most {MAX_REGIONS} "
                                    "fit one conditioning. Merge regions that share a prompt into one mask.")

    def attention_mask(self, base_len: int, region_lens, grid_h: int, grid_w: int, n_other_image: int, device):
        """:func:`regional_attention_mask` for this layout, made once and reused while the layout stays the same
        (every sampling step of an image asks for the same one)."""
        key = (base_len, tuple(region_lens), grid_h, grid_w, n_other_image, str(device))
        hit = getattr(self, "_mask", None)
        if hit is None or hit[0] != key:
            inside = token_masks(self.regions, grid_h, grid_w, device)
            self._mask = hit = (key, regional_attention_mask(base_len, region_lens, inside, n_other_image))
        return hit[1]

    def __len__(self):
        return len(self.regions)

    def __iter__(self):
        return iter(self.regions)

    def __eq__(self, other):
        return self is other

    def __hash__(self):
        return id(self)


def make_region(context: torch.Tensor, mask: torch.Tensor, name: str, width: int) -> Region:
    """A checked :class:`Region`: ``context`` must be ``(1, seq, width)`` (the base prompt's width: the same text
    encoder), ``mask`` ``(H, W)`` or ``(1, H, W)`` covering something."""
    if context.ndim != 3 or context.shape[-1] != width:
        raise ConditioningError(f"Krea 2 regional prompt: {name} has conditioning of shape {tuple(context.shape)}, "
                                f"the base prompt's width is {width}. Encode every region's prompt with the same "
                                "Krea 2 text encoder as the base prompt.")
    if context.shape[0] != 1:
        context = context[:1]
    if mask.ndim == 3:
        mask = mask[0]
    if mask.ndim != 2:
        raise ConditioningError(f"Krea 2 regional prompt: the mask of {name} must be (height, width), got shape "
                                f"{tuple(mask.shape)}.")
    mask = mask.float().clamp(0, 1)
    if not bool((mask >= 0.5).any()):
        raise ConditioningError(f"Krea 2 regional prompt: the mask of {name} covers nothing (no pixel is at least "
                                "0.5). Paint the region white on black, or leave the region out.")
    return Region(context, mask, name)


def token_masks(regions, grid_h: int, grid_w: int, device) -> torch.Tensor:
    """``(R, grid_h * grid_w)`` bool: which target tokens each region holds (its mask area-resized to the token
    grid, inside at >= 0.5). A region that holds no token at this resolution is an error naming it."""
    out = []
    for r in regions:
        m = F.interpolate(r.mask.to(device=device, dtype=torch.float32)[None, None], size=(grid_h, grid_w),
                          mode="area")[0, 0]
        inside = (m >= 0.5).flatten()
        if not bool(inside.any()):
            raise ConditioningError(f"Krea 2 regional prompt: the mask of {r.name} covers no latent patch at "
                                    f"{grid_h * 16} x {grid_w * 16} px (it is smaller than one 16 px patch there). "
                                    "Make the region larger.")
        out.append(inside)
    return torch.stack(out)


def regional_attention_mask(base_len: int, region_lens, inside: torch.Tensor, n_other_image: int = 0
                            ) -> torch.Tensor:
    """The attention rule of the module docstring as ``(1, 1, L, L)`` bool (True = attend), queries by rows.

    ``base_len``: base text tokens; ``region_lens``: each region's text tokens; ``inside (R, n_target)`` bool:
    which target image tokens lie in each region; ``n_other_image``: image tokens after the target (references),
    which belong to no region. ``L = base_len + sum(region_lens) + n_target + n_other_image``."""
    R, n_target = inside.shape
    if len(region_lens) != R:
        raise ValueError("one text length per region")
    n_text = base_len + sum(region_lens)
    n_img = n_target + n_other_image
    L = n_text + n_img
    dev = inside.device
    m = torch.zeros(L, L, dtype=torch.bool, device=dev)
    img = slice(n_text, L)
    # base text and every image token: the base text and all image tokens
    for rows in (slice(0, base_len), img):
        m[rows, :base_len] = True
        m[rows, img] = True
    start = base_len
    for r, n in enumerate(region_lens):
        txt = slice(start, start + n)
        in_r = torch.zeros(n_img, dtype=torch.bool, device=dev)
        in_r[:n_target] = inside[r]
        m[txt, txt] = True                                   # region text: itself ...
        m[txt, img] = in_r                                   # ... and its region's image tokens
        m[n_text:, txt] = in_r[:, None]                      # image tokens inside region r: region r's text
        start += n
    return m[None, None]
