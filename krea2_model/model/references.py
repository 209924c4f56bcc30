"""Reference latents: Krea 2's image prompts as extra tokens after the target.

The sequence is ``[text | target | ref_1 .. ref_N]``; reference i is patchified on its own grid and sits at RoPE
positions ``(i, row, col)`` (:mod:`.positions`). ``ref_latents_method`` is one of :data:`REF_METHODS` (ComfyUI's
FluxKontextMultiReferenceLatentMethod): all of them place the references so, and "index_timestep_zero" also
modulates the reference tokens with t = 0 in every block. Only the target is returned by the forward.
"""

from __future__ import annotations

import logging

import torch

from ..errors import ConditioningError

log = logging.getLogger("krea2")

#: ``reference_latents_method`` values (ComfyUI's FluxKontextMultiReferenceLatentMethod). All of them give
#: reference i the positions (i, row, col); "index_timestep_zero" also modulates reference tokens with t = 0.
REF_METHODS = ("index", "offset", "uxo", "index_timestep_zero")


def warn_placement(method, last_warned):
    """One warning for a method Krea 2 places as "index" ("offset", "uxo", or an unknown one), unless it is
    ``last_warned`` (the model remembers the last one: once, not at every step). Returns the method to remember."""
    if method in ("index", "index_timestep_zero") or method == last_warned:
        return last_warned
    if method in REF_METHODS:  # "offset", "uxo"
        log.warning("Krea 2: ref_latents_method %r places the references as 'index' does (reference i "
                    "at positions (i, row, col)), as native ComfyUI Krea 2 does: Krea 2 has no placement "
                    "of its own for %r.", method, method)
    else:
        log.warning("Krea 2: unknown ref_latents_method %r; references are placed as 'index' (one of %s "
                    "was expected)", method, ", ".join(REF_METHODS))
    return method


def without_method(ref_latents) -> ConditioningError:
    """The error for reference latents given with no method and no default."""
    return ConditioningError(
        f"{len(ref_latents)} reference latent(s) given without ref_latents_method; give one of "
        f"{', '.join(REF_METHODS)} (ComfyUI: FluxKontextMultiReferenceLatentMethod).")


def reference_tokens(patchify, channels: int, ref_latents, batch: int):
    """Reference latents -> ``(tokens (batch, n, C*p*p), [(gh, gw), ...])``, every reference patchified (by
    ``patchify(latent, what)``) on its own grid and repeated (or cut) to ``batch``. A reference is
    ``(b, C, H, W)`` or ``(b, C, T, H, W)`` (T frames, each one image); any size."""
    tokens, grids = [], []
    for i, ref in enumerate(ref_latents, 1):
        what = f"reference latent {i} of {len(ref_latents)}"
        if ref.ndim not in (4, 5) or ref.shape[1] != channels:
            raise ConditioningError(f"Krea 2 {what} must have {channels} channels (Wan21 latent format, "
                                    f"(batch, {channels}, height, width) or (batch, {channels}, frames, "
                                    f"height, width)), got shape {tuple(ref.shape)}. Encode the reference image "
                                    "with the Qwen-Image / Wan 2.1 VAE.")
        if ref.ndim == 5:
            ref = ref.transpose(1, 2).flatten(0, 1)
        if ref.shape[0] != batch:
            if ref.shape[0] > batch:
                ref = ref[:batch]
            else:
                ref = ref.repeat(-(-batch // ref.shape[0]), 1, 1, 1)[:batch]
        tok, gh, gw = patchify(ref, what)
        tokens.append(tok)
        grids.append((gh, gw))
    return torch.cat(tokens, dim=1), grids
