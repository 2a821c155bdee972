"""Compare finished runs by the compute they spent (``msg-compare``): the MSG paper's speed-up.

Growth pays off as loss per FLOP: a grown run reaches a given loss with fewer
training FLOPs than the full-size model.  Each run's cumulative FLOPs after
every step come from its own recorded config (the schedule's shapes and
Megatron's FLOP count, growth/plan.py), its losses from ``metrics.jsonl``.
The runs are compared at one target loss (default: the highest of their best
validation losses, so every run reaches it): FLOPs to reach it, read off the
validation curve by linear interpolation between evaluations, and the speed-up
against a reference run (``reference_flops / run_flops``).  Each run is also
compared at its own final loss: the FLOPs and the wall time the reference needed
to get there ("not reached" when it never did) against the run's own, and the
reference's loss at the run's budget.  Wall time is the training time the run
recorded (``time_s``: evaluation and saves excluded), so wall-time speed-ups mean
something only between runs on the same hardware.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from megatron_msg.checkpoint.io import CheckpointError, latest_checkpoint, open_checkpoint
from megatron_msg.config import RunConfig, config_from_dict
from megatron_msg.growth.plan import StagePlan, plan_schedule
from megatron_msg.metrics_file import iter_metrics
from megatron_msg.training.plot import save_figure


class CompareError(ValueError):
    """A run directory that cannot be compared (named in the message)."""


@dataclass
class RunCurves:
    name: str
    path: Path
    cfg: RunConfig
    plans: list[StagePlan]
    train: list[tuple[int, float]] = field(default_factory=list)  # (step, loss)
    valid: list[tuple[int, float]] = field(default_factory=list)
    valid_time: dict[int, float] = field(default_factory=dict)  # step -> training seconds (when recorded)
    growths: list[dict] = field(default_factory=list)
    # at_step: auto: (step, FLOPs) of every lookahead the run trained and rolled back, and the checks.
    lookaheads: list[tuple[int, int]] = field(default_factory=list)
    checks: list[dict] = field(default_factory=list)

    def flops_after(self, step: int) -> int:
        """Training FLOPs spent by steps 0..step (the schedule's, whatever the run logged), with the
        lookaheads of at_step: auto run before them."""
        done = step + 1
        return (sum(p.flops // (p.last_step - p.first_step) * max(0, min(done, p.last_step) - p.first_step)
                    for p in self.plans if p.last_step > p.first_step)
                + sum(flops for at, flops in self.lookaheads if at <= step))

    def shape_at(self, step: int) -> str:
        return next(p.shape for p in reversed(self.plans) if p.first_step <= step)

    def valid_by_flops(self) -> list[tuple[int, float]]:
        return [(self.flops_after(step), loss) for step, loss in self.valid]

    def valid_by_time(self) -> list[tuple[float, float]] | None:
        """(training seconds, loss) per evaluation; None for a run that did not record time."""
        if any(step not in self.valid_time for step, _ in self.valid):
            return None
        return [(self.valid_time[step], loss) for step, loss in self.valid]


def load_run(path: str | Path, name: str | None = None) -> RunCurves:
    """A run directory's losses and schedule (its config is read from its latest checkpoint)."""
    path = Path(path)
    metrics = path / "metrics.jsonl"
    if not metrics.is_file():
        raise CompareError(f"{path}: no metrics.jsonl (not a msg-train run directory)")
    try:
        ckpt = latest_checkpoint(path)
        if ckpt is None:
            raise CompareError(f"{path}: no checkpoint, so no record of the run's config and schedule")
        state = open_checkpoint(ckpt).state
        cfg = config_from_dict(state["config"], check=False)
    except CheckpointError as exc:
        raise CompareError(str(exc)) from None
    decided = {int(k): v for k, v in state.get("growth_decisions", {}).items()}  # at_step: auto
    run = RunCurves(name or path.name, path, cfg, plan_schedule(cfg, decided))
    for _, rec in iter_metrics(metrics, CompareError):
        kind = rec.get("kind")
        if kind == "train":
            run.train.append((rec["step"], rec["loss"]))
        elif kind == "valid":
            run.valid.append((rec["step"], rec["loss"]))
            if isinstance(rec.get("time_s"), (int, float)):
                run.valid_time[rec["step"]] = float(rec["time_s"])
        elif kind == "growth":
            run.growths.append(rec)
        elif kind == "growth_check":
            run.checks.append(rec)
            if rec.get("probe_flops"):
                run.lookaheads.append((rec["step"], int(rec["probe_flops"])))
    if not run.valid:
        raise CompareError(f"{metrics}: no validation losses (train.eval_interval larger than the run?)")
    return run


def flops_to_reach(points: list[tuple[float, float]], target: float) -> float | None:
    """FLOPs at which a (FLOPs, loss) curve first reaches ``target``, interpolated; None if never.
    Any increasing x works: msg-compare also reads (training seconds, loss) curves with it."""
    prev = None
    for flops, loss in points:
        if loss <= target:
            if prev is None or prev[1] <= target:
                return float(flops)
            (f0, l0), (f1, l1) = prev, (flops, loss)
            return f0 + (f1 - f0) * (l0 - target) / (l0 - l1)
        prev = (flops, loss)
    return None


def loss_at(points: list[tuple[float, float]], x: float) -> float | None:
    """The loss of a (FLOPs or seconds, loss) curve at ``x``, interpolated; None past its end."""
    if not points or x > points[-1][0]:
        return None
    prev = None
    for px, loss in points:
        if px >= x:
            if prev is None or px == prev[0]:
                return loss
            return prev[1] + (loss - prev[1]) * (x - prev[0]) / (px - prev[0])
        prev = (px, loss)
    return None


def _ratio(reference: float | None, run: float | None) -> float | None:
    return reference / run if (reference is not None and run) else None


def default_target(runs: list[RunCurves]) -> float:
    """The highest of the runs' best validation losses: a loss every run reaches."""
    return max(min(loss for _, loss in r.valid) for r in runs)


def compare(runs: list[RunCurves], reference: int = 0, target: float | None = None) -> tuple[float, list[dict]]:
    """(target loss, one row per run) with FLOPs to the target and the speed-up vs ``runs[reference]``."""
    if not runs:
        raise CompareError("no runs to compare")
    if not 0 <= reference < len(runs):
        raise CompareError(f"reference {reference} is not one of the {len(runs)} runs")
    target = default_target(runs) if target is None else target
    reached = [flops_to_reach(r.valid_by_flops(), target) for r in runs]
    timed = [r.valid_by_time() for r in runs]
    reached_time = [flops_to_reach(t, target) if t else None for t in timed]
    ref_flops_curve, ref_time_curve = runs[reference].valid_by_flops(), timed[reference]
    rows = []
    for run, flops, seconds, time_curve in zip(runs, reached, reached_time, timed):
        last_step, final = run.valid[-1]
        budget = run.flops_after(last_step)
        run_time = time_curve[-1][0] if time_curve else None
        # The reference at this run's own final loss, and at this run's own budget.
        ref_flops_to_final = flops_to_reach(ref_flops_curve, final)
        ref_time_to_final = flops_to_reach(ref_time_curve, final) if ref_time_curve else None
        rows.append({
            "run": run.name, "final_shape": run.shape_at(last_step),
            "growth_events": len(run.growths), "last_step": last_step,
            "flops": budget, "time_s": run_time, "final_valid_loss": final,
            "best_valid_loss": min(loss for _, loss in run.valid), "flops_to_target": flops,
            "speedup": _ratio(reached[reference], flops),
            "time_to_target_s": seconds, "wall_speedup": _ratio(reached_time[reference], seconds),
            "reference_flops_to_final_loss": ref_flops_to_final,  # None: the reference never got there
            "speedup_at_final_loss": _ratio(ref_flops_to_final, budget),
            "reference_time_to_final_loss_s": ref_time_to_final,
            "wall_speedup_at_final_loss": _ratio(ref_time_to_final, run_time),
            "reference_loss_at_budget": loss_at(ref_flops_curve, budget),
        })
    return target, rows


def _sci(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"


def _times(x: float | None, missing: str = "-") -> str:
    return missing if x is None else f"{x:.2f}x"


def _secs(x: float | None, missing: str = "-") -> str:
    return missing if x is None else f"{x:.1f}"


def _loss(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def format_comparison(target: float, rows: list[dict], reference: int = 0) -> str:
    ref = rows[reference]["run"]
    out = [f"| run | growth events | final shape | last step | FLOPs | train s | best valid loss | final valid loss "
           f"| FLOPs to loss {target:.4f} | speed-up vs {ref} | wall speed-up | {ref} FLOPs to this final loss "
           f"| speed-up at final loss (FLOPs / wall) | {ref} loss at this budget |",
           "|" + "---|" * 14]
    for r in rows:
        reached = r["reference_flops_to_final_loss"]
        out.append(f"| {r['run']} | {r['growth_events']} | {r['final_shape']} | {r['last_step']} "
                   f"| {_sci(r['flops'])} | {_secs(r['time_s'])} | {r['best_valid_loss']:.4f} "
                   f"| {r['final_valid_loss']:.4f} | {_sci(r['flops_to_target'])} | {_times(r['speedup'])} "
                   f"| {_times(r['wall_speedup'])} | {'not reached' if reached is None else _sci(reached)} "
                   f"| {_times(r['speedup_at_final_loss'], 'not reached')} / "
                   f"{_times(r['wall_speedup_at_final_loss'], '-' if r['time_s'] is None else 'not reached')} "
                   f"| {_loss(r['reference_loss_at_budget'])} |")
    out.append("")
    out.append("FLOPs: Megatron-LM's training count for each run's schedule (docs/user_guide.md, msg-plan); "
               "FLOPs and wall time to a loss interpolate linearly between validation evaluations; wall time is "
               "training time (time_s, evaluation and saves excluded), comparable on the same hardware only.")
    return "\n".join(out)


def plot_comparison(runs: list[RunCurves], target: float, path: str | Path) -> Path | None:
    """Validation loss against training FLOPs, one line per run, growth events marked."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(9, 5))
    for run in runs:
        pts = run.valid_by_flops()
        (line,) = ax.plot(*zip(*pts), "o-", ms=3, lw=1.2, label=run.name)
        for g in run.growths:
            ax.axvline(run.flops_after(g["step"] - 1) if g["step"] else 0, color=line.get_color(),
                       ls=":", lw=0.8)
    ax.axhline(target, color="grey", ls="--", lw=0.8, label=f"target {target:.4f}")
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel("validation loss")
    ax.set_title("validation loss per training FLOP (dotted: growth events)")
    return save_figure(fig, ax, path)
