"""DeepSpeed universal checkpoints, both ways (``msg-deepspeed export`` / ``import``).

DeepSpeed turns a ZeRO-1/2 checkpoint into its *universal* form with its own converter
(``python -m deepspeed.checkpoint.ds_to_universal``): per parameter
``zero/<name>/{fp32,exp_avg,exp_avg_sq}.pt`` (each ``{"param": full tensor, "cat_dim": 0}``)
and ``step.pt`` (the Adam step, a tensor), ``zero/optimizer_state.pt`` (the param groups'
hyper-parameters) and the engine's ``mp_rank_00_model_states.pt`` (``global_steps``, ...).  A
DeepSpeed engine with ``"checkpoint": {"load_universal": true}`` loads one on any data-parallel
size.  Parameter names are the module's ``named_parameters`` names, so a DeepSpeed engine that
wraps our GPT/BERT module (``build_model``) has exactly our names.

* **import**: a universal checkpoint (DeepSpeed's converter output) becomes our checkpoint of
  the same step: values, moments, Adam steps; the masks (buffers, which universal loading never
  touches) are 1; the run's position (stage, data, LR segment) comes from the config given,
  whose schedule must have reached the checkpoint's shape by its step.
* **export**: our checkpoint becomes a universal one that DeepSpeed loads.  DeepSpeed's Adam
  keeps one step per parameter group and no per-entry step offsets, and universal loading sets
  no buffers, so a checkpoint inside a growth ramp (masks not all 1), with per-entry offsets
  left by a growth, or whose tensors of one group have different steps (a depth growth's new
  layers) is refused with the reason, never approximated.

The two parameter groups are ours (training/optimizer_factory.py): weight decay, then the
``no_weight_decay`` tensors; a DeepSpeed engine continuing an export must pass its parameters
in those two groups, in ``named_parameters`` order (tests/deepspeed_driver.py does).
"""
from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import torch

from megatron_msg.checkpoint.errors import CheckpointError
from megatron_msg.checkpoint.io import LogicalTensor, open_checkpoint, save_checkpoint
from megatron_msg.config import ModelConfig, RunConfig, config_from_dict
from megatron_msg.model.init import logical_shapes
from megatron_msg.model.layout import tensor_spec
from megatron_msg.training.batches import BatchSchedule
from megatron_msg.training.lr import lr_at, lr_segments
from megatron_msg.training.trainer import train_settings_at

MODEL_STATES = "mp_rank_00_model_states.pt"
LATEST = "latest_universal"


def _groups(names: list[str]) -> tuple[list[str], list[str]]:
    """Our optimizer's two parameter groups, in order: weight decay, then no weight decay."""
    return ([n for n in names if not tensor_spec(n).no_weight_decay],
            [n for n in names if tensor_spec(n).no_weight_decay])


def _ds_version() -> str:
    try:
        import deepspeed
        return deepspeed.__version__
    except ImportError:  # writing the files needs no DeepSpeed; the loader wants a version >= 0.3.17
        return "0.19.8"


