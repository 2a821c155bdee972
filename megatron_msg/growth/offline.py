"""Offline growth: apply the next stage of a schedule to a checkpoint, file to file (``msg-grow``).

FLM-101B grew between stages outside the training job (and moved to a new
cluster layout).  Here that is the same composition as live growth, with files
instead of ranks at both ends: ``stream_growth`` (growth/apply.py) reads the
old logical tensors from the checkpoint one global tensor or one source layer
at a time, grows them with the same operators, and the grown tensors stream
straight into a new checkpoint (checkpoint/io.py), so memory stays at about one
logical layer whatever the model size.

The rule that keeps it exact: a checkpoint taken at step ``s`` with ``k`` stages
applied can be grown offline only by stage ``k`` of the config's schedule, and
only if that stage grows at step ``s``; the result is what the trainer would
have built live at that step (same growth RNG, ramp and optimizer state), so
``msg-train`` resuming it reproduces the uninterrupted run bit for bit, on any
layout (checkpoints are layout-free).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

from megatron_msg.checkpoint.io import (Checkpoint, CheckpointError, LogicalTensor, latest_checkpoint,
                                        open_checkpoint, remove_stale_temporaries, save_checkpoint)
from megatron_msg.checkpoint.reshard import Layout, reshard
from megatron_msg.config import ModelConfig, ResolvedStage, RunConfig
from megatron_msg.growth.apply import spec_for_stage, stream_growth
from megatron_msg.growth.operators import GrowthSpec, plan_growth
from megatron_msg.growth.optimizer_state import check_rule
from megatron_msg.growth.ramp import MaskRamp
from megatron_msg.metrics_file import iter_metrics
from megatron_msg.model.init import logical_num_parameters, logical_shapes


class OfflineGrowthError(ValueError):
    """The checkpoint, the schedule and the output directory do not fit together."""


@dataclasses.dataclass
class OfflineGrowthResult:
    checkpoint: Path      # the new checkpoint directory
    stage: ResolvedStage  # the stage applied
    parameters: int       # parameters of the grown model


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, given it or a run directory (its latest checkpoint)."""
    path = Path(path)
    if (path / "state.pt").is_file():
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise OfflineGrowthError(f"{path}: neither a checkpoint directory (no state.pt) nor a run directory "
                                 f"with checkpoints")
    return latest


def _run_dir_of(checkpoint: Path) -> Path:
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent


def next_stage(cfg: RunConfig, ckpt: Checkpoint) -> tuple[ModelConfig, ResolvedStage]:
    """(the checkpoint's model config, the schedule's stage that grows it now), or an error naming why not."""
    state, path = ckpt.state, ckpt.path
    mcfg = ModelConfig(**state["model_config"])
    stages, k, step = cfg.resolved_stages(), state["stage_index"], state["step"]
    if mcfg.arch != cfg.model.arch:
        raise OfflineGrowthError(f"{path}: checkpoint is a {mcfg.arch} model, config says model.arch={cfg.model.arch}")
    want = stages[k - 1].shape if k else cfg.model.shape
    if mcfg.shape != want:
        raise OfflineGrowthError(f"{path}: checkpoint shape {mcfg.shape} after {k} growth stage(s) does not match "
                                 f"the config's schedule, which gives {want}")
    if k >= len(stages):
        raise OfflineGrowthError(f"{path}: all {len(stages)} growth stage(s) of the config are already applied")
    stage = stages[k]
    if stage.auto:
        raise OfflineGrowthError(f"growth.stages[{k}].at_step is auto: the trainer decides it while training; "
                                 "offline growth applies a stage with a fixed at_step")
    if stage.at_step > step:
        raise OfflineGrowthError(
            f"{path}: checkpoint is at step {step}, growth.stages[{k}] grows at step {stage.at_step}; offline growth "
            f"applies a stage at its own step only (train to it first: msg-train --max-steps {stage.at_step - step})")
    if stage.at_step < step:
        raise OfflineGrowthError(f"{path}: checkpoint is at step {step}, past growth.stages[{k}].at_step="
                                 f"{stage.at_step}: the config's schedule does not fit this run")
    return mcfg, stage


