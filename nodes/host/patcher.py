"""The ModelPatcher our Krea 2 MODEL uses: weight patches without a second copy of the model.

ComfyUI's ``ModelPatcher`` applies a LoRA (or any ``add_patches`` patch) on load by writing a patched
copy of every patched weight and keeping the original in ``patcher.backup`` for unpatching. When the
model's load device is a different device than its offload device (the usual GPU set-up), the
originals stay where they already were (system RAM) and the patched copies take their place on the
GPU, so nothing is held twice. When both devices are the same (``--cpu``, ``--gpu-only``,
``--highvram``), the backup and the patched copy sit side by side: about 2x the model while a LoRA
is loaded, which is how an fp8 model plus LoRA runs out of memory.

``Krea2ModelPatcher`` changes only that case: when load device == offload device, a patched weight
of a module that ComfyUI casts per call (``comfy.ops`` layers, which have ``weight_function``) is not
rewritten; instead the module gets ComfyUI's own ``LowVramPatch`` for that key, the same object
ComfyUI's low-VRAM mode installs, so the patch is applied to the freshly cast compute copy on every
call. The stored weights are never touched (unpatching is exact by construction, and there is no
backup), the patches stay in ``patcher.patches`` (so stacking, merging and hooks see them), and a
load with ``force_patch_weights`` (checkpoint saving) still bakes them in the ordinary way. Quantized
and scaled-fp8 weights are covered too: the patch keeps the host's convert / set functions, as core's
low-VRAM mode does. Everything else (other devices; plain parameters such as norm scales and modulation
tables, which are small) takes ComfyUI's ordinary path.
"""

from __future__ import annotations

import logging

import torch

import comfy.lora
import comfy.model_patcher as _mp

from .internals import adopt_patcher, key_weight, low_vram_patch_class, patch_weight_arguments

log = logging.getLogger("krea2")


try:
    from comfy.weight_adapter import LoRAAdapter as _LoRAAdapter
except ImportError:  # hosts before comfy.weight_adapter: every patch takes ComfyUI's own maths
    _LoRAAdapter = None

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _add_low_rank(weight, patch) -> bool:
    """Add one plain low-rank patch to the compute copy ``weight`` in place as a single fused
    ``addmm_`` (``weight += strength * alpha / rank * up @ down``, the delta ComfyUI's LoRA adapter
    computes); False (nothing done) for anything else, which then takes ComfyUI's own maths."""
    if _LoRAAdapter is None or len(patch) < 5:
        return False
    strength, adapter, strength_model, offset, function = patch[:5]
    if offset is not None or function is not None or strength_model != 1.0 or not isinstance(adapter, _LoRAAdapter):
        return False
    w = adapter.weights
    up, down, alpha = w[0], w[1], w[2]
    if any(x is not None for x in w[3:6]) or weight.ndim != 2 or up.ndim != 2 or down.ndim != 2 \
            or (up.shape[0], down.shape[1]) != tuple(weight.shape) or up.shape[1] != down.shape[0]:
        return False  # middle factor, DoRA, reshape, conv shapes
    scale = float(strength) * (float(alpha) / down.shape[0] if alpha is not None else 1.0)
    weight.addmm_(up.to(weight.device, weight.dtype, non_blocking=True),
                  down.to(weight.device, weight.dtype, non_blocking=True), alpha=scale)
    return True


class CastTimePatch(low_vram_patch_class()):
    """ComfyUI's ``LowVramPatch``, marked as installed by :class:`Krea2ModelPatcher` (so only ours are
    taken off again). Called on every forward with the freshly cast compute copy of the weight (which
    ComfyUI copies whenever a weight function is set, so in-place updates are safe): plain low-rank
    patches are added in one fused ``addmm_`` each, with no full-size temporaries; every other patch
    (LoKr, LoHa, diffs, DoRA, strength_model, offsets) goes through ComfyUI's own maths, and so does every
    patch of a quantized or scaled weight (the host's LowVramPatch knows its scale functions)."""

    krea2_cast_time = True

    def __init__(self, key, patches, convert_func=None, set_func=None):
        super().__init__(key, patches, convert_func, set_func)
        #: a quantized or scaled weight (the host's convert / set functions): the host's own maths, always. Our own
        #: flag: the host's ``convert_func`` attribute is marked for removal (0.33)
        self.krea2_host_maths = convert_func is not None or set_func is not None

    def __call__(self, weight):
        if weight.dtype not in _FLOATS or getattr(self, "prepared_patches", None) is not None \
                or self.krea2_host_maths:
            return super().__call__(weight)
        for p in self.patches[self.key]:
            if not _add_low_rank(weight, p):
                weight = comfy.lora.calculate_weight([p], weight, self.key, intermediate_dtype=weight.dtype)
        return weight


def _is_ours(f) -> bool:
    return getattr(f, "krea2_cast_time", False)


