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

from megatron_msg.parallel.interleaved import run_chunked_pipeline
from megatron_msg.parallel.topology import ParallelState


def my_micro_batches(grad_accum: int, ps: ParallelState) -> range:
    if grad_accum % ps.dp_size:
        raise ValueError(f"train.grad_accum={grad_accum} is not divisible by parallel.dp={ps.dp_size} "
                         "(data-parallel replicas take equal shares of a step's micro-batches)")
    n = grad_accum // ps.dp_size
    return range(ps.dp_rank * n, (ps.dp_rank + 1) * n)


def forward_backward(stage_forward: Callable[..., torch.Tensor], ps: ParallelState,
                     get_batch: Callable[[int], dict], micro_ids: range, scale: float,
                     act_shape: tuple[int, ...], forward_only: bool = False,
                     before_micro: Callable[[int, int], None] | None = None,
                     autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
                     act_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Run ``micro_ids`` through this rank's pipeline; return the replica's summed scaled loss.

    ``stage_forward(x, batch, chunk)`` is the stage model's ``stage_forward`` (or a compiled
    version of it). ``get_batch(micro)`` gives the micro-batch (every stage loads it: later
    stages need the attention mask, the last one the labels; with several chunks per stage it
    is loaded once and shared by them). ``before_micro(micro, vstage)`` runs before each forward
    of a chunk (RNG seeding); ``vstage`` is the virtual stage ``chunk * pp + pp_rank``, the
    pipeline rank when there is one chunk. The returned loss is known on every stage of the
    pipeline (broadcast from the last), not yet summed over data-parallel replicas.
    ``act_dtype``: the residual stream's dtype, sent between stages (the parameters' dtype:
    fp32 under autocast from fp32 weights, bf16/fp16 with 16-bit parameters).
    ``ps.vpp_size > 1`` runs interleaved 1F1B (parallel/interleaved.py), else plain 1F1B.
    """
    autocast = autocast or contextlib.nullcontext
    virtual = ps.vpp_size
    batches: dict[int, dict] = {}

    def chunk_fn(i: int, chunk: int, x: torch.Tensor | None) -> torch.Tensor:
        micro = micro_ids[i]
        if before_micro is not None:
            before_micro(micro, chunk * ps.pp_size + ps.pp_rank)
        if i not in batches:
            batches[i] = get_batch(micro)
        batch = batches[i] if chunk < virtual - 1 else batches.pop(i)  # the last chunk is its last use
        with autocast():
            out = stage_forward(x, batch, chunk) if virtual > 1 else stage_forward(x, batch)
        return out * scale if ps.is_last_stage and chunk == virtual - 1 else out

    ctx = torch.no_grad() if forward_only else contextlib.nullcontext()
    with ctx:
        losses = run_chunked_pipeline(chunk_fn, len(micro_ids), ps.pipeline_ranks(), ps.pp_rank, virtual,
                                      act_shape, act_dtype, ps.device, forward_only=forward_only)
    total = torch.stack(losses).float().sum() if losses else torch.zeros((), device=ps.device)
    if ps.pp_size > 1:
        dist.all_reduce(total, group=ps.pp_group)  # only the last stage holds a non-zero value
    return total.detach()
