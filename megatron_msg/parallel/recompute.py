"""Activation recomputation ("full" in Megatron's terms): keep a layer's input, redo its forward in backward.

A recomputed layer saves nothing for backward but its input; when backward
reaches it, its forward runs again (under autograd this time) and the gradient
flows through that second run.  Memory for a stage's activations drops from
every intermediate of every layer to one tensor per layer plus one layer's
intermediates at a time, for about one extra forward of the recomputed layers
(docs/parallel.md, "Activation recomputation").

The second forward must be the first one again, bit for bit, or the gradient
belongs to another function.  Dropout is the catch: it draws from the default
generators and from the TP-region generator that ``RNGTracker.fork`` swaps in
(parallel/random.py), and both have moved on by the time backward runs.  So the
generators' states (default and tracker) are captured when the layer first
runs and replayed around the recomputation, then put back, so the rest of the
step draws what it would have drawn without recomputation.  Autocast state is
replayed by ``torch.utils.checkpoint`` itself.

Non-reentrant checkpointing is used: it works with inputs that do not require
grad, with the pipeline's ``torch.autograd.backward`` on stage outputs, and it
checks that the recomputed forward saved tensors of the same shapes.
"""
from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from megatron_msg.config import RECOMPUTE_MODES
from megatron_msg.parallel.random import RNGTracker


@dataclass(frozen=True)
class RecomputePolicy:
    """Which of a pipeline stage's layers recompute their activations in backward.

    ``num_layers`` 0 means every layer of the stage; N means the first N of them
    (Megatron's "block" method: the stage's later layers, whose activations live
    the shortest under 1F1B, keep theirs and cost no extra forward).
    """
    enabled: bool = False
    num_layers: int = 0

    @classmethod
    def from_config(cls, mode: str, num_layers: int = 0) -> "RecomputePolicy":
        if mode not in RECOMPUTE_MODES:
            raise ValueError(f"recompute mode {mode!r}: expected one of {RECOMPUTE_MODES}")
        return cls(enabled=mode == "full", num_layers=num_layers)

    def recomputes(self, position: int) -> bool:
        """Whether the stage's ``position``-th layer (0 = its first) is recomputed."""
        return self.enabled and (self.num_layers == 0 or position < self.num_layers)


class _GeneratorStates:
    """The generator states a layer's forward starts from (default generators and the tracker's)."""

    def __init__(self, tracker: RNGTracker | None, device: torch.device):
        # Without a tracker, a bare one on ``device`` still reaches the default generators.
        self.tracker = tracker or RNGTracker(device)
        self.own_tracker = tracker is not None
        self.saved = None

    def capture(self):
        tracked = self.tracker.get_states() if self.own_tracker else None
        return self.tracker.default_states(), tracked

    def restore(self, states) -> None:
        default, tracked = states
        self.tracker.set_default_states(default)
        if tracked is not None:
            self.tracker.set_states(tracked)

    @contextmanager
    def record(self):
        self.saved = self.capture()
        yield

    @contextmanager
    def replay(self):
        after = self.capture()
        self.restore(self.saved)
        try:
            yield
        finally:
            self.restore(after)


def recompute(fn: Callable[..., torch.Tensor], *args, rng: RNGTracker | None = None,
              random: bool = True) -> torch.Tensor:
    """``fn(*args)`` whose intermediates are recomputed in backward instead of saved.

    ``rng``: the tracker ``fn``'s dropout forks from (None: ``fn`` draws only from the
    default generators of its first tensor argument's device).  ``random=False`` says
    ``fn`` draws no random numbers (no dropout), so no generator state is replayed:
    that form is the one ``torch.compile`` can trace (it cannot trace the replay).
    """
    if not random:
        return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=False)
    device = next(a.device for a in args if isinstance(a, torch.Tensor))
    states = _GeneratorStates(rng, device)
    return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=False,
                      context_fn=lambda: (states.record(), states.replay()))
