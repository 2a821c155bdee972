"""How noisy is the probe loss that ``at_step: auto`` compares?  Measured on a run's own config.

    python tools/probe_noise.py runs/bench/growth/runs/msg --steps 600 --every 10 --batches 64 \\
        --out runs/noise/bundled

Trains the run's config from step 0 (its start shape, up to ``--steps``, which must come before
its first growth) and every ``--every`` steps evaluates each of the first ``--batches`` validation
batches on its own (eval mode, the probe's batches).  Writes ``noise.json`` (the per-batch losses)
and prints, for probe losses averaged over 1, 2, 4, 8, ... batches, the residual standard deviation
around a smooth fit of the curve (a + b ln t + c ln^2 t, from ``--from`` on), the residual's
autocorrelation at 1, 2, 3 and 6 probe intervals, and the smooth fit's loss drop over one probe
window of ``--window`` steps: the signal a window's rate measures, against the noise (a window's
rate is a difference of two probe losses, so its noise is sqrt(2) times the residual's).

Why it exists: docs/benchmarks.md "Probe-loss noise" -- the decisions of the timing rule are set
by how large a window's loss drop is against this noise, and whether more batches per probe help.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
from pathlib import Path

import numpy as np


class UsageError(ValueError):
    """Bad input (run directory, arguments, an earlier noise.json): one line, exit 2."""


def smooth_fit(steps: np.ndarray, losses: np.ndarray) -> np.ndarray:
    """Least-squares a + b ln t + c ln^2 t through ``losses`` at ``steps``: the curve without noise."""
    lt = np.log(steps.astype(float))
    design = np.vstack([np.ones_like(lt), lt, lt ** 2]).T
    coef, *_ = np.linalg.lstsq(design, losses, rcond=None)
    return design @ coef


def summarise(steps: np.ndarray, per_batch: np.ndarray, window: int, start: int) -> list[dict]:
    """One row per batch count n (1, 2, 4, ... and all): residual sd of the n-batch probe loss around
    its smooth fit, its autocorrelation at 1, 2, 3, 6 probe intervals, the fitted drop over
    ``window`` steps at the first and last fitted step, and that drop over the window rate's noise."""
    keep = steps >= start
    t, rows = steps[keep], []
    counts = sorted({2 ** i for i in range(int(math.log2(per_batch.shape[1])) + 1)} | {per_batch.shape[1]})
    for n in counts:
        y = per_batch[keep, :n].mean(axis=1)
        fit = smooth_fit(t, y)
        resid = y - fit
        sd = float(resid.std(ddof=3))
        lags = {k: float(np.corrcoef(resid[:-k], resid[k:])[0, 1]) for k in (1, 2, 3, 6) if len(resid) > k + 2}
        drops = [float(np.interp(s, t, fit) - np.interp(s + window, t, fit)) for s in (t[0], t[-1] - window)]
        rows.append({"batches": n, "residual_sd": sd, "autocorrelation": lags, "window_drop_first": drops[0],
                     "window_drop_last": drops[1], "snr_last": drops[1] / (math.sqrt(2) * sd)})
    return rows


def measure(run_dir: Path, out: Path, steps: int, every: int, batches: int) -> dict:
    """Train ``run_dir``'s config (read from its latest checkpoint) to ``steps`` and return the
    per-batch validation losses every ``every`` steps."""
    from megatron_msg.checkpoint.io import CheckpointError, latest_checkpoint, open_checkpoint
    from megatron_msg.config import ConfigError, config_from_dict
    from megatron_msg.training.trainer import Trainer

    try:
        last = latest_checkpoint(run_dir, report=None)
        if last is None:
            raise UsageError(f"{run_dir} holds no checkpoint to read the run's config from")
        cfg = config_from_dict(copy.deepcopy(open_checkpoint(last).state["config"]))
    except (CheckpointError, ConfigError) as e:
        raise UsageError(f"{run_dir}: {e}") from e
    stages = cfg.resolved_stages()
    if any(st.at_step is None for st in stages):
        raise UsageError(f"{run_dir} is an at_step: auto run, whose first growth step is not known in advance; "
                         "give a fixed-schedule run")
    first = min((st.at_step for st in stages), default=None)
    if first is not None and steps >= first:
        raise UsageError(f"--steps {steps} reaches the run's first growth (step {first}); the fit assumes one shape")
    trainer = Trainer(cfg, out_dir=out / "run", resume=False, progress=False)
    rows = []

    def probe() -> None:
        rows.append({"step": trainer.step, "losses": trainer.eval_batch_losses(batches)})

    while trainer.step < steps:
        if trainer.step % every == 0:
            probe()
        trainer.advance()
    probe()
    return {"run": str(run_dir), "steps": steps, "every": every, "batches": batches, "rows": rows}


def _load_or_measure(a: argparse.Namespace) -> dict:
    """``a.out/noise.json`` when it holds this very measurement (so the table can be reprinted
    without retraining), else measure and write it (temporary file, then rename)."""
    path = a.out / "noise.json"
    wanted = {"run": str(a.run), "steps": a.steps, "every": a.every, "batches": a.batches}
    if path.exists():
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise UsageError(f"{path} is not valid JSON ({e}); remove it to measure again") from e
        if {k: data.get(k) for k in wanted} != wanted:
            raise UsageError(f"{path} holds another measurement ({ {k: data.get(k) for k in wanted} }); "
                             "give another --out or remove it")
        return data
    a.out.mkdir(parents=True, exist_ok=True)
    data = measure(a.run, a.out, a.steps, a.every, a.batches)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)
    return data


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path, help="a run directory with a checkpoint (its config is used)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--every", type=int, default=10)
    p.add_argument("--batches", type=int, default=64)
    p.add_argument("--window", type=int, default=62, help="probe window whose drop is compared (steps)")
    p.add_argument("--from", dest="start", type=int, default=200, help="first step of the smooth fit")
    a = p.parse_args(argv)
    if a.start < 1:
        p.error("need --from >= 1: the smooth fit is in ln(step)")
    if a.every < 1 or a.batches < 1 or a.steps < a.start + 10 * a.every:
        p.error("need --every >= 1, --batches >= 1 and at least ten probes after --from")
    if not 1 <= a.window <= a.steps - a.start:
        p.error(f"need 1 <= --window <= --steps - --from ({a.steps - a.start}): the drop is read off the fit")
    try:
        data = _load_or_measure(a)
    except UsageError as e:
        print(f"probe_noise: error: {e}", file=sys.stderr)
        raise SystemExit(2) from e
    steps = np.array([r["step"] for r in data["rows"]])
    per_batch = np.array([r["losses"] for r in data["rows"]])
    print("| batches per probe | residual sd | autocorrelation at 1, 2, 3, 6 probes | drop per window "
          "(first, last) | last drop / window noise |")
    print("|---|---|---|---|---|")
    for row in summarise(steps, per_batch, a.window, a.start):
        lags = ", ".join(f"{v:+.2f}" for v in row["autocorrelation"].values())
        print(f"| {row['batches']} | {row['residual_sd']:.4f} | {lags} | {row['window_drop_first']:.4f}, "
              f"{row['window_drop_last']:.4f} | {row['snr_last']:.1f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
