"""Every ComfyUI internal the pack relies on that is not a node-facing API, in one place.

Each function says what it uses and on which host versions that was checked (ComfyUI 0.33.0 with native Krea 2,
0.3.64 without); ``tests/host/internals_check.py`` runs each one on both hosts, so a host that changes one of them
fails there by name instead of somewhere deep in a sampling run. Everything else in ``nodes/host`` uses only what
core's own nodes use (``comfy.ops``, ``comfy.model_base.BaseModel``, ``comfy.patcher_extension``, ...).
"""

from __future__ import annotations

import inspect

import comfy.model_base
import comfy.model_patcher as _mp

#: the versions every function below was checked on (``tests/host/internals_check.py`` on both)
CHECKED_ON = ("0.33.0", "0.3.64")


def key_weight(model, key: str):
    """``(weight, set_func, convert_func)`` of parameter ``key`` as the host's own patching sees it.

    Uses ``comfy.model_patcher.get_key_weight`` (checked on 0.33.0 and 0.3.64: same signature and result), so a
    patch on a quantized or scaled weight is computed with the host's own convert / set functions."""
    return _mp.get_key_weight(model, key)


def patch_weight_arguments(key, device_to, args, kwargs) -> dict:
    """The arguments of a host ``ModelPatcher.patch_weight_to_device`` call, by name, bound against the host's own
    signature (never a list of names of ours): ``{"key", "device_to", "inplace_update", ...}`` with the host's
    defaults filled in. Checked on 0.33.0 (``inplace_update, return_weight, force_cast``) and 0.3.64
    (``inplace_update``)."""
    sig = inspect.signature(_mp.ModelPatcher.patch_weight_to_device)
    bound = sig.bind(None, key, device_to, *args, **kwargs)
    bound.apply_defaults()
    out = dict(bound.arguments)
    out.pop(next(iter(sig.parameters)))  # self
    return out


def low_vram_patch_class():
    """The host's ``LowVramPatch`` (``comfy.model_patcher``): called with a cast weight, it returns it patched;
    built as ``LowVramPatch(key, patches, convert_func, set_func)``. Checked on 0.33.0 and 0.3.64 (same
    constructor; 0.33 adds prepared patches for its dynamic loader, which the subclass leaves to the host)."""
    return _mp.LowVramPatch


def adopt_patcher(patcher, cls):
    """``patcher`` switched to ``cls`` (a subclass of the host's ``ModelPatcher`` that adds no state of its own) when
    it is exactly the host's plain ``ModelPatcher``: a clone made of core's native Krea 2 MODEL. Changing the class
    of that clone changes only how it applies its patches; the MODEL it was cloned from keeps its class (the host
    test checks both). Relies on ``ModelPatcher`` keeping all its state in instance attributes; checked on 0.33.0
    (native Krea 2) and 0.3.64 (a plain ModelPatcher of another model)."""
    if type(patcher) is _mp.ModelPatcher:
        patcher.__class__ = cls
    return patcher


def native_krea2_class():
    """Core's native Krea 2 ``BaseModel`` subclass (``comfy.model_base.Krea2``, 0.33.0), or None on hosts without
    it (0.3.64)."""
    return getattr(comfy.model_base, "Krea2", None)


def native_krea2_text_class():
    """Core's native Krea 2 text-encoder model class (``comfy.text_encoders.krea2.Krea2TEModel``, the base of what
    ``CLIPLoader`` type krea2 builds; 0.33.0), or None on hosts without it (0.3.64)."""
    try:
        from comfy.text_encoders import krea2
    except ImportError:
        return None
    return getattr(krea2, "Krea2TEModel", None)


def unload_patcher(patcher) -> bool:
    """Unload ``patcher`` from the host's list of loaded models (``comfy.model_management.current_loaded_models``,
    each entry's ``model`` and ``model_unload()``: checked on 0.33.0 and 0.3.64), before a patcher of ours replaces
    it on the same model; True when it was loaded. Dropping a loaded patcher without this makes the host's garbage
    check report the model as a leak."""
    import comfy.model_management as mm
    for i in range(len(mm.current_loaded_models) - 1, -1, -1):
        lm = mm.current_loaded_models[i]
        if lm.model is patcher:
            lm.model_unload()
            mm.current_loaded_models.pop(i)
            return True
    return False
