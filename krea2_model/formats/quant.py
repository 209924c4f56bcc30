"""ComfyUI's scaled and per-layer quantized weights, read exactly or refused by name.

One helper for every checkpoint reader (transformer and text encoder). A quantized weight travels with
side tensors named after it (``X.weight`` + ``X.weight_scale`` / ``X.scale_weight`` / ``X.comfy_quant``
...); :func:`dequantize` turns the stored tensor and its side tensors into the weight's real values:

* scaled fp8 (``scale_weight``, the older ``fp8_scaled`` files) and ``comfy_quant`` ``float8_e4m3fn`` /
  ``float8_e5m2`` (``weight_scale``): ``fp8 * scale``, the scale per tensor or per output row;
* ``comfy_quant`` ``int8_tensorwise`` without rotation: ``int8 * weight_scale`` (per tensor or per row);
* an int8 weight with a scale and no ``comfy_quant``: the same (older int8 exports).

Everything else (``nvfp4``, ``mxfp8``, ``int8_tensorwise`` with ``convrot``, ``convrot_w4a4``,
``asym_w4a8_int8``, any format this code does not know, a block-wise scale) is refused with
:class:`~krea2_model.errors.QuantFormatError` naming the file, the tensor and the format. Inside ComfyUI
such files load through the host's own quantized operations instead (``nodes/host``), which is where
those formats have kernels.
"""

from __future__ import annotations

import json

import torch

from ..errors import QuantFormatError

#: Side tensors that belong to a quantized weight and travel with it.
QUANT_SUFFIXES = (".scale_weight", ".scale_input", ".weight_scale", ".input_scale", ".comfy_quant",
                  ".weight_scale_2", ".pre_quant_scale", ".weight_s_rel", ".weight_s_channel", ".weight_codebook")
#: Whole-file marker tensors of ComfyUI's scaled-fp8 files; not weights.
MARKER_KEYS = ("scaled_fp8",)
FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
_FP8_FORMATS = {"float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2}
_SCALE_NAMES = ("weight_scale", "scale_weight")


def side_key(weight_key: str, suffix: str) -> str:
    """``'a.b.weight'`` + ``'.weight_scale'`` -> ``'a.b.weight_scale'`` (side tensors replace ``.weight``)."""
    return weight_key.rsplit(".", 1)[0] + suffix


def read_conf(t: torch.Tensor, where: str, key: str) -> dict:
    """The JSON of a ``comfy_quant`` tensor (its bytes), as a dict."""
    try:
        conf = json.loads(bytes(t.reshape(-1).to(torch.uint8).tolist()).decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise QuantFormatError(f"{where}: '{key}' is not readable quantization metadata ({e}); the file is "
                               "corrupt. Download it again.") from None
    if not isinstance(conf, dict):
        raise QuantFormatError(f"{where}: '{key}' holds {type(conf).__name__} JSON, not a quantization config "
                               "object; the file is corrupt.")
    return conf


def _refuse(where, key, what):
    return QuantFormatError(
        f"{where}: '{key}' is stored as {what}, which the Krea 2 loader cannot turn back into weights "
        "exactly outside ComfyUI. Use a bf16 or fp8_scaled file, or load this file in ComfyUI (Load Krea 2 "
        "Model runs it through ComfyUI's own quantized layers).")


def _apply_scale(x: torch.Tensor, scale: torch.Tensor, where: str, key: str) -> torch.Tensor:
    s = scale.to(torch.float32)
    if s.numel() == 1:
        return x * s.reshape(())
    if x.ndim >= 1 and s.numel() == x.shape[0]:  # one scale per output row
        return x * s.reshape(-1, *([1] * (x.ndim - 1)))
    raise _refuse(where, key, f"a block-wise scaled weight (scale of shape {list(scale.shape)} for a weight of "
                              f"shape {list(x.shape)})")


def dequantize(t: torch.Tensor, side: dict, where: str, key: str, *, keep_fp8: bool = False) -> torch.Tensor:
    """The real values of stored weight ``t`` (file key ``key``) given its side tensors ``side``
    (``{'weight_scale': tensor, 'comfy_quant': tensor, ...}``, names without the dot; empty for a plain
    weight). Returns ``t`` itself for a plain weight, and for an unscaled fp8 weight when ``keep_fp8``;
    otherwise float32. Raises :class:`QuantFormatError` for anything it cannot read exactly."""
    conf = read_conf(side["comfy_quant"], where, side_key(key, ".comfy_quant")) if "comfy_quant" in side else None
    scale = next((side[n] for n in _SCALE_NAMES if n in side), None)
    if conf is None:
        if t.dtype in FP8:
            if scale is None:
                return t if keep_fp8 else t.to(torch.float32)
            return _apply_scale(t.to(torch.float32), scale, where, key)
        if t.dtype == torch.int8 and scale is not None:
            return _apply_scale(t.to(torch.float32), scale, where, key)
        return t
    fmt = conf.get("format")
    if fmt in _FP8_FORMATS:
        q = t if t.dtype in FP8 else t.view(_FP8_FORMATS[fmt])  # some files store the fp8 bytes as uint8
        if scale is None:
            return q if keep_fp8 else q.to(torch.float32)
        return _apply_scale(q.to(torch.float32), scale, where, key)
    if fmt == "int8_tensorwise":
        params = conf.get("params") if isinstance(conf.get("params"), dict) else {}
        if conf.get("convrot", params.get("convrot", False)):
            raise _refuse(where, key, "ComfyUI's 'int8_tensorwise' with a ConvRot (Hadamard) rotation")
        if scale is None:
            raise QuantFormatError(f"{where}: '{key}' is 'int8_tensorwise' but its '{side_key(key, '.weight_scale')}' "
                                   "is missing; the file is incomplete. Download it again.")
        return _apply_scale(t.view(torch.int8).to(torch.float32), scale, where, key)
    if fmt is None:
        raise QuantFormatError(f"{where}: '{side_key(key, '.comfy_quant')}' names no quantization format; the file "
                               "is corrupt.")
    raise _refuse(where, key, f"ComfyUI's '{fmt}' quantization")


#: ComfyUI formats that store two 4-bit values per byte along a weight's input axis
PACKED_4BIT = ("nvfp4", "convrot_w4a4", "asym_w4a8_int8")
#: ComfyUI formats that store a weight padded to a multiple of this many rows and columns
PADDED = {"nvfp4": 16, "mxfp8": 32}


def stored_shape(shape, fmt) -> tuple:
    """The shape ComfyUI stores a 2-D weight of ``shape`` in under per-layer format ``fmt`` (padding, 4-bit
    packing); other shapes and formats unchanged."""
    shape = tuple(shape)
    if len(shape) != 2:
        return shape
    m = PADDED.get(fmt, 1)
    rows, cols = -(-shape[0] // m) * m, -(-shape[1] // m) * m
    return (rows, cols // 2) if fmt in PACKED_4BIT else (rows, cols)


def logical_shape(shape, fmt) -> tuple:
    """The inverse of :func:`stored_shape` up to padding (Krea 2's sizes are multiples of every pad), for
    reading a model's size off a quantized file."""
    shape = tuple(shape)
    if len(shape) == 2 and fmt in PACKED_4BIT:
        return (shape[0], shape[1] * 2)
    return shape


def is_quantized_storage(dtype) -> bool:
    """Whether a stored dtype is a quantized one (its values are not the weight's without a scale)."""
    return dtype in FP8 or dtype in (torch.int8, torch.uint8)
