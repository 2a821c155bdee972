"""Where a rank's piece of a logical tensor lies, as boxes of the tensor's *unit view*.

A sharded checkpoint (checkpoint/sharded.py) stores every logical tensor as
rectangular chunks ("boxes": offsets and sizes) of one global tensor, and a
rank that loads asks for the boxes it needs.  For that to work the pieces a
rank holds must be boxes, and two facts of our layout make them so:

* **Unit view.**  Tensor parallelism takes a contiguous block of *units* of one
  dimension (shard.py), but a unit can be several entries apart: the packed QKV
  rows are ``(3, heads, head_dim)``, so rank r's rows are three separate runs.
  Viewing that dimension as ``(prefix, units, suffix)`` (QKV weight
  ``[3, heads, head_dim, hidden]``) makes every TP block one box.  Vocabulary
  blocks are row ranges already (the zero padding of the last block is cut off:
  it is not part of the logical tensor).  Replicated tensors are one box.
* **Flat ranges.**  A ZeRO fragment (training/zero.py) is a range of a TP
  block's entries in C order.  A flat range of an N-d array is at most
  ``2(N-1)+1`` boxes, each of them *contiguous* in the flat order (fixed leading
  indices, a range in one dimension, everything after it whole), so a box's data
  is a slice of the fragment, never a copy.

Pure functions of (name, model config, TP size and rank, flat range): every rank
can compute every other rank's boxes without communication.
"""
from __future__ import annotations

import math
from typing import NamedTuple

from megatron_msg.config import ModelConfig
from megatron_msg.model.layout import tensor_spec


class Box(NamedTuple):
    """A rectangular chunk of a unit-view tensor, and where its entries sit in the piece it came from."""
    offsets: tuple[int, ...]   # in the unit-view global tensor
    sizes: tuple[int, ...]
    start: int                 # the box's entries are piece.flatten()[start:start + numel]

    @property
    def numel(self) -> int:
        return math.prod(self.sizes)


def unit_view_shape(name: str, shape: tuple[int, ...], cfg: ModelConfig) -> tuple[int, ...]:
    """The shape a logical tensor of ``shape`` is stored in: its TP-split dimension as (prefix, units, suffix)."""
    spec = tensor_spec(name)
    dim = spec.tp_split_dim()
    if dim is None or spec.vocab_dim is not None:
        return tuple(shape)
    pre, units, suf = spec.axes[dim].factors(cfg.shape, cfg.head_dim)
    if shape[dim] != pre * units * suf:
        raise ValueError(f"{name}: dimension {dim} has size {shape[dim]}, expected {pre} x {units} x {suf} "
                         f"at shape {cfg.shape}")
    return (*shape[:dim], pre, units, suf, *shape[dim + 1:])


def block_box(name: str, shape: tuple[int, ...], cfg: ModelConfig, tp_size: int, tp_rank: int
              ) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """(offsets, sizes of the logical part, full local shape) of TP rank ``tp_rank``'s block, in the unit view.

    The local shape differs from the sizes only for the last vocabulary block, whose
    zero padding rows lie outside the logical tensor.
    """
    spec = tensor_spec(name)
    dim = spec.tp_split_dim()
    view = unit_view_shape(name, shape, cfg)
    if tp_size == 1 or dim is None:
        return (0,) * len(view), view, view
    if spec.vocab_dim is not None:
        if dim != 0:
            raise ValueError(f"{name}: a vocabulary dimension must come first to be stored in boxes")
        rows = math.ceil(shape[0] / tp_size)
        start = min(tp_rank * rows, shape[0])
        real = min(rows, shape[0] - start)
        return (start, *(0,) * (len(view) - 1)), (real, *view[1:]), (rows, *view[1:])
    units = view[dim + 1]
    if units % tp_size:
        raise ValueError(f"{name}: {units} units are not divisible by tensor-parallel size {tp_size}")
    local = units // tp_size
    offsets = [0] * len(view)
    offsets[dim + 1] = tp_rank * local
    sizes = list(view)
    sizes[dim + 1] = local
    return tuple(offsets), tuple(sizes), tuple(sizes)


def flat_range_boxes(shape: tuple[int, ...], start: int, end: int) -> list[Box]:
    """Entries ``[start, end)`` of a C-ordered array of ``shape`` as contiguous boxes (offsets in ``shape``)."""
    total = math.prod(shape)
    if not 0 <= start <= end <= total:
        raise ValueError(f"flat range [{start}, {end}) outside an array of {total} entries")
    if not shape:
        return [Box((), (), 0)] if end > start else []
    strides = [math.prod(shape[d + 1:]) for d in range(len(shape))]
    boxes, pos = [], start
    while pos < end:
        # The outermost dimension d at which a run starting at pos can take whole sub-blocks:
        # pos must be aligned to stride[d], and at least one of them must fit before end.
        for d in range(len(shape)):
            if pos % strides[d] == 0 and pos + strides[d] <= end:
                break
        else:  # cannot happen: the innermost stride is 1
            raise AssertionError
        index = [(pos // strides[k]) % shape[k] for k in range(len(shape))]
        # Take as many stride[d] blocks as fit in this dimension and before end.
        count = min(shape[d] - index[d], (end - pos) // strides[d])
        sizes = (1,) * d + (count,) + tuple(shape[d + 1:])
        boxes.append(Box(tuple(index[:d + 1]) + (0,) * (len(shape) - d - 1), sizes, pos - start))
        pos += count * strides[d]
    return boxes


def piece_boxes(name: str, shape: tuple[int, ...], cfg: ModelConfig, tp_size: int, tp_rank: int,
                start: int = 0, end: int | None = None) -> list[Box]:
    """Boxes of the unit-view global tensor holding entries ``[start, end)`` of TP rank ``tp_rank``'s block.

    ``start``/``end`` index the block as the rank holds it (with the vocabulary padding);
    the default is the whole block, one box.  Padding entries belong to no box.
    """
    offsets, real, local = block_box(name, shape, cfg, tp_size, tp_rank)
    end = math.prod(local) if end is None else end
    out = []
    for box in flat_range_boxes(local, start, end):
        sizes = list(box.sizes)
        if local and local[0] != real[0]:  # the last vocabulary block: drop rows past the vocabulary
            if box.offsets[0] >= real[0]:
                continue
            sizes[0] = min(sizes[0], real[0] - box.offsets[0])
        glob = tuple(o + b for o, b in zip(offsets, box.offsets))
        out.append(Box(glob, tuple(sizes), box.start))
    return out
