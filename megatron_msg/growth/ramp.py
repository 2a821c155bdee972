"""The mask ramp: new units' masks rise linearly from 0 to 1 over ``phi`` optimizer steps.

Growth happens before the forward pass of step ``at_step``; the forward pass of
step ``s`` then uses ``c = min(1, (s - at_step) / phi)``, so the first step after
growth runs exactly the old function (c = 0) and step ``at_step + phi`` runs the
plain model with the masks removed.

Because ramps never overlap (config validation), every mask entry is either 1
(an old unit) or the current ramp value (a new unit).  Raising the masks is then
a single on-device ``clamp_(min=c)`` per buffer: no per-entry bookkeeping, no host
sync, idempotent (so a resumed run simply recomputes ``c`` from the step).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MaskRamp:
    start_step: int
    phi: int

    def value(self, step: int) -> float:
        return min(1.0, max(0.0, (step - self.start_step) / self.phi))

    def finished(self, step: int) -> bool:
        return step >= self.start_step + self.phi


@torch.no_grad()
def apply_ramp(model, ramp: MaskRamp | None, step: int) -> MaskRamp | None:
    """Set the model's masks for the forward pass of ``step``; returns the ramp still active.

    At the ramp's end the masks are set to exactly 1 and the model switches to its
    unmasked fast path.
    """
    if ramp is None:
        model.set_masked(False)
        return None
    c = ramp.value(step)
    for buf in model.mask_buffers().values():
        buf.clamp_(min=c)
    if ramp.finished(step):
        model.set_masked(False)
        return None
    model.set_masked(True)
    return ramp
