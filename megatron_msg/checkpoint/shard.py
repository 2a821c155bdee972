"""``shard`` and ``merge``: logical (full) tensors <-> one tensor-parallel rank's block.

Pure, per-tensor functions that know ranks but never growth (DESIGN.md).  Which
dimension is split comes from the tensor's layout spec (model/layout.py):

* units of ffn or heads (fc1 rows, fc2 columns, packed QKV rows, proj columns,
  ffn/head masks): the dimension is viewed as ``(prefix, units, suffix)``, e.g.
  QKV as ``(3, heads, head_dim)``, and each rank takes an equal contiguous block
  of units, so QKV is packed ``[3, heads/tp, head_dim]`` on every rank;
* vocabulary (token embedding, untied LM head, MLM bias): blocks of
  ``ceil(vocab / tp)`` rows, the last one zero-padded (see parallel/layers.py);
* everything else is replicated.

This is the same contiguous-block rule that ``GrowthSpec.parts`` uses for
growth, so a growth with ``parts = tp`` appends each rank's new units inside
that rank's own block.  Optimizer moments and per-entry step offsets have the
shape of their parameter and are sharded by the same functions.
"""
from __future__ import annotations

import math

import torch

from megatron_msg.config import ModelConfig
from megatron_msg.model.layout import tensor_spec


def _unit_view(name: str, t: torch.Tensor, dim: int, cfg: ModelConfig, units: int) -> tuple[int, int]:
    """(prefix, suffix) of dimension ``dim`` of ``t`` when it holds ``units`` units."""
    axis = tensor_spec(name).axes[dim]
    pre, _, suf = axis.factors(cfg.shape, cfg.head_dim)
    if t.shape[dim] != pre * units * suf:
        raise ValueError(f"{name}: dimension {dim} has size {t.shape[dim]}, expected "
                         f"{pre} x {units} x {suf} for {axis.kind} at shape {cfg.shape}")
    return pre, suf


def shard_tensor(name: str, full: torch.Tensor, cfg: ModelConfig, tp_size: int, tp_rank: int) -> torch.Tensor:
    """This rank's block of the logical tensor ``name`` (a view-free copy)."""
    spec = tensor_spec(name)
    dim = spec.tp_split_dim()
    if tp_size == 1 or dim is None:
        return full.clone()
    if spec.vocab_dim is not None:
        rows = math.ceil(full.shape[dim] / tp_size)
        pad = rows * tp_size - full.shape[dim]
        if pad:
            widths = [0, 0] * (full.dim() - 1 - dim) + [0, pad]
            full = torch.nn.functional.pad(full, widths)
        return full.narrow(dim, tp_rank * rows, rows).clone()
    units = getattr(cfg.shape, tensor_spec(name).axes[dim].unit_dim)
    if units % tp_size:
        raise ValueError(f"{name}: {units} units are not divisible by tensor-parallel size {tp_size}")
    pre, suf = _unit_view(name, full, dim, cfg, units)
    local = units // tp_size
    view = full.reshape(*full.shape[:dim], pre, units, suf, *full.shape[dim + 1:])
    block = view.narrow(dim + 1, tp_rank * local, local)
    return block.reshape(*full.shape[:dim], pre * local * suf, *full.shape[dim + 1:]).clone()


def merge_tensor(name: str, parts: list[torch.Tensor], cfg: ModelConfig) -> torch.Tensor:
    """Inverse of :func:`shard_tensor`: the logical tensor from every rank's block, in rank order."""
    spec = tensor_spec(name)
    dim = spec.tp_split_dim()
    if len(parts) == 1 or dim is None:
        return parts[0].clone()
    if spec.vocab_dim is not None:
        return torch.cat(parts, dim=dim).narrow(dim, 0, cfg.vocab_size).clone()
    units = getattr(cfg.shape, spec.axes[dim].unit_dim)
    local = units // len(parts)
    views = []
    for p in parts:
        pre, suf = _unit_view(name, p, dim, cfg, local)
        views.append(p.reshape(*p.shape[:dim], pre, local, suf, *p.shape[dim + 1:]))
    full = torch.cat(views, dim=dim + 1)
    return full.reshape(*full.shape[:dim], -1, *full.shape[dim + 3:]).clone()
