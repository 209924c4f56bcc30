"""Host adapter: our transformer as a ComfyUI model class, the way core declares its own models.

A model config (``supported_models_base.BASE`` subclass), a ``BaseModel`` whose ``diffusion_model`` is our
:class:`krea2_model.Krea2Transformer` built through ComfyUI's operations and run through the host's wrapper
chain, and the ``weight_dtype`` options of the loader nodes. The loaders that fill them are
:mod:`nodes.host.model` (safetensors, folders) and :mod:`nodes.host.gguf` (GGUF); both import this module.
"""

from __future__ import annotations

import logging

import torch

import comfy.latent_formats
import comfy.model_base
import comfy.patcher_extension
import comfy.supported_models_base

from ...krea2_model import Krea2Config, Krea2Transformer
from ...krea2_model.sampling import TURBO_MU
from .attention import host_attention, host_rope

log = logging.getLogger("krea2")

WEIGHT_DTYPES = ["default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2"]


class HostKrea2Transformer(Krea2Transformer):
    """Our transformer as the host's diffusion model: ``forward`` runs ``_forward`` through ComfyUI's
    DIFFUSION_MODEL wrapper chain (EasyCache, FluxKVCache, community wrappers), with native Krea 2's
    argument order ``(x, timesteps, context, attention_mask, ref_latents, transformer_options, **kwargs)``:
    wrappers read ``x`` first and ``transformer_options`` last. Every other host hook (patches, block
    replacement, references) is plain data in ``transformer_options`` / kwargs, read by ``_forward``. Every
    layer attends with the host's attention choice and overrides (:mod:`nodes.host.attention`)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.attention_backend = host_attention
        self.rope_backend = host_rope

    def forward(self, x, timesteps, context, attention_mask=None, ref_latents=None, transformer_options=None,
                **kwargs):
        opts = {} if transformer_options is None else transformer_options
        ext = comfy.patcher_extension
        wrappers = ext.get_all_wrappers(ext.WrappersMP.DIFFUSION_MODEL, opts)
        run = ext.WrapperExecutor.new_class_executor(self._forward, self, wrappers)
        return self.check_finite(run.execute(x, timesteps, context, attention_mask, ref_latents, opts, **kwargs), opts)

    def references_without_method(self, ref_latents) -> None:
        # Native Krea 2 has no default method and ignores such references; so do we, but say so, once per model.
        if not getattr(self, "_warned_no_method", False):
            self._warned_no_method = True
            log.warning("Krea 2: %d reference latent(s) in the conditioning are ignored: Krea 2 needs a reference "
                        "method. Add FluxKontextMultiReferenceLatentMethod after ReferenceLatent "
                        "(index_timestep_zero for style references, index for identity edits).", len(ref_latents))


def _unet(krea2_config: dict, dtype=None, device=None, operations=None, **_ignored):
    """What ``BaseModel`` calls as ``unet_model(**unet_config, device=..., operations=...)``."""
    return HostKrea2Transformer(Krea2Config(**krea2_config), dtype=dtype, device=device, operations=operations)


def _latents(model, refs):
    return comfy.conds.CONDList([model.process_latent_in(r) for r in refs]) if refs else None


def _constant(model, value):
    return comfy.conds.CONDConstant(value)


#: What our transformer's forward reads from the sampler, one row per input: ``(the key the host's conditioning
#: gives, the forward's keyword, how the value is wrapped for batching, the key it needs beside it)``. The prompt
#: (``c_crossattn``, batched row by row), the reference latents (``ref_latents``, in the model's latent space, one
#: list per conditioning) and their method (``ref_latents_method``, only beside references: without a method the
#: transformer uses its ``default_ref_method``, set by FluxKVCache, or ignores them with a warning), the regional
#: prompts (``krea2_regions``: compared by identity, so batched only with the same regions).
CONDITIONING = (
    ("cross_attn", "c_crossattn", lambda model, v: comfy.conds.CONDRegular(v), None),
    ("reference_latents", "ref_latents", _latents, None),
    ("reference_latents_method", "ref_latents_method", _constant, "reference_latents"),
    ("krea2_regions", "krea2_regions", _constant, None),
)


class Krea2BaseModel(comfy.model_base.BaseModel):
    """Flow model (sigma in [0, 1], velocity) around our transformer; its inputs from the conditioning as
    :data:`CONDITIONING` lists them (core's ReferenceLatent and FluxKontextMultiReferenceLatentMethod feed the
    reference rows, Krea2RegionalPrompt the regions)."""

    def __init__(self, model_config, model_type=comfy.model_base.ModelType.FLUX, device=None):
        super().__init__(model_config, model_type, device=device, unet_model=_unet)
        # the sampler's memory estimate counts reference tokens too (see extra_conds_shapes)
        self.memory_usage_factor_conds = ("ref_latents",)

    def extra_conds(self, **kwargs):
        out = super().extra_conds(**kwargs)
        for given, name, wrap, needs in CONDITIONING:
            value = kwargs.get(given)
            if value is None or (needs is not None and not kwargs.get(needs)):
                continue
            cond = wrap(self, value)
            if cond is not None:
                out[name] = cond
        return out

    def extra_conds_shapes(self, **kwargs):
        """The reference tokens as a latent-shaped extra for the host's memory estimate (``memory_required`` sums
        these alongside the noise latent): all references' elements as one ``[1, channels, n]``."""
        refs = kwargs.get("reference_latents")
        if not refs:
            return {}
        channels = self.latent_format.latent_channels
        return {"ref_latents": [1, channels, sum(r.numel() for r in refs) // channels]}


class Krea2ModelConfig(comfy.supported_models_base.BASE):
    """How the host sees our model. Each value from Krea 2 itself: the latents are the Wan 2.1 VAE's; a flow model
    whose default shift is Turbo's ``mu`` (``Krea2ModelSampling`` sets Raw's resolution-aware one); activations in
    bf16, fp16 or fp32; the memory factor core gives the same 12.9B model (it sizes the same activations); the key
    prefixes of a single-file checkpoint. ``image_model`` names our pack's model, never core's ``krea2`` (the host
    must not build its own for our files)."""

    unet_config = {"image_model": "krea2_pack"}
    unet_extra_config = {}
    latent_format = comfy.latent_formats.Wan21
    sampling_settings = {"multiplier": 1.0, "shift": TURBO_MU}
    supported_inference_dtypes = [torch.bfloat16, torch.float16, torch.float32]
    memory_usage_factor = 2.2
    vae_key_prefix = ["vae."]
    text_encoder_key_prefix = ["text_encoders."]

    def model_type(self, state_dict, prefix=""):
        return comfy.model_base.ModelType.FLUX

    def inpaint_model(self):
        return False

    def get_model(self, state_dict, prefix="", device=None):
        return Krea2BaseModel(self, device=device)

    def clip_target(self, state_dict=None):
        return None  # the text encoder comes from Krea2TextEncoderLoader


import comfy.conds  # noqa: E402  (after comfy.model_base, as core does)


def weight_dtype_options(weight_dtype: str) -> dict:
    opts = {}
    if weight_dtype in ("fp8_e4m3fn", "fp8_e4m3fn_fast"):
        opts["dtype"] = torch.float8_e4m3fn
        opts["fp8_optimizations"] = weight_dtype == "fp8_e4m3fn_fast"
    elif weight_dtype == "fp8_e5m2":
        opts["dtype"] = torch.float8_e5m2
    elif weight_dtype != "default":
        raise ValueError(f"weight_dtype must be one of {WEIGHT_DTYPES}, got {weight_dtype!r}")
    return opts
