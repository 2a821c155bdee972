"""Kernel dispatch for the MSG mask operations.

Every op here has a plain PyTorch definition that is the CPU path and the
correctness reference.  Fused Triton/CUDA backends plug in behind the same
signatures (see docs/kernels.md) and are chosen automatically on GPU.
"""
from __future__ import annotations

import torch

from megatron_msg.model.masked_norm import masked_layer_norm_reference


def masked_layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                      mask: torch.Tensor, eps: float) -> torch.Tensor:
    """Masked LayerNorm over the last dim (MSG eq. 16-19)."""
    return masked_layer_norm_reference(x, weight, bias, mask, eps)


def depth_mix(x: torch.Tensor, y: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Depth mask (MSG eq. 20): ``x + c * (y - x)`` for a layer input x and output y.

    ``torch.lerp`` computes exactly this in one pass; c is a 0-dim device tensor.
    """
    return torch.lerp(x, y, c.to(x.dtype))


def scale_heads(o: torch.Tensor, head_mask: torch.Tensor) -> torch.Tensor:
    """Multiply each head's attention output by its mask.  o: [batch, heads, seq, head_dim]."""
    return o * head_mask.to(o.dtype).view(1, -1, 1, 1)
