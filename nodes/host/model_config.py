"""Host adapter: our transformer as a ComfyUI model class, the way core declares its own models.

A model config (``supported_models_base.BASE`` subclass), a ``BaseModel`` whose ``diffusion_model`` is our
:class:`krea2_model.Krea2Transformer` built through ComfyUI's operations and run through the host's wrapper
chain, with the conditioning it reads in one table (:data:`INPUTS`), and the ``weight_dtype`` options of the
loader nodes. The loaders that fill them are
:mod:`nodes.host.model` (safetensors, folders) and :mod:`nodes.host.gguf` (GGUF); both import this module.
"""

from __future__ import annotations

import logging
from typing import Callable, NamedTuple

import torch

import comfy.latent_formats
import comfy.model_base
import comfy.conds  # (after comfy.model_base, which imports it)
import comfy.patcher_extension
import comfy.supported_models_base

from ...krea2_model import Krea2Config, Krea2Transformer, sampling
from . import regions
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


def _given(value) -> bool:
    """A conditioning entry that is there: set, and not an empty list (of reference latents)."""
    return value is not None and not (isinstance(value, list) and not value)


class _Input(NamedTuple):
    """One input of our transformer's forward that comes from the conditioning."""
    name: str                  # the forward's keyword (BaseModel passes each ``extra_conds`` entry by name)
    source: str                # the key the host's conditioning nodes set
    wrap: Callable             # (model, value) -> the comfy.conds object that batches it
    needs: str | None = None   # made only when this other source is there too
    tokens: Callable | None = None  # (model, value) -> the extra tokens, for the host's memory estimate


def _reference_tokens(model, refs) -> list:
    # the sampler's memory estimate (BaseModel.memory_required) counts each shape it gets like the noise
    # latent's: one sample of the latent channels, here holding every reference latent's elements
    ch = model.latent_format.latent_channels
    return [1, ch, sum(r.numel() for r in refs) // ch]


#: What the forward reads from the conditioning (``_forward(x, sigma, context, ..., ref_latents,
#: ref_latents_method, krea2_regions)``; ``c_crossattn`` arrives as ``context``), each made from what the
#: host's nodes leave in it:
INPUTS = (
    # the prompt; batched only with prompts of the same length: the host's own CONDCrossAttn would repeat a
    # shorter prompt's tokens to a common length, which in one joint attention changes the image
    _Input("c_crossattn", "cross_attn", lambda m, v: comfy.conds.CONDRegular(v)),
    # core's ReferenceLatent; in the model's latent space, as the noise latent is
    _Input("ref_latents", "reference_latents",
           lambda m, v: comfy.conds.CONDList([m.process_latent_in(r) for r in v]), tokens=_reference_tokens),
    # FluxKontextMultiReferenceLatentMethod; without one, references follow default_ref_method (FluxKVCache
    # sets it) or are ignored with a warning (HostKrea2Transformer.references_without_method)
    _Input("ref_latents_method", "reference_latents_method", lambda m, v: comfy.conds.CONDConstant(v),
           needs="reference_latents"),
    # Krea2RegionalPrompt: compared by identity, so batched only with the same regions
    _Input(regions.KEY, regions.KEY, lambda m, v: comfy.conds.CONDConstant(v)),
)


class Krea2BaseModel(comfy.model_base.BaseModel):
    """Flow model (sigma in [0, 1], velocity) around our transformer. The conditioning is turned into the
    forward's inputs by :data:`INPUTS`: the prompt, reference latents and their method (core's ReferenceLatent
    and FluxKontextMultiReferenceLatentMethod, which native Krea 2 reads too), regional prompts."""

    def __init__(self, model_config, model_type=comfy.model_base.ModelType.FLUX, device=None):
        super().__init__(model_config, model_type, device=device, unet_model=_unet)
        self.memory_usage_factor_conds = tuple(i.name for i in INPUTS if i.tokens is not None)

    def extra_conds(self, **kwargs):
        # the entries the host makes for every model first (a noise concat, a ControlNet's prompt), as it makes
        # them; then ours, whose prompt entry replaces the host's
        out = super().extra_conds(**kwargs)
        for i in INPUTS:
            if _given(kwargs.get(i.source)) and (i.needs is None or _given(kwargs.get(i.needs))):
                out[i.name] = i.wrap(self, kwargs[i.source])
        return out

    def extra_conds_shapes(self, **kwargs):
        """The extra tokens conditioning adds (reference latents), as shapes the host's memory estimate sums
        alongside the noise latent's."""
        return {i.name: i.tokens(self, kwargs[i.source]) for i in INPUTS
                if i.tokens is not None and _given(kwargs.get(i.source))}


class Krea2ModelConfig(comfy.supported_models_base.BASE):
    """How the host sees our model. Only our loaders make it, from the file's own config (``unet_config =
    {"image_model": "krea2_pack", "krea2_config": ...}``); no core detection ever matches ``krea2_pack``."""
    unet_config = {"image_model": "krea2_pack"}
    unet_extra_config = {}  # (BASE adds UNet keys our constructor does not take)
    # the model's conventions (docs/architecture.md): sigma in [0, 1], Qwen-Image VAE latents; the default
    # shift is Turbo's mu, which Krea2ModelSampling replaces (Raw's depends on the image size)
    sampling_settings = {"multiplier": 1.0, "shift": sampling.TURBO_MU}
    latent_format = comfy.latent_formats.Wan21
    # compute dtypes the transformer runs in, preferred first
    supported_inference_dtypes = [torch.bfloat16, torch.float16, torch.float32]
    # the host plans memory for our MODEL as for native Krea 2's (same architecture, same activations; the
    # host tier checks that both estimates agree)
    memory_usage_factor = 2.2
    # where a saved checkpoint (CheckpointSave) puts the VAE and text encoder: the prefixes native Krea 2
    # checkpoints use, so such a file loads in core too
    vae_key_prefix = ["vae."]
    text_encoder_key_prefix = ["text_encoders."]

    def model_type(self, state_dict, prefix=""):
        return comfy.model_base.ModelType.FLUX  # flow matching with a velocity output (the CONST sampling)

    def inpaint_model(self):
        return False  # no concat channels (BASE would read a UNet's in_channels)

    def get_model(self, state_dict, prefix="", device=None):
        return Krea2BaseModel(self, device=device)

    def clip_target(self, state_dict=None):
        return None  # the text encoder always comes from its own loader, never from the model file


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
