"""Learning-rate schedule: linear warm-up, then cosine/linear/constant decay to ``min_lr``,
in segments that restart at growth events.

The run starts a segment at step 0 (``optimizer.lr``, ``optimizer.min_lr``,
``lr.warmup_steps``).  A growth stage starts a new one at its step when it rewinds
the LR (``rewind_lr``, as the MSG paper does at the 1st and 2nd growth) or sets its own
``lr`` / ``min_lr`` / ``warmup_steps`` (as FLM-101B does at every growth: 4e-4, 3.4e-4,
2e-4).  Within the segment that began at step ``r`` the schedule behaves as if training
restarted at ``r``: a warm-up from 0 to the segment's peak over its warm-up steps
(inherited: ``lr.rewind_warmup_steps``; 0 jumps to the peak), then decay from the peak to
the segment's floor, ending at the same step as the original schedule
(``lr.decay_steps``, or the run's last step).  Two settings shape every rewind alike (growth
stages' and ``lr.rewind_at``'s), so a full-size control with the same rewinds gets the same policy:
``lr.rewind_peak`` restarts at a fraction of the peak (a partial rewind), ``lr.rewind_decay``
reaches the floor after that fraction of the steps left to the decay end and stays there (LEMON's
faster decay after expansion).  The LR is a pure function of the step and the config, so resuming
needs no scheduler state.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from megatron_msg.config import LRConfig, ResolvedStage, RunConfig


@dataclass(frozen=True)
class LRSegment:
    start: int    # first step of the segment
    peak: float   # LR after the warm-up
    floor: float  # LR the decay ends at
    warmup: int   # warm-up steps from the segment's start
    end: int | None = None  # step the decay reaches the floor; None: the schedule's decay end


def lr_segments(cfg: RunConfig, stages: list[ResolvedStage] | None = None,
                moved_rewinds: dict[int, int] | None = None) -> list[LRSegment]:
    """The run's LR segments in step order: step 0's, one per stage that starts one, and one per
    ``lr.rewind_at`` step (peak and floor of the stage in force there; a stage's own segment at
    the same step wins).  ``stages``: the resolved stages with the auto steps decided so far (an
    undecided stage starts no segment yet: the LR before a growth never depends on its step).
    ``moved_rewinds``: stage index -> the step its segment starts at instead of its growth step
    (an adopted at_step: auto lookahead, which trained on without the rewind)."""
    stages = [st for st in (cfg.resolved_stages() if stages is None else stages) if st.at_step is not None]
    moved = moved_rewinds or {}
    rewinds = [(moved.get(st.index, st.at_step), st.lr, st.min_lr, st.warmup_steps) for st in stages if st.rewind_lr]
    taken = {start for start, *_ in rewinds}
    for step in cfg.lr.rewind_at:
        if step in taken:
            continue
        current = [st for st in stages if st.at_step <= step]
        peak, floor = ((current[-1].lr, current[-1].min_lr) if current else (cfg.optimizer.lr, cfg.optimizer.min_lr))
        rewinds.append((step, peak, floor, cfg.lr.rewind_warmup_steps))
    decay_end = cfg.lr.decay_steps if cfg.lr.decay_steps is not None else cfg.train.steps
    segments = [LRSegment(0, cfg.optimizer.lr, cfg.optimizer.min_lr, cfg.lr.warmup_steps)]
    for start, peak, floor, warmup in rewinds:
        end = None
        if cfg.lr.rewind_decay < 1:
            decay_from = start + warmup
            end = decay_from + max(1, round(cfg.lr.rewind_decay * max(0, decay_end - decay_from)))
        segments.append(LRSegment(start, peak * cfg.lr.rewind_peak, floor, warmup, end))
    return sorted(segments, key=lambda s: s.start)


def segment_at(step: int, segments: list[LRSegment]) -> LRSegment:
    return max((s for s in segments if s.start <= step), key=lambda s: s.start)


def lr_at(step: int, segments: list[LRSegment], sched: LRConfig, total_steps: int) -> float:
    seg = segment_at(step, segments)
    k = step - seg.start
    if k < seg.warmup:
        return seg.peak * (k + 1) / seg.warmup
    if sched.decay == "constant":
        return seg.peak
    start = seg.start + seg.warmup
    end = seg.end if seg.end is not None else (sched.decay_steps if sched.decay_steps is not None else total_steps)
    if end <= start:
        return seg.floor
    progress = min(1.0, (step - start) / (end - start))
    if sched.decay == "linear":
        return seg.peak + (seg.floor - seg.peak) * progress
    return seg.floor + (seg.peak - seg.floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
