"""Dynamic loss scaling for fp16 training on any TP x PP x DP layout.

fp16 activations overflow above 65,504 and flush small gradients to zero, so the
loss is multiplied by a scale S before the backward pass and the gradients by
1/S after it.  S halves whenever a step's gradients overflow (that step is
skipped: no optimizer update) and doubles after ``window`` clean steps in a row,
staying as large as the run allows (Megatron's and DeepSpeed's dynamic scaler).
S is a power of two times the initial scale, so scaling and unscaling are exact
unless something overflows or underflows.

Why not ``torch.amp.GradScaler``: every rank must take the same skip decision,
but GradScaler looks only at its own process's gradients (a TP rank whose shard
overflowed would skip while its neighbour stepped), keeps its state per
optimizer object (rebuilt at every growth), and is not in our checkpoints.
Here the decision is made on the global gradient norm, which
``parallel.grads.clip_grad_norm`` already all-reduces over the model-parallel
group and which is identical on data-parallel replicas (their gradients are
summed first), so a non-finite entry anywhere makes it non-finite on every rank
and no extra collective is needed.  The scaler's state is part of the
checkpoint, so a resumed run skips exactly the steps the uninterrupted one does.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from megatron_msg.parallel.grads import grad_of


@dataclass
class DynamicLossScaler:
    scale: float = 65536.0
    window: int = 1000       # clean steps in a row before the scale doubles
    min_scale: float = 1.0   # the scale never halves below this
    clean_steps: int = 0     # clean steps since the last change of scale
    skipped_steps: int = 0   # overflowed (skipped) steps over the whole run

    @torch.no_grad()
    def unscale_(self, model: torch.nn.Module) -> None:
        """Divide every gradient by the scale (after the gradient synchronisation)."""
        inv = 1.0 / self.scale
        for p in model.parameters():
            if (g := grad_of(p)) is not None:
                g.mul_(inv)

    def update(self, grads_finite: bool) -> bool:
        """Record one step's outcome; returns whether the optimizer should apply it."""
        if not grads_finite:
            self.skipped_steps += 1
            self.clean_steps = 0
            self.scale = max(self.scale / 2.0, self.min_scale)
            return False
        self.clean_steps += 1
        if self.clean_steps >= self.window:
            self.scale *= 2.0
            self.clean_steps = 0
        return True

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        """Restore the dynamic part; window and min_scale stay as configured for this run."""
        self.scale = float(state["scale"])
        self.clean_steps = int(state["clean_steps"])
        self.skipped_steps = int(state["skipped_steps"])
