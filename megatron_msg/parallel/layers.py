"""Tensor-parallel layers: column/row-parallel linear, vocab-parallel embedding and CE.

Parameter names and meanings are those of the unsharded model (``weight`` is
``[out, in]``); each rank holds a contiguous block of the split dimension, cut
from the logical tensor by ``checkpoint/shard.py``.  With ``TensorParallel()``
(size 1) every layer is the ordinary single-device layer.

The vocabulary is split in blocks of ``ceil(vocab / tp)`` rows; the last block
is padded with rows that no token id selects and whose logits are excluded from
the softmax, so the sharded model computes exactly the unpadded model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from megatron_msg.kernels.folding import fold_masks
from megatron_msg.parallel.mappings import (copy_to_tp, gather_from_sequence, reduce_from_tp,
                                            reduce_scatter_to_sequence)


@dataclass(frozen=True)
class TensorParallel:
    """What a layer needs to know about tensor parallelism."""

    size: int = 1
    rank: int = 0
    group: object = None
    sequence_parallel: bool = False

    def local(self, n: int, what: str) -> int:
        if n % self.size:
            raise ValueError(f"{what}={n} is not divisible by the tensor-parallel size {self.size}")
        return n // self.size

    def vocab_range(self, vocab: int) -> tuple[int, int, int]:
        """(first id, rows per rank incl. padding, real rows) of this rank's vocab block."""
        rows = math.ceil(vocab / self.size)
        start = self.rank * rows
        return start, rows, max(0, min(rows, vocab - start))

    @property
    def splits_sequence(self) -> bool:
        """Whether activations between TP regions hold only this rank's slice of the sequence."""
        return self.sequence_parallel and self.size > 1

    def sequence_slice(self, seq_len: int) -> slice:
        """The positions of a ``seq_len`` sequence this rank holds (all of them without SP)."""
        if not self.splits_sequence:
            return slice(0, seq_len)
        if seq_len % self.size:
            raise ValueError(f"sequence length {seq_len} is not divisible by the tensor-parallel size "
                             f"{self.size} (sequence parallelism gives every rank an equal slice)")
        n = seq_len // self.size
        return slice(self.rank * n, (self.rank + 1) * n)

    def enter(self, x: torch.Tensor) -> torch.Tensor:
        """Input of a column-parallel layer (all-gathers the sequence under SP)."""
        return gather_from_sequence(x, self.group) if self.sequence_parallel else copy_to_tp(x, self.group)

    def leave(self, x: torch.Tensor) -> torch.Tensor:
        """Output of a row-parallel layer (reduce-scatters the sequence under SP)."""
        return reduce_scatter_to_sequence(x, self.group) if self.sequence_parallel else reduce_from_tp(x, self.group)


class ColumnParallelLinear(nn.Module):
    """``y = x W^T + b`` with W's output rows split across ranks; output stays split."""

    def __init__(self, in_features: int, out_features: int, tp: TensorParallel, bias: bool = True,
                 what: str = "out_features"):
        super().__init__()
        self.tp = tp
        self.weight = nn.Parameter(torch.empty(tp.local(out_features, what), in_features))
        self.bias = nn.Parameter(torch.zeros(self.weight.shape[0])) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.tp.enter(x), self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """``y = x W^T + b`` with W's input columns split across ranks; output all-reduced.

    The bias is added once, after the reduction.  MSG masks next to the layer
    (``out_mask * linear(in_mask * x)``, in_mask: this rank's input columns, out_mask:
    all outputs) are folded into the weight (kernels/folding.py): no pass over the
    activations, and the result equals masking them.
    """

    def __init__(self, in_features: int, out_features: int, tp: TensorParallel, bias: bool = True,
                 what: str = "in_features"):
        super().__init__()
        self.tp = tp
        self.weight = nn.Parameter(torch.empty(out_features, tp.local(in_features, what)))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x: torch.Tensor, in_mask: torch.Tensor | None = None,
                out_mask: torch.Tensor | None = None) -> torch.Tensor:
        weight, bias = fold_masks(self.weight, self.bias, in_mask, out_mask)
        y = self.tp.leave(F.linear(x, weight))
        return y if bias is None else y + bias


class VocabParallelEmbedding(nn.Module):
    """Token embedding with the vocabulary split in row blocks; lookups all-reduced
    (reduce-scattered along the sequence under sequence parallelism)."""

    def __init__(self, vocab: int, hidden: int, tp: TensorParallel):
        super().__init__()
        self.tp, self.vocab = tp, vocab
        self.start, rows, _ = tp.vocab_range(vocab)
        self.weight = nn.Parameter(torch.empty(rows, hidden))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        # Sum of the ranks' partial lookups; under SP a reduce-scatter, so the output is
        # already this rank's sequence slice (the layer feeding the split region).
        return self.tp.leave(out)


class _VocabParallelCE(torch.autograd.Function):
    """Per-token cross entropy over logits split by vocabulary block."""

    @staticmethod
    def forward(ctx, logits, targets, start, real, group, ignore_index):
        logits = logits.float()
        if real < logits.shape[-1]:  # padding rows never win and never count
            logits = logits.clone()
            logits[..., real:] = float("-inf")
        top = logits.max(dim=-1).values
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - top.unsqueeze(-1)
        exp = shifted.exp()
        sum_exp = exp.sum(dim=-1)
        dist.all_reduce(sum_exp, group=group)
        local = targets - start
        mine = (local >= 0) & (local < real)
        idx = local.clamp(0, logits.shape[-1] - 1)
        picked = shifted.gather(-1, idx.unsqueeze(-1)).squeeze(-1) * mine
        dist.all_reduce(picked, group=group)
        ignored = targets == ignore_index
        loss = (sum_exp.log() - picked).masked_fill(ignored, 0.0)
        ctx.save_for_backward(exp, sum_exp, idx, mine, ignored)
        return loss

    @staticmethod
    def backward(ctx, g):
        exp, sum_exp, idx, mine, ignored = ctx.saved_tensors
        grad = exp / sum_exp.unsqueeze(-1)
        grad.scatter_add_(-1, idx.unsqueeze(-1), -mine.to(grad.dtype).unsqueeze(-1))
        grad = grad * g.masked_fill(ignored, 0.0).unsqueeze(-1)
        return grad, None, None, None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, tp: TensorParallel,
                                 vocab: int, ignore_index: int = -100) -> torch.Tensor:
    """Mean cross entropy over non-ignored targets; ``logits`` hold this rank's vocab block.

    A batch whose targets are all ignored (a BERT micro-batch with no masked
    token) contributes 0 with zero gradient, instead of PyTorch's 0/0 = NaN.
    """
    flat, tgt = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
    count = (tgt != ignore_index).sum().clamp(min=1)
    if tp.size == 1:
        return F.cross_entropy(flat[:, :vocab].float(), tgt, ignore_index=ignore_index, reduction="sum") / count
    start, _, real = tp.vocab_range(vocab)
    per_token = _VocabParallelCE.apply(flat, tgt, start, real, tp.group, ignore_index)
    return per_token.sum() / count


def gather_vocab_logits(logits: torch.Tensor, tp: TensorParallel, vocab: int) -> torch.Tensor:
    """Full ``[..., vocab]`` logits from vocab-split ones (drops the padding)."""
    from megatron_msg.parallel.mappings import gather_from_tp
    return gather_from_tp(logits, tp.group)[..., :vocab]
