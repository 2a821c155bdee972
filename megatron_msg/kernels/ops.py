"""The fused MSG ops as ``torch.library`` custom ops (namespace ``megatron_msg``).

Why: an ``autograd.Function`` that launches Triton or a pybind11 extension is
opaque Python to torch.compile (it graph-breaks or, worse, traces into the
launcher) and cannot sit in a captured graph.  A custom op is one node in the
dispatcher: Dynamo/AOTAutograd put it in the graph as is, the fake (meta)
implementation gives Inductor the output shapes and dtypes without running
it, and the backward registered with ``register_autograd`` is itself a
custom op, so the backward graph holds the fused backward kernel too.

Ops (``torch.ops.megatron_msg.<name>``); ``backend`` is ``"reference"``,
``"triton"`` or ``"cuda"`` (already resolved: see ``backend.resolve``):

``masked_layer_norm_fwd(x, weight, bias, mask, eps, backend) -> (y, mean, rstd)``
    MSG eq. 16-19; mean/rstd are the per-row statistics the backward needs,
    shape ``x.shape[:-1]``, dtype fp32 (fp64 for fp64 input, reference only).
``masked_layer_norm_bwd(dy, x, weight, mask, mean, rstd, dres, bias_dtype, backend) -> (dx, dw, db)``
    ``dres`` (optional, x's shape) is added to dx in the same pass.
``add_masked_layer_norm_fwd(x, delta, weight, bias, mask, eps, backend) -> (y, h, mean, rstd)``
    ``h = x + delta`` (x's dtype), ``y = masked_ln(h)``; backward = the op above with ``dres = dh``.
``depth_residual_add(x, h, f, c, backend) -> out`` and ``depth_residual_add_bwd(dout, c, backend) -> (dx, dy)``
    ``x + c ((h + f) - x)``.

Every op has a PyTorch implementation (``backend="reference"``, any device),
which is also used for input the kernels do not take (fp64), so the fake
implementations can state one dtype rule.  Σc is always reduced on the device:
no op reads a tensor value on the host, so they are safe in CUDA graphs.
Outputs are always freshly allocated and contiguous.

Eager calls (no compile trace, no dispatch mode) run an ``autograd.Function``
twin of each op instead (``masked_layer_norm`` etc. at the end of this file):
the same implementation, ``setup_context`` and backward, called directly.
The custom-op path costs several times more Python per call (dispatcher
round trips, output alias checks), and host time is what limits the eager
Triton path already.

The mask (and the depth mask c) are schedule values: the ops give them no
gradient, and their backward raises if one is asked for (the dispatch
functions in ``megatron_msg.kernels`` route a mask that requires grad to the
plain PyTorch definition instead).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.utils._python_dispatch import _get_current_dispatch_mode

from megatron_msg.kernels.backend import BACKENDS

NAMESPACE = "megatron_msg"
# I/O dtypes the Triton and CUDA kernels take; anything else uses the reference implementation.
FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def stats_dtype(x: Tensor) -> torch.dtype:
    """dtype of the saved mean/rstd: fp32, or fp64 for fp64 input (reference implementation)."""
    return torch.promote_types(x.dtype, torch.float32)


def _kernel(backend: str, *tensors: Tensor) -> str:
    """The implementation to run: ``backend`` unless the dtypes need the reference."""
    if backend not in BACKENDS:
        raise ValueError(f"megatron_msg ops: backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "reference" and any(t.dtype not in FUSED_DTYPES for t in tensors):
        return "reference"
    return backend


def _rows(t: Tensor) -> Tensor:
    return t.reshape(-1)


# ---------------------------------------------------------------------------
# PyTorch implementations (backend "reference"): the same formulas as
# megatron_msg.kernels.reference.masked_layer_norm_reference and the kernels'
# docstrings, accumulating in at least fp32.


def _ln_fwd_ref(x: Tensor, weight: Tensor, bias: Tensor, mask: Tensor, eps: float):
    acc = stats_dtype(x)
    xf = x.to(acc)
    c = mask.to(acc)
    inv_s = 1.0 / c.sum()  # a 0-dim device tensor: no host sync
    mean = (xf * c).sum(-1) * inv_s
    d = xf - mean.unsqueeze(-1)
    var = (d * d * c).sum(-1) * inv_s
    rstd = torch.rsqrt(var + eps)
    y = (d * rstd.unsqueeze(-1) * weight.to(acc) + bias.to(acc)) * c
    return y.to(x.dtype).contiguous(), mean.contiguous(), rstd.contiguous()


def _ln_bwd_ref(dy, x, weight, mask, mean, rstd, dres, bias_dtype):
    acc = stats_dtype(x)
    n = x.shape[-1]
    c = mask.to(acc)
    xhat = (x.to(acc) - mean.to(acc).unsqueeze(-1)) * rstd.to(acc).unsqueeze(-1)
    dyc = dy.to(acc) * c
    g = dyc * weight.to(acc)
    inv_s = 1.0 / c.sum()
    a = g.sum(-1, keepdim=True) * inv_s
    b = (g * xhat).sum(-1, keepdim=True) * inv_s
    dx = rstd.to(acc).unsqueeze(-1) * (g - c * (a + xhat * b))
    if dres is not None:
        dx = dx + dres.to(acc)
    dw = (dyc * xhat).reshape(-1, n).sum(0)
    db = dyc.reshape(-1, n).sum(0)
    return dx.to(x.dtype).contiguous(), dw.to(weight.dtype), db.to(bias_dtype)


# ---------------------------------------------------------------------------
# masked LayerNorm


def _ln_fwd_impl(x: Tensor, weight: Tensor, bias: Tensor, mask: Tensor, eps: float,
                 backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """Masked LayerNorm forward -> (y, mean, rstd); mean/rstd have shape x.shape[:-1]."""
    kind = _kernel(backend, x)
    if kind == "triton":
        from megatron_msg.kernels import triton_masked_ln as tml  # lazy: triton is optional
        y, mean, rstd, _ = tml.masked_ln_fwd(x, weight, bias, mask, eps)
    elif kind == "cuda":
        from megatron_msg.kernels import cuda_ext
        y, mean, rstd = cuda_ext.fwd(x, weight, bias, mask, eps)
    else:
        return _ln_fwd_ref(x, weight, bias, mask, eps)
    return y, mean.view(x.shape[:-1]), rstd.view(x.shape[:-1])


masked_layer_norm_fwd = torch.library.custom_op(f"{NAMESPACE}::masked_layer_norm_fwd", _ln_fwd_impl,
                                                mutates_args=())


@masked_layer_norm_fwd.register_fake
def _(x, weight, bias, mask, eps, backend):
    st = stats_dtype(x)
    return (x.new_empty(x.shape), x.new_empty(x.shape[:-1], dtype=st),
            x.new_empty(x.shape[:-1], dtype=st))


def _ln_bwd_impl(dy: Tensor, x: Tensor, weight: Tensor, mask: Tensor, mean: Tensor, rstd: Tensor,
                 dres: Optional[Tensor], bias_dtype: torch.dtype, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """Masked LayerNorm backward -> (dx, dweight, dbias); dx gets ``dres`` added when given."""
    kind = _kernel(backend, x)
    if kind == "triton":
        from megatron_msg.kernels import triton_masked_ln as tml
        dx, dw, db = tml.masked_ln_bwd(dy, x, weight, mask, _rows(mean), _rows(rstd),
                                       bias_dtype=bias_dtype, dres=dres)
        return dx, dw, db
    if kind == "cuda":
        from megatron_msg.kernels import cuda_ext
        dx, dw, db = cuda_ext.bwd(dy, x, weight, mask, mean, rstd, bias_dtype)
        if dres is not None:  # the CUDA kernel has no residual input: one extra pass
            dx.add_(dres)
        return dx, dw, db
    return _ln_bwd_ref(dy, x, weight, mask, mean, rstd, dres, bias_dtype)


masked_layer_norm_bwd = torch.library.custom_op(f"{NAMESPACE}::masked_layer_norm_bwd", _ln_bwd_impl,
                                                mutates_args=())


@masked_layer_norm_bwd.register_fake
def _(dy, x, weight, mask, mean, rstd, dres, bias_dtype, backend):
    n = x.shape[-1]
    return x.new_empty(x.shape), weight.new_empty((n,)), weight.new_empty((n,), dtype=bias_dtype)


def _no_mask_grad(ctx, index: int, what: str) -> None:
    if ctx.needs_input_grad[index]:
        raise RuntimeError(f"megatron_msg fused ops give no gradient for {what}; "
                           "use the reference backend for a mask that requires grad")


def _ln_setup(ctx, inputs, output):
    x, weight, bias, mask, _eps, backend = inputs
    _, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.save_for_backward(x, weight, mask, mean, rstd)
    ctx.bias_dtype = bias.dtype
    ctx.backend = backend


def _ln_backward(bwd):
    def backward(ctx, dy, _dmean, _drstd):
        _no_mask_grad(ctx, 3, "the LayerNorm mask")
        x, weight, mask, mean, rstd = ctx.saved_tensors
        dx, dw, db = bwd(dy, x, weight, mask, mean, rstd, None, ctx.bias_dtype, ctx.backend)
        return dx, dw, db, None, None, None
    return backward


masked_layer_norm_fwd.register_autograd(_ln_backward(masked_layer_norm_bwd), setup_context=_ln_setup)


class _EagerMaskedLayerNorm(torch.autograd.Function):
    """The same forward, context and backward as the custom op, without the dispatcher round trips."""

    @staticmethod
    def forward(ctx, *args):  # ctx-style forward: a separate setup_context costs an inspect.signature per call
        out = _ln_fwd_impl(*args)
        _ln_setup(ctx, args, out)
        return out

    backward = staticmethod(once_differentiable(_ln_backward(_ln_bwd_impl)))


# ---------------------------------------------------------------------------
# residual add fused with masked LayerNorm


def _add_ln_fwd_impl(x: Tensor, delta: Tensor, weight: Tensor, bias: Tensor, mask: Tensor, eps: float,
                     backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``h = x + delta`` (x's dtype) and masked LayerNorm of h -> (y, h, mean, rstd).

    Triton does both in one pass; the CUDA backend adds in PyTorch, then runs its LayerNorm.
    """
    kind = _kernel(backend, x, delta)
    if kind == "triton":
        from megatron_msg.kernels import triton_masked_ln as tml
        y, mean, rstd, h = tml.masked_ln_fwd(x, weight, bias, mask, eps, delta=delta)
        return y, h, mean.view(x.shape[:-1]), rstd.view(x.shape[:-1])
    h = (x + delta).to(x.dtype)
    if kind == "cuda":
        from megatron_msg.kernels import cuda_ext
        y, mean, rstd = cuda_ext.fwd(h, weight, bias, mask, eps)
        return y, h, mean.view(x.shape[:-1]), rstd.view(x.shape[:-1])
    y, mean, rstd = _ln_fwd_ref(h, weight, bias, mask, eps)
    return y, h, mean, rstd


