"""Masked LayerNorm (MSG paper eq. 16-19): the plain PyTorch definition.

With a mask ``c`` over the hidden units (1 for old units, the ramp value for new
ones) the statistics are weighted by ``c`` and the output is multiplied by ``c``:

    mu  = sum(c * x) / sum(c)
    var = sum(c * (x - mu)^2) / sum(c)
    y   = c * (w * (x - mu) / sqrt(var + eps) + b)

When the new units' ``c`` is 0 this equals LayerNorm over the old units alone,
whatever values the new positions hold, which is what makes hidden-size growth
exactly function-preserving for both pre-LN (GPT) and post-LN (BERT) models.

``sum(c)`` is computed on the device from the mask tensor: there is no host
sync, so the function is safe under ``torch.compile`` and CUDA graphs.
"""
from __future__ import annotations

import torch


def masked_layer_norm_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                                mask: torch.Tensor, eps: float) -> torch.Tensor:
    """Plain PyTorch definition of masked LayerNorm; kernels are tested against it.

    Accumulates in at least fp32 (fp64 input stays fp64, so tests can use it as
    the high-precision reference) and returns ``x.dtype``.
    """
    acc = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(acc)
    c = mask.to(acc)
    inv_csum = 1.0 / c.sum()
    mu = (xf * c).sum(-1, keepdim=True) * inv_csum
    d = xf - mu
    var = (d * d * c).sum(-1, keepdim=True) * inv_csum
    y = d * torch.rsqrt(var + eps) * weight.to(acc) + bias.to(acc)
    return (y * c).to(x.dtype)
