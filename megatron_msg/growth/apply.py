"""Apply one growth event to a live (whole or sharded) model and its optimizer.

The composition DESIGN.md asks for: gather the logical state (named full
tensors; the identity on one device), ``grow`` it with the pure operators, then
build this rank's part of the new model and cut its blocks out of the grown
state (``shard``).  Nothing here edits module internals, and the same code runs
on one CPU and on a TP x PP x DP layout: under parallelism every rank of a
model replica gathers the same logical state and grows it identically
(growth RNG is keyed by seed, event and tensor name), then keeps its own part,
so new layers land on whichever stage the new layer count assigns them to.

The composition is streamed: global tensors one at a time, then new layer by
new layer (gather its source layer's parameters, masks and Adam state, grow,
keep this rank's blocks, free), so the extra memory per rank is about one
logical layer, never the whole logical state.  The result is bit-identical to
``grow_tensors`` / ``grow_optimizer_state`` on the whole state.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from megatron_msg.checkpoint.logical import gather_model, gather_optimizer, load_model, shard_optimizer_state
from megatron_msg.config import ModelConfig, ResolvedStage
from megatron_msg.growth.operators import (GrowthPlan, GrowthSpec, grow_layer, grow_layer_width, grow_param,
                                           plan_growth)
from megatron_msg.growth.optimizer_state import (check_rule, grow_layer_state, grow_layer_width_state,
                                                 grow_tensor_state)
from megatron_msg.growth.ramp import MaskRamp
from megatron_msg.model import build_model
from megatron_msg.model.init import logical_shapes
from megatron_msg.model.layout import split_layer_name
from megatron_msg.parallel.topology import ParallelState

# An optimizer that holds state by parameter name (training/optimizer.py's MSGAdamW, training/zero.py's
# ZeroAdamW): ``load_named_state``, ``set_lr``, ``param_groups``, and what checkpoint/logical.py reads.
Optimizer = Any


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
    optimizer: Optimizer | None
    ramp: MaskRamp | None
    plan: GrowthPlan


Fetch = Callable[[list[str]], tuple[dict, dict]]


def stream_growth(plan: GrowthPlan, old_names: list[str], fetch: Fetch, rule: str | None,
                  wanted: Callable[[str, int | None], bool] = lambda name, layer: True
                  ) -> Iterator[tuple[dict, dict]]:
    """The grown logical state, piece by piece: ``(params and masks, Adam states)`` by new name.

    ``fetch(names)`` returns the old logical tensors and Adam states of ``names`` (a
    gather over the ranks in a live run, a read from files offline); it is called for
    every global tensor, one at a time, then for each new layer's source layer, in
    the same order whatever ``wanted`` says (so collective fetches stay in step).
    ``wanted(name, None)`` / ``wanted(None, j)``: whether to grow a global tensor /
    new layer j (a rank grows only what it holds).  ``rule``: the Adam step rule, or
    None to grow no optimizer state.  Holds at most one old layer at a time.
    """
    global_names, layer_names = [], {}
    for name in old_names:
        layer, _ = split_layer_name(name)
        if layer is None:
            global_names.append(name)
        else:
            layer_names.setdefault(layer, []).append(name)

    for name in global_names:  # one global tensor at a time
        params, states = fetch([name])
        if wanted(name, None):
            yield ({name: grow_param(name, params[name], plan)},
                   {n: grow_tensor_state(n, st, plan, rule) for n, st in states.items()} if rule else {})
        del params, states

    # New layer by new layer.  The last source is cached, width-grown on first use: copies of
    # one source are adjacent (interleave placement), so at most one old layer is held at a time.
    source = None  # [index, old params, old states, width-grown (params, states) or None]
    for j, ls in enumerate(plan.layers):
        if source is None or source[0] != ls.src:
            source = None  # free the previous source before fetching the next
            params, states = fetch(layer_names[ls.src])
            source = [ls.src, {split_layer_name(n)[1]: t for n, t in params.items()},
                      {split_layer_name(n)[1]: st for n, st in states.items()}, None]
            del params, states
        if not wanted(None, j):
            continue
        if source[3] is None:
            source[3] = (grow_layer_width(ls.src, source[1], plan),
                         grow_layer_width_state(ls.src, source[2], plan, rule) if rule else {})
            source[1] = source[2] = None
        yield grow_layer(j, source[3][0], plan), grow_layer_state(j, source[3][1], plan)


def grow_model(model, spec: GrowthSpec, optimizer: Optimizer | None = None,
               new_optimizer: Callable[[torch.nn.Module], Optimizer] | None = None, step_rule: str = "per_entry",
               ramp_start: int = 0, phi: int = 1, ps: ParallelState | None = None, placement=None,
               params_dtype: torch.dtype = torch.float32) -> GrowthResult:
    """Grow ``model`` (and its optimizer state) to ``spec.new``; returns new objects.

    Under MSG the new model starts on its masked path with a ramp from
    ``ramp_start`` over ``phi`` steps; other operators have no ramp.  With a
    sharded model every rank of the replica must call this together (``ps``, the
    layout the model is sharded on); ``placement`` is this rank's part of the new
    model (default: the old model's, i.e. the same layout), so a growth event can
    also move the run to another TP x PP x DP layout.  With ``optimizer``,
    ``new_optimizer(new_model)`` builds the grown model's (the caller's choice of
    ZeRO stage and the layout it is partitioned on: training/optimizer_factory.py)
    and the Adam state grows into it by ``step_rule``; ``params_dtype``: the new
    parameters' dtype (bf16/fp16: fp32 masters in the new optimizer, grown from the
    old optimizer's masters, never from rounded parameters).
    """
    plan = plan_growth(spec)
    device = next(model.parameters()).device
    ps = ps or ParallelState.single(device)
    # Allocated once, on the device and in the parameters' dtype: the values are streamed in below.
    new_model = build_model(model.cfg.with_shape(spec.new), placement or model.placement, initialize=False,
                            device=device, params_dtype=params_dtype)
    new_model.train(model.training)
    new_model.set_masked(spec.uses_masks)
    new_opt, rule = None, None
    if optimizer is not None:
        if new_optimizer is None:
            raise ValueError("grow_model: growing an optimizer's state needs new_optimizer (it builds the grown one)")
        rule = step_rule
        check_rule(rule)
        new_opt = new_optimizer(new_model)
    held = set(new_model.state_dict())  # this rank's tensors of the new model
    held_layers = {split_layer_name(n)[0] for n in held}
    loaded: set[str] = set()
    shapes = logical_shapes(model.cfg)

    def gather(names: list[str]) -> tuple[dict, dict]:
        """Logical parameters/masks and Adam state of ``names`` (collective over the replica)."""
        params = gather_model(model, ps, names=names, shapes=shapes, optimizer=optimizer)
        states = gather_optimizer(optimizer, model, ps, names=names, shapes=shapes) if new_opt else {}
        return params, states

    def held_here(name: str | None, layer: int | None) -> bool:
        return name in held if layer is None else layer in held_layers

    # Every rank joins every gather (stream_growth fetches the same names in the same order
    # on every rank: they are collective); only the pieces this rank holds are grown and kept.
    for params, states in stream_growth(plan, list(shapes), gather, rule, wanted=held_here):
        loaded.update(load_model(new_model, params, strict=False, optimizer=new_opt))
        if new_opt is not None:
            new_opt.load_named_state(shard_optimizer_state(states, new_model))
    missing = sorted(set(new_model.state_dict()) - loaded)
    if missing:
        raise KeyError(f"growth produced no value for {len(missing)} tensor(s) of the new model, e.g. {missing[:3]}")
    if new_opt is not None:
        new_opt.set_lr(optimizer.param_groups[0]["lr"])
    ramp = MaskRamp(ramp_start, phi) if spec.uses_masks else None
    return GrowthResult(new_model, new_opt, ramp, plan)
