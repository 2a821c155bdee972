"""Compare finished runs by the compute they spent (``msg-compare``): the MSG paper's speed-up.

Growth pays off as loss per FLOP: a grown run reaches a given loss with fewer
training FLOPs than the full-size model.  Each run's cumulative FLOPs after
every step come from its own recorded config (the schedule's shapes and
Megatron's FLOP count, growth/plan.py), its losses from ``metrics.jsonl``.
The runs are compared at one target loss (default: the highest of their best
validation losses, so every run reaches it): FLOPs to reach it, read off the
validation curve by linear interpolation between evaluations, and the speed-up
against a reference run (``reference_flops / run_flops``).
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
    growths: list[dict] = field(default_factory=list)

    def flops_after(self, step: int) -> int:
        """Training FLOPs spent by steps 0..step (the schedule's, whatever the run logged)."""
        done = step + 1
        return sum(p.flops // (p.last_step - p.first_step) * max(0, min(done, p.last_step) - p.first_step)
                   for p in self.plans if p.last_step > p.first_step)

    def shape_at(self, step: int) -> str:
        return next(p.shape for p in reversed(self.plans) if p.first_step <= step)

    def valid_by_flops(self) -> list[tuple[int, float]]:
        return [(self.flops_after(step), loss) for step, loss in self.valid]


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
        cfg = config_from_dict(open_checkpoint(ckpt).state["config"], check=False)
    except CheckpointError as exc:
        raise CompareError(str(exc)) from None
    run = RunCurves(name or path.name, path, cfg, plan_schedule(cfg))
    for _, rec in iter_metrics(metrics, CompareError):
        kind = rec.get("kind")
        if kind == "train":
            run.train.append((rec["step"], rec["loss"]))
        elif kind == "valid":
            run.valid.append((rec["step"], rec["loss"]))
        elif kind == "growth":
            run.growths.append(rec)
    if not run.valid:
        raise CompareError(f"{metrics}: no validation losses (train.eval_interval larger than the run?)")
    return run


def flops_to_reach(points: list[tuple[float, float]], target: float) -> float | None:
    """FLOPs at which a (FLOPs, loss) curve first reaches ``target``, interpolated; None if never."""
    prev = None
    for flops, loss in points:
        if loss <= target:
            if prev is None or prev[1] <= target:
                return float(flops)
            (f0, l0), (f1, l1) = prev, (flops, loss)
            return f0 + (f1 - f0) * (l0 - target) / (l0 - l1)
        prev = (flops, loss)
    return None


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
    ref = reached[reference]
    rows = []
    for run, flops in zip(runs, reached):
        last_step = run.valid[-1][0]
        rows.append({
            "run": run.name, "final_shape": run.shape_at(last_step),
            "growth_events": len(run.growths), "last_step": last_step,
            "flops": run.flops_after(last_step), "final_valid_loss": run.valid[-1][1],
            "best_valid_loss": min(loss for _, loss in run.valid), "flops_to_target": flops,
            "speedup": (ref / flops) if (ref is not None and flops) else None,
        })
    return target, rows


def _sci(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"


def format_comparison(target: float, rows: list[dict], reference: int = 0) -> str:
    out = [f"| run | growth events | final shape | last step | FLOPs | best valid loss | final valid loss "
           f"| FLOPs to loss {target:.4f} | speed-up vs {rows[reference]['run']} |",
           "|" + "---|" * 9]
    for r in rows:
        speed = "-" if r["speedup"] is None else f"{r['speedup']:.2f}x"
        out.append(f"| {r['run']} | {r['growth_events']} | {r['final_shape']} | {r['last_step']} "
                   f"| {_sci(r['flops'])} | {r['best_valid_loss']:.4f} | {r['final_valid_loss']:.4f} "
                   f"| {_sci(r['flops_to_target'])} | {speed} |")
    out.append("")
    out.append("FLOPs: Megatron-LM's training count for each run's schedule (docs/user_guide.md, msg-plan); "
               "FLOPs to the target loss interpolate linearly between validation evaluations.")
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
