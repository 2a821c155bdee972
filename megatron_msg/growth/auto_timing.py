"""Self-adaptive growth timing (``at_step: auto``): when to grow, from the run's own measurements.

The rule (docs/growth.md, "Self-adaptive timing"): grow when the grown model would lower the loss
faster per FLOP than the current one does.  That is the greedy form of the optimal-schedule
condition of staged training (Shen et al., 2022: switch when the small model's loss-per-compute
slope falls to the large model's at the same loss), measured instead of fitted:

* the current shape's rate is its own: the drop of the probe loss (a fixed set of validation
  batches, eval mode) over the last ``probe_steps`` steps, per training FLOP spent on them,
  extrapolated (``extrapolate``, the default) to where the grown rate is measured, along a power
  law in the steps since the shape was made through its last two windows: comparing a rate
  before the check with one measured a ramp and a window after it would favour the current
  shape, whose curve keeps decelerating;
* the grown shape's rate comes from a lookahead: grow (function-preserving, so the grown model
  starts at the current loss), train through the mask ramp and ``probe_steps`` steps more as the
  real growth would (same batches, mask ramp; the LR goes on without the stage's rewind, whose
  transient says nothing about when to grow), and take the probe loss's drop from right after
  growing (``include_ramp``, the default; from the ramp's end otherwise) per grown FLOP;
* grow now if ``rate_grown >= rate_current`` (the extrapolated one), else train on and check
  again ``check_every`` steps later.  A lookahead whose rate after its ramp and half its window is
  already below the current one stops there (``stop_early``, the default): a decelerating loss curve
  lowers the rate over the rest, so the whole window would say "wait" too.  A lookahead
  that says "grow" is kept (``adopt_lookahead``, the default): the run goes on from its end, and
  the stage's LR rewind comes there instead of at the growth; only the lookaheads that say "wait"
  are rolled back and cost compute.  Stage k of n auto stages grows at the latest at
  ``steps * (1 - (n - k) * reserve)``, so every later shape keeps its share of the budget.  A check
  nearer that deadline than the grown steps a "wait" lookahead throws away runs no lookahead
  (``skip_near_deadline``, the default): there a "wait" changes nothing (the deadline grows the
  stage anyway), and a "grow" moves the growth earlier by no more steps than a "wait" throws away.

Checks start ``check_every`` steps after the current shape stopped ramping (and after the LR
warm-up), so the trailing window never straddles a growth.  (The LR rewind an adopted lookahead
moves to its end can fall inside the next stage's first windows; starting them after it instead
was measured and grew earlier at more compute on both corpora: docs/benchmarks.md.)  Everything
here is a function of the config and the steps decided so far; the trainer records the decisions
and the probe losses in its checkpoints, so a resumed run decides the same way.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from megatron_msg.config import ModelConfig, ResolvedStage, RunConfig


@dataclass(frozen=True)
class AutoTiming:
    """growth.auto resolved for a run: where a stage's checks fall (config.AutoTimingConfig has the
    defaults and the deadline formula, which validation uses too)."""

    steps: int          # train.steps
    check_every: int
    probe_steps: int
    eval_iters: int
    warmup_steps: int   # lr.warmup_steps: no check inside the first warm-up
    deadlines: dict[int, int]  # auto stage index -> the step it grows at if no check said so before
    adopt: bool = True  # keep a lookahead that decided "grow" (growth.auto.adopt_lookahead)
    extrapolate: bool = True  # compare the current rate where the grown one is measured (growth.auto.extrapolate)
    stop_early: bool = True  # cut a lookahead after half its window once it cannot say grow (growth.auto.stop_early)
    include_ramp: bool = True  # the grown window starts at the growth, not at the ramp's end (growth.auto.include_ramp)
    ramps: dict[int, int] = field(default_factory=dict)  # auto stage index -> its ResolvedStage.ramp_steps
    skip_near_deadline: bool = True  # no lookahead nearer the deadline than a "wait" costs (growth.auto.skip_near_deadline)

    @classmethod
    def from_config(cls, cfg: RunConfig, stages: list[ResolvedStage]) -> "AutoTiming":
        a, t = cfg.growth.auto, cfg.train
        autos = [st.index for st in stages if st.auto]
        return cls(t.steps, a.every(t.steps), a.probe(t.steps), a.eval_iters or t.eval_iters, cfg.lr.warmup_steps,
                   {k: a.latest(t.steps, i, len(autos)) for i, k in enumerate(autos)}, a.adopt_lookahead,
                   a.extrapolate, a.stop_early, a.include_ramp,
                   {st.index: st.ramp_steps for st in stages if st.auto}, a.skip_near_deadline)

    def early_stop_steps(self) -> int | None:
        """Steps after the mask ramp at which a lookahead may stop (None: it never does)."""
        half = self.probe_steps // 2
        return half if self.stop_early and half >= 1 else None

    def wait_cost(self, stage: int) -> int:
        """Grown steps a lookahead for ``stage`` trains and throws away when it says "wait": its ramp
        and half its window when it stops early, else its ramp and the whole window."""
        half = self.early_stop_steps()
        return self.ramps.get(stage, 0) + (self.probe_steps if half is None else half)

    def grown_middle(self, ramp: int) -> float:
        """Steps from a check to the middle of the window the grown rate is measured over: from the
        growth to the ramp's end plus ``probe_steps`` (include_ramp), else from the ramp's end on."""
        w = self.probe_steps
        return (ramp + w) / 2 if self.include_ramp else ramp + w / 2

    def latest(self, stage: int) -> int:
        """The step auto stage ``stage`` grows at if no check has said so before."""
        return self.deadlines[stage]

    def settled(self, previous: ResolvedStage | None) -> int:
        """The first step the current shape trains unramped: the previous growth's ramp end."""
        if previous is None:
            return self.warmup_steps
        return previous.at_step + previous.ramp_steps

    def checks(self, stage: int, previous: ResolvedStage | None) -> list[int]:
        """The steps at which the lookahead runs for ``stage``, given the stage before it (None: the
        start shape), every ``check_every`` steps but none nearer the deadline than ``wait_cost``
        (skip_near_deadline); the last entry is the deadline (grown there without a lookahead), or
        the first check when that comes later."""
        latest = self.latest(stage)
        first = self.settled(previous) + self.check_every
        if first >= latest:
            return [first]
        grid = range(first, latest, self.check_every)
        if self.skip_near_deadline:
            # Nearer the deadline than a "wait" costs: a "grow" would move the growth earlier by no
            # more steps than that, and a "wait" leaves it where it is (at the deadline).
            grid = [s for s in grid if latest - s > self.wait_cost(stage)]
        return list(grid) + [latest]

    def measure_steps(self, stage: int, previous: ResolvedStage | None) -> set[int]:
        """Steps whose probe loss a check needs: each check's, ``probe_steps`` before it, and (to
        extrapolate) ``2 * probe_steps`` before it where that window is still the current shape's."""
        grid, w = self.checks(stage, previous)[:-1], self.probe_steps
        earlier = {s - 2 * w for s in grid if s - 2 * w >= self.settled(previous)} if self.extrapolate else set()
        return set(grid) | {s - w for s in grid} | earlier

    def current_rates(self, losses: dict[int, float], step: int, previous: ResolvedStage | None, ramp: int,
                      flops: int) -> tuple[float, float | None]:
        """The current shape's loss drop per training FLOP over the last window before ``step``, and
        that rate where the lookahead measures the grown shape (the middle of its window:
        ``grown_middle(ramp)``), or None where it is not extrapolated.

        The extrapolation is a power law r(t) = r1 (t / t1)^-beta in t, the steps since the current
        shape was made (the previous growth; step 0 for the start shape), through the rates of the
        last two windows (r0 at t0, r1 at t1).  It only lowers the rate: a rate that is not falling
        (or a window whose loss rose) is compared as measured."""
        w = self.probe_steps
        rate = window_rate(losses[step - w], losses[step], w, flops)
        if not self.extrapolate or step - 2 * w not in losses:
            return rate, None
        earlier = window_rate(losses[step - 2 * w], losses[step - w], w, flops)
        if rate <= 0 or earlier <= rate:
            return rate, None
        born = previous.at_step if previous is not None else 0
        t0, t1, ahead = step - 1.5 * w - born, step - 0.5 * w - born, step + self.grown_middle(ramp) - born
        beta = math.log(earlier / rate) / math.log(t1 / t0)
        return rate, rate * (t1 / ahead) ** beta


