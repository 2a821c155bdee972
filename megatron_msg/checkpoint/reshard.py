"""Offline resharding: rewrite a checkpoint for a target layout (or format), streaming (``msg-reshard``).

Any layout resumes any checkpoint (the load reshards), so what a target layout changes is
how the store is cut: a checkpoint resharded for TP x PP x DP x ZeRO holds, for every store
key, exactly the chunks a run on that layout holds, so each rank of it reads whole stored
chunks and no byte it does not keep.  The chunks are

* values (``<name>/fp32``): one per TP block of the owning stage (what every rank loads);
* Adam state (``exp_avg``, ``exp_avg_sq``, ``step_offset``): per TP block, or under ZeRO per
  fragment of each (TP, PP) rank's flat buffer over DP (parallel/zero_layout.py, computed
  from the rank's parameter list on the meta device: nothing is built).

Streaming: the chunks are declared up front (LazyBoxes) and produced when DCP's writer
asks for them, in order, each cut from the parts (value and moments) of the one logical
tensor read last (io.Checkpoint.read_parts), so the peak memory is about one logical
tensor's value and moments whatever the model size.  Values are
copied, never recomputed: a round trip A -> B -> A is bit-exact, and its chunks are A's.

``fmt="logical"`` writes the per-tensor format instead (one directory per tensor), the
DeepSpeed-universal-like layout.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

import torch

from megatron_msg.checkpoint.boxes import piece_boxes, unit_view_shape
from megatron_msg.checkpoint.dcp_store import METADATA, LazyBoxes, distcp_files, save_boxes
from megatron_msg.checkpoint.errors import CheckpointError, file_crc32
from megatron_msg.checkpoint.io import (SHARDED_FORMAT, STORE_DIR, Checkpoint, LogicalTensor, begin_save,
                                        commit_save, fsync_dir, open_checkpoint, remove_stale_temporaries,
                                        save_checkpoint)
from megatron_msg.config import ModelConfig
from megatron_msg.model import build_model
from megatron_msg.model.layout import tensor_spec
from megatron_msg.model.placement import Placement, owner_stage
from megatron_msg.parallel.layers import TensorParallel
from megatron_msg.parallel.zero_layout import partition


@dataclasses.dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    dp: int = 1
    zero: int = 0
    virtual: int = 1  # model chunks per pipeline stage (parallel.virtual_stages)

    @property
    def chunks(self) -> int:
        """Chunks per stage in effect: ``virtual`` under pipeline parallelism, else 1."""
        return self.virtual if self.pp > 1 else 1

    def describe(self) -> str:
        return (f"tp{self.tp} x pp{self.pp} x dp{self.dp}" + (f" x {self.virtual} virtual" if self.chunks > 1 else "")
                + (f", ZeRO-{self.zero}" if self.zero else ""))


@dataclasses.dataclass
class ReshardResult:
    checkpoint: Path
    bytes_written: int
    seconds: float


def check_layout(cfg: ModelConfig, layout: Layout) -> None:
    """A one-line CheckpointError when the model cannot be cut this way."""
    s = cfg.shape
    for what, value in (("tp", layout.tp), ("pp", layout.pp), ("dp", layout.dp)):
        if value < 1:
            raise CheckpointError(f"--{what} must be >= 1, got {value}")
    if layout.zero not in (0, 1, 2):
        raise CheckpointError(f"--zero must be 0, 1 or 2, got {layout.zero}")
    for what, n in (("heads", s.heads), ("ffn", s.ffn)):
        if n % layout.tp:
            raise CheckpointError(f"the checkpoint's {what}={n} is not divisible by tp={layout.tp}")
    if layout.virtual < 1:
        raise CheckpointError(f"--virtual-stages must be >= 1, got {layout.virtual}")
    if s.layers % layout.pp:
        raise CheckpointError(f"the checkpoint's layers={s.layers} is not divisible by pp={layout.pp}")
    if s.layers % (layout.pp * layout.chunks):
        raise CheckpointError(f"the checkpoint's layers={s.layers} is not divisible by pp={layout.pp} x "
                              f"virtual stages={layout.virtual}")


def _fragments(cfg: ModelConfig, layout: Layout, tp_rank: int, pp_rank: int) -> dict[str, list[tuple[int, int]]]:
    """name -> the [start, end) ranges of its block that ZeRO gives each DP rank, for one (TP, PP) rank."""
    placement = Placement(tp=TensorParallel(layout.tp, tp_rank), stage=pp_rank, stages=layout.pp,
                          virtual=layout.chunks)
    with torch.device("meta"):
        model = build_model(cfg, placement, initialize=False)
    _, frags = partition([(n, p.numel()) for n, p in model.named_parameters()], layout.dp)
    out: dict[str, list] = {}
    for f in frags:
        out.setdefault(f.name, []).append((f.start, f.end))
    return out


def layout_chunks(cfg: ModelConfig, index: dict[str, dict], layout: Layout) -> dict[str, dict[tuple, tuple]]:
    """Store key -> {offsets: sizes} of the chunks a run on ``layout`` holds, each once, in logical order."""
    check_layout(cfg, layout)
    chunks: dict[str, dict[tuple, tuple]] = {}

    def put(key: str, boxes) -> None:
        for b in boxes:
            have = chunks.setdefault(key, {}).setdefault(b.offsets, b.sizes)
            if have != b.sizes:
                raise AssertionError(f"{key}: two chunks at {b.offsets} of sizes {have} and {b.sizes}")

    fragments = {(t, p): _fragments(cfg, layout, t, p) for p in range(layout.pp) for t in range(layout.tp)
                 } if layout.zero else {}
    for name, entry in index.items():  # the index's (logical) order: names stay together in the store
        shape = tuple(entry["shape"])
        stage = owner_stage(name, cfg.layers, layout.pp, layout.chunks)
        split = tensor_spec(name).tp_split_dim() is not None
        for tp_rank in range(layout.tp) if split else [0]:  # a replicated tensor: the same box on every TP rank
            put(f"{name}/fp32", piece_boxes(name, shape, cfg, layout.tp, tp_rank))
            if entry.get("optimizer"):
                ranges = fragments[(tp_rank, stage)][name] if layout.zero else [(0, None)]
                for key in entry["optimizer"]["keys"]:
                    for start, end in ranges:
                        put(f"{name}/{key}", piece_boxes(name, shape, cfg, layout.tp, tp_rank, start, end))
    return chunks


class _Source:
    """The source checkpoint's logical tensors in unit view: every part (value, moments) of the one
    tensor being written, read together and dropped when the writer moves to the next tensor."""

    def __init__(self, ckpt: Checkpoint, cfg: ModelConfig, on_bytes: Callable[[int], None]):
        self._ckpt, self._cfg, self._on_bytes = ckpt, cfg, on_bytes
        self._name, self._views = None, {}

    def chunk(self, name: str, part: str, offsets: tuple, sizes: tuple) -> torch.Tensor:
        if self._name != name:
            self._name, self._views = None, {}  # drop the previous tensor before reading the next
            entry = self._ckpt.index[name]
            parts = ["fp32"] + list((entry.get("optimizer") or {}).get("keys", ()))
            view = unit_view_shape(name, tuple(entry["shape"]), self._cfg)
            self._views = {p: t.reshape(view) for p, t in self._ckpt.read_parts(name, parts).items()}
            self._name = name
        piece = self._views[part][tuple(slice(o, o + s) for o, s in zip(offsets, sizes))]
        self._on_bytes(piece.numel() * piece.element_size())
        return piece


def reshard(source: Path, out_dir: Path, layout: Layout, fmt: str = "sharded",
            on_bytes: Callable[[int], None] = lambda n: None) -> ReshardResult:
    """Write ``source`` (a checkpoint directory) into the run directory ``out_dir``, cut for ``layout``.

    ``out_dir`` must hold no checkpoint.  ``on_bytes(n)`` is told of every n bytes of tensor data
    as they go out (a progress bar).
    """
    ckpt = open_checkpoint(source)
    cfg = ModelConfig(**ckpt.state["model_config"])
    check_layout(cfg, layout)
    out_dir = Path(out_dir)
    if (out_dir / "checkpoints").is_dir() and any((out_dir / "checkpoints").glob("step_*")):
        raise CheckpointError(f"{out_dir} already holds checkpoints; reshard into a new run directory")
    remove_stale_temporaries(out_dir)  # what a killed reshard left
    state = {k: v for k, v in ckpt.state.items() if k not in ("format", "tensors", "manifest")}
    state["written_by"] = {"tp": layout.tp, "pp": layout.pp, "dp": layout.dp, "zero": layout.zero,
                           "resharded_from": str(ckpt.path)}
    step = state["step"]
    meta = {"shape": str(cfg.shape), "stage_index": state["stage_index"], "resharded_from": str(ckpt.path),
            "layout": layout.describe()}
    index = ckpt.index
    counted = [0]

    def count(n: int) -> None:
        counted[0] += n
        on_bytes(n)

    t0 = time.perf_counter()
    if fmt == "logical":
        def tensors():
            for name in index:
                value = ckpt.model[name]
                count(value.numel() * 4)
                st = ckpt.optimizer.get(name)
                if st is not None:
                    count(sum(st[k].numel() * 4 for k in ("exp_avg", "exp_avg_sq", "step_offset")
                              if st.get(k) is not None))
                yield LogicalTensor(name, value, st)
        written = save_checkpoint(out_dir, step, state, meta, 1, tensors())
        return ReshardResult(written, counted[0], time.perf_counter() - t0)
    if fmt != "sharded":
        raise CheckpointError(f"unknown checkpoint format {fmt!r} (sharded or logical)")
    source_tensors = _Source(ckpt, cfg, count)
    pieces = {}
    for key, boxes in layout_chunks(cfg, index, layout).items():
        name, part = key.rsplit("/", 1)
        view = unit_view_shape(name, tuple(index[name]["shape"]), cfg)
        pieces[key] = LazyBoxes(view, boxes.items(),
                                lambda off, sizes, n=name, p=part: source_tensors.chunk(n, p, off, sizes))
    tmp, final = begin_save(out_dir, step)
    store = tmp / STORE_DIR
    _, checksums = save_boxes(store, pieces, no_dist=True)
    chunks = {f"{STORE_DIR}/{rel}": rows for rel, rows in checksums.items()}
    files = {f"{STORE_DIR}/{name}": {"bytes": (store / name).stat().st_size} for name in distcp_files(store)}
    files[f"{STORE_DIR}/{METADATA}"] = {"bytes": (store / METADATA).stat().st_size,
                                        "crc32": file_crc32(store / METADATA)}
    fsync_dir(store)
    written = commit_save(tmp, final, step, {**state, "tensors": index}, meta, files, 1,
                          fmt=SHARDED_FORMAT, chunks=chunks)
    return ReshardResult(written, counted[0], time.perf_counter() - t0)
