"""Training batches built ahead of the step that uses them, in one background thread (``train.prefetch``).

A batch source's ``get(step, micro)`` is a pure function of its arguments (training/batches.py),
so building it earlier, in another thread, gives the same tensors: data order and resume
stay bit-identical by construction, whatever the prefetch depth.  One worker thread makes
every ``get`` call of the wrapped source, one after another, so the source never sees two
calls at once (its readers need not be thread-safe); the step only waits on results.  On a
CUDA device the worker also pins the batch's host memory, so the trainer's
``.to(device, non_blocking=True)`` copies asynchronously.

Which micro-batches a step needs (``keys_of_step``) can change at a growth event that changes
the layout; a prefetched batch nobody asks for is dropped once its step has passed, and
one asked for that was not prefetched is built on request.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor

import torch


class PrefetchedBatches:
    """``source.get(step, micro)``, built up to ``depth`` steps ahead of the step asked for."""

    def __init__(self, source, keys_of_step: Callable[[int], Iterable[int]], depth: int, pin_memory: bool = False):
        if depth < 1:
            raise ValueError(f"prefetch depth must be >= 1, got {depth}")
        self.source, self.depth, self.pin_memory = source, depth, pin_memory
        self._keys_of_step = keys_of_step
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="msg-prefetch")
        self._pending: dict[tuple[int, int], Future] = {}
        self._ahead = -1  # the last step whose batches have been submitted

    def _build(self, step: int, micro: int) -> dict:
        batch = self.source.get(step, micro)
        if self.pin_memory:
            batch = {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        return batch

    def _submit(self, step: int, micro: int) -> Future:
        key = (step, micro)
        if key not in self._pending:
            self._pending[key] = self._pool.submit(self._build, step, micro)
        return self._pending[key]

    def get(self, step: int, micro: int) -> dict:
        for old in [k for k in self._pending if k[0] < step]:  # steps that have passed
            self._pending.pop(old).cancel()
        future = self._submit(step, micro)
        for ahead in range(max(step, self._ahead + 1), step + self.depth + 1):  # queue the next steps
            for m in self._keys_of_step(ahead):
                self._submit(ahead, m)
            self._ahead = ahead
        del self._pending[(step, micro)]
        return future.result()

    def close(self) -> None:
        for f in self._pending.values():
            f.cancel()
        self._pending.clear()
        self._pool.shutdown(wait=True)
