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


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, g):
        return _all_reduce(g, ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, g):
        return g, None


class _ScatterToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split(x, -1, group)

    @staticmethod
    def backward(ctx, g):
        return _all_gather(g, -1, ctx.group), None


class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_gather(x, -1, group)

    @staticmethod
    def backward(ctx, g):
        return _split(g, -1, ctx.group), None


class _ScatterToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split(x, SEQ_DIM, group)

    @staticmethod
    def backward(ctx, g):
        return _all_gather(g, SEQ_DIM, ctx.group), None


class _GatherFromSequence(torch.autograd.Function):
    # Feeds a column-parallel layer: every rank's gradient for the full sequence is a
    # partial sum over its own output columns, so backward reduce-scatters it.
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_gather(x, SEQ_DIM, group)

    @staticmethod
    def backward(ctx, g):
        return _reduce_scatter(g, SEQ_DIM, ctx.group), None


class _ReduceScatterToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter(x, SEQ_DIM, group)

    @staticmethod
    def backward(ctx, g):
        return _all_gather(g, SEQ_DIM, ctx.group), None


class _GatherSequenceForReplicated(torch.autograd.Function):
    # Feeds a computation every TP rank repeats identically (BERT's pooler): each rank's
    # gradient for the full sequence is already the whole gradient, so backward keeps
    # this rank's slice instead of summing tp identical copies.
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_gather(x, SEQ_DIM, group)

    @staticmethod
    def backward(ctx, g):
        return _split(g, SEQ_DIM, ctx.group), None


def _wrap(fn):
    def apply(x: torch.Tensor, group) -> torch.Tensor:
        if _size(group) == 1:
            return x
        return fn.apply(x, group)
    apply.__name__ = fn.__name__.lstrip("_")
    return apply


copy_to_tp = _wrap(_CopyToTP)
reduce_from_tp = _wrap(_ReduceFromTP)
scatter_to_tp = _wrap(_ScatterToTP)
gather_from_tp = _wrap(_GatherFromTP)
scatter_to_sequence = _wrap(_ScatterToSequence)
gather_from_sequence = _wrap(_GatherFromSequence)
reduce_scatter_to_sequence = _wrap(_ReduceScatterToSequence)
gather_sequence_for_replicated = _wrap(_GatherSequenceForReplicated)
