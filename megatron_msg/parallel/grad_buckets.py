"""Data-parallel gradient all-reduce in buckets, overlapped with backward (``parallel.overlap_grad_reduce``).

Without it the replicas' gradients are summed after the last backward pass (grads.py,
step 3).  With it, as Megatron's and torch's DDP do, the parameters are grouped into
buckets of about ``bucket_mb`` in the reverse of their order in the model (about the order
backward produces their gradients), and a bucket's all-reduce is launched asynchronously as
soon as every gradient in it is final, while backward goes on producing the others.

* Final means: its post-accumulate hook has fired once per micro-batch of the step
  (``begin_step(n)``), so gradient accumulation still reduces once per optimizer step.
* Buckets are launched strictly in index order (a ready bucket waits for the ones before
  it), so every replica issues the same collectives in the same order whatever the order
  of its hooks.
* ``finish()`` launches what backward left (a parameter without gradient this step: it
  has none on any replica, which run the same graph, and keeps none), waits for
  everything, and writes the sums back into the gradients (``grad_of``: the fp32
  accumulator of a 16-bit parameter).
* Left out, and reduced after backward as before (grads.py): the tied embedding on a
  pipeline (its two copies sum first) and sequence-parallel parameters (their TP sum
  comes first), so their order of summation is unchanged.  ZeRO-2 keeps its one
  reduce-scatter after backward (zero.py).

Equality: the sum of each entry over the replicas is the same set of numbers; with two
replicas it is bit for bit today's (``a + b``), with more the collective's order of
summation can depend on where the entry sits in the buffer (tested within float noise).
The buckets belong to one model: a growth builds new ones for the grown model.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_msg.parallel.grads import grad_of


class GradBuckets:
    def __init__(self, named_params, group, bucket_mb: float = 25.0, exclude: set[str] = frozenset()):
        if bucket_mb <= 0:
            raise ValueError(f"parallel.bucket_mb must be > 0, got {bucket_mb}")
        self.group = group
        params = [(n, p) for n, p in named_params if p.requires_grad and n not in exclude]
        self.names = frozenset(n for n, _ in params)  # reduced here, not after backward
        self.buckets: list[list[torch.nn.Parameter]] = []
        limit, current, size = bucket_mb * 2 ** 20, [], 0
        for _, p in reversed(params):  # backward meets the last layers first
            current.append(p)
            size += p.numel() * 4
            if size >= limit:
                self.buckets.append(current)
                current, size = [], 0
        if current:
            self.buckets.append(current)
        self._bucket_of = {p: i for i, b in enumerate(self.buckets) for p in b}
        self._buffers: list[torch.Tensor | None] = [None] * len(self.buckets)
        self._works: list = [None] * len(self.buckets)
        self._pending = [0] * len(self.buckets)
        self._seen: dict[torch.nn.Parameter, int] = {}
        self._expected = 0
        self._next = 0  # the next bucket to launch
        self._armed = False
        self.launched_during_backward = 0  # buckets of the current step launched from a hook
        self._handles = [p.register_post_accumulate_grad_hook(self._on_gradient) for _, p in params]

    def remove(self) -> None:
        """Unregister the hooks (the model is being replaced)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def begin_step(self, micro_batches: int) -> None:
        """Arm the hooks for a step of ``micro_batches`` backward passes on this rank."""
        self._expected = micro_batches
        self._seen = {}
        self._pending = [len(b) for b in self.buckets]
        self._works = [None] * len(self.buckets)
        self._next = 0
        self.launched_during_backward = 0
        self._armed = micro_batches > 0

    def _on_gradient(self, p: torch.nn.Parameter) -> None:
        if not self._armed:
            return  # a backward outside a training step
        seen = self._seen.get(p, 0) + 1
        self._seen[p] = seen
        if seen != self._expected:
            return
        i = self._bucket_of[p]
        self._pending[i] -= 1
        while self._next < len(self.buckets) and self._pending[self._next] == 0:
            self._launch(self._next)
            self.launched_during_backward += 1

    @torch.no_grad()
    def _launch(self, i: int) -> None:
        grads = [grad_of(p) for p in self.buckets[i]]
        dtypes = {g.dtype for g in grads if g is not None}
        if len(dtypes) > 1:
            raise TypeError(f"gradient bucket {i} mixes dtypes {sorted(map(str, dtypes))}")
        dtype = dtypes.pop() if dtypes else torch.float32
        device = self.buckets[i][0].device
        n = sum(p.numel() for p in self.buckets[i])
        buf = self._buffers[i]
        if buf is None or buf.dtype != dtype or buf.numel() != n:
            buf = self._buffers[i] = torch.empty(n, dtype=dtype, device=device)
        offset = 0
        for p, g in zip(self.buckets[i], grads):
            k = p.numel()
            if g is None:
                buf[offset:offset + k].zero_()  # no gradient (then none on any replica: same graph)
            else:
                buf[offset:offset + k].copy_(g.reshape(-1))
            offset += k
        self._works[i] = dist.all_reduce(buf, group=self.group, async_op=True)
        self._next = i + 1

    @torch.no_grad()
    def finish(self) -> None:
        """Launch what is left, wait for every bucket, and put the sums into the gradients."""
        while self._next < len(self.buckets):
            self._launch(self._next)
        self._armed = False
        for i, bucket in enumerate(self.buckets):
            self._works[i].wait()
            buf, offset = self._buffers[i], 0
            for p in bucket:
                k = p.numel()
                g = grad_of(p)
                if g is not None:
                    g.copy_(buf[offset:offset + k].view(p.shape))
                offset += k
        self._works = [None] * len(self.buckets)
