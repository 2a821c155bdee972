"""Autograd communication functions for tensor (and sequence) parallelism.

Each function's backward is the conjugate of its forward (Megatron, nanotron):

    copy_to_tp            fwd identity              bwd all-reduce
    reduce_from_tp        fwd all-reduce            bwd identity
    scatter_to_tp         fwd split last dim        bwd all-gather last dim
    gather_from_tp        fwd all-gather last dim   bwd split last dim
    scatter_to_sequence   fwd split sequence dim    bwd all-gather sequence dim
    gather_from_sequence  fwd all-gather sequence   bwd reduce-scatter sequence
    reduce_scatter_to_sequence  fwd reduce-scatter  bwd all-gather sequence
    gather_sequence_for_replicated  fwd all-gather sequence  bwd split sequence

Activations are ``[batch, seq, hidden]``, so the sequence dimension is 1.  With
``group=None`` (one process, or tp == 1) every function is the identity, so a
model written with them is the plain model on one device.  gloo has no
reduce-scatter, so that falls back to all-reduce + local slice there.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

SEQ_DIM = 1


def _size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    x = x.contiguous().clone()
    dist.all_reduce(x, group=group)
    return x


def _split(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    n = _size(group)
    if x.shape[dim] % n:
        raise ValueError(f"cannot split dimension {dim} of size {x.shape[dim]} into {n} equal parts")
    return x.chunk(n, dim=dim)[dist.get_rank(group)].contiguous()


def _all_gather(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def _reduce_scatter(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    if dist.get_backend(group) != "gloo":
        chunks = [c.contiguous() for c in x.chunk(_size(group), dim=dim)]
        out = torch.empty_like(chunks[0])
        dist.reduce_scatter(out, chunks, group=group)
        return out
    return _split(_all_reduce(x, group), dim, group)


def _identity(x: torch.Tensor, group) -> torch.Tensor:
    return x


def _last(op):
    return lambda x, group: op(x, -1, group)


def _seq(op):
    return lambda x, group: op(x, SEQ_DIM, group)


class _Conjugate(torch.autograd.Function):
    """``forward(x) = fwd(x)``, ``backward(g) = bwd(g)``: one Function for every mapping below."""

    @staticmethod
    def forward(ctx, x, group, fwd, bwd):
        ctx.group, ctx.bwd = group, bwd
        return fwd(x, group)

    @staticmethod
    def backward(ctx, g):
        return ctx.bwd(g, ctx.group), None, None, None


def _mapping(name: str, fwd, bwd, doc: str):
    def apply(x: torch.Tensor, group) -> torch.Tensor:
        if _size(group) == 1:
            return x
        return _Conjugate.apply(x, group, fwd, bwd)
    apply.__name__, apply.__doc__ = name, doc
    return apply


copy_to_tp = _mapping("copy_to_tp", _identity, _all_reduce, "Input of a TP region.")
reduce_from_tp = _mapping("reduce_from_tp", _all_reduce, _identity, "Output of a row-parallel layer.")
scatter_to_tp = _mapping("scatter_to_tp", _last(_split), _last(_all_gather), "Keep this rank's last-dim block.")
gather_from_tp = _mapping("gather_from_tp", _last(_all_gather), _last(_split), "Concatenate last-dim blocks.")
scatter_to_sequence = _mapping("scatter_to_sequence", _seq(_split), _seq(_all_gather),
                               "Keep this rank's sequence slice.")
# Feeds a column-parallel layer: every rank's gradient for the full sequence is a
# partial sum over its own output columns, so backward reduce-scatters it.
gather_from_sequence = _mapping("gather_from_sequence", _seq(_all_gather), _seq(_reduce_scatter),
                                "All-gather the sequence before a column-parallel layer.")
reduce_scatter_to_sequence = _mapping("reduce_scatter_to_sequence", _seq(_reduce_scatter), _seq(_all_gather),
                                      "Output of a row-parallel layer under sequence parallelism.")
# Feeds a computation every TP rank repeats identically (BERT's pooler): each rank's
# gradient for the full sequence is already the whole gradient, so backward keeps
# this rank's slice instead of summing tp identical copies.
gather_sequence_for_replicated = _mapping("gather_sequence_for_replicated", _seq(_all_gather), _seq(_split),
                                          "All-gather the sequence for a replicated computation.")
