"""``MaskedLayerNorm``: the model's LayerNorm module with an optional MSG hidden mask.

The op itself (MSG eq. 16-19) is defined in ``megatron_msg/kernels/reference.py``
and dispatched to the fused kernels by ``megatron_msg.kernels.masked_layer_norm``.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from megatron_msg import kernels


class MaskedLayerNorm(nn.Module):
    """LayerNorm that takes an optional hidden mask.

    ``mask=None`` is the fast path (plain ``F.layer_norm``), used once every
    mask has ramped to 1; the model decides, not this module.
    """

    def __init__(self, hidden: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden))
        self.bias = nn.Parameter(torch.zeros(hidden))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is None:
            return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)
        return kernels.masked_layer_norm(x, self.weight, self.bias, mask, self.eps)
