"""One forward/backward over a step's micro-batches on any TP x PP x DP layout.

The step's ``grad_accum`` micro-batches are dealt to data-parallel replicas in
contiguous blocks (replica ``d`` runs micro-batches ``d*n .. d*n+n-1`` with
``n = grad_accum / dp``) and each replica pushes its block through its
pipeline with the 1F1B schedule.  Every micro-batch's loss is scaled by
``1 / grad_accum``, so after the data-parallel gradient sum the step's
gradient equals that of one process running all micro-batches: micro-batches
are split, never rows within one, which keeps BERT's per-micro-batch MLM mean
identical too.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.distributed as dist

from megatron_msg.parallel.pipeline import PipeComm, run_pipeline
from megatron_msg.parallel.topology import ParallelState


def pipe_comm(ps: ParallelState) -> PipeComm:
    prev, nxt = ps.stage_neighbours()
    return PipeComm(prev, nxt, stage=ps.pp_rank, num_stages=ps.pp_size)


def my_micro_batches(grad_accum: int, ps: ParallelState) -> range:
    if grad_accum % ps.dp_size:
        raise ValueError(f"train.grad_accum={grad_accum} is not divisible by parallel.dp={ps.dp_size} "
                         "(data-parallel replicas take equal shares of a step's micro-batches)")
    n = grad_accum // ps.dp_size
    return range(ps.dp_rank * n, (ps.dp_rank + 1) * n)


def forward_backward(stage_forward: Callable[[torch.Tensor | None, dict], torch.Tensor], ps: ParallelState, get_batch: Callable[[int], dict], micro_ids: range,
                     scale: float, act_shape: tuple[int, ...], forward_only: bool = False,
                     before_micro: Callable[[int], None] | None = None,
                     autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
                     act_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Run ``micro_ids`` through this rank's pipeline; return the replica's summed scaled loss.

    ``stage_forward`` is the stage model's ``stage_forward`` (or a compiled version of it).
    ``get_batch(micro)`` gives the micro-batch (every stage loads it: later stages need
    the attention mask, the last one the labels); ``before_micro(micro)`` runs before
    each forward (RNG seeding).  The returned loss is known on every stage of the
    pipeline (broadcast from the last), not yet summed over data-parallel replicas.
    ``act_dtype``: the residual stream's dtype, sent between stages (the parameters'
    dtype: fp32 under autocast from fp32 weights, bf16/fp16 with 16-bit parameters).
    """
    autocast = autocast or contextlib.nullcontext

    def stage_fn(i: int, x: torch.Tensor | None) -> torch.Tensor:
        micro = micro_ids[i]
        if before_micro is not None:
            before_micro(micro)
        with autocast():
            out = stage_forward(x, get_batch(micro))
        return out * scale if ps.is_last_stage else out

    ctx = torch.no_grad() if forward_only else contextlib.nullcontext()
    with ctx:
        losses = run_pipeline(stage_fn, len(micro_ids), pipe_comm(ps), act_shape, act_dtype,
                              ps.device, forward_only=forward_only)
    total = torch.stack(losses).float().sum() if losses else torch.zeros((), device=ps.device)
    if ps.pp_size > 1:
        dist.all_reduce(total, group=ps.pp_group)  # only the last stage holds a non-zero value
    return total.detach()
