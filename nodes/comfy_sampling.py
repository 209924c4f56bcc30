"""Host adapter: Krea 2's reference sigma schedule as a ComfyUI ``model_sampling`` object."""

from __future__ import annotations

import comfy.model_sampling

from ..krea2_model import sampling


class Krea2ModelSamplingObject(comfy.model_sampling.ModelSamplingFlux, comfy.model_sampling.CONST):
    """Flow sampling (sigma in [0, 1], velocity) with ``sigma(t) = e^mu / (e^mu + 1/t - 1)``; the
    ``simple`` scheduler over its 10000-entry table gives the reference pipeline's sigmas."""


def patch_model_sampling(model, variant: str, width: int, height: int, base_shift: float = sampling.BASE_SHIFT,
                         max_shift: float = sampling.MAX_SHIFT):
    """A clone of ``model`` sampled with Krea's schedule for ``variant`` at ``width`` x ``height``."""
    mu = sampling.mu(width, height, variant, base_shift, max_shift)
    ms = Krea2ModelSamplingObject(model.model.model_config)
    ms.set_parameters(shift=mu)
    m = model.clone()
    m.add_object_patch("model_sampling", ms)
    return m, mu
