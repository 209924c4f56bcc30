"""Host adapter: Krea 2's reference sigma schedule as a ComfyUI ``model_sampling`` object."""

from __future__ import annotations

import comfy.model_sampling

from ...krea2_model import sampling


#: Entries of the sigma table the ``simple`` scheduler picks from. The reference evaluates the shift at
#: t = 1 - i/steps; ``simple`` reads entry ``L - int(i * L / steps)``, which is that t exactly when steps
#: divides L. 3603600 = 2^4 3^2 5^2 7 11 13 is divided by 1-16, 20, 25, 28, 30, 40, 50, 52 (Raw's default),
#: 60, 100 and most other step counts; for the rest the t error is below 1/L = 3e-7 (core's 10000-entry table:
#: up to 1e-4, which moved the final latent by 2.5e-3 in a 6-step test). The table costs 14 MB.
TABLE = 3603600


class Krea2ModelSamplingObject(comfy.model_sampling.ModelSamplingFlux, comfy.model_sampling.CONST):
    """Flow sampling (sigma in [0, 1], velocity) with ``sigma(t) = e^mu / (e^mu + 1/t - 1)``; the
    ``simple`` scheduler over its table gives the reference pipeline's sigmas."""

    def set_parameters(self, shift=1.15, timesteps=TABLE):
        super().set_parameters(shift=shift, timesteps=timesteps)


def patch_model_sampling(model, variant: str, width: int, height: int, base_shift: float = sampling.BASE_SHIFT,
                         max_shift: float = sampling.MAX_SHIFT):
    """A clone of ``model`` sampled with Krea's schedule for ``variant`` at ``width`` x ``height``."""
    mu = sampling.mu(width, height, variant, base_shift, max_shift)
    ms = Krea2ModelSamplingObject(model.model.model_config)
    ms.set_parameters(shift=mu)
    m = model.clone()
    m.add_object_patch("model_sampling", ms)
    return m, mu
