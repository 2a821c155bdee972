"""Learning-rate schedule: linear warm-up, then cosine/linear/constant decay to ``min_lr``,
with optional rewinds to the peak at growth events (the MSG paper rewinds at the
1st and 2nd growth).

After a rewind at step ``r`` the schedule behaves as if training restarted at
``r``: an optional short warm-up (``lr.rewind_warmup_steps``), then decay from
the peak to ``min_lr`` at the same end step as the original schedule.  The LR is
a pure function of the step and the (config-given) rewind steps, so resuming
needs no scheduler state.
"""
from __future__ import annotations

import math

from megatron_msg.config import LRConfig, OptimizerConfig


def lr_at(step: int, opt: OptimizerConfig, sched: LRConfig, total_steps: int,
          rewind_steps: list[int] = ()) -> float:
    peak, floor = opt.lr, opt.min_lr
    anchors = [r for r in rewind_steps if r <= step]
    if anchors:
        anchor, warmup = max(anchors), sched.rewind_warmup_steps
    else:
        anchor, warmup = 0, sched.warmup_steps
    k = step - anchor
    if k < warmup:
        return peak * (k + 1) / warmup
    if sched.decay == "constant":
        return peak
    start = anchor + warmup
    end = sched.decay_steps if sched.decay_steps is not None else total_steps
    if end <= start:
        return floor
    progress = min(1.0, (step - start) / (end - start))
    if sched.decay == "linear":
        return peak + (floor - peak) * progress
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
