"""Pipeline parallelism: a small non-interleaved 1F1B schedule with point-to-point communication.

The model is cut into ``num_stages`` consecutive pieces, one per rank of a pipeline. A
training step pushes ``num_micro`` micro-batches through it. Each stage runs (Megatron's
"PipeDream-flush" / 1F1B schedule)::

    warm-up    min(num_stages - stage - 1, num_micro) forwards, outputs sent downstream
    steady     one forward, then one backward, until every forward has run
    cool-down  the backwards still owed for the warm-up forwards

so stage ``s`` holds at most ``num_stages - s`` micro-batches' activations at once instead of
all ``num_micro`` (as GPipe's all-forwards-then-all-backwards would). Backwards run in
micro-batch order on every stage, so parameter gradients are accumulated in the same order as
a plain gradient-accumulation loop; with one stage the schedule *is* that loop
(fwd0, bwd0, fwd1, bwd1, ...) and does no communication.

Communication
-------------
In the steady state stage ``s`` sends an activation forward to ``s + 1`` while ``s + 1`` sends
a gradient backward to ``s``. With blocking ``send`` then ``recv`` on both sides each one waits
for a receive the other never posts: deadlock. So every exchange with a neighbour is a pair
of non-blocking ``isend``/``irecv`` that are both posted before either is waited on.
``dist.batch_isend_irecv`` would do the same, but on gloo it can hang (see DESIGN.md), so it is
not used.

Within a pair the ops are posted in one fixed order per link: the upstream stage posts
"send to next" before "recv from next", the downstream stage posts "recv from prev" before
"send to prev". Both ends of a link thus post their ops in the same order. Gloo does not
care (its ops are truly asynchronous), but NCCL runs the p2p ops of one rank pair on one
stream in posting order, so if both ends posted their receive first they would deadlock.
This is the ordering Megatron uses when it does not batch p2p ops.

All p2p uses *global* ranks (``PipeComm.prev_rank``/``next_rank``), so several pipelines
(data- or tensor-parallel replicas) can run side by side in one world, each rank talking
only to its own neighbours. Nothing here names a device: buffers are created on the device
passed in, so the same code runs with gloo on CPU and NCCL on GPUs.

Why not DeepSpeed's pipeline engine
-----------------------------------
DeepSpeed's ``PipelineModule`` fixes the layer partition when the engine is built. MSG depth
growth rebuilds the model with a different number of layers per stage at every growth event,
which would mean tearing down and rebuilding the engine (and its optimizer and buffers) each
time. The schedule below knows nothing about the model -- the trainer hands it a
``stage_fn`` closing over whatever layers this stage currently owns -- so growth stays a
model-side operation.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class PipeComm:
    """Where this rank sits in its pipeline. Ranks are global ranks of the default group."""

    prev_rank: int | None  # rank of stage - 1, None on the first stage
    next_rank: int | None  # rank of stage + 1, None on the last stage
    stage: int = 0
    num_stages: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.stage < self.num_stages:
            raise ValueError(f"PipeComm: stage {self.stage} not in [0, {self.num_stages})")
        if (self.prev_rank is None) != (self.stage == 0):
            raise ValueError(f"PipeComm: stage {self.stage} with prev_rank={self.prev_rank}")
        if (self.next_rank is None) != (self.stage == self.num_stages - 1):
            raise ValueError(f"PipeComm: stage {self.stage} of {self.num_stages} with next_rank={self.next_rank}")

    @property
    def is_first(self) -> bool:
        return self.prev_rank is None

    @property
    def is_last(self) -> bool:
        return self.next_rank is None

    @classmethod
    def from_ranks(cls, pipeline_ranks: Sequence[int], rank: int) -> "PipeComm":
        """PipeComm for global ``rank`` in the pipeline whose stages are ``pipeline_ranks`` in order."""
        ranks = list(pipeline_ranks)
        stage = ranks.index(rank)
        return cls(prev_rank=ranks[stage - 1] if stage > 0 else None,
                   next_rank=ranks[stage + 1] if stage + 1 < len(ranks) else None,
                   stage=stage, num_stages=len(ranks))


# ---------------------------------------------------------------------------------------------
# Point-to-point helpers. Each returns once all of its transfers have completed. On a stage
# without the neighbour in question they do nothing (and receives return None), so the
# schedule below is the same code on the first, middle and last stages.
# ---------------------------------------------------------------------------------------------

def _wait(works) -> None:
    for w in works:
        w.wait()


def _send_then_recv(send: torch.Tensor | None, recv_buf: torch.Tensor | None, peer: int | None) -> None:
    """Exchange with the NEXT stage: post send, then recv (the downstream end posts the mirror order)."""
    if peer is None:
        return
    works = []
    if send is not None:
        works.append(dist.isend(send, dst=peer))
    if recv_buf is not None:
        works.append(dist.irecv(recv_buf, src=peer))
    _wait(works)


def _recv_then_send(recv_buf: torch.Tensor | None, send: torch.Tensor | None, peer: int | None) -> None:
    """Exchange with the PREVIOUS stage: post recv, then send."""
    if peer is None:
        return
    works = []
    if recv_buf is not None:
        works.append(dist.irecv(recv_buf, src=peer))
    if send is not None:
        works.append(dist.isend(send, dst=peer))
    _wait(works)


class _P2P:
    """The six transfers of the schedule, bound to one stage's neighbours and activation spec."""

    def __init__(self, comm: PipeComm, shape: tuple[int, ...], dtype: torch.dtype,
                 device: torch.device, requires_grad: bool):
        self.comm, self.shape, self.dtype, self.device = comm, tuple(shape), dtype, device
        self.requires_grad = requires_grad

    def _buf(self) -> torch.Tensor:
        return torch.empty(self.shape, dtype=self.dtype, device=self.device)

    def _wire(self, t: torch.Tensor, what: str) -> torch.Tensor:
        # A shape mismatch would corrupt or hang the peer's receive; fail loudly here instead.
        if tuple(t.shape) != self.shape:
            raise ValueError(f"pipeline stage {self.comm.stage}: {what} has shape {tuple(t.shape)}, "
                             f"expected act_shape {self.shape}")
        return t.detach().to(self.dtype).contiguous()

    def recv_forward(self) -> torch.Tensor | None:
        if self.comm.is_first:
            return None
        x = self._buf()
        _recv_then_send(x, None, self.comm.prev_rank)
        # A fresh leaf: its .grad after backward is exactly what the previous stage needs.
        return x.requires_grad_(self.requires_grad)

    def send_forward(self, y: torch.Tensor) -> None:
        if not self.comm.is_last:
            _send_then_recv(self._wire(y, "stage output"), None, self.comm.next_rank)

    def recv_backward(self) -> torch.Tensor | None:
        if self.comm.is_last:
            return None
        g = self._buf()
        _send_then_recv(None, g, self.comm.next_rank)
        return g

    def send_backward(self, gx: torch.Tensor | None) -> None:
        if not self.comm.is_first:
            _recv_then_send(None, self._wire(gx, "input gradient"), self.comm.prev_rank)

    def send_forward_recv_backward(self, y: torch.Tensor) -> torch.Tensor | None:
        if self.comm.is_last:
            return None
        g = self._buf()
        _send_then_recv(self._wire(y, "stage output"), g, self.comm.next_rank)
        return g

    def send_backward_recv_forward(self, gx: torch.Tensor | None) -> torch.Tensor | None:
        if self.comm.is_first:
            return None
        x = self._buf()
        _recv_then_send(x, self._wire(gx, "input gradient"), self.comm.prev_rank)
        return x.requires_grad_(self.requires_grad)


