"""Host adapter: putting checkpoint tensors into modules the host built, whichever way it built them.

ComfyUI builds layers in two ways. With ``--cpu``, ``--highvram``, ``--disable-dynamic-vram`` (and on hosts
before dynamic VRAM) its ``comfy.ops`` Linear is an ordinary ``nn.Linear`` with allocated parameters. With
dynamic VRAM (comfy-aimdo: ComfyUI 0.33's default on NVIDIA with torch >= 2.8) the same Linear is built
*lazily*: ``weight`` and ``bias`` are ``None`` (the bias is marked ``comfy_need_lazy_init_bias``) and its
``Embedding`` holds a ``meta`` tensor, until the layer's own ``_load_from_state_dict`` assigns the tensors.
So a loader may never assume a parameter exists right after construction.

:func:`load_into` is the one way our loaders place tensors: grouped by the module that owns them, through
that module's own ``_load_from_state_dict`` (the host's loading protocol, lazy or not), converted first to
the dtype the layer was built for, so the result is the same tensor either way. :func:`slot` says what a
parameter should be before it exists; :func:`unfilled` lists what a load left empty.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch

from ...krea2_model.errors import Krea2Error, first_names


def owner_of(model: torch.nn.Module, key: str):
    """``(module, prefix, name)`` of ``key`` (``'layers.0.mlp.up_proj.weight'``) in ``model``."""
    mod_name, _, name = key.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    return mod, (mod_name + "." if mod_name else ""), name


def _current(module: torch.nn.Module, name: str):
    if name in module._parameters:
        return module._parameters[name]
    if name in module._buffers:
        return module._buffers[name]
    return module.__dict__.get(name)  # a lazily built layer keeps ``weight = None`` as a plain attribute


def slot(module: torch.nn.Module, name: str):
    """``(dtype, device, lazy)`` of parameter ``name`` of ``module`` as the host built it. ``lazy``: it does not
    exist yet (``None``) or holds no data (``meta``); then its dtype is the one the layer was built with (the
    host records it as ``<name>_comfy_model_dtype``; float32 when built without one, as ``nn.Linear`` is) and its
    tensors stay on the CPU until the host's patcher moves them, as core's own lazy loads do."""
    p = _current(module, name)
    if isinstance(p, torch.Tensor) and not p.is_meta:
        return p.dtype, p.device, False
    dtype = p.dtype if isinstance(p, torch.Tensor) else getattr(module, f"{name}_comfy_model_dtype", None)
    return dtype or torch.get_default_dtype(), torch.device("cpu"), True


def load_into(model: torch.nn.Module, keys: Iterable[str], tensor: Callable[[str, torch.dtype], torch.Tensor],
              where: str, what: str) -> None:
    """Load every canonical ``keys`` entry of ``model``: ``tensor(key, dtype)`` gives the value (``dtype``: the
    dtype the layer was built for, for the caller's fp8 choice); it is converted to that dtype and handed to the
    owning module's ``_load_from_state_dict``, one module at a time (peak memory: the model plus one layer).
    A key without a place, a tensor the layer refuses, or a parameter left empty is a :class:`Krea2Error`
    naming ``where``."""
    groups: dict = {}
    for k in keys:
        try:
            mod, prefix, name = owner_of(model, k)
        except AttributeError:
            raise Krea2Error(f"{where}: {what} tensor {k!r} has no place in the model.") from None
        groups.setdefault(id(mod), (mod, prefix, []))[2].append(name)
    missing, unexpected, errors = [], [], []
    with torch.no_grad():
        for mod, prefix, names in groups.values():
            part, lazy = {}, False
            for name in names:
                dtype, device, is_lazy = slot(mod, name)
                lazy = lazy or is_lazy
                v = tensor(prefix + name, dtype)
                if v.dtype != dtype:
                    v = v.to(dtype)
                if v.device != device:
                    v = v.to(device)
                part[prefix + name] = v
            # the host's lazy layers assign (copying unless told to assign); allocated layers copy in place
            mod._load_from_state_dict(part, prefix, {"assign_to_params_buffers": lazy}, True, missing, unexpected,
                                      errors)
            del part
    if errors:
        raise Krea2Error(f"{where}: the {what} refused tensors: {errors[0]}")
    if unexpected:
        raise Krea2Error(f"{where}: {what} tensors without a place in the model: {first_names(unexpected)}")
    requested = {p + n for _, p, ns in groups.values() for n in ns}
    # a parameter of a loaded module that was not in the file (buffers are computed, never loaded)
    left = [m for m in missing if m not in requested and _is_parameter(model, m)]
    empty = unfilled(model)
    if empty or left:
        raise Krea2Error(f"{where}: the {what} was left with parameters that no tensor filled: "
                         f"{first_names(empty or left)}. The file is incomplete for this model.")


def _is_parameter(model, key: str) -> bool:
    try:
        mod, _, name = owner_of(model, key)
    except AttributeError:
        return False
    return name in mod._parameters or name in ("weight", "bias") and name not in mod._buffers


def unfilled(model: torch.nn.Module) -> list:
    """Names of parameters that hold no data: a lazily built layer's ``None`` weight / bias that no load
    assigned (``bias`` only where the layer has one), or a ``meta`` tensor."""
    out = []
    for mod_name, mod in model.named_modules():
        pre = mod_name + "." if mod_name else ""
        for name, p in mod._parameters.items():
            if p is not None and p.is_meta:
                out.append(pre + name)
        if mod.__dict__.get("weight", 0) is None and "weight" not in mod._parameters:
            out.append(pre + "weight")
        if mod.__dict__.get("bias", 0) is None and getattr(mod, "comfy_need_lazy_init_bias", False):
            out.append(pre + "bias")
    return out


def settle_dtypes(model: torch.nn.Module) -> int:
    """Give every parameter a lazily built layer received the dtype the layer was built for. The host's lazy
    loader assigns the file's tensors as they are (a bf16 file stays bf16 under ``weight_dtype`` fp8), where an
    allocated layer converts them on copy; so ``weight_dtype`` (fp8 storage) would otherwise be dropped, and the
    model would compute other numbers than with the flag off. Plain tensors only (quantized tensors keep their
    format). Returns how many were converted."""
    n = 0
    with torch.no_grad():
        for mod in model.modules():
            if not hasattr(mod, "comfy_need_lazy_init_bias"):  # set only by the host's lazy construction
                continue
            for name in ("weight", "bias"):
                want = getattr(mod, f"{name}_comfy_model_dtype", None)
                p = mod._parameters.get(name)
                if want is None or p is None or type(p.data) is not torch.Tensor or p.dtype == want \
                        or not p.is_floating_point() or p.is_meta:
                    continue
                setattr(mod, name, torch.nn.Parameter(p.data.to(want), requires_grad=False))
                n += 1
    return n
