"""Host adapter: a Krea 2 checkpoint -> a ComfyUI MODEL built the way core builds its own models.

The model class (:mod:`nodes.host.model_config`) built through ComfyUI's operations (manual cast, fp8
storage, scaled-fp8 / per-layer quantized files) and filled by the host's own file loader, and a
``ModelPatcher`` with ComfyUI's load and offload devices, so low-VRAM partial loading, LoRA patching and
unloading work as for core models. GGUF files go to :mod:`nodes.host.gguf`.
"""

from __future__ import annotations

import logging
import os

import torch

import comfy.model_management as mm
import comfy.model_patcher
import comfy.utils

from ...krea2_model import CanonicalCheckpoint, Krea2Transformer
from ...krea2_model.errors import read_error
from ...krea2_model.formats.transformer_file import fix_shape
from .model_config import WEIGHT_DTYPES, Krea2ModelConfig, weight_dtype_options  # noqa: F401
from .patcher import patcher_class
from .compat import takes
from .weights import settle_dtypes

log = logging.getLogger("krea2")


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
        except Exception as e:  # the header was valid: say what actually went wrong
            raise read_error(f, e) from e
        raw.update(part)
        pbar.update(1)
    sd = {c: fix_shape(c, raw.pop(s)) for c, s in ck.keymap.items()}
    sd.update({c: raw.pop(s) for c, s in ck.aux.items()})
    return sd, metadata


def load_model(path: str, weight_dtype: str = "default", model_options: dict | None = None,
               disable_dynamic: bool = False):
    """Load a Krea 2 transformer file or diffusers folder into a ComfyUI ``ModelPatcher``.

    ``disable_dynamic``: a plain (not dynamic-VRAM) patcher, what the host asks for through
    ``cached_patcher_init`` when a node needs one (TorchCompileModel, hooks, multi-GPU clones)."""
    patcher = _load_model(path, weight_dtype, model_options, disable_dynamic)
    # the host rebuilds a MODEL from this factory when it needs a non-dynamic or a per-device copy of it
    patcher.cached_patcher_init = (load_model, (path, weight_dtype, model_options))
    return patcher


def _load_model(path, weight_dtype, model_options, disable_dynamic):
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
    if takes(model_config.set_inference_dtype, "device"):
        model_config.set_inference_dtype(unet_dtype, manual_cast, device=load_device)
    else:  # older hosts (0.3.6x): no device argument
        model_config.set_inference_dtype(unet_dtype, manual_cast)
    if opts.get("fp8_optimizations"):
        model_config.optimizations["fp8"] = True

    model = model_config.get_model(sd, "")
    core_cls = comfy.model_patcher.ModelPatcher if disable_dynamic else \
        getattr(comfy.model_patcher, "CoreModelPatcher", comfy.model_patcher.ModelPatcher)
    patcher_cls = patcher_class(core_cls, load_device)
    patcher = patcher_cls(model, load_device=load_device, offload_device=offload_device)
    if not mm.is_device_cpu(offload_device):
        model.to(offload_device)
    dynamic = getattr(patcher, "is_dynamic", lambda: False)()
    if takes(model.load_model_weights, "assign"):
        model.load_model_weights(sd, "", assign=dynamic)
    else:  # older hosts: no assign argument (and no dynamic VRAM)
        model.load_model_weights(sd, "")
    del sd
    settle_dtypes(model.diffusion_model)  # lazily built layers: the weight_dtype the user chose (see weights.py)
    log.info("Krea 2: loaded %s (%s layout, hidden %d, %d blocks, weights %s, compute %s)", os.path.basename(path),
             ck.layout, ck.config.hidden, ck.config.layers, unet_dtype, manual_cast or unet_dtype)
    return patcher




def name_source(patcher, path: str):
    """``patcher`` with its transformer told which file it came from (named in its warnings, e.g. on NaN output)."""
    inner = getattr(getattr(patcher, "model", None), "diffusion_model", None)
    if isinstance(inner, Krea2Transformer):
        inner.source_name = path
    return patcher


def is_krea2_model(model) -> bool:
    """True for our MODEL and for core's native Krea 2 MODEL (its own ``BaseModel`` class, where the host has one)."""
    from .internals import native_krea2_class
    inner = getattr(getattr(model, "model", None), "diffusion_model", None)
    if isinstance(inner, Krea2Transformer):
        return True
    native = native_krea2_class()
    return native is not None and isinstance(getattr(model, "model", None), native)
