"""Dropout randomness under tensor parallelism, and why it is a function of the step.

Two kinds of dropout exist in a tensor-parallel model (Megatron's RNG tracker):

* dropout on *replicated* activations (embeddings, residual stream) must draw
  the same mask on every TP rank, or the replicas silently diverge; it uses the
  default generator, seeded identically across TP ranks;
* dropout on *split* activations (attention probabilities of a rank's own
  heads) must draw different masks per rank, or all heads share one pattern;
  it runs inside ``tracker.fork()``, which swaps in a generator seeded with the
  TP rank.

Both are reseeded before every micro-batch from ``(seed, step, micro, stage)``.
That makes dropout a pure function of the position in training, so a resumed
run draws the masks an uninterrupted one would (no generator state to save),
whatever the 1F1B interleaving; and because the single-process model uses the
tracker too, replicated-region masks are identical at any TP size.

On CUDA the fork swaps the device generator's state; elsewhere (CPU, tests)
it swaps the CPU generator's state: the CPU fallback.
"""
from __future__ import annotations

import hashlib
from contextlib import contextmanager

import torch

TP_REGION = "tensor-parallel"


def derive_seed(*parts) -> int:
    """A 63-bit seed from any tuple of values: stable across runs and platforms."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class RNGTracker:
    """Named generator states that ``fork`` swaps in for the default generator."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        # A name holds either a seed not yet drawn from (cheap to set every micro-batch)
        # or the generator state left by its last fork.
        self._seeds: dict[str, int] = {}
        self._states: dict[str, torch.Tensor] = {}

    def _generator(self) -> torch.Generator:
        if self.device.type == "cuda":
            index = self.device.index if self.device.index is not None else torch.cuda.current_device()
            return torch.cuda.default_generators[index]
        return torch.default_generator

    def seed(self, name: str, seed: int) -> None:
        self._seeds[name] = seed & ((1 << 63) - 1)
        self._states.pop(name, None)

    @contextmanager
    def fork(self, name: str = TP_REGION):
        if name not in self._states and name not in self._seeds:
            raise KeyError(f"RNG state {name!r} was never seeded")
        gen = self._generator()
        outer = gen.get_state()
        if name in self._states:
            gen.set_state(self._states[name])
        else:
            gen.manual_seed(self._seeds.pop(name))
        try:
            yield
        finally:
            self._states[name] = gen.get_state()
            gen.set_state(outer)

    def get_states(self) -> tuple[dict[str, int], dict[str, torch.Tensor]]:
        """A snapshot of every named state (activation recomputation replays from it)."""
        return dict(self._seeds), dict(self._states)

    def set_states(self, states: tuple[dict[str, int], dict[str, torch.Tensor]]) -> None:
        seeds, gen_states = states
        self._seeds, self._states = dict(seeds), dict(gen_states)

    def default_states(self) -> tuple[torch.Tensor, ...]:
        """The default generators' states: the device's (on CUDA) and the CPU's."""
        if self.device.type == "cuda":
            return (self._generator().get_state(), torch.default_generator.get_state())
        return (torch.default_generator.get_state(),)

    def set_default_states(self, states: tuple[torch.Tensor, ...]) -> None:
        if self.device.type == "cuda":
            self._generator().set_state(states[0])
        torch.default_generator.set_state(states[-1])

    def seed_micro_batch(self, seed: int, step: int, micro: int, pp_rank: int = 0, tp_rank: int = 0) -> None:
        """Seed both generators for one micro-batch (see the module docstring)."""
        default = derive_seed(seed, step, micro, "default", pp_rank)
        self._generator().manual_seed(default)
        if self.device.type == "cuda":
            torch.default_generator.manual_seed(default)  # CPU-side randomness stays reproducible too
        self.seed(TP_REGION, derive_seed(seed, step, micro, TP_REGION, pp_rank, tp_rank))