add_masked_layer_norm_fwd = torch.library.custom_op(f"{NAMESPACE}::add_masked_layer_norm_fwd", _add_ln_fwd_impl,
                                                    mutates_args=())


@add_masked_layer_norm_fwd.register_fake
def _(x, delta, weight, bias, mask, eps, backend):
    st = stats_dtype(x)
    return (x.new_empty(x.shape), x.new_empty(x.shape), x.new_empty(x.shape[:-1], dtype=st),
            x.new_empty(x.shape[:-1], dtype=st))


def _add_ln_setup(ctx, inputs, output):
    _x, delta, weight, bias, mask, _eps, backend = inputs
    _, h, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.save_for_backward(h, weight, mask, mean, rstd)
    ctx.delta_dtype = delta.dtype
    ctx.bias_dtype = bias.dtype
    ctx.backend = backend


def _add_ln_backward(bwd):
    def backward(ctx, dy, dh, _dmean, _drstd):
        _no_mask_grad(ctx, 4, "the LayerNorm mask")
        h, weight, mask, mean, rstd = ctx.saved_tensors
        dsum, dw, db = bwd(dy, h, weight, mask, mean, rstd, dh, ctx.bias_dtype, ctx.backend)
        return dsum, dsum.to(ctx.delta_dtype), dw, db, None, None, None
    return backward


