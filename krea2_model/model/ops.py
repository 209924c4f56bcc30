"""Small ``operations`` namespaces for building the model without a host.

``CastOps``: Linears that store their weights in any dtype (fp8 included) and cast them to the
input's dtype and device at call time, so a model can be kept in fp8 and run in bf16/fp32:

    model = load_transformer(path, dtype=torch.float8_e4m3fn, operations=CastOps)
    model(x.bfloat16(), sigma, context.bfloat16())

Peak memory is then about the fp8 bytes plus one layer's weight in the compute dtype.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class CastLinear(nn.Linear):
    """``nn.Linear`` whose weight and bias are cast to the input's dtype/device per call."""

    def reset_parameters(self) -> None:  # weights come from a checkpoint; skip the random init
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if w.dtype != x.dtype or w.device != x.device:
            w = w.to(device=x.device, dtype=x.dtype)
        b = self.bias
        if b is not None and (b.dtype != x.dtype or b.device != x.device):
            b = b.to(device=x.device, dtype=x.dtype)
        return F.linear(x, w, b)


class CastOps:
    """An ``operations`` namespace whose ``Linear`` is :class:`CastLinear`."""

    Linear = CastLinear