@dataclass(frozen=True)
class GrowthCheck:
    """One decision: the two rates it compared and what it chose."""

    step: int
    stage: int
    decision: str              # "grow", "wait" or "deadline" (grown at the latest step, no lookahead)
    loss_before: float | None  # probe loss probe_steps before the check (current shape)
    loss_now: float | None     # at the check
    grown_settled: float | None  # the grown model's, at the end of its mask ramp (None: no lookahead)
    grown_after: float | None    # probe_steps after that
    rate_current: float | None  # loss drop per training FLOP (the paper's gamma), current shape
    rate_grown: float | None    # the grown shape's (this check's lookahead, or the last one's)
    probe_flops: int            # training FLOPs the lookahead spent and threw away (pure overhead)
    adopted: bool = False       # the lookahead was kept: its steps are the run's (probe_flops 0)
    rate_current_ahead: float | None = None  # rate_current extrapolated to the grown window (compared when set)
    # The lookahead stopped after half its window (stop_early): grown_after and rate_grown are that
    # half's, an upper bound of the whole window's on a decelerating curve.
    stopped_early: bool = False
    # The grown model's probe loss right after growing, where its window starts (include_ramp; None:
    # the window starts at grown_settled).  Equal to loss_now for MSG, which preserves the function.
    grown_start: float | None = None


