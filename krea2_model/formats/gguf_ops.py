"""A GGUF-aware ``operations`` namespace: Linear and Embedding layers whose weight may be raw GGUF blocks.

A layer holding blocks has ``weight`` = ``uint8 (rows, row_bytes)`` and the attributes ``gguf_qtype``
(e.g. ``'Q4_K'``) and ``gguf_shape`` (the logical ``(out, in)``); it dequantizes per call, on the input's
device and in the input's dtype, so memory holds the quantized bytes plus one layer's weight in the compute
dtype. A layer without ``gguf_qtype`` behaves as :class:`~krea2_model.model.ops.CastLinear` (plain float
weights of a GGUF, any dtype, cast per call).

    model = load_transformer("krea2_turbo-Q4_K.gguf")          # uses GGUFOps
    model(x.bfloat16(), sigma, context.bfloat16())             # weights dequantized to bf16 per layer
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..model.ops import CastLinear
from .gguf_dequant import dequantize

__all__ = ["GGUFLinear", "GGUFEmbedding", "GGUFOps", "gguf_operations", "gguf_weight"]


def gguf_weight(mod: nn.Module, device, dtype) -> torch.Tensor:
    """``mod``'s packed weight dequantized to ``dtype`` on ``device`` (the bytes move, then expand)."""
    raw = mod.weight
    if raw.device != torch.device(device):
        raw = raw.to(device, non_blocking=True)
    return dequantize(raw, mod.gguf_qtype, mod.gguf_shape, dtype)


class GGUFLinear(CastLinear):
    """:class:`CastLinear` that also takes packed GGUF blocks as its weight (see the module docstring)."""

    gguf_capable = True
    gguf_qtype = None
    gguf_shape = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gguf_qtype is None:
            return super().forward(x)
        w = gguf_weight(self, x.device, x.dtype)
        b = self.bias
        if b is not None and (b.dtype != x.dtype or b.device != x.device):
            b = b.to(device=x.device, dtype=x.dtype)
        return F.linear(x, w, b)


class GGUFEmbedding(nn.Embedding):
    """``nn.Embedding`` whose table may be packed GGUF blocks: only the rows looked up are dequantized
    (float32; callers cast to their compute dtype)."""

    gguf_capable = True
    gguf_qtype = None
    gguf_shape = None

    def reset_parameters(self) -> None:  # weights come from a checkpoint
        return None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.gguf_qtype is None:
            return super().forward(ids.to(self.weight.device)).to(ids.device)
        flat = ids.reshape(-1).to(self.weight.device)
        rows = self.weight.index_select(0, flat).to(ids.device)
        out = dequantize(rows, self.gguf_qtype, (flat.numel(), self.gguf_shape[1]), torch.float32)
        return out.reshape(*ids.shape, self.gguf_shape[1])


class GGUFOps:
    """``operations`` for GGUF files without a host: :class:`GGUFLinear` and :class:`GGUFEmbedding`."""

    gguf_capable = True
    Linear = GGUFLinear
    Embedding = GGUFEmbedding


_mixed: dict = {}


def gguf_operations(operations=None):
    """The operations to build a model for a GGUF file with: :class:`GGUFOps` for None (or
    :class:`~krea2_model.model.ops.CastOps`), ``operations`` itself when it is GGUF-aware (a host's,
    ``gguf_capable = True``), else a namespace whose Linear subclasses ``operations.Linear`` and
    dequantizes packed weights before calling it."""
    from ..model.ops import CastOps

    if operations is None or operations is CastOps:
        return GGUFOps
    if getattr(operations, "gguf_capable", False):
        return operations
    if operations in _mixed:
        return _mixed[operations]
    base = operations.Linear

    class Linear(base):
        gguf_capable = True
        gguf_qtype = None
        gguf_shape = None

        def forward(self, x):
            if self.gguf_qtype is None:
                return super().forward(x)
            w = gguf_weight(self, x.device, x.dtype)
            b = self.bias
            if b is not None:
                b = b.to(device=x.device, dtype=x.dtype)
            return F.linear(x, w, b)

    ns = type("GGUF" + getattr(operations, "__name__", "Ops"), (), {"gguf_capable": True, "Linear": Linear,
                                                                      "Embedding": GGUFEmbedding})
    _mixed[operations] = ns
    return ns