def export_universal(checkpoint: Path, out_dir: Path) -> Path:
    """Write ``checkpoint`` as a DeepSpeed universal checkpoint under ``out_dir``; returns its tag directory."""
    ckpt = open_checkpoint(Path(checkpoint))
    state = ckpt.state
    cfg = config_from_dict(state["config"])
    mcfg = ModelConfig(**state["model_config"])
    if state.get("masked"):
        raise CheckpointError(f"{ckpt.path}: inside a growth ramp (masks below 1): DeepSpeed's universal loading "
                              f"sets no buffers; export after the ramp ends (step {_ramp_end(state)})")
    step = state["step"]
    params = [n for n in logical_shapes(mcfg) if not tensor_spec(n).is_mask]
    adam = {}
    for group in _groups(params):
        steps = {}
        for name in group:
            st = ckpt.index[name]["optimizer"]
            if st is None:
                raise CheckpointError(f"{ckpt.path}: {name} has no Adam state yet; DeepSpeed needs every parameter "
                                      f"of a group to have one")
            if "step_offset" in st["keys"]:
                raise CheckpointError(f"{ckpt.path}: {name} has per-entry Adam steps left by a growth; DeepSpeed's "
                                      f"Adam has one step per group (export once they settle, or after a run "
                                      f"with optimizer.growth_step_rule inherit)")
            steps.setdefault(st["step"], name)
        if len(steps) > 1:
            (a, na), (b, nb) = list(steps.items())[:2]
            raise CheckpointError(f"{ckpt.path}: {na} has taken {a} Adam steps, {nb} {b}; DeepSpeed's Adam keeps one "
                                  f"step per parameter group")
        adam.update({name: next(iter(steps)) for name in group})
    tag = f"global_step{step}"
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    final, tmp = out_dir / tag, out_dir / f".tmp-{tag}.{os.getpid()}"
    if final.exists():
        raise CheckpointError(f"{final} exists already")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "zero").mkdir(parents=True)
    module = {}
    for name in logical_shapes(mcfg):  # buffers (the masks, all 1 here) as ds_to_universal writes them
        if tensor_spec(name).is_mask:
            (tmp / "zero" / name).mkdir()
            module[name] = ckpt.model[name]
            torch.save({"param": module[name], "cat_dim": 0}, tmp / "zero" / name / "fp32.pt")
    for name in params:
        d = tmp / "zero" / name
        d.mkdir()
        value = ckpt.model[name]
        module[name] = value
        torch.save({"param": value, "cat_dim": 0}, d / "fp32.pt")
        for key in ("exp_avg", "exp_avg_sq"):
            torch.save({"param": ckpt.read_part(name, key), "cat_dim": 0}, d / f"{key}.pt")
        torch.save(torch.tensor(float(adam[name])), d / "step.pt")
    o = cfg.optimizer
    lr = lr_at(step, lr_segments(cfg), cfg.lr, cfg.train.steps)
    hyper = {"lr": lr, "betas": (o.beta1, o.beta2), "eps": o.eps, "amsgrad": False}
    decay, plain = _groups(params)
    torch.save({"ds_version": _ds_version(),
                "param_groups": [{**hyper, "weight_decay": o.weight_decay}, {**hyper, "weight_decay": 0.0}]},
               tmp / "zero" / "optimizer_state.pt")
    shapes = logical_shapes(mcfg)
    written = state.get("written_by") or {}
    torch.save({"module": module, "dp_world_size": int(written.get("dp", 1)), "mp_world_size": 1,
                "global_steps": step, "global_samples": BatchSchedule.from_config(cfg).samples_before(step),
                "skipped_steps": 0, "lr_scheduler": None, "ds_version": _ds_version(), "ds_config": {},
                "param_shapes": [{n: torch.Size(shapes[n]) for n in g} for g in (decay, plain)],
                "megatron_msg": {"exported_from": str(ckpt.path), "model_config": dataclasses.asdict(mcfg)}},
               tmp / MODEL_STATES)
    os.replace(tmp, final)
    latest = out_dir / f".{LATEST}.tmp.{os.getpid()}"
    latest.write_text(tag)
    os.replace(latest, out_dir / LATEST)
    return final


def _ramp_end(state: dict):
    ramp = state.get("ramp")
    return "unknown" if not ramp else ramp["start_step"] + ramp["phi"]


def _universal_tag_dir(path: Path) -> Path:
    """The tag directory of a universal checkpoint, given it or its parent (``latest_universal``)."""
    if (path / "zero").is_dir():
        return path
    if (path / LATEST).is_file():
        return path / (path / LATEST).read_text().strip()
    raise CheckpointError(f"{path}: not a DeepSpeed universal checkpoint (no zero/ directory, no {LATEST})")