def window_rate(loss_start: float, loss_end: float, steps: int, flops_per_step: int) -> float:
    """Loss drop per training FLOP over a window of ``steps`` steps (the paper's gamma)."""
    return (loss_start - loss_end) / (steps * flops_per_step)


def grown_rate(grown_start: float | None, grown_settled: float, grown_end: float, ramp: int, measured: int,
               flops_grown: int) -> float:
    """The grown shape's loss drop per FLOP in a lookahead: from right after growing over the ramp and
    the ``measured`` steps after it when ``grown_start`` is given (include_ramp), else from the
    ramp's end over the ``measured`` steps only."""
    if grown_start is None:
        return window_rate(grown_settled, grown_end, measured, flops_grown)
    return window_rate(grown_start, grown_end, ramp + measured, flops_grown)


def compared_rate(rate_current: float, rate_ahead: float | None) -> float:
    """The current shape's rate the rule compares with the grown one: extrapolated when it was."""
    return rate_current if rate_ahead is None else rate_ahead


def decide(stage: int, step: int, probe_steps: int, loss_before: float, loss_now: float, grown_settled: float,
           grown_after: float, flops_current: int, flops_grown: int, lookahead_steps: int,
           rate_ahead: float | None = None, grown_steps: int | None = None,
           grown_start: float | None = None) -> GrowthCheck:
    """Grow iff the grown model's loss drop per FLOP matches the current shape's over the
    ``probe_steps`` before the check (or ``rate_ahead``, that rate extrapolated to the grown window,
    when given).  The grown window runs from ``grown_start`` (the probe loss right after growing)
    over all ``lookahead_steps`` when that is given (include_ramp), else from ``grown_settled`` (the
    ramp's end) over ``grown_steps`` (``probe_steps`` unless the lookahead stopped early).
    ``flops_*``: training FLOPs of one step of each shape; ``lookahead_steps``: the grown steps the
    lookahead trained (its cost)."""
    rate_current = window_rate(loss_before, loss_now, probe_steps, flops_current)
    measured = probe_steps if grown_steps is None else grown_steps
    rate_grown = grown_rate(grown_start, grown_settled, grown_after, lookahead_steps - measured, measured,
                            flops_grown)
    compared = compared_rate(rate_current, rate_ahead)
    return GrowthCheck(step, stage, "grow" if rate_grown >= compared else "wait", loss_before, loss_now,
                       grown_settled, grown_after, rate_current, rate_grown, lookahead_steps * flops_grown,
                       rate_current_ahead=rate_ahead, stopped_early=measured < probe_steps, grown_start=grown_start)


def step_flops(model: ModelConfig, global_batch: int) -> int:
    """Training FLOPs of one optimizer step of ``model`` (growth/plan.py's count)."""
    from megatron_msg.growth.plan import flops_per_token
    return flops_per_token(model) * global_batch * model.seq_len


def planned_stages(cfg: RunConfig, decided: dict[int, int] | None = None) -> list[ResolvedStage]:
    """The resolved stages with every undecided auto step at its earliest check: the most compute
    the rule can spend on the schedule (lookaheads aside), what msg-plan and the memory check use."""
    import dataclasses
    stages = cfg.resolved_stages(decided)
    if not any(st.at_step is None for st in stages):
        return stages
    timing = AutoTiming.from_config(cfg, stages)
    out: list[ResolvedStage] = []
    for st in stages:
        if st.at_step is None:
            st = dataclasses.replace(st, at_step=timing.checks(st.index, out[-1] if out else None)[0])
        out.append(st)
    return out