add_masked_layer_norm_fwd.register_autograd(_add_ln_backward(masked_layer_norm_bwd), setup_context=_add_ln_setup)


class _EagerAddMaskedLayerNorm(torch.autograd.Function):
    """The custom op add_masked_layer_norm_fwd for eager calls."""

    @staticmethod
    def forward(ctx, *args):  # ctx-style forward: a separate setup_context costs an inspect.signature per call
        out = _add_ln_fwd_impl(*args)
        _add_ln_setup(ctx, args, out)
        return out

    backward = staticmethod(once_differentiable(_add_ln_backward(_ln_bwd_impl)))


# ---------------------------------------------------------------------------
# depth mask fused into the last residual add


def _depth_fwd_impl(x: Tensor, h: Tensor, f: Tensor, c: Tensor, backend: str) -> Tensor:
    """``x + c ((h + f) - x)``, ``h + f`` rounded to x's dtype; c is a 0-dim tensor.

    Triton for both fused backends (there is no CUDA-extension version).
    """
    if _kernel(backend, x, h, f) == "reference":
        return torch.lerp(x, (h + f).to(x.dtype), c.to(x.dtype)).contiguous()
    from megatron_msg.kernels import triton_elementwise as te
    return te.depth_residual_fwd(x, h, f, c)


