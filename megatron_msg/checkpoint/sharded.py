"""Fully parallel checkpoints: every rank writes its own pieces, all at once, and reads only what it needs.

A sharded checkpoint directory (format ``megatron_msg.sharded/1``)::

    state.pt        small state (as every format) and the index: each logical tensor's
                    shape and Adam counts (step, max_offset, which moments it has)
    meta.json       headline facts, human-readable
    dcp/.metadata   DCP's index: every stored chunk's box in its tensor and its byte range
    dcp/__R_0.distcp   the chunks rank R wrote (R of the world that saved)
    manifest.json   every file's size (and CRC-32 of the small ones), and the CRC-32 of every
                    chunk of the .distcp files; written last

Tensors are stored in their unit view (boxes.py) under ``<name>/fp32``,
``<name>/exp_avg``, ``<name>/exp_avg_sq``, ``<name>/step_offset``.  The same rules
as for the per-tensor format hold (io.py): temporary directory, manifest last,
fsync, rename, ``latest``, a step never saved twice.  The logical view (io.py's
``open_checkpoint``) reads one logical tensor at a time from any layout, so
growth, ``msg-grow``, export and inspection need no process group.

Saving: rank 0 creates the temporary directory; every rank writes its pieces
through DCP (rank_state.py), checksumming each chunk as it goes out; rank 0 gathers the
index entries and the checksums (small objects), writes state.pt, meta.json and
the manifest, and renames the directory into place.
"""
from __future__ import annotations

from pathlib import Path

import torch.distributed as dist

from megatron_msg.checkpoint.dcp_store import METADATA, distcp_files, save_boxes
from megatron_msg.checkpoint.errors import CheckpointError, file_crc32
from megatron_msg.checkpoint.io import SHARDED_FORMAT, STORE_DIR, begin_save, commit_save, fsync_dir
from megatron_msg.checkpoint.rank_state import rank_pieces
from megatron_msg.model.init import logical_shapes


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _from_rank0(value):
    """``value`` of rank 0 on every rank (an object broadcast over the default group)."""
    if not _distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def save_sharded(out_dir: Path, step: int, state: dict, meta: dict, keep: int, model, optimizer, ps) -> Path | None:
    """Write a sharded checkpoint of ``step``; collective over every rank.  Returns its path on rank 0.

    ``state`` and ``meta`` are only read on rank 0.  A refusal on rank 0 (the step is
    saved already) is raised on every rank, so none is left waiting.
    """
    rank = dist.get_rank() if _distributed() else 0
    began = None
    if rank == 0:
        try:
            began = begin_save(out_dir, step)
        except CheckpointError as exc:
            began = str(exc)
    began = _from_rank0(began)
    if isinstance(began, str):
        raise CheckpointError(began)
    tmp, final = began
    pieces, index = rank_pieces(model, optimizer, ps)
    store = tmp / STORE_DIR
    _, checksums = save_boxes(store, pieces, no_dist=not _distributed())
    mine = (index, checksums)
    if _distributed():
        gathered = [None] * dist.get_world_size() if rank == 0 else None
        dist.gather_object(mine, gathered, dst=0)
    else:
        gathered = [mine]
    if rank != 0:
        return None
    full_index, chunks = {}, {}
    for part_index, part_chunks in gathered:
        full_index.update(part_index)
        chunks.update({f"{STORE_DIR}/{rel}": rows for rel, rows in part_chunks.items()})
    # The index in the model's logical order (every stage contributed its own tensors).
    full_index = {name: full_index[name] for name in logical_shapes(model.cfg)}
    fsync_dir(store)
    files = {f"{STORE_DIR}/{name}": {"bytes": (store / name).stat().st_size} for name in distcp_files(store)}
    files[f"{STORE_DIR}/{METADATA}"] = {"bytes": (store / METADATA).stat().st_size,
                                        "crc32": file_crc32(store / METADATA)}
    return commit_save(tmp, final, step, {**state, "tensors": full_index}, meta, files, keep,
                       fmt=SHARDED_FORMAT, chunks=chunks)