def stage_backward(x: torch.Tensor | None, y: torch.Tensor, gy: torch.Tensor | None) -> torch.Tensor | None:
    """Backward of one micro-batch on this stage; returns the gradient for the previous stage."""
    if gy is None:  # last stage: y is the (already scaled) loss
        y.backward()
    else:
        torch.autograd.backward(y, gy.to(y.dtype))
    if x is None:  # first stage: nothing to send back
        return None
    # A stage that ignores its input still owes the previous stage a gradient (zeros).
    return x.grad if x.grad is not None else torch.zeros_like(x)


def run_pipeline(stage_fn: Callable[[int, torch.Tensor | None], torch.Tensor], num_micro: int,
                 comm: PipeComm, act_shape: tuple[int, ...], act_dtype: torch.dtype,
                 device: torch.device, forward_only: bool = False) -> list[torch.Tensor]:
    """1F1B over ``num_micro`` micro-batches.

    ``stage_fn(micro, x) -> Tensor``: ``x`` is None on the first stage, else the activation
    received from the previous stage (a fresh leaf of ``act_shape``/``act_dtype``, with
    ``requires_grad=True`` unless ``forward_only``). On a non-last stage it returns the
    activation to send (shape ``act_shape``; cast to ``act_dtype`` for the wire). On the last
    stage it returns the micro-batch's scalar loss, already scaled by the caller; the schedule
    calls ``.backward()`` on it as is.

    Returns the detached losses on the last stage in micro-batch order, ``[]`` elsewhere.
    ``forward_only=True`` (evaluation): forwards only, under ``torch.no_grad``.
    """
    if num_micro < 1:
        raise ValueError(f"run_pipeline: num_micro must be >= 1, got {num_micro}")
    p2p = _P2P(comm, act_shape, act_dtype, device, requires_grad=not forward_only)
    losses: list[torch.Tensor] = []

    def forward(micro: int, x: torch.Tensor | None) -> torch.Tensor:
        y = stage_fn(micro, x)
        if comm.is_last:
            losses.append(y.detach())
        return y

    if forward_only:
        # Data only flows downstream, so plain in-order forwards cannot deadlock.
        with torch.no_grad():
            for micro in range(num_micro):
                p2p.send_forward(forward(micro, p2p.recv_forward()))
        return losses

    num_warmup = min(comm.num_stages - comm.stage - 1, num_micro)
    num_steady = num_micro - num_warmup
    in_flight: deque[tuple[torch.Tensor | None, torch.Tensor]] = deque()  # (input, output) FIFO

    # Warm-up: fill the pipeline downstream of this stage.
    for micro in range(num_warmup):
        x = p2p.recv_forward()
        y = forward(micro, x)
        p2p.send_forward(y)
        in_flight.append((x, y))

    # Steady state: each forward's send is paired with the receive of the gradient of the
    # oldest in-flight micro-batch, and each backward's send with the next forward's input.
    x = p2p.recv_forward() if num_steady > 0 else None
    for i in range(num_steady):
        y = forward(num_warmup + i, x)
        gy = p2p.send_forward_recv_backward(y)
        in_flight.append((x, y))
        old_x, old_y = in_flight.popleft()
        gx = stage_backward(old_x, old_y, gy)
        del old_x, old_y  # free this micro-batch's activations now, not at the next iteration
        if i == num_steady - 1:
            p2p.send_backward(gx)
        else:
            x = p2p.send_backward_recv_forward(gx)

    # Cool-down: the backwards owed for the warm-up forwards.
    while in_flight:
        gy = p2p.recv_backward()
        old_x, old_y = in_flight.popleft()
        p2p.send_backward(stage_backward(old_x, old_y, gy))
        del old_x, old_y

    return losses
