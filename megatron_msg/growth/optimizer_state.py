"""Carry AdamW state across a growth event (logical, name-keyed form).

Old moments move to the positions their entries moved to; new entries start at
zero.  The step count of tensors that mix old and new entries follows the rule
chosen in ``optimizer.growth_step_rule`` (see training/optimizer.py and
docs/growth.md); tensors of brand-new layers start fresh; untouched tensors
keep their state.
"""
from __future__ import annotations

import torch

from megatron_msg.growth.operators import GrowthPlan, grow_moment, grow_moments, new_entry_mask
from megatron_msg.model.layout import layer_name, split_layer_name

STATE_KEYS = ("exp_avg", "exp_avg_sq")


def grow_optimizer_state(named: dict[str, dict], plan: GrowthPlan, rule: str) -> dict[str, dict]:
    if rule not in ("per_entry", "inherit", "reset"):
        raise ValueError(f"optimizer.growth_step_rule: unknown rule {rule!r}")
    moments = {k: grow_moments({n: st[k] for n, st in named.items()}, plan) for k in STATE_KEYS}
    # Which grown name came from which old name (depth growth renames layers).
    origin: dict[str, tuple[str, bool]] = {}
    for name in named:
        layer, local = split_layer_name(name)
        if layer is None:
            origin[name] = (name, False)
    for j, ls in enumerate(plan.layers):
        for name in named:
            layer, local = split_layer_name(name)
            if layer == ls.src:
                origin[layer_name(j, local)] = (name, ls.new)

    out: dict[str, dict] = {}
    for new_name, (old_name, is_new_layer) in origin.items():
        old = named[old_name]
        m, v = moments["exp_avg"][new_name], moments["exp_avg_sq"][new_name]
        if is_new_layer:
            out[new_name] = dict(step=0, exp_avg=m, exp_avg_sq=v, step_offset=None, max_offset=0)
            continue
        mixed = tuple(m.shape) != tuple(old["exp_avg"].shape)
        step, offset, max_offset = int(old["step"]), old.get("step_offset"), int(old.get("max_offset", 0))
        if mixed:
            if offset is not None:
                offset = grow_moment(old_name, offset, plan)
            if rule == "reset":
                step, offset, max_offset = 0, None, 0
            elif rule == "per_entry":
                born = new_entry_mask(old_name, tuple(m.shape), plan).to(m.device)
                base = offset if offset is not None else torch.zeros(m.shape, device=m.device)
                offset = torch.where(born, torch.full_like(base, float(step)), base)
                max_offset = step
            # inherit: new entries silently share the old count (and old offsets)
        out[new_name] = dict(step=step, exp_avg=m, exp_avg_sq=v, step_offset=offset,
                             max_offset=max_offset)
    return out
