"""Depth mask fused into the residual add (MSG eq. 20), in Triton.

A new layer's output is ``x + c (Layer(x) - x)``; in a pre-LN block
``Layer(x) = h + f`` where h is the mid-block residual stream and f the MLP
output.  Computing the add and the mix separately costs two passes (``h + f``,
then ``lerp``); this kernel reads x, h, f once and writes one tensor, and its
backward reads the gradient once and writes both input gradients.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _depth_residual_fwd_kernel(X, H, F, C, OUT, numel, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    msk = offs < numel
    c = tl.load(C).to(tl.float32)
    x = tl.load(X + offs, mask=msk, other=0.0).to(tl.float32)
    h = tl.load(H + offs, mask=msk, other=0.0)
    f = tl.load(F + offs, mask=msk, other=0.0)
    # round h + f to the I/O dtype, as the unfused ``h + f`` would
    y = (h.to(tl.float32) + f.to(tl.float32)).to(OUT.dtype.element_ty).to(tl.float32)  # f may be narrower
    # torch.lerp's two-sided form: exact at c = 0 (x) and at c = 1 (h + f), so an old
    # layer (c = 1) gives bit for bit what the unmasked model computes
    d = y - x
    out = tl.where(c < 0.5, x + c * d, y - d * (1.0 - c))
    tl.store(OUT + offs, out.to(OUT.dtype.element_ty), mask=msk)


@triton.jit
def _depth_residual_bwd_kernel(DOUT, C, DX, DY, numel, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    msk = offs < numel
    c = tl.load(C).to(tl.float32)
    g = tl.load(DOUT + offs, mask=msk, other=0.0).to(tl.float32)
    tl.store(DX + offs, ((1.0 - c) * g).to(DX.dtype.element_ty), mask=msk)
    tl.store(DY + offs, (c * g).to(DY.dtype.element_ty), mask=msk)


_BLOCK = 4096


def depth_residual_fwd(x: torch.Tensor, h: torch.Tensor, f: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``x + c ((h + f) - x)`` as a new contiguous tensor of x's dtype; c: 0-dim, read on the device."""
    x, h, f = x.contiguous(), h.contiguous(), f.contiguous()
    c = c.reshape(()).contiguous()
    out = torch.empty_like(x)
    n = x.numel()
    if n:
        _depth_residual_fwd_kernel[(triton.cdiv(n, _BLOCK),)](x, h, f, c, out, n, BLOCK=_BLOCK, num_warps=8)
    return out


def depth_residual_bwd(dout: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``((1 - c) dout, c dout)`` in one pass (gradients of x and of ``h + f``), dout's dtype."""
    dout = dout.contiguous()
    c = c.reshape(()).contiguous()
    dx = torch.empty_like(dout)
    dy = torch.empty_like(dout)
    n = dout.numel()
    if n:
        _depth_residual_bwd_kernel[(triton.cdiv(n, _BLOCK),)](dout, c, dx, dy, n, BLOCK=_BLOCK, num_warps=8)
    return dx, dy


# Autograd and torch.compile wiring: megatron_msg/kernels/ops.py (custom op megatron_msg::depth_residual_add).