def grow_checkpoint(cfg: RunConfig, source: str | Path, out_dir: str | Path, fmt: str = "logical") -> OfflineGrowthResult:
    """Apply the config's next growth stage to ``source`` (a checkpoint or run directory);
    write the grown checkpoint into the run directory ``out_dir`` (which must hold none yet).

    ``fmt="sharded"``: the grown checkpoint is cut for the stage's layout (and the config's ZeRO
    stage) as msg-reshard does: grown per tensor into a scratch directory beside it first, then
    resharded (twice the writing, still about one layer in memory).
    """
    path = find_checkpoint(source)
    out_dir = Path(out_dir)
    if out_dir.resolve() == _run_dir_of(path).resolve():
        raise OfflineGrowthError(f"--out-dir {out_dir} is the source run directory: the grown checkpoint has the "
                                 f"same step and would replace the one it is grown from; choose another directory")
    remove_stale_temporaries(out_dir)  # what a killed msg-grow left in it
    for scratch in out_dir.glob(".grown-*") if out_dir.is_dir() else ():
        shutil.rmtree(scratch, ignore_errors=True)
    existing = out_dir / "checkpoints"
    if existing.is_dir() and any(p.name.startswith("step_") or p.name == "latest" for p in existing.iterdir()):
        raise OfflineGrowthError(f"--out-dir {out_dir} already holds checkpoints; choose an empty directory")
    try:
        ckpt = open_checkpoint(path)
    except CheckpointError as exc:
        raise OfflineGrowthError(str(exc)) from None
    mcfg, stage = next_stage(cfg, ckpt)
    rule = cfg.optimizer.growth_step_rule
    check_rule(rule)
    # Exactly the spec Trainer.grow builds (growth RNG keyed by seed, event and tensor name).
    spec = spec_for_stage(mcfg, stage, seed=cfg.train.seed, layout_parts=cfg.parallel.layout_parts(stage.layout[0]))
    new_cfg = mcfg.with_shape(stage.shape)
    state = _grown_state(ckpt.state, cfg, new_cfg, stage, spec)
    parameters = logical_num_parameters(new_cfg)
    meta = {"shape": str(new_cfg.shape), "stage_index": state["stage_index"], "parameters": parameters,
            "grown_offline_from": str(path)}
    # Read before anything is written: a source whose metrics cannot be read leaves no output behind.
    metrics = _carried_metrics(_run_dir_of(path), stage, new_cfg, parameters)
    if fmt == "sharded":
        scratch = out_dir / f".grown-{os.getpid()}"
        grown = save_checkpoint(scratch, state["step"], state, meta, 1, _grown_tensors(ckpt, mcfg, spec, rule))
        tp, pp, dp = stage.layout
        written = reshard(grown, out_dir, Layout(tp, pp, dp, cfg.parallel.zero_stage, cfg.parallel.virtual_stages)).checkpoint
        shutil.rmtree(scratch, ignore_errors=True)
    elif fmt == "logical":
        written = save_checkpoint(out_dir, state["step"], state, meta, cfg.train.keep_checkpoints,
                                  _grown_tensors(ckpt, mcfg, spec, rule))
    else:
        raise OfflineGrowthError(f"unknown checkpoint format {fmt!r} (sharded or logical)")
    _write_metrics(out_dir, metrics)
    return OfflineGrowthResult(written, stage, parameters)


def _grown_tensors(ckpt: Checkpoint, mcfg: ModelConfig, spec: GrowthSpec, rule: str):
    """The grown logical tensors, one at a time, read lazily from ``ckpt``."""
    def read(names: list[str]) -> tuple[dict, dict]:
        states = {n: st for n in names if (st := ckpt.optimizer.get(n)) is not None}
        return {n: ckpt.model[n] for n in names}, states

    plan = plan_growth(spec)
    for params, states in stream_growth(plan, list(logical_shapes(mcfg)), read, rule):
        for name, value in params.items():
            yield LogicalTensor(name, value, states.get(name))


def _grown_state(old: dict, cfg: RunConfig, new_cfg: ModelConfig, stage: ResolvedStage, spec: GrowthSpec) -> dict:
    """The small state of the grown checkpoint: what the trainer holds right after growing live."""
    ramp = MaskRamp(stage.at_step, stage.phi) if spec.uses_masks else None
    keep = {k: v for k, v in old.items() if k not in ("format", "tensors")}
    return {**keep, "stage_index": stage.index + 1, "model_config": dataclasses.asdict(new_cfg),
            "masked": spec.uses_masks, "ramp": None if ramp is None else dataclasses.asdict(ramp),
            "config": cfg.to_dict()}


def _carried_metrics(src_run: Path, stage: ResolvedStage, new_cfg: ModelConfig, parameters: int) -> list[str]:
    """The source run's metrics before the growth step (a torn last line left out), plus a growth record."""
    lines = []
    src = src_run / "metrics.jsonl"
    if src.is_file():
        for _, rec in iter_metrics(src, OfflineGrowthError):
            if rec.get("step", -1) < stage.at_step:
                lines.append(json.dumps(rec))
    lines.append(json.dumps({"kind": "growth", "step": stage.at_step, "stage": stage.index, "operator": stage.operator,
                             "shape": str(new_cfg.shape), "parameters": parameters,
                             "layout": "tp{} x pp{} x dp{}".format(*stage.layout), "phi": stage.phi,
                             "rewind_lr": stage.rewind_lr, "offline": True}))
    return lines


def _write_metrics(out_dir: Path, lines: list[str]) -> None:
    path = out_dir / "metrics.jsonl"
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)


def record_probe(out_dir: str | Path, stage: ResolvedStage, before: float, after: float) -> None:
    """Add probe losses (``msg-grow --verify``) to the offline growth record of ``out_dir`` (atomic)."""
    path = Path(out_dir) / "metrics.jsonl"
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        rec = json.loads(line) if line.strip() else {}
        if rec.get("kind") == "growth" and rec.get("stage") == stage.index and rec.get("offline"):
            lines[i] = json.dumps({**rec, "loss_before": before, "loss_after": after})
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)
