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
from .gguf_dequant import CPU_CHUNK, dequantize, qtype_of

__all__ = ["GGUFLinear", "GGUFEmbedding", "GGUFOps", "gguf_operations", "gguf_weight", "call_copies",
           "call_weight", "available_memory"]


def gguf_weight(mod: nn.Module, device, dtype) -> torch.Tensor:
    """``mod``'s packed weight dequantized to ``dtype`` on ``device`` (the bytes move, then expand)."""
    raw = mod.weight
    if raw.device != torch.device(device):
        raw = raw.to(device, non_blocking=True)
    return dequantize(raw, mod.gguf_qtype, mod.gguf_shape, dtype)


#: rows of input up to which a CPU product with GGUF blocks dequantizes a cache-sized band of output rows at a time
#: instead of the whole weight (token-by-token generation; measured on one 9728x2560 Q8_0 layer, one bf16 row:
#: 12.6 ms against 47 ms for the whole weight; in bf16 the same numbers to the bit, in float32 within rounding,
#: since the CPU's float32 kernels sum differently for some small row counts)
FEW_ROWS = 16
#: elements of weight dequantized per band (cache-sized, as :data:`~.gguf_dequant.CPU_CHUNK`)
BAND_ELEMS = CPU_CHUNK


def gguf_linear(mod: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T + bias`` for ``mod``'s packed weight ``W`` in ``x``'s dtype. On the CPU, for at most
    :data:`FEW_ROWS` rows of ``x``, each band of output rows is dequantized and multiplied while it is still in
    cache (the full weight is never written out); otherwise the weight is dequantized whole, then multiplied."""
    raw = mod.weight
    out_f, in_f = (int(s) for s in mod.gguf_shape)
    if x.device.type != "cpu" or raw.device.type != "cpu" or x.numel() // max(in_f, 1) > FEW_ROWS:
        return F.linear(x, gguf_weight(mod, x.device, x.dtype), bias)
    q = qtype_of(mod.gguf_qtype)
    band = max(8, BAND_ELEMS // in_f // 8 * 8)  # whole groups of 8 rows
    rows = raw.reshape(out_f, -1)
    flat = x.reshape(-1, in_f)
    out = torch.empty(flat.shape[0], out_f, dtype=x.dtype)
    for i in range(0, out_f, band):
        j = min(out_f, i + band)
        w = q.fn(rows[i:j].reshape(-1, q.block_bytes)).view(j - i, in_f)
        out[:, i:j] = F.linear(flat, w if w.dtype == x.dtype else w.to(x.dtype), None if bias is None else bias[i:j])
    return out.reshape(*x.shape[:-1], out_f)


def call_weight(mod: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """The per-call copy :func:`call_copies` gave ``mod``, when it is in ``x``'s dtype on ``x``'s device."""
    w = mod.__dict__.get("krea2_call_weight")
    if w is not None and w.dtype == x.dtype and w.device == x.device:
        return w
    return None


def available_memory(device) -> int:
    """Bytes free on ``device`` now: CUDA's free memory, the CPU's ``MemAvailable``; 0 where unknown."""
    device = torch.device(device)
    try:
        if device.type == "cuda":
            return int(torch.cuda.mem_get_info(device)[0])
        if device.type == "cpu":
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
    except (OSError, RuntimeError, ValueError):
        pass
    return 0


class call_copies:
    """``with call_copies(layers, device, dtype, budget) as c:``: each GGUF-block Linear among ``layers``' modules
    gets its weight dequantized once (with the layer's weight patches, through its ``krea2_weight``) for the
    duration of the block, as many as ``budget`` bytes hold, in module order; the others keep dequantizing per
    call. For work that runs the same layers many times over few rows (token-by-token generation), where
    dequantizing per call would cost more than the product itself. ``c.layers`` / ``c.bytes``: what was copied,
    ``c.skipped``: GGUF layers left out for the budget. The copies are dropped on exit."""

    def __init__(self, modules, device, dtype, budget: int):
        self.modules = [m for root in modules for m in root.modules()
                        if getattr(m, "gguf_qtype", None) is not None and hasattr(m, "krea2_weight")]
        self.device, self.dtype, self.budget = torch.device(device), dtype, int(budget)
        self.layers = self.bytes = self.skipped = 0
        self._set: list = []

    def __enter__(self):
        size = torch.empty((), dtype=self.dtype).element_size()
        try:
            for m in self.modules:
                n = 1
                for s in m.gguf_shape:
                    n *= int(s)
                if self.bytes + n * size > self.budget:
                    self.skipped += 1
                    continue
                m.__dict__["krea2_call_weight"] = m.krea2_weight(self.device, self.dtype)
                self._set.append(m)
                self.layers += 1
                self.bytes += n * size
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc):
        for m in self._set:
            m.__dict__.pop("krea2_call_weight", None)
        self._set.clear()
        return False


class GGUFLinear(CastLinear):
    """:class:`CastLinear` that also takes packed GGUF blocks as its weight (see the module docstring)."""

    gguf_capable = True
    gguf_qtype = None
    gguf_shape = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gguf_qtype is None:
            return super().forward(x)
        b = self.bias
        if b is not None and (b.dtype != x.dtype or b.device != x.device):
            b = b.to(device=x.device, dtype=x.dtype)
        w = call_weight(self, x)
        return gguf_linear(self, x, b) if w is None else F.linear(x, w, b)

    def krea2_weight(self, device, dtype) -> torch.Tensor:
        """The weight as :meth:`forward` computes with it (see :func:`call_copies`)."""
        return gguf_weight(self, device, dtype)


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
            b = self.bias
            if b is not None:
                b = b.to(device=x.device, dtype=x.dtype)
            w = call_weight(self, x)
            return gguf_linear(self, x, b) if w is None else F.linear(x, w, b)

        def krea2_weight(self, device, dtype):
            return gguf_weight(self, device, dtype)

    ns = type("GGUF" + getattr(operations, "__name__", "Ops"), (), {"gguf_capable": True, "Linear": Linear,
                                                                      "Embedding": GGUFEmbedding})
    _mixed[operations] = ns
    return ns
