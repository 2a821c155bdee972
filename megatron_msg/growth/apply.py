"""Apply one growth event to a live (whole or sharded) model and its optimizer.

The composition DESIGN.md asks for: gather the logical state (named full
tensors; the identity on one device), ``grow`` it with the pure operators, then
build this rank's part of the new model and cut its blocks out of the grown
state (``shard``).  Nothing here edits module internals, and the same code runs
on one CPU and on a TP x PP x DP layout: under parallelism every rank of a
model replica gathers the same logical state and grows it identically
(growth RNG is keyed by seed, event and tensor name), then keeps its own part,
so new layers land on whichever stage the new layer count assigns them to.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_msg.checkpoint.logical import gather_model, gather_optimizer, load_model, shard_optimizer_state
from megatron_msg.config import ModelConfig, OptimizerConfig, ResolvedStage
from megatron_msg.growth.operators import GrowthPlan, GrowthSpec, grow_tensors, plan_growth
from megatron_msg.growth.optimizer_state import grow_optimizer_state
from megatron_msg.growth.ramp import MaskRamp
from megatron_msg.model import build_model
from megatron_msg.model.layout import tensor_spec
from megatron_msg.parallel.topology import ParallelState
from megatron_msg.training.optimizer import MSGAdamW


def build_optimizer(model: torch.nn.Module, cfg: OptimizerConfig) -> MSGAdamW:
    named = list(model.named_parameters())
    no_decay = {n for n, _ in named if tensor_spec(n).no_weight_decay}
    return MSGAdamW(named, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                    weight_decay=cfg.weight_decay, no_decay=no_decay)


def spec_for_stage(model_cfg: ModelConfig, stage: ResolvedStage, seed: int, layout_parts: int = 1) -> GrowthSpec:
    """The growth spec of ``stage``; ``layout_parts`` blocks for ffn/heads (the TP layout rule)."""
    parts = {"ffn": layout_parts, "heads": layout_parts} if layout_parts > 1 else {}
    return GrowthSpec(old=model_cfg.shape, new=stage.shape, head_dim=model_cfg.head_dim,
                      operator=stage.operator, init=stage.init, init_std=stage.init_std,
                      depth_placement=stage.depth_placement, depth_init=stage.depth_init,
                      seed=seed, event=stage.index, parts=parts)


@dataclass
class GrowthResult:
    model: torch.nn.Module
    optimizer: MSGAdamW | None
    ramp: MaskRamp | None
    plan: GrowthPlan


def grow_model(model, spec: GrowthSpec, optimizer: MSGAdamW | None = None,
               optim_cfg: OptimizerConfig | None = None, ramp_start: int = 0, phi: int = 1,
               ps: ParallelState | None = None, placement=None) -> GrowthResult:
    """Grow ``model`` (and its optimizer state) to ``spec.new``; returns new objects.

    Under MSG the new model starts on its masked path with a ramp from
    ``ramp_start`` over ``phi`` steps; other operators have no ramp.  With a
    sharded model every rank of the replica must call this together (``ps``, the
    layout the model is sharded on); ``placement`` is this rank's part of the new
    model (default: the old model's, i.e. the same layout), so a growth event can
    also move the run to another TP x PP x DP layout.
    """
    plan = plan_growth(spec)
    device = next(model.parameters()).device
    ps = ps or ParallelState.single(device)
    grown = grow_tensors(gather_model(model, ps), plan)
    new_model = build_model(model.cfg.with_shape(spec.new), placement or model.placement, initialize=False)
    load_model(new_model, grown)
    new_model.to(device)
    new_model.train(model.training)
    new_model.set_masked(spec.uses_masks)
    new_opt = None
    if optimizer is not None:
        assert optim_cfg is not None
        named = gather_optimizer(optimizer, model, ps)
        new_opt = build_optimizer(new_model, optim_cfg)
        new_opt.load_named_state(shard_optimizer_state(
            grow_optimizer_state(named, plan, optim_cfg.growth_step_rule), new_model))
        new_opt.set_lr(optimizer.param_groups[0]["lr"])
    ramp = MaskRamp(ramp_start, phi) if spec.uses_masks else None
    return GrowthResult(new_model, new_opt, ramp, plan)