def _load(file: Path):
    try:
        return torch.load(file, map_location="cpu", weights_only=False)  # DeepSpeed pickles plain containers
    except FileNotFoundError:
        raise CheckpointError(f"{file}: missing from the universal checkpoint") from None
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"{file}: cannot read ({' '.join(str(exc).split())})") from None


def import_universal(universal: Path, cfg: RunConfig, out_dir: Path) -> Path:
    """Our checkpoint (per-tensor format) of the DeepSpeed universal checkpoint ``universal``, for run ``cfg``."""
    tag_dir = _universal_tag_dir(Path(universal))
    states = _load(tag_dir / MODEL_STATES)
    step = int(states.get("global_steps", -1))
    if step < 0:
        raise CheckpointError(f"{tag_dir / MODEL_STATES}: no global_steps")
    stages = cfg.resolved_stages()
    if any(s.auto for s in stages):
        raise CheckpointError("growth.stages: at_step auto is decided by msg-train's own checkpoints; a DeepSpeed "
                              "checkpoint records no decisions (give the stages fixed steps)")
    stage_index = sum(1 for s in stages if s.at_step <= step)
    shape = stages[stage_index - 1].shape if stage_index else cfg.model.shape
    if stage_index and stages[stage_index - 1].at_step + stages[stage_index - 1].phi > step:
        raise CheckpointError(f"the config's growth.stages[{stage_index - 1}] ramps its masks until step "
                              f"{stages[stage_index - 1].at_step + stages[stage_index - 1].phi}; a DeepSpeed checkpoint "
                              f"has no masks: import it at a step outside every ramp")
    mcfg = cfg.model.with_shape(shape)
    shapes = logical_shapes(mcfg)
    for name, want in shapes.items():
        if tensor_spec(name).is_mask:
            continue
        if not (tag_dir / "zero" / name).is_dir():
            raise CheckpointError(f"{tag_dir}: no zero/{name}: the DeepSpeed model is not this config's model at "
                                  f"step {step} (shape {shape})")
    extra = sorted(p.name for p in (tag_dir / "zero").iterdir() if p.is_dir() and p.name not in shapes)
    if extra:
        raise CheckpointError(f"{tag_dir}: parameters this config's model does not have, e.g. {extra[:3]}")

    def tensors():
        for name, want in shapes.items():
            if tensor_spec(name).is_mask:
                yield LogicalTensor(name, torch.ones(want), None)
                continue
            d = tag_dir / "zero" / name
            parts = {}
            for key in ("fp32", "exp_avg", "exp_avg_sq"):
                entry = _load(d / f"{key}.pt")
                t = entry["param"] if isinstance(entry, dict) else entry
                if t.numel() != torch.Size(want).numel():
                    raise CheckpointError(f"{d / key}.pt: {tuple(t.shape)}, this config's model has {want}")
                parts[key] = t.detach().to(torch.float32).reshape(want).contiguous()
            if not (d / "step.pt").is_file():  # Adam's count may differ from the global step (skipped steps)
                raise CheckpointError(f"{d / 'step.pt'}: missing (the Adam step of {name}, which its bias "
                                      "correction needs)")
            adam_step = int(_load(d / "step.pt"))
            yield LogicalTensor(name, parts["fp32"], {"step": adam_step, "max_offset": 0, "step_offset": None,
                                                      "exp_avg": parts["exp_avg"], "exp_avg_sq": parts["exp_avg_sq"]})

    settings = train_settings_at(BatchSchedule.from_config(cfg), lr_segments(cfg), step)
    state = {"step": step, "stage_index": stage_index, "model_config": dataclasses.asdict(mcfg), "masked": False,
             "ramp": None, "written_by": {"deepspeed_universal": str(tag_dir)}, "loss_scaler": None,
             "nonfinite_skipped": 0, "train_settings": settings, "config": cfg.to_dict()}
    meta = {"shape": str(shape), "stage_index": stage_index, "imported_from": str(tag_dir)}
    return save_checkpoint(Path(out_dir), step, state, meta, 1, tensors())
