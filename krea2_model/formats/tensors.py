"""Helpers every checkpoint reader shares: shape tables, tensor-set checks, index counting, placing a
loaded tensor into a model built on the meta device."""

from __future__ import annotations

import re

import torch

from ..errors import MissingTensorsError, ShapeMismatchError, first_names


def module_shapes(build) -> dict:
    """``{key: shape}`` of the state dict of the module ``build()`` makes (built on the meta device,
    so nothing is allocated)."""
    with torch.device("meta"):
        m = build()
    return {k: tuple(v.shape) for k, v in m.state_dict().items()}


def count_indices(keys, pattern: str) -> int:
    """How many distinct values the first group of ``pattern`` takes over ``keys`` (e.g. block count)."""
    rx = re.compile(pattern)
    return len({m.group(1) for k in keys for m in [rx.match(k)] if m})


def shape_getter(shapes: dict, where: str, what: str):
    """``need(key) -> shape`` over canonical ``shapes`` for config inference: a missing sizing tensor is a
    :class:`MissingTensorsError` naming the file, the ``what`` tensor (e.g. ``"Krea 2"``) and the key."""
    def need(key):
        if key not in shapes:
            raise MissingTensorsError(f"{where}: the {what} tensor '{key}' is missing, so the model size cannot be "
                                      "inferred. The file is incomplete; download it again.")
        return shapes[key]
    return need


def check_tensors(shapes: dict, want: dict, where: str, what: str, file_key, size: str) -> None:
    """Raise :class:`MissingTensorsError` (count and first names) or :class:`ShapeMismatchError` (file key,
    shape seen, shape expected) unless canonical ``shapes`` cover ``want``. ``file_key`` maps a canonical
    name to the file's name for it (present or missing); ``size`` describes the inferred model size."""
    missing = [k for k in want if k not in shapes]
    if missing:
        raise MissingTensorsError(
            f"{where}: {len(missing)} of the {len(want)} {what} tensors are missing (first: "
            f"{first_names([file_key(m) for m in missing])}). The file is incomplete or a "
            "partial export; download the full checkpoint.")
    for k, shp in want.items():
        if shapes[k] != shp:
            raise ShapeMismatchError(
                f"{where}: tensor '{file_key(k)}' has shape {list(shapes[k])}, expected {list(shp)} for the "
                f"{what} size inferred from the rest of the file ({size}). The file mixes tensors of different "
                "models or is corrupt.")


def set_tensor(model: torch.nn.Module, key: str, t: torch.Tensor) -> None:
    """Put ``t`` at ``key`` of a model built on the meta device: as a frozen Parameter where the model has a
    parameter of that name, else as a buffer-like plain attribute tensor."""
    mod_name, _, name = key.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    if name in mod._parameters:
        mod._parameters[name] = torch.nn.Parameter(t, requires_grad=False)
    elif name in mod._buffers:
        mod._buffers[name] = t
    else:
        raise KeyError(f"{key}: the model has no parameter or buffer of that name")
