"""Host adapter: Krea 2's reference sigma schedule as a ComfyUI ``model_sampling`` object."""

from __future__ import annotations

import logging

import comfy.model_sampling

from ...krea2_model import sampling

log = logging.getLogger("krea2")


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

    def set_target(self, variant: str, width: int, height: int, base_shift: float, max_shift: float) -> None:
        """The size (pixels) the schedule was made for; checked against the latent when sampling starts."""
        self.target = (variant, width, height, base_shift, max_shift)
        self.size_checked = False

    def noise_scaling(self, sigma, noise, latent_image, max_denoise=False):
        # The one call every sampler makes with the latent before the first step: the place to see the size
        # actually sampled. Raw's mu depends on it, so a setting for another size is worth a word (once).
        target = getattr(self, "target", None)
        if target is not None and not self.size_checked:
            self.size_checked = True
            warn_size_mismatch(target, latent_image.shape)
        return super().noise_scaling(sigma, noise, latent_image, max_denoise)


def warn_size_mismatch(target, latent_shape) -> bool:
    """Warn (and return True) when a Raw schedule set for one image size samples a latent of another
    (the latent is 1/8 of the pixel size: Wan 2.1 VAE)."""
    variant, width, height, base_shift, max_shift = target
    lat_h, lat_w = int(latent_shape[-2]), int(latent_shape[-1])
    px_w, px_h = lat_w * 8, lat_h * 8
    if variant != "raw" or sampling.image_tokens(px_w, px_h) == sampling.image_tokens(width, height):
        return False
    log.warning("Krea 2: Krea2ModelSampling is set for %dx%d (raw, mu %.3f) but the latent being sampled is %dx%d "
                "(mu %.3f fits it). Set its width and height to the latent's size for the reference schedule.",
                width, height, sampling.mu(width, height, "raw", base_shift, max_shift), px_w, px_h,
                sampling.mu(px_w, px_h, "raw", base_shift, max_shift))
    return True


def patch_model_sampling(model, variant: str, width: int, height: int, base_shift: float = sampling.BASE_SHIFT,
                         max_shift: float = sampling.MAX_SHIFT):
    """A clone of ``model`` sampled with Krea's schedule for ``variant`` at ``width`` x ``height``."""
    mu = sampling.mu(width, height, variant, base_shift, max_shift)
    ms = Krea2ModelSamplingObject(model.model.model_config)
    ms.set_parameters(shift=mu)
    ms.set_target(variant, width, height, base_shift, max_shift)
    m = model.clone()
    m.add_object_patch("model_sampling", ms)
    return m, mu