def _same_device(a, b) -> bool:
    try:
        a, b = torch.device(a), torch.device(b)
    except (TypeError, RuntimeError):
        return False
    if a.type != b.type:
        return False
    if a.type == "cpu":
        return True
    return (a.index or 0) == (b.index or 0)


def drop_cast_time_patches(model) -> int:
    """Take every :class:`CastTimePatch` off the modules of ``model``; returns how many."""
    n = 0
    for m in model.modules():
        for attr in ("weight_function", "bias_function"):
            fns = getattr(m, attr, None)
            if fns and any(_is_ours(f) for f in fns):
                kept = [f for f in fns if not _is_ours(f)]
                n += len(fns) - len(kept)
                setattr(m, attr, kept)  # a new list: comfy.ops keeps an empty class-level default
    return n


class Krea2ModelPatcher(_mp.ModelPatcher):
    """``ModelPatcher`` that applies weight patches at cast time when load and offload devices are the
    same (see the module docstring). Adds no state of its own, so ComfyUI's ``clone`` keeps it."""

    def _krea2_cast_time(self) -> bool:
        return _same_device(self.load_device, self.offload_device) and not getattr(self, "_krea2_forcing", False)

    def load(self, device_to=None, lowvram_model_memory=0, force_patch_weights=False, full_load=False, *args, **kwargs):
        self._krea2_forcing = bool(force_patch_weights)
        self._krea2_cast_count = 0
        try:
            return super().load(device_to, lowvram_model_memory, force_patch_weights, full_load, *args, **kwargs)
        finally:
            self._krea2_forcing = False
            if self._krea2_cast_count:
                log.info("Krea 2: %d patched weights are applied at cast time (the load device is the offload "
                         "device, so no second copy of the model is kept)", self._krea2_cast_count)

    def patch_weight_to_device(self, key, device_to=None, *args, **kwargs):
        opts = patch_weight_arguments(key, device_to, args, kwargs)
        if opts.get("return_weight") or opts.get("force_cast") or key not in self.patches \
                or not self._krea2_cast_time():
            return super().patch_weight_to_device(key, device_to, *args, **kwargs)
        module_name, _, param = key.rpartition(".")
        attr = {"weight": "weight_function", "bias": "bias_function"}.get(param)
        try:
            module = self.model.get_submodule(module_name)
        except AttributeError:
            module = None
        weight, set_func, convert_func = key_weight(self.model, key)
        if attr is None or module is None or not hasattr(module, attr) or weight is None:
            # plain parameters (norm scales, modulation tables: small): ComfyUI's ordinary patch-and-backup
            return super().patch_weight_to_device(key, device_to, *args, **kwargs)
        fns = [f for f in getattr(module, attr) if not (_is_ours(f) and f.key == key)]
        # quantized / scaled weights keep their host functions, which ComfyUI's LowVramPatch applies as its
        # low-VRAM mode does on that host version; patches go before weight wrappers, as in core
        setattr(module, attr, [CastTimePatch(key, self.patches, convert_func, set_func)] + fns)
        self._krea2_cast_count = getattr(self, "_krea2_cast_count", 0) + 1
        return None

    def unpatch_model(self, device_to=None, unpatch_weights=True, *args, **kwargs):
        if unpatch_weights:
            drop_cast_time_patches(self.model)
        return super().unpatch_model(device_to, unpatch_weights, *args, **kwargs)

    def partially_unload(self, *args, **kwargs):
        out = super().partially_unload(*args, **kwargs)
        # a module ComfyUI moved to low-VRAM mode got its own LowVramPatch for the same key: keep only that one
        for m in self.model.modules():
            for attr in ("weight_function", "bias_function"):
                fns = getattr(m, attr, None)
                if not fns:
                    continue
                core = {getattr(f, "key", None) for f in fns if isinstance(f, low_vram_patch_class()) and not _is_ours(f)}
                if core and any(_is_ours(f) and f.key in core for f in fns):
                    setattr(m, attr, [f for f in fns if not (_is_ours(f) and f.key in core)])
        return out


def adopt(patcher):
    """``patcher`` itself, switched to :class:`Krea2ModelPatcher` if it is exactly ComfyUI's plain
    ``ModelPatcher`` (core's native Krea 2 MODEL, a clone made for a LoRA): the subclass has no state of
    its own, so this changes only how that clone applies patches. Other patcher classes (the dynamic
    one, other packs' subclasses) are left alone."""
    return adopt_patcher(patcher, Krea2ModelPatcher)


def patcher_class(default_cls, load_device):
    """The class to wrap our model in: :class:`Krea2ModelPatcher`, unless the host picked its dynamic
    (aimdo) patcher for a GPU, which already applies patches at cast time."""
    if default_cls is not _mp.ModelPatcher and isinstance(default_cls, type) and \
            issubclass(default_cls, _mp.ModelPatcher) and torch.device(load_device).type != "cpu":
        return default_cls
    return Krea2ModelPatcher
