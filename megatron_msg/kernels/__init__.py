"""Kernel dispatch for the MSG mask operations.

Every op here has a plain PyTorch definition that is the CPU path and the
correctness reference.  Fused Triton/CUDA backends plug in behind the same
signatures (see docs/kernels.md) and are chosen automatically on GPU:

* ``backend=None`` / ``MSG_KERNEL_BACKEND`` unset or ``auto``: Triton for CUDA
  tensors when Triton imports, the reference otherwise (CPU);
* ``"reference"``, ``"triton"``, ``"cuda"``: forced (tests, benchmarks).
  ``"triton"`` on CPU tensors runs under ``TRITON_INTERPRET=1`` only.

Public ops the model calls while masks are active:

``masked_layer_norm(x, weight, bias, mask, eps)``
    MSG eq. 16-19, fused forward+backward.
``add_masked_layer_norm(x, delta, weight, bias, mask, eps) -> (y, h)``
    ``h = x + delta`` (residual add) and ``y = masked_layer_norm(h)`` in one pass.
``depth_mix(x, y, c)``
    MSG eq. 20, ``x + c (y - x)`` for a 0-dim mask ``c``.
``depth_residual_add(x, h, f, c)``
    ``x + c ((h + f) - x)``: the last residual add of a new layer fused with its
    depth mix (``h + f`` is that layer's output ``Layer(x)``).
``scale_heads(o, head_mask)``
    per-head output scaling, o: [batch, heads, seq, head_dim].
``masked_linear(x, weight, bias, in_mask=None, out_mask=None)``
    ``out_mask * linear(in_mask * x)`` with both masks folded into the weight:
    the head, FFN and hidden output masks then cost no pass over activations.

The fused backends run as ``torch.library`` custom ops (``torch.ops.megatron_msg.*``,
defined in ``ops.py``) with fake implementations and registered backward
formulas, so ``torch.compile(fullgraph=True)`` and CUDA graphs capture them as
single nodes; the functions here only choose the backend and the op.
"""
from __future__ import annotations

import torch

from megatron_msg.kernels import ops
from megatron_msg.kernels.backend import MAX_FUSED_N, resolve
from megatron_msg.kernels.folding import head_columns, masked_linear
from megatron_msg.kernels.reference import masked_layer_norm_reference

__all__ = ["masked_layer_norm", "add_masked_layer_norm", "depth_mix", "depth_residual_add",
           "scale_heads", "masked_linear", "head_columns", "resolve"]


def _fusable_ln(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, mask: torch.Tensor) -> bool:
    n = x.shape[-1]
    return (not mask.requires_grad and n <= MAX_FUSED_N and x.dtype in ops.FUSED_DTYPES
            and weight is not None and bias is not None
            and weight.shape == (n,) and bias.shape == (n,) and mask.shape == (n,)
            and x.device == weight.device == mask.device)


def masked_layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                      mask: torch.Tensor, eps: float, *, backend: str | None = None) -> torch.Tensor:
    """Masked LayerNorm over the last dim (MSG eq. 16-19).

    Shapes the fused kernels do not cover (a mask that needs a gradient, rows
    wider than 16384) silently use the reference, which defines the result.
    """
    name = resolve(x, backend)
    if name != "reference" and _fusable_ln(x, weight, bias, mask):
        return ops.masked_layer_norm(x, weight, bias, mask, float(eps), name)[0]
    return masked_layer_norm_reference(x, weight, bias, mask, eps)


def add_masked_layer_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                          mask: torch.Tensor, eps: float, *, backend: str | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add fused with masked LayerNorm: returns ``(masked_ln(x + delta), x + delta)``.

    delta may be narrower than x (a bf16 sublayer output added to an fp32
    residual stream under autocast); h and y have x's dtype.

    The pre-LN block's ``h = x + attn_out; y = ln2(h)`` becomes one kernel that
    reads x and delta once and writes h and y; its backward adds the residual
    gradient in the same pass.
    """
    name = resolve(x, backend)
    if (name == "triton" and _fusable_ln(x, weight, bias, mask) and delta.shape == x.shape
            and torch.promote_types(x.dtype, delta.dtype) == x.dtype and delta.dtype in ops.FUSED_DTYPES):
        y, h, _, _ = ops.add_masked_layer_norm(x, delta, weight, bias, mask, float(eps), name)
        return y, h
    h = x + delta
    return masked_layer_norm(h, weight, bias, mask, eps, backend=name), h


def depth_mix(x: torch.Tensor, y: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Depth mask (MSG eq. 20): ``x + c * (y - x)`` for a layer input x and output y.

    ``torch.lerp`` computes exactly this in one pass; c is a 0-dim device tensor.
    """
    return torch.lerp(x, y, c.to(x.dtype))


def depth_residual_add(x: torch.Tensor, h: torch.Tensor, f: torch.Tensor, c: torch.Tensor,
                       *, backend: str | None = None) -> torch.Tensor:
    """``depth_mix(x, h + f, c)`` in one pass: the final residual add of a new layer.

    x: the layer's input, h: its mid-block residual stream, f: its last
    sublayer's output, c: the 0-dim depth mask.  Costs the same as the plain
    ``h + f`` it replaces plus one read of x.
    """
    name = resolve(x, backend)
    if (name != "reference" and h.shape == x.shape == f.shape and h.dtype == x.dtype
            and x.dtype in ops.FUSED_DTYPES and f.dtype in ops.FUSED_DTYPES
            and torch.promote_types(h.dtype, f.dtype) == x.dtype and not c.requires_grad
            and c.numel() == 1 and c.device == x.device):
        return ops.depth_residual(x, h, f, c, name)
    return torch.lerp(x, h + f, c.to(x.dtype))


def scale_heads(o: torch.Tensor, head_mask: torch.Tensor) -> torch.Tensor:
    """Multiply each head's attention output by its mask.  o: [batch, heads, seq, head_dim].

    One elementwise pass.  To make it free, fold the mask into the output
    projection instead: ``masked_linear(o_flat, W_o, b_o, in_mask=head_columns(head_mask, head_dim))``.
    """
    return o * head_mask.to(o.dtype).view(1, -1, 1, 1)