depth_residual_add = torch.library.custom_op(f"{NAMESPACE}::depth_residual_add", _depth_fwd_impl, mutates_args=())


@depth_residual_add.register_fake
def _(x, h, f, c, backend):
    return x.new_empty(x.shape)


def _depth_bwd_impl(dout: Tensor, c: Tensor, backend: str) -> tuple[Tensor, Tensor]:
    """-> ``((1 - c) dout, c dout)``: the gradients of x and of ``h + f``."""
    if _kernel(backend, dout) == "reference":
        acc = stats_dtype(dout)
        g, cc = dout.to(acc), c.to(acc)
        return ((1 - cc) * g).to(dout.dtype).contiguous(), (cc * g).to(dout.dtype).contiguous()
    from megatron_msg.kernels import triton_elementwise as te
    return te.depth_residual_bwd(dout, c)


depth_residual_add_bwd = torch.library.custom_op(f"{NAMESPACE}::depth_residual_add_bwd", _depth_bwd_impl,
                                                 mutates_args=())


@depth_residual_add_bwd.register_fake
def _(dout, c, backend):
    return dout.new_empty(dout.shape), dout.new_empty(dout.shape)


def _depth_setup(ctx, inputs, output):
    _x, h, f, c, backend = inputs
    ctx.save_for_backward(c)
    ctx.h_dtype, ctx.f_dtype = h.dtype, f.dtype
    ctx.backend = backend


def _depth_backward(bwd):
    def backward(ctx, dout):
        _no_mask_grad(ctx, 3, "the depth mask")
        (c,) = ctx.saved_tensors
        dx, dy = bwd(dout, c, ctx.backend)
        return dx, dy.to(ctx.h_dtype), dy.to(ctx.f_dtype), None, None
    return backward


depth_residual_add.register_autograd(_depth_backward(depth_residual_add_bwd), setup_context=_depth_setup)


class _EagerDepthResidualAdd(torch.autograd.Function):
    """The custom op depth_residual_add for eager calls."""

    @staticmethod
    def forward(ctx, *args):  # ctx-style forward: a separate setup_context costs an inspect.signature per call
        out = _depth_fwd_impl(*args)
        _depth_setup(ctx, args, out)
        return out

    backward = staticmethod(once_differentiable(_depth_backward(_depth_bwd_impl)))


# ---------------------------------------------------------------------------
# entry points for the dispatch functions in megatron_msg/kernels/__init__.py


def _eager(x: Tensor) -> bool:
    """True for plain eager calls: no torch.compile trace, no dispatch mode (export, fake tensors).

    Then the ops' autograd.Function twins run: the same implementations and
    backward, minus the custom-op machinery's Python overhead (~4x an
    autograd.Function's per call, measured on CPU), which adds to the host
    time that already limits the Triton path (docs/kernel_notes.md).
    Everything that traces gets the custom op.
    """
    if torch.compiler.is_compiling() or type(x) is not torch.Tensor:
        return False
    return _get_current_dispatch_mode() is None


def masked_layer_norm(x: Tensor, weight: Tensor, bias: Tensor, mask: Tensor, eps: float, backend: str):
    """-> (y, mean, rstd): the custom op when traced, its autograd.Function twin in eager mode."""
    if _eager(x):
        return _EagerMaskedLayerNorm.apply(x, weight, bias, mask, eps, backend)
    return masked_layer_norm_fwd(x, weight, bias, mask, eps, backend)


def add_masked_layer_norm(x: Tensor, delta: Tensor, weight: Tensor, bias: Tensor, mask: Tensor, eps: float,
                          backend: str):
    """-> (y, h, mean, rstd)."""
    if _eager(x):
        return _EagerAddMaskedLayerNorm.apply(x, delta, weight, bias, mask, eps, backend)
    return add_masked_layer_norm_fwd(x, delta, weight, bias, mask, eps, backend)


def depth_residual(x: Tensor, h: Tensor, f: Tensor, c: Tensor, backend: str) -> Tensor:
    if _eager(x):
        return _EagerDepthResidualAdd.apply(x, h, f, c, backend)
    return depth_residual_add(x, h, f, c, backend)


__all__ = ["masked_layer_norm_fwd", "masked_layer_norm_bwd", "add_masked_layer_norm_fwd",
           "depth_residual_add", "depth_residual_add_bwd", "masked_layer_norm", "add_masked_layer_norm",
           "depth_residual", "stats_dtype", "FUSED_DTYPES", "NAMESPACE"]
