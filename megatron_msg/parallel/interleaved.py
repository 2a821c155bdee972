"""Run any pipeline schedule of parallel/schedule.py on real ranks: the interleaved 1F1B executor.

The plain 1F1B loop (pipeline.py) pairs each send with the matching receive by hand. With
virtual stages a micro-batch leaves the last rank for the first one again (chunk c of rank
p-1 feeds chunk c+1 of rank 0), so each rank talks to both neighbours in both directions and
hand-pairing gets fragile. Instead every rank derives the same timed schedule
(``schedule.simulated``: fixed costs, each op as early as its rank and inputs allow) and
uses its clock only to *agree on when to talk*:

* an op's output (activation or input gradient) is transferred at the tick its op ends;
* a rank walks the ticks that concern it in order: at each, it runs its own op ending there
  (waiting first for that op's inputs to have arrived), then *posts* that tick's transfers,
  non-blocking. A receive is waited on only by the op that needs it, and sends only at the
  end of the step, so a transfer never holds up work that does not depend on it.

Both ends of every transfer post it while handling the same tick, and every rank handles
ticks in increasing order, so each link's transfers are posted in one agreed order at both
ends (no tags needed). Within a tick, for each peer, the lower stage posts send then receive
and the higher stage receive then send, the same order at both ends, which NCCL needs (it
runs one rank pair's p2p ops on one stream, in posting order). The only blocking wait is an
op waiting for an input produced at an earlier tick, by a rank that itself waits only on
still earlier ticks: by induction on ticks, the run cannot deadlock. Real ops take real
time; the simulated clock fixes only the order of events, never a wait.

Bit-exactness: a parameter belongs to one chunk, and each chunk's backwards run in
micro-batch order, so gradients accumulate in the order of a plain accumulation loop.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Sequence

import torch
import torch.distributed as dist

from megatron_msg.parallel.pipeline import PipeComm, run_pipeline, stage_backward
from megatron_msg.parallel.schedule import Op, rank_and_chunk, simulated, virtual_stage


@dataclass(frozen=True)
class _Tick:
    op: Op | None                          # this rank's op ending at this tick
    sends: tuple[tuple[int, Op], ...]      # (peer stage, the peer's op the tensor is for)
    recvs: tuple[tuple[int, Op], ...]      # (peer stage, this rank's op the tensor is for)


def _consumer(kind: str, micro: int, vstage: int, stages: int, virtual: int) -> tuple[int, Op] | None:
    """Who needs the output of op ``kind`` at ``vstage``: (rank, op), or None (the ends)."""
    target = vstage + 1 if kind == "F" else vstage - 1
    if not 0 <= target < stages * virtual:
        return None
    rank, chunk = rank_and_chunk(target, stages)
    return rank, Op(kind, micro, chunk)


@lru_cache(maxsize=256)
def rank_ticks(stages: int, virtual: int, num_micro: int, train: bool, rank: int) -> tuple[tuple[int, _Tick], ...]:
    """(tick, what this rank does at it), in tick order."""
    sim = simulated(stages, virtual, num_micro, train)
    ops, sends, recvs = {}, {}, {}
    for timed_rank in sim.timed:
        for t in timed_rank:
            target = _consumer(t.op.kind, t.op.micro, virtual_stage(t.op.chunk, t.rank, stages), stages, virtual)
            if t.rank == rank:
                ops[t.end] = t.op
            if target is None:
                continue
            if t.rank == rank:
                sends.setdefault(t.end, []).append(target)
            if target[0] == rank:
                recvs.setdefault(t.end, []).append((t.rank, target[1]))
    ticks = sorted(set(ops) | set(sends) | set(recvs))
    return tuple((k, _Tick(ops.get(k), tuple(sends.get(k, ())), tuple(recvs.get(k, ())))) for k in ticks)


def run_scheduled_pipeline(stage_fn: Callable[[int, int, torch.Tensor | None], torch.Tensor], num_micro: int,
                           pipeline_ranks: Sequence[int], stage: int, virtual: int, act_shape: tuple[int, ...],
                           act_dtype: torch.dtype, device: torch.device,
                           forward_only: bool = False) -> list[torch.Tensor]:
    """Interleaved 1F1B (or, for evaluation, forwards only) over ``num_micro`` micro-batches.

    ``stage_fn(micro, chunk, x)``: ``x`` is None on virtual stage 0, else the received activation
    (a fresh leaf; ``requires_grad`` unless ``forward_only``). It returns the activation for the
    next virtual stage, or on the last one (chunk ``virtual - 1`` of the last rank) the
    micro-batch's scaled scalar loss. ``pipeline_ranks``: the global ranks of stages 0..p-1.
    Returns the detached losses in micro-batch order on the last rank, ``[]`` elsewhere.
    """
    stages = len(pipeline_ranks)
    last = stages * virtual - 1
    shape = tuple(act_shape)
    received: dict[Op, tuple] = {}   # (work, buffer) of an input activation / output gradient, by its op
    in_flight: dict[tuple[int, int], tuple] = {}  # (micro, chunk) -> (input, output) awaiting backward
    sent: list[tuple] = []           # (work, tensor): kept alive until the step's end
    losses: dict[int, torch.Tensor] = {}

    def wire(t: torch.Tensor, what: str) -> torch.Tensor:
        if tuple(t.shape) != shape:  # a wrong shape would corrupt or hang the peer's receive
            raise ValueError(f"pipeline stage {stage}: {what} has shape {tuple(t.shape)}, expected act_shape {shape}")
        return t.detach().to(act_dtype).contiguous()

    def arrived(op: Op) -> torch.Tensor:
        work, buf = received.pop(op)
        work.wait()
        # Activations arrive as fresh leaves: their .grad after backward is what goes back.
        return buf.requires_grad_(not forward_only) if op.kind == "F" else buf

    def run(op: Op) -> torch.Tensor | None:
        """Run ``op``; return what it sends on (None at the ends of the pipeline)."""
        v = virtual_stage(op.chunk, stage, stages)
        if op.kind == "F":
            x = arrived(op) if v > 0 else None
            y = stage_fn(op.micro, op.chunk, x)
            if v == last:
                losses[op.micro] = y.detach()
            if not forward_only:
                in_flight[(op.micro, op.chunk)] = (x, y)
            return None if v == last else wire(y, "stage output")
        x, y = in_flight.pop((op.micro, op.chunk))
        gx = stage_backward(x, y, arrived(op) if v < last else None)
        return None if v == 0 else wire(gx, "input gradient")

    for _, tick in rank_ticks(stages, virtual, num_micro, not forward_only, stage):
        out = run(tick.op) if tick.op is not None else None
        by_peer: dict[int, list] = {}
        for peer, _ in tick.sends:
            by_peer.setdefault(peer, []).append(("send", out, None))
        for peer, for_op in tick.recvs:
            by_peer.setdefault(peer, []).append(("recv", torch.empty(shape, dtype=act_dtype, device=device), for_op))
        for peer in sorted(by_peer):
            # Lower stage sends first, higher stage receives first: both ends post in one order.
            first = "send" if stage < peer else "recv"
            for kind, t, for_op in sorted(by_peer[peer], key=lambda e: e[0] != first):
                if kind == "send":
                    sent.append((dist.isend(t, dst=pipeline_ranks[peer]), t))
                else:
                    received[for_op] = (dist.irecv(t, src=pipeline_ranks[peer]), t)
    for work, _ in sent:
        work.wait()
    if received or in_flight:
        raise AssertionError(f"pipeline stage {stage}: schedule left {len(received)} transfers and "
                             f"{len(in_flight)} activations unused")
    return [losses[m] for m in sorted(losses)]


def run_chunked_pipeline(chunk_fn: Callable[[int, int, torch.Tensor | None], torch.Tensor], num_micro: int,
                         pipeline_ranks: Sequence[int], stage: int, virtual: int, act_shape: tuple[int, ...],
                         act_dtype: torch.dtype, device: torch.device,
                         forward_only: bool = False) -> list[torch.Tensor]:
    """``chunk_fn`` through plain 1F1B (pipeline.py) with one chunk per stage, else interleaved 1F1B.

    Same contract as :func:`run_scheduled_pipeline`; with ``virtual == 1`` the chunk is always 0.
    """
    if virtual > 1:
        return run_scheduled_pipeline(chunk_fn, num_micro, pipeline_ranks, stage, virtual, act_shape, act_dtype,
                                      device, forward_only=forward_only)
    return run_pipeline(lambda i, x: chunk_fn(i, 0, x), num_micro,
                        PipeComm.from_ranks(pipeline_ranks, pipeline_ranks[stage]), act_shape, act_dtype, device,
                        forward_only=forward_only)
