"""Moving between a rank's sharded model/optimizer and the logical (full, named) state.

``gather_*`` are collective over one model replica (its TP x PP ranks): tensor
by tensor, the owning stage all-gathers the TP blocks and merges them
(shard.py), then broadcasts the logical tensor along its pipeline group, so
every rank of the replica ends with the logical state.  Data-parallel replicas
hold identical state and each gathers its own copy.  ``load_*`` are local: each
rank cuts its blocks out of a logical state.  ``names=`` gathers a subset
(live growth streams one layer at a time this way, growth/apply.py).

With one process (``ParallelState.single()``) gather is the identity and load
is ``load_state_dict``, so growth, checkpoints and resume run the same code at
every scale.  Checkpoints gather and write one logical tensor at a time, growth
one layer at a time (docs/parallel.md, "Memory").
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.distributed as dist

from megatron_msg.checkpoint.shard import merge_tensor, shard_tensor
from megatron_msg.model.init import logical_shapes
from megatron_msg.model.layout import tensor_spec
from megatron_msg.model.placement import owner_stage
from megatron_msg.parallel.topology import ParallelState

STATE_TENSORS = ("exp_avg", "exp_avg_sq", "step_offset")


def _gather_tensor(name: str, local: torch.Tensor | None, shape: tuple, cfg, ps: ParallelState) -> torch.Tensor:
    """The logical tensor ``name`` on every rank of the replica (``local`` is this rank's block or None).

    Collectives run on ``ps.device`` (NCCL cannot move CPU tensors); the result is on the CPU.
    """
    owner = owner_stage(name, cfg.layers, ps.pp_size, ps.vpp_size)
    if ps.pp_rank == owner:
        t = local.detach().to(ps.device, torch.float32)
        if ps.tp_size > 1 and tensor_spec(name).tp_split_dim() is not None:
            parts = [torch.empty_like(t) for _ in range(ps.tp_size)]
            dist.all_gather(parts, t.contiguous(), group=ps.tp_group)
            full = merge_tensor(name, [p.cpu() for p in parts], cfg)
        else:
            full = t.cpu().clone()
    else:
        full = torch.empty(shape, dtype=torch.float32)
    if ps.pp_size > 1:
        c = ps.coords
        on_device = full.to(ps.device)
        dist.broadcast(on_device, src=ps.topology.rank_of(c.tp, owner, c.dp), group=ps.pp_group)
        full = on_device.cpu()
    return full


def _selected(shapes: dict[str, tuple], names) -> dict[str, tuple]:
    """``shapes`` restricted to ``names``, in the order of ``names`` (every rank must pass the same)."""
    if names is None:
        return shapes
    unknown = [n for n in names if n not in shapes]
    if unknown:
        raise KeyError(f"no logical tensor(s) {unknown[:3]}")
    return {n: shapes[n] for n in names}


def gather_tensors(local: dict[str, torch.Tensor], cfg, ps: ParallelState,
                   params_only: bool = False, names=None, shapes: dict | None = None) -> dict[str, torch.Tensor]:
    """Logical tensors (fp32, CPU) from every rank's named blocks (parameters, masks or grads).

    ``names``: only these tensors, gathered in this order, which must be the
    same on every rank of the replica (the collectives run per tensor);
    default all.  ``shapes``: ``logical_shapes(cfg)`` if the caller has it.
    """
    if ps.topology.world_size == 1:
        keep = local if names is None else {n: local[n] for n in names if n in local}
        return {k: v.detach().to("cpu", torch.float32).clone() for k, v in keep.items()}
    shapes = _selected(shapes or logical_shapes(cfg), names)
    return {name: _gather_tensor(name, local.get(name), shape, cfg, ps) for name, shape in shapes.items()
            if not (params_only and tensor_spec(name).is_mask)}


def gather_model(model: torch.nn.Module, ps: ParallelState, names=None,
                 shapes: dict | None = None, optimizer=None) -> dict[str, torch.Tensor]:
    """Logical parameters and masks of a whole or sharded model (only ``names``, if given).

    With an ``optimizer`` that keeps fp32 master weights (16-bit parameters,
    training/optimizer.py) the parameters' values are the masters, not their rounded
    copies; under ZeRO that read is collective over the DP group, like ``gather_optimizer``.
    """
    local = model.state_dict()
    if optimizer is not None and optimizer.keeps_master_weights:
        held = dict(model.named_parameters())
        for name in (list(held) if names is None else [n for n in names if n in held]):
            local[name] = optimizer.master_block(name)
    return gather_tensors(local, model.cfg, ps, names=names, shapes=shapes)


def gather_optimizer(optimizer, model: torch.nn.Module, ps: ParallelState, names=None,
                     shapes: dict | None = None) -> dict[str, dict]:
    """Logical (name-keyed, full-tensor) AdamW state; parameters without state are left out.

    ``names``/``shapes`` as in :func:`gather_tensors` (masks among ``names`` are skipped).
    Each rank's block comes from ``optimizer.block_state``, which under ZeRO
    (training/zero.py) is itself collective over the DP group: every rank of the run
    must then call this for the same names.
    """
    if ps.topology.world_size == 1:
        params = [n for n, _ in model.named_parameters()]
        held = set(params)
        out = {}
        for n in (params if names is None else [n for n in names if n in held]):
            st = optimizer.block_state(n)
            if st is not None:
                out[n] = {k: (v.detach().cpu().clone() if torch.is_tensor(v) else v) for k, v in st.items()}
        return out
    cfg = model.cfg
    shapes = _selected(shapes or logical_shapes(cfg), names)
    out = {}
    for name, shape in shapes.items():
        if tensor_spec(name).is_mask:  # buffers have no optimizer state
            continue
        owner = owner_stage(name, cfg.layers, ps.pp_size, ps.vpp_size)
        st = optimizer.block_state(name) if ps.pp_rank == owner else None
        meta = [None]
        if ps.pp_rank == owner:
            meta = [None if st is None else {"step": int(st["step"]), "max_offset": int(st.get("max_offset", 0)),
                                             "has_offset": st.get("step_offset") is not None}]
        if ps.pp_size > 1:
            c = ps.coords
            dist.broadcast_object_list(meta, src=ps.topology.rank_of(c.tp, owner, c.dp), group=ps.pp_group)
        if meta[0] is None:
            continue
        full = {"step": meta[0]["step"], "max_offset": meta[0]["max_offset"], "step_offset": None}
        for key in STATE_TENSORS:
            if key == "step_offset" and not meta[0]["has_offset"]:
                continue
            full[key] = _gather_tensor(name, None if st is None else st[key], shape, cfg, ps)
        out[name] = full
    return out


@torch.no_grad()
def load_model(model: torch.nn.Module, logical: Mapping[str, torch.Tensor], strict: bool = True,
               optimizer=None) -> set[str]:
    """Copy this rank's blocks of a logical state into a (whole or sharded) model.

    Reads ``logical`` one tensor at a time (it may be a checkpoint's lazy mapping).
    An ``optimizer`` with fp32 master weights takes the exact blocks as its masters
    (the 16-bit parameters get them rounded).

    ``strict=False`` loads only the tensors of this model that ``logical`` has
    (a piece of a streamed state) and ignores the rest; returns the names loaded.
    """
    tp = model.placement.tp
    local = model.state_dict(keep_vars=True)
    params = dict(model.named_parameters())
    missing = sorted(set(local) - set(logical))
    if missing and strict:
        raise KeyError(f"logical state lacks {len(missing)} tensor(s) of this model, e.g. {missing[:3]}")
    loaded = set()
    for name, t in local.items():
        if name not in logical:
            continue
        block = shard_tensor(name, logical[name], model.cfg, tp.size, tp.rank)
        if tuple(block.shape) != tuple(t.shape):
            raise ValueError(f"{name}: logical state gives a block of shape {tuple(block.shape)}, "
                             f"the model has {tuple(t.shape)}")
        t.copy_(block)
        if optimizer is not None and optimizer.keeps_master_weights and name in params:
            optimizer.load_master(name, block)
        loaded.add(name)
    return loaded


def shard_optimizer_state(logical: Mapping[str, dict], model: torch.nn.Module) -> dict[str, dict]:
    """This rank's part of a logical optimizer state (only the parameters it holds).

    Looks up only this rank's parameters, one at a time, so ``logical`` may be a
    lazy mapping over a checkpoint's files (checkpoint/io.py).
    """
    tp, cfg = model.placement.tp, model.cfg
    out = {}
    for name, _ in model.named_parameters():
        st = logical.get(name)
        if st is None:
            continue
        local = dict(st)
        for key in STATE_TENSORS:
            if local.get(key) is not None:
                local[key] = shard_tensor(name, st[key], cfg, tp.size, tp.rank)
        out[name] = local
    return out
