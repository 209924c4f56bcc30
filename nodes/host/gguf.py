"""Host adapter: GGUF Krea 2 transformers and Qwen3-VL text encoders as ComfyUI MODEL / CLIP.

Block-quantized weights stay as their GGUF bytes (``krea2_model.formats.gguf``); the layers are the
host's own ``comfy.ops.manual_cast`` classes with one change: a layer holding GGUF blocks dequantizes
them at cast time, on the device and in the dtype of the input, and then runs the host's
``weight_function`` / ``bias_function`` hooks on the fresh compute copy, as ``comfy.ops`` does for any
cast weight. So ComfyUI's offloading and low-VRAM partial loading move the quantized bytes, and LoRA
patches (our cast-time ``Krea2ModelPatcher`` path, and ComfyUI's own ``LowVramPatch``) apply after
dequantization on every call; the stored bytes are never rewritten, so unpatching is exact.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F

import comfy.model_management as mm
import comfy.model_patcher
import comfy.ops
import comfy.sd
import comfy.supported_models_base
import comfy.utils

from ...krea2_model import CanonicalCheckpoint
from ...krea2_model.errors import Krea2Error, first_names
from ...krea2_model.formats.gguf import place_tensor
from ...krea2_model.formats.gguf_dequant import dequantize
from ...krea2_model.formats.gguf_ops import call_weight, gguf_linear
from ...krea2_model.formats.text_file import TextCheckpoint
from .model_config import Krea2ModelConfig, weight_dtype_options
from .patcher import Krea2ModelPatcher
from .weights import owner_of, slot, unfilled
from .compat import takes
from .internals import unload_patcher

log = logging.getLogger("krea2")

_run_every_op = getattr(comfy.ops, "run_every_op", None)


def _dequant_weight(m, x):
    raw = m.weight
    if raw.device != x.device:
        raw = raw.to(x.device, non_blocking=mm.device_supports_non_blocking(x.device))
    return dequantize(raw, m.gguf_qtype, m.gguf_shape, x.dtype)


def _bias(m, dtype, device):
    b = m.bias
    if b is None:
        return None
    fns = getattr(m, "bias_function", ())
    b = b.to(device=device, dtype=dtype, copy=bool(fns))
    for f in fns:
        b = f(b)
    return b


def _hooked(m, w):
    for f in getattr(m, "weight_function", ()):
        w = f(w)  # LoRA and other weight patches, on the dequantized compute copy
    return w


def host_gguf_ops(base=None):
    """An operations namespace: the host's ``base`` (default ``comfy.ops.manual_cast``) with GGUF-aware
    ``Linear`` and ``Embedding`` (``gguf_capable``; see the module docstring)."""
    base = base or comfy.ops.manual_cast
    cached = _OPS.get(base)
    if cached is not None:
        return cached

    class Linear(base.Linear):
        gguf_capable = True
        gguf_qtype = None
        gguf_shape = None

        def forward(self, *args, **kwargs):
            if self.gguf_qtype is None:
                return super().forward(*args, **kwargs)
            if _run_every_op is not None:
                _run_every_op()
            x = args[0]
            w = call_weight(self, x)  # generation's per-call copy (hooks already applied), else cast now
            if w is None and x.device.type == "cpu" and not getattr(self, "weight_function", None):
                return gguf_linear(self, x, _bias(self, x.dtype, x.device))  # no patches: banded for few rows
            if w is None:
                w = _hooked(self, _dequant_weight(self, x))
            return F.linear(x, w, _bias(self, x.dtype, x.device))

        def krea2_weight(self, device, dtype):
            """The compute weight as :meth:`forward` makes it: dequantized, then the weight patches."""
            return _hooked(self, _dequant_weight(self, torch.empty(0, dtype=dtype, device=device)))

    class Embedding(base.Embedding):
        gguf_capable = True
        gguf_qtype = None
        gguf_shape = None

        def forward(self, ids, out_dtype=None, **kwargs):
            if self.gguf_qtype is None:
                return super().forward(ids, **({"out_dtype": out_dtype} if out_dtype is not None else {}), **kwargs)
            if getattr(self, "weight_function", None):
                # a patched embedding: dequantize the whole table, patch it, then look up
                w = _hooked(self, dequantize(self.weight.to(ids.device), self.gguf_qtype, self.gguf_shape))
                return F.embedding(ids, w).to(out_dtype or torch.float32)
            flat = ids.reshape(-1).to(self.weight.device)
            rows = self.weight.index_select(0, flat).to(ids.device)
            out = dequantize(rows, self.gguf_qtype, (flat.numel(), self.gguf_shape[1]), out_dtype or torch.float32)
            return out.reshape(*ids.shape, self.gguf_shape[1])

    ns = type("GGUF" + base.__name__, (base,), {"gguf_capable": True, "Linear": Linear, "Embedding": Embedding})
    _OPS[base] = ns
    return ns


_OPS: dict = {}


class Krea2GGUFPatcher(Krea2ModelPatcher):
    """:class:`Krea2ModelPatcher` that applies every Linear weight patch at cast time whatever the devices:
    a GGUF weight's stored bytes cannot take a patch, so ComfyUI's patch-and-backup is never used for them.

    Saving (core's ModelSave / CheckpointSave) is refused with :class:`Krea2Error`: the stored weights are packed
    blocks, which the host would write as ``weight`` tensors, and a LoRA lives only at cast time, so it would be
    lost. Hosts reach the save two ways: 0.3.6x loads with ``force_patch_weights`` and reads the model's state
    dict; 0.33 calls the patcher's ``state_dict_for_saving``. Both stop here."""

    def _krea2_cast_time(self) -> bool:
        return True

    #: what is refused, in the message: (the thing, core's save nodes, our loader of its safetensors, what goes on)
    _krea2_saved = ("a GGUF Krea 2 MODEL", "ModelSave / CheckpointSave", "the model with Krea2ModelLoader",
                    "the GGUF MODEL samples as usual")

    def _krea2_source(self) -> str:
        inner = getattr(self.model, "diffusion_model", None)
        return os.path.basename(getattr(inner, "source_name", None) or "") or "this GGUF model"

    def _krea2_refuse_save(self):
        what, nodes, loader, still = self._krea2_saved
        raise Krea2Error(
            f"{self._krea2_source()}: {what} cannot be saved ({nodes}): its weights are packed quantized blocks, which "
            "would be written as if they were weights, and a LoRA on it is applied at run time only, so it would be "
            f"lost. To save it (a LoRA baked in), load the safetensors release of {loader} and save that; {still}.")

    def load(self, device_to=None, lowvram_model_memory=0, force_patch_weights=False, *args, **kwargs):
        if force_patch_weights:  # only checkpoint saving (and LoRA extraction) asks for weights with patches written in
            self._krea2_refuse_save()
        return super().load(device_to, lowvram_model_memory, force_patch_weights, *args, **kwargs)

    def partially_load(self, device_to, extra_memory=0, force_patch_weights=False, *args, **kwargs):
        if force_patch_weights:
            self._krea2_refuse_save()
        return super().partially_load(device_to, extra_memory, force_patch_weights, *args, **kwargs)

    def state_dict_for_saving(self, *args, **kwargs):
        self._krea2_refuse_save()

    def model_state_dict_for_saving(self, *args, **kwargs):
        self._krea2_refuse_save()


class Krea2GGUFClipPatcher(Krea2GGUFPatcher):
    """The patcher of a CLIP (text encoder) loaded from a GGUF file: weight patches (core's LoRA loaders and
    ``add_patches``) at cast time, on the dequantized copy, as for the GGUF MODEL. Core's own CLIP patcher would
    try to merge them into the packed bytes, find the shapes different and drop them with a log line only."""

    _krea2_saved = ("a CLIP loaded from a GGUF file", "CLIPSave / CheckpointSave",
                    "the text encoder with Krea2TextEncoderLoader", "the GGUF CLIP encodes and generates as usual")

    def _krea2_source(self) -> str:
        return os.path.basename(getattr(self, "krea2_source", None) or "") or "this GGUF text encoder"


def _gguf_clip_patcher(clip, source: str) -> Krea2GGUFClipPatcher:
    """A :class:`Krea2GGUFClipPatcher` in place of the patcher core's CLIP made, with the same devices and the
    settings core gives a CLIP's patcher (float32 compute, the minimum-VRAM hook mode, ``is_clip``)."""
    old = clip.patcher
    new = Krea2GGUFClipPatcher(clip.cond_stage_model, load_device=old.load_device, offload_device=old.offload_device)
    if hasattr(new, "set_model_compute_dtype") and getattr(old, "model_compute_dtype", None) is not None:
        new.set_model_compute_dtype(old.model_compute_dtype)
    for attr in ("hook_mode", "is_clip"):
        if hasattr(old, attr):
            setattr(new, attr, getattr(old, attr))
    new.krea2_source = source
    if unload_patcher(old):  # core loaded it at once (text encoder's initial device = load device): load ours so
        mm.load_models_gpu([new], force_full_load=True)
    return new


def place_all(model: torch.nn.Module, ck, what: str) -> int:
    """Every tensor of GGUF checkpoint ``ck`` into ``model``, which the host may have built lazily (no
    parameter exists yet under dynamic VRAM: see :mod:`nodes.host.weights`): each one created here, packed
    blocks as they are, the rest in the dtype its layer was built for (norm scales float32), on the device its
    layer was built on (the CPU for a lazy one). Returns how many stayed packed."""
    packed = 0
    pbar = comfy.utils.ProgressBar(len(ck.keys()))
    for k in ck.keys():
        try:
            mod, _, name = owner_of(model, k)
        except AttributeError:
            raise Krea2Error(f"{ck.where}: {what} tensor {k!r} has no place in the model.") from None
        dtype, device, _lazy = slot(mod, name)
        target = torch.float32 if k.endswith(".scale") else dtype
        packed += place_tensor(model, k, ck.src.packed(ck.keymap[k]), ck.shape(k), target, device, ck.where)
        pbar.update(1)
    empty = unfilled(model)
    if empty:
        raise Krea2Error(f"{ck.where}: the {what} was left with parameters that no tensor filled: "
                         f"{first_names(empty)}. The file is incomplete for this model.")
    return packed


def load_gguf_model(path: str, weight_dtype: str = "default", model_options: dict | None = None):
    """A Krea 2 transformer GGUF -> ComfyUI ``ModelPatcher`` with block-quantized weights kept packed."""
    opts = dict(model_options or {})
    if weight_dtype != "default":
        weight_dtype_options(weight_dtype)  # validates the name
        log.warning("Krea 2: weight_dtype %s is not used for %s: GGUF weights stay in the file's quantized types "
                    "(dequantized per layer at run time).", weight_dtype, os.path.basename(path))
    ck = CanonicalCheckpoint(path)  # GGUF: reads the header and checks names and shapes (typed errors)
    ck.report_extra()
    model_config = Krea2ModelConfig({"image_model": "krea2_pack", "krea2_config": ck.config.to_dict()})
    load_device = opts.get("load_device", mm.get_torch_device())
    offload_device = opts.get("offload_device", mm.unet_offload_device())
    n_params = sum(int(torch.Size(ck.shape(k)).numel()) for k in ck.keys())
    unet_dtype = mm.unet_dtype(model_params=n_params, supported_dtypes=model_config.supported_inference_dtypes)
    manual_cast = mm.unet_manual_cast(unet_dtype, load_device, model_config.supported_inference_dtypes)
    if takes(model_config.set_inference_dtype, "device"):
        model_config.set_inference_dtype(unet_dtype, manual_cast, device=load_device)
    else:
        model_config.set_inference_dtype(unet_dtype, manual_cast)
    model_config.custom_operations = host_gguf_ops(comfy.ops.manual_cast)
    model = model_config.get_model({}, "")
    packed = place_all(model.diffusion_model, ck, "transformer")
    patcher = Krea2GGUFPatcher(model, load_device=load_device, offload_device=offload_device)
    if not mm.is_device_cpu(offload_device):
        model.to(offload_device)
    log.info("Krea 2: loaded %s (GGUF, hidden %d, %d blocks, %d of %d tensors kept quantized, compute %s)",
             os.path.basename(path), ck.config.hidden, ck.config.layers, packed, len(ck.keys()),
             manual_cast or unet_dtype)
    return patcher


def load_gguf_clip(ck: TextCheckpoint, target, n_params: int):
    """A Qwen3-VL text-model GGUF (its :class:`TextCheckpoint`) -> ComfyUI CLIP built from ``target`` (the
    ``ClipTarget`` ``nodes.host.clip.load_clip`` makes), block-quantized weights kept packed."""
    path = ck.where
    kwargs = {"disable_dynamic": True} if takes(comfy.sd.CLIP.__init__, "disable_dynamic") else {}
    clip = comfy.sd.CLIP(target=target, embedding_directory=None, tokenizer_data={}, parameters=n_params,
                         model_options={"custom_operations": host_gguf_ops(comfy.ops.manual_cast)}, **kwargs)
    packed = place_all(clip.cond_stage_model.transformer, ck, "text encoder")
    clip.patcher = _gguf_clip_patcher(clip, path)
    log.info("Krea 2: text encoder %s (GGUF, %d layers, hidden %d, %d of %d tensors kept quantized)",
             os.path.basename(path), ck.config.layers, ck.config.hidden, packed, len(ck.keys()))
    return clip
