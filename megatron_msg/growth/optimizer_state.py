"""Carry AdamW state across a growth event (logical, name-keyed form).

Old moments move to the positions their entries moved to; new entries start at
zero.  The step count of tensors that mix old and new entries follows the rule
chosen in ``optimizer.growth_step_rule`` (see training/optimizer.py and
docs/growth.md); tensors of brand-new layers start fresh; untouched tensors
keep their state.
"""
from __future__ import annotations

import torch

from megatron_msg.growth.operators import GrowthPlan, grow_moment, new_entry_mask
from megatron_msg.model.layout import layer_name, split_layer_name

STATE_KEYS = ("exp_avg", "exp_avg_sq")
RULES = ("per_entry", "inherit", "reset")


def check_rule(rule: str) -> None:
    if rule not in RULES:
        raise ValueError(f"optimizer.growth_step_rule: unknown rule {rule!r}")


def grow_tensor_state(name: str, old: dict, plan: GrowthPlan, rule: str) -> dict:
    """Width-grow the AdamW state of one tensor (global, or an old layer's under its old name).

    Moments move with their entries (new entries 0); if the tensor grew, its
    step count and per-entry offsets follow ``rule``.
    """
    check_rule(rule)
    m, v = (grow_moment(name, old[k], plan) for k in STATE_KEYS)
    step, offset, max_offset = int(old["step"]), old.get("step_offset"), int(old.get("max_offset", 0))
    if tuple(m.shape) != tuple(old["exp_avg"].shape):  # mixed old and new entries
        if offset is not None:
            offset = grow_moment(name, offset, plan)
        if rule == "reset":
            step, offset, max_offset = 0, None, 0
        elif rule == "per_entry":
            born = new_entry_mask(name, tuple(m.shape), plan).to(m.device)
            base = offset if offset is not None else torch.zeros(m.shape, device=m.device)
            offset = torch.where(born, torch.full_like(base, float(step)), base)
            max_offset = step
        # inherit: new entries silently share the old count (and old offsets)
    return dict(step=step, exp_avg=m, exp_avg_sq=v, step_offset=offset, max_offset=max_offset)


def grow_layer_width_state(index: int, states: dict[str, dict], plan: GrowthPlan, rule: str) -> dict[str, dict]:
    """Width-grow the state of old layer ``index`` ({local name: state})."""
    return {local: grow_tensor_state(layer_name(index, local), st, plan, rule) for local, st in states.items()}


def grow_layer_state(j: int, src: dict[str, dict], plan: GrowthPlan) -> dict[str, dict]:
    """State of new layer ``j`` (full names) from the width-grown state of its source layer.

    An old layer keeps its (width-grown) state; a brand-new layer starts fresh.
    """
    out = {}
    for local, st in src.items():
        if plan.layers[j].new:
            st = dict(step=0, exp_avg=torch.zeros_like(st["exp_avg"]),
                      exp_avg_sq=torch.zeros_like(st["exp_avg_sq"]), step_offset=None, max_offset=0)
        out[layer_name(j, local)] = st
    return out


def grow_optimizer_state(named: dict[str, dict], plan: GrowthPlan, rule: str) -> dict[str, dict]:
    """Grow a whole logical AdamW state: a loop over the per-tensor / per-layer pieces above."""
    check_rule(rule)
    out: dict[str, dict] = {}
    per_layer: dict[int, dict[str, dict]] = {}
    for name, st in named.items():
        layer, local = split_layer_name(name)
        if layer is None:
            out[name] = grow_tensor_state(name, st, plan, rule)
        else:
            per_layer.setdefault(layer, {})[local] = st
    grown = {i: grow_layer_width_state(i, sts, plan, rule) for i, sts in per_layer.items()}
    for j, ls in enumerate(plan.layers):
        out.update(grow_layer_state(j, grown.get(ls.src, {}), plan))
    return out
