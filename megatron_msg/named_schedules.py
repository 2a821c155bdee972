"""Growth schedules made from a target shape and a step budget (``growth.schedule: sch1 | sch0 | rapid``).

The MSG paper's rules (section 3.2.1, Table 2; ../shared/paper_schedules.md), so a user gets the
paper's schedule for their own target without a grid search:

* sch1 starts at about 2/3 of the target's hidden size and heads and 1/4 of its FFN and depth,
  and grows one dimension per stage in the order FFN, depth (to 1/2), hidden, heads, depth.
  The start hidden size is 2/3 of the target's rounded to a multiple of 4 head sizes (2, then 1,
  when that lands more than 20% away or leaves nothing to grow); the start heads are the
  target's in the same ratio.
  This gives Sch1-B's, Sch1-L's and Sch1-G's shapes exactly: Sch1-L's "2/3" is 768 of 1024
  (3/4), which is 2/3 rounded to a multiple of 256.
* Stage lengths are weighted to the early stages, 5:5:3:3:3:5 (the six shapes): Sch1-G's own
  lengths (50k, 50k, 30k, 30k, 30k, 50k of 240k), reproduced exactly.  Sch1-B and Sch1-L (900k)
  deviate from these weights: the paper's 200k/400k/500k/600k/700k are the boundaries they give,
  187.5k/375k/487.5k/600k/712.5k, rounded to one significant digit (at most 25k, 2.8% of the
  budget, apart).  The paper states no rule for them; we keep one rule for all.
* The mask ramp: the paper's phi is 5,000 steps, 1/6 of Sch1-G's shortest stage; here
  min(5000, shortest stage / 6), so short runs keep the same proportion.
* The LR is reset to its peak at the 1st and 2nd growth (Appendix D).  Which LR policy across
  growths is best is measured by ``msg-bench growth`` (docs/growth.md).
* sch0 grows depth first and FFN last, keeping hidden size and heads (Table 8, Sch0-B: depth
  1/4 -> 1/2 -> 3/4 -> 1, then FFN 1/4 -> 1; boundaries 2/9, 4/9, 6/9, 7/9 of the budget).
  Sch0-L as printed keeps hidden 768 of 1024 and grows FFN first: it follows none of these
  rules, and is shipped as printed in configs/paper/ instead.
* rapid is Rapid-L's rules (Table 2): half the target's hidden size and heads, 1/4 of its FFN
  and depth for the first half of the budget, then FFN, hidden and heads one after another
  in 1/40 of the budget each (the 2nd 3/40), and all the depth at once for the last 3/8
  (weights 20:1:1:3:15, Rapid-L's 400k/20k/20k/60k/300k of 800k, exactly).  Its phi is the
  paper's 5,000, 1/4 of Rapid-L's shortest stage: min(5000, shortest / 4).  The paper shows
  it to measure what fast growth costs (GLUE 79.1 against Sch1-L's 83.2) and where the mask
  matters most (No Mask on Rapid-L: 77.9); ``msg-bench growth --schedule rapid`` runs it.
"""
from __future__ import annotations

from dataclasses import dataclass

SCHEDULES = ("sch1", "sch0", "rapid")
SCH1_WEIGHTS = (5, 5, 3, 3, 3, 5)  # stage lengths, start shape first
SCH0_BOUNDARIES = (2 / 9, 4 / 9, 6 / 9, 7 / 9)
RAPID_WEIGHTS = (20, 1, 1, 3, 15)
PAPER_PHI = 5000
# phi is the shortest stage over this: the paper's 5,000 steps are 1/6 of Sch1-G's 30k, 1/4 of Rapid-L's 20k.
PHI_DIVISOR = {"sch1": 6, "sch0": 6, "rapid": 4}


@dataclass(frozen=True)
class Dims:
    hidden: int
    ffn: int
    heads: int
    layers: int


@dataclass(frozen=True)
class NamedStage:
    at_step: int
    dims: Dims
    rewind_lr: bool


@dataclass(frozen=True)
class NamedSchedule:
    start: Dims
    stages: tuple[NamedStage, ...]
    phi: int


