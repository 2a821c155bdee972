"""Masks folded into the neighbouring matrix product (zero passes over activations).

A diagonal mask next to a linear layer commutes into its weight:

    out_mask * (W (in_mask * x) + b)  ==  (out_mask[:, None] * W * in_mask[None, :]) x + out_mask * b

Scaling the weight touches ``out x in`` numbers once per step; scaling the
activation touches ``tokens x features`` numbers twice (forward and backward),
which for GPT-2-small at 16K tokens per step is ~20x more memory traffic.  Autograd
through the product gives exactly the gradients of the masked function (the
weight gradient picks up the same diagonal factors), so this is a drop-in
replacement, not an approximation.  It covers, per MSG:

* the FFN mask after the activation (``in_mask`` of fc2, eq. 10-12),
* the per-head output mask (``in_mask`` of the attention output projection,
  expanded with :func:`head_columns`; appendix A),
* the hidden mask on a sublayer's output (``out_mask`` of proj / fc2).

Under tensor parallelism the masks are sharded like the weight's dims
(column-parallel: ``out_mask`` local shard; row-parallel: ``in_mask`` local shard).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def head_columns(head_mask: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Per-head mask [heads] -> per-column mask [heads * head_dim] (head-major, as o.view(B, T, H*D))."""
    return head_mask.repeat_interleave(head_dim)


def fold_masks(weight: torch.Tensor, bias: torch.Tensor | None, in_mask: torch.Tensor | None = None,
               out_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(out_mask[:, None] * weight * in_mask[None, :], out_mask * bias)``; unmasked inputs pass through.

    weight: [out, in]; in_mask: [in] or None; out_mask: [out] or None.  The masks
    are cast to the weight's dtype (the product then runs in the weight's or
    autocast's precision, as the unmasked layer would).
    """
    w = weight
    if in_mask is not None:
        w = w * in_mask.to(w.dtype)[None, :]
    if out_mask is not None:
        om = out_mask.to(w.dtype)
        w = w * om[:, None]
        if bias is not None:
            bias = bias * om.to(bias.dtype)
    return w, bias


def masked_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  in_mask: torch.Tensor | None = None, out_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``out_mask * F.linear(in_mask * x, weight, bias)`` with the masks folded into the weight."""
    return F.linear(x, *fold_masks(weight, bias, in_mask, out_mask))
