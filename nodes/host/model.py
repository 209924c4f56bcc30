"""Host adapter: a Krea 2 checkpoint -> a ComfyUI MODEL built the way core builds its own models.

A model config (``supported_models_base.BASE`` subclass), a ``BaseModel`` whose ``diffusion_model``
is our :class:`krea2_model.Krea2Transformer` built through ComfyUI's operations (manual cast, fp8
storage, scaled-fp8 / per-layer quantized files), and a ``ModelPatcher`` with ComfyUI's load and
offload devices, so low-VRAM partial loading, LoRA patching and unloading work as for core models.
"""

from __future__ import annotations

import inspect
import logging
import os

import torch

import comfy.latent_formats
import comfy.model_base
import comfy.model_management as mm
import comfy.model_patcher
import comfy.patcher_extension
import comfy.supported_models_base
import comfy.utils

from ...krea2_model import CanonicalCheckpoint, Krea2Config, Krea2FileError, Krea2Transformer
from ...krea2_model.formats.transformer_file import fix_shape
from .attention import host_attention, host_rope
from .patcher import patcher_class

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


class Krea2BaseModel(comfy.model_base.BaseModel):
    """Flow model (sigma in [0, 1], velocity) around our transformer; conditioning via ``c_crossattn``,
    reference images via ``reference_latents`` + ``reference_latents_method`` (core's ReferenceLatent and
    FluxKontextMultiReferenceLatentMethod), handed to the transformer as ``ref_latents`` /
    ``ref_latents_method`` the way core hands them to its native Krea 2."""

    def __init__(self, model_config, model_type=comfy.model_base.ModelType.FLUX, device=None):
        super().__init__(model_config, model_type, device=device, unet_model=_unet)
        # the sampler's memory estimate counts reference tokens too (see extra_conds_shapes)
        self.memory_usage_factor_conds = ("ref_latents",)

    def extra_conds(self, **kwargs):
        out = super().extra_conds(**kwargs)
        cross_attn = kwargs.get("cross_attn", None)
        if cross_attn is not None:
            out["c_crossattn"] = comfy.conds.CONDRegular(cross_attn)
        refs = kwargs.get("reference_latents", None)
        if refs:
            # without a method the transformer uses its default_ref_method (set by FluxKVCache), or ignores
            # them with a warning (HostKrea2Transformer.references_without_method)
            out["ref_latents"] = comfy.conds.CONDList([self.process_latent_in(r) for r in refs])
            method = kwargs.get("reference_latents_method", None)
            if method is not None:
                out["ref_latents_method"] = comfy.conds.CONDConstant(method)
        return out

    def extra_conds_shapes(self, **kwargs):
        """Reference latents as one ``[1, 16, elements / 16]`` shape, the form the host's memory estimate
        (``memory_required``) sums alongside the noise latent."""
        refs = kwargs.get("reference_latents", None)
        if not refs:
            return {}
        ch = self.latent_format.latent_channels
        return {"ref_latents": [1, ch, sum(r.numel() for r in refs) // ch]}


class Krea2ModelConfig(comfy.supported_models_base.BASE):
    unet_config = {"image_model": "krea2_pack"}
    unet_extra_config = {}
    sampling_settings = {"multiplier": 1.0, "shift": 1.15}  # Turbo's mu; Krea2ModelSampling sets Raw's
    latent_format = comfy.latent_formats.Wan21
    memory_usage_factor = 2.2
    supported_inference_dtypes = [torch.bfloat16, torch.float16, torch.float32]
    vae_key_prefix = ["vae."]
    text_encoder_key_prefix = ["text_encoders."]

    def model_type(self, state_dict, prefix=""):
        return comfy.model_base.ModelType.FLUX

    def inpaint_model(self):
        return False

    def get_model(self, state_dict, prefix="", device=None):
        return Krea2BaseModel(self, device=device)

    def clip_target(self, state_dict=None):
        return None


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


def _cfg_attr(cfg, name):
    """A model-config attribute without BASE.__getattr__'s warning when this host lacks it."""
    return cfg.__dict__.get(name, getattr(type(cfg), name, None))


def _read_canonical(ck: CanonicalCheckpoint):
    """Every tensor under canonical names, read with ComfyUI's own file loader (memory-mapped where the
    host supports it, like core's UNET loader), shard by shard for folders."""
    files = {}
    for name in list(ck.keymap.values()) + list(ck.aux.values()):
        files.setdefault(ck.src.file_of(name), []).append(name)
    raw, metadata = {}, ck.src.metadata or None
    pbar = comfy.utils.ProgressBar(len(files))
    for f in files:
        try:
            part = comfy.utils.load_torch_file(f, safe_load=True)
        except Exception as e:  # header was valid, data is not
            raise Krea2FileError(f"{f}: cannot read the tensors ({e}). The file is corrupt; download it again.") from None
        raw.update(part)
        pbar.update(1)
    sd = {c: fix_shape(c, raw.pop(s)) for c, s in ck.keymap.items()}
    sd.update({c: raw.pop(s) for c, s in ck.aux.items()})
    return sd, metadata


def load_model(path: str, weight_dtype: str = "default", model_options: dict | None = None):
    """Load a Krea 2 transformer file or diffusers folder into a ComfyUI ``ModelPatcher``."""
    from ...krea2_model.formats.gguf import is_gguf
    if is_gguf(path):  # weights stay quantized, dequantized at cast time: see nodes.host.gguf
        from .gguf import load_gguf_model
        return load_gguf_model(path, weight_dtype, model_options)
    opts = dict(model_options or {})
    opts.update(weight_dtype_options(weight_dtype))
    ck = CanonicalCheckpoint(path)          # validates layout, shapes, completeness (typed errors)
    ck.report_extra()
    sd, metadata = _read_canonical(ck)

    model_config = Krea2ModelConfig({"image_model": "krea2_pack", "krea2_config": ck.config.to_dict()})
    # ComfyUI's quantized formats: newer hosts convert scale_weight files and detect per-layer quant
    # configs; older ones use a scaled_fp8 marker on the model config.
    if hasattr(comfy.utils, "convert_old_quants"):
        sd, metadata = comfy.utils.convert_old_quants(sd, "", metadata=metadata)
        detect = getattr(comfy.utils, "detect_layer_quantization", None)
        quant = detect(sd, "") if detect is not None else None
        if quant:
            model_config.quant_config = quant
    elif "scaled_fp8" in sd:
        marker = sd.pop("scaled_fp8")
        model_config.scaled_fp8 = marker.dtype if marker.dtype != torch.float32 else torch.float8_e4m3fn
        model_config.optimizations["fp8"] = marker.nelement() != 2
    sd.pop("scaled_fp8", None)

    load_device = opts.get("load_device", mm.get_torch_device())
    offload_device = opts.get("offload_device", mm.unet_offload_device())
    parameters = comfy.utils.calculate_parameters(sd)
    quantized = _cfg_attr(model_config, "quant_config") is not None or \
        _cfg_attr(model_config, "scaled_fp8") is not None
    if opts.get("dtype") is None:
        weight_dtype_sd = None if quantized else comfy.utils.weight_dtype(sd)
        unet_dtype = mm.unet_dtype(model_params=parameters, supported_dtypes=model_config.supported_inference_dtypes,
                                   weight_dtype=weight_dtype_sd)
    else:
        unet_dtype = opts["dtype"]
    manual_cast = mm.unet_manual_cast(None if _cfg_attr(model_config, "quant_config") is not None else unet_dtype,
                                      load_device, model_config.supported_inference_dtypes)
    if _takes(model_config.set_inference_dtype, "device"):
        model_config.set_inference_dtype(unet_dtype, manual_cast, device=load_device)
    else:  # older hosts (0.3.6x): no device argument
        model_config.set_inference_dtype(unet_dtype, manual_cast)
    if opts.get("fp8_optimizations"):
        model_config.optimizations["fp8"] = True

    model = model_config.get_model(sd, "")
    patcher_cls = patcher_class(getattr(comfy.model_patcher, "CoreModelPatcher", comfy.model_patcher.ModelPatcher),
                                load_device)
    patcher = patcher_cls(model, load_device=load_device, offload_device=offload_device)
    if not mm.is_device_cpu(offload_device):
        model.to(offload_device)
    dynamic = getattr(patcher, "is_dynamic", lambda: False)()
    if _takes(model.load_model_weights, "assign"):
        model.load_model_weights(sd, "", assign=dynamic)
    else:  # older hosts: no assign argument (and no dynamic VRAM)
        model.load_model_weights(sd, "")
    del sd
    log.info("Krea 2: loaded %s (%s layout, hidden %d, %d blocks, weights %s, compute %s)", os.path.basename(path),
             ck.layout, ck.config.hidden, ck.config.layers, unet_dtype, manual_cast or unet_dtype)
    return patcher


def name_source(patcher, path: str):
    """``patcher`` with its transformer told which file it came from (named in its warnings, e.g. on NaN output)."""
    inner = getattr(getattr(patcher, "model", None), "diffusion_model", None)
    if isinstance(inner, Krea2Transformer):
        inner.source_name = path
    return patcher


def _takes(fn, name: str) -> bool:
    """Whether host function ``fn`` accepts keyword ``name``: host versions differ in signatures, and
    asking once is exact where retrying on TypeError would hide a TypeError raised inside the call."""
    params = inspect.signature(fn).parameters
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def is_krea2_model(model) -> bool:
    """True for our MODEL and for core's native Krea 2 MODEL (its own ``BaseModel`` class, where the host has one)."""
    from .internals import native_krea2_class
    inner = getattr(getattr(model, "model", None), "diffusion_model", None)
    if isinstance(inner, Krea2Transformer):
        return True
    native = native_krea2_class()
    return native is not None and isinstance(getattr(model, "model", None), native)