def _start_hidden(hidden: int, head_dim: int, ratio: float) -> int:
    """``ratio`` of ``hidden`` on the coarsest grain (4, 2 or 1 head sizes) that lands within 20% of it."""
    want = hidden * ratio
    for blocks in (4, 2, 1):
        grain = blocks * head_dim
        start = round(want / grain) * grain
        if grain <= start < hidden and abs(start - want) <= 0.2 * want:
            return start
    start = min(hidden - head_dim, max(head_dim, round(want / head_dim) * head_dim))
    return start if start >= 1 else hidden  # too small to grow: the hidden stage is left out


def _start_width(target: Dims, head_dim: int, ratio: float) -> tuple[int, int]:
    """The start hidden size (``ratio`` of the target's, on a head-size grain) and heads in the same ratio."""
    hidden = _start_hidden(target.hidden, head_dim, ratio)
    return hidden, max(1, min(target.heads, round(target.heads * hidden / target.hidden)))


def _boundaries(steps: int, weights: tuple[int, ...]) -> list[int]:
    total, acc, out = sum(weights), 0, []
    for w in weights[:-1]:
        acc += w
        out.append(round(steps * acc / total))
    return out


def _schedule(start: Dims, shapes: list[Dims], bounds: list[int], steps: int,
              phi_divisor: int = 6) -> NamedSchedule:
    stages, prev, growth = [], start, 0
    for at, dims in zip(bounds, shapes):
        if dims == prev:
            continue  # a dimension already at its target: no event
        stages.append(NamedStage(at, dims, rewind_lr=growth < 2))
        growth += 1
        prev = dims
    starts = [0] + [s.at_step for s in stages] + [steps]
    shortest = min(b - a for a, b in zip(starts, starts[1:]))
    return NamedSchedule(start, tuple(stages), max(1, min(PAPER_PHI, shortest // phi_divisor)))


def sch1(target: Dims, steps: int, head_dim: int) -> NamedSchedule:
    hidden, heads = _start_width(target, head_dim, 2 / 3)
    ffn, layers = max(1, target.ffn // 4), max(1, target.layers // 4)
    start = Dims(hidden, ffn, heads, layers)
    half = max(layers, target.layers // 2)
    shapes = [Dims(hidden, target.ffn, heads, layers), Dims(hidden, target.ffn, heads, half),
              Dims(target.hidden, target.ffn, heads, half), Dims(target.hidden, target.ffn, target.heads, half),
              Dims(target.hidden, target.ffn, target.heads, target.layers)]
    return _schedule(start, shapes, _boundaries(steps, SCH1_WEIGHTS), steps)


def sch0(target: Dims, steps: int, head_dim: int) -> NamedSchedule:
    del head_dim  # width stays at the target's
    ffn, quarter = max(1, target.ffn // 4), max(1, target.layers // 4)
    start = Dims(target.hidden, ffn, target.heads, quarter)
    depths = [max(quarter, target.layers // 2), max(quarter, target.layers * 3 // 4), target.layers]
    shapes = [Dims(target.hidden, ffn, target.heads, d) for d in depths] + [target]
    return _schedule(start, shapes, [round(steps * b) for b in SCH0_BOUNDARIES], steps)


def rapid(target: Dims, steps: int, head_dim: int) -> NamedSchedule:
    hidden, heads = _start_width(target, head_dim, 1 / 2)
    start = Dims(hidden, max(1, target.ffn // 4), heads, max(1, target.layers // 4))
    shapes = [Dims(hidden, target.ffn, heads, start.layers), Dims(target.hidden, target.ffn, heads, start.layers),
              Dims(target.hidden, target.ffn, target.heads, start.layers), target]
    return _schedule(start, shapes, _boundaries(steps, RAPID_WEIGHTS), steps, PHI_DIVISOR["rapid"])


def make_schedule(name: str, target: Dims, steps: int, head_dim: int) -> NamedSchedule:
    return {"sch1": sch1, "sch0": sch0, "rapid": rapid}[name](target, steps, head_dim)
