"""A rank's own pieces of the training state, as boxes of a sharded checkpoint, and back.

Save (``rank_pieces``): every rank offers, for each logical tensor its pipeline
stage owns,

* ``<name>/fp32``: its value, from the fp32 master where the optimizer keeps
  one (under ZeRO only the rank's fragment of it) and from the parameter or mask
  otherwise (its whole TP block);
* ``<name>/exp_avg``, ``exp_avg_sq`` and (after a growth) ``step_offset``: its
  AdamW state, the whole block, or under ZeRO the rank's fragment.

Pieces held by several ranks (a TP block on every data-parallel replica, a
replicated LayerNorm on every TP rank) are offered by all of them; DCP writes
each once, spread over the ranks that hold it.  Nothing is gathered: a save moves
no tensor between ranks.

Load (``load_rank_pieces``): each rank asks for exactly what it will hold on its
own layout (whole TP blocks of values, the optimizer state it keeps: a fragment
under ZeRO) and DCP reads the stored chunks that overlap it, whatever layout
wrote them.  Values are loaded a group of tensors at a time (``GROUP_BYTES``
of logical state per group), so a rank's extra memory stays bounded.

The optimizer is duck-typed (training/optimizer.py, training/zero.py):
``held_range``, ``state_piece``, ``master_piece``, ``load_state_piece``,
``load_master`` and ``keeps_master_weights``.
"""
from __future__ import annotations

import math

import torch

from megatron_msg.checkpoint.boxes import block_box, piece_boxes, unit_view_shape
from megatron_msg.checkpoint.dcp_store import Boxes, VerifyingReader, load_boxes
from megatron_msg.checkpoint.errors import CheckpointError
from megatron_msg.model.init import logical_shapes
from megatron_msg.model.placement import owner_stage

GROUP_BYTES = 64 << 20  # logical bytes of state loaded per DCP call: a bound on a rank's extra memory


def _add(sd: dict, key: str, name: str, shape: tuple, cfg, tp, start: int, flat: torch.Tensor) -> None:
    """Put the boxes of ``flat`` (entries ``[start, start + numel)`` of this rank's block) under ``key``."""
    boxes = piece_boxes(name, shape, cfg, tp.size, tp.rank, start, start + flat.numel())
    if boxes:
        sd[key] = Boxes(unit_view_shape(name, shape, cfg),
                        [(b.offsets, flat[b.start:b.start + b.numel].view(b.sizes)) for b in boxes])


def rank_pieces(model: torch.nn.Module, optimizer, ps) -> tuple[dict[str, Boxes], dict[str, dict]]:
    """(state dict of this rank's pieces, index entries of the tensors whose canonical copy it holds).

    An index entry (``shape``, ``optimizer``: ``step``/``max_offset``/``keys`` or None) comes
    from the first TP and DP rank of the owning stage, so every tensor gets exactly one.
    """
    cfg, tp = model.cfg, model.placement.tp
    local = model.state_dict(keep_vars=True)
    params = dict(model.named_parameters())
    canonical = ps.tp_rank == 0 and ps.dp_rank == 0
    sd, index = {}, {}
    for name, shape in logical_shapes(cfg).items():
        if ps.pp_rank != owner_stage(name, cfg.layers, ps.pp_size, ps.vpp_size):
            continue
        t = local[name].detach()
        is_param = name in params
        master = optimizer.master_piece(name) if is_param else None
        if master is not None:
            _add(sd, f"{name}/fp32", name, shape, cfg, tp, optimizer.held_range(name)[0], master)
        else:
            _add(sd, f"{name}/fp32", name, shape, cfg, tp, 0, t.reshape(-1).to(torch.float32))
        piece = optimizer.state_piece(name) if is_param else None
        if piece is not None:
            start = optimizer.held_range(name)[0]
            for key, flat in piece[1].items():
                _add(sd, f"{name}/{key}", name, shape, cfg, tp, start, flat)
        if canonical:
            index[name] = {"shape": list(shape), "optimizer": None if piece is None else piece[0]}
    return sd, index


def _groups(names: list[str], index: dict[str, dict]) -> list[list[str]]:
    """``names`` cut into runs of about GROUP_BYTES of logical state (the same on every rank)."""
    groups, current, size = [], [], 0
    for name in names:
        entry = index[name]
        parts = 1 + len((entry.get("optimizer") or {}).get("keys", ()))
        current.append(name)
        size += 4 * parts * math.prod(entry["shape"])
        if size >= GROUP_BYTES:
            groups.append(current)
            current, size = [], 0
    return groups + ([current] if current else [])


@torch.no_grad()
def load_rank_pieces(model: torch.nn.Module, optimizer, store: VerifyingReader, index: dict[str, dict],
                     no_dist: bool = False) -> None:
    """Fill this rank's model (values and masters) and optimizer state from a sharded checkpoint.

    Collective over every rank of the default process group unless ``no_dist``: each
    group of tensors is one DCP load, which every rank joins (with what it needs of it).
    """
    cfg, tp = model.cfg, model.placement.tp
    local = model.state_dict(keep_vars=True)
    params = dict(model.named_parameters())
    missing = sorted(set(local) - set(index))
    if missing:
        raise CheckpointError(f"the checkpoint lacks {len(missing)} tensor(s) of this model, e.g. {missing[:3]}")
    for group in _groups(list(index), index):
        sd, todo = {}, []
        for name in group:
            if name not in local:
                continue
            t, shape = local[name], tuple(index[name]["shape"])
            held = math.prod(block_box(name, shape, cfg, tp.size, tp.rank)[2])
            if held != t.numel():
                raise CheckpointError(f"{name}: the checkpoint's shape {shape} gives this rank a block of {held} "
                                      f"entries, the model holds {t.numel()}")
            value = torch.zeros(t.numel(), dtype=torch.float32)  # vocabulary padding rows stay zero
            _add(sd, f"{name}/fp32", name, shape, cfg, tp, 0, value)
            entry = index[name]["optimizer"] if name in params else None
            moments = {}
            if entry is not None:
                start, end = optimizer.held_range(name)
                for key in entry["keys"]:
                    moments[key] = torch.zeros(end - start, dtype=torch.float32)
                    _add(sd, f"{name}/{key}", name, shape, cfg, tp, start, moments[key])
            todo.append((name, t, value, entry, moments))
        load_boxes(store, sd, no_dist=no_dist)
        for name, t, value, entry, moments in todo:
            block = value.view(t.shape)
            t.copy_(block)
            if name in params and optimizer.keeps_master_weights:
                optimizer.load_master(name, block.to(t.device))
            if entry is not None:
                optimizer.load_state_piece(name, entry, {k: v.to(t.device) for k, v in moments.items()})
