"""Atomic, streamed checkpoint files of the logical training state.

A checkpoint is a directory ``<out>/checkpoints/step_XXXXXXXX``::

    state.pt                     small state: step, stage, model config, ramp, config, and an
                                 index of the tensors (shape, Adam step/offset metadata)
    meta.json                    the same headline facts, human-readable
    tensors/<name>/fp32.pt       one logical (full, unsharded) parameter or MSG mask, fp32
    tensors/<name>/exp_avg.pt    its AdamW moments, when it has optimizer state
    tensors/<name>/exp_avg_sq.pt
    tensors/<name>/step_offset.pt   per-entry Adam step offsets (only after a growth)

One directory per tensor with its fp32 value and moments is the layout of
DeepSpeed's universal checkpoint (``zero/<param>/fp32.pt, exp_avg.pt,
exp_avg_sq.pt``) plus what MSG needs on top (masks, step offsets).  Per-tensor
files let a run write and read its state one logical tensor at a time, so no
process ever holds the whole logical state (DESIGN.md: a 101B checkpoint never
has to fit in one process's memory).

The directory is written under a temporary name and renamed into place, then
``latest`` (a one-line file) is replaced atomically, so a kill at any moment
leaves either the previous or the new checkpoint, never a torn one.

Checkpoints of the first format (``megatron_msg.logical/1``: every tensor in one
``state.pt``) are still read.
"""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import NamedTuple

import torch

FORMAT = "megatron_msg.logical/2"
LEGACY_FORMAT = "megatron_msg.logical/1"
MOMENT_KEYS = ("exp_avg", "exp_avg_sq", "step_offset")


class CheckpointError(RuntimeError):
    pass


class LogicalTensor(NamedTuple):
    """One entry of the stream a checkpoint is written from."""
    name: str
    value: torch.Tensor               # the logical parameter or mask (fp32, CPU)
    optimizer: dict | None            # its logical AdamW state (step, max_offset, moments), if any


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _tensor_dir(root: Path, name: str) -> Path:
    if not name or "/" in name or name.startswith("."):
        raise CheckpointError(f"tensor name {name!r} cannot be a checkpoint file name")
    return root / "tensors" / name


def _write_tensors(root: Path, tensors: Iterable[LogicalTensor]) -> dict[str, dict]:
    """Write each tensor (and its moments) as it arrives; returns the index for state.pt."""
    index: dict[str, dict] = {}
    for name, value, opt in tensors:
        if name in index:
            raise CheckpointError(f"tensor {name!r} appears twice in the checkpoint stream")
        d = _tensor_dir(root, name)
        d.mkdir(parents=True)
        torch.save(value.detach().contiguous(), d / "fp32.pt")
        entry: dict = {"shape": list(value.shape), "optimizer": None}
        if opt is not None:
            keys = [k for k in MOMENT_KEYS if opt.get(k) is not None]
            for k in keys:
                torch.save(opt[k].detach().contiguous(), d / f"{k}.pt")
            entry["optimizer"] = {"step": int(opt["step"]), "max_offset": int(opt.get("max_offset", 0)),
                                  "keys": keys}
        index[name] = entry
    return index


def save_checkpoint(out_dir: Path, step: int, state: dict, meta: dict, keep: int,
                    tensors: Iterable[LogicalTensor]) -> Path:
    """Write ``state`` (small, picklable) and the streamed ``tensors``; returns the final directory.

    ``tensors`` is consumed lazily, one logical tensor at a time (under
    parallelism each item is produced by collectives, see Trainer.save).
    """
    root = Path(out_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp-step_{step:08d}.{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    index = _write_tensors(tmp, tensors)
    torch.save({"format": FORMAT, **state, "tensors": index}, tmp / "state.pt")
    (tmp / "meta.json").write_text(json.dumps({"format": FORMAT, "step": step, **meta}, indent=2))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _atomic_write_text(root / "latest", final.name + "\n")
    _prune(root, keep, final.name)
    return final


def _prune(root: Path, keep: int, newest: str) -> None:
    ckpts = sorted(p for p in root.glob("step_*") if p.is_dir())
    for old in ckpts[:-keep]:
        if old.name != newest:
            shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(out_dir: Path) -> Path | None:
    root = Path(out_dir) / "checkpoints"
    pointer = root / "latest"
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    if not (path / "state.pt").is_file():
        raise CheckpointError(f"{pointer} names {path.name}, which has no state.pt: "
                              f"the checkpoint directory is damaged")
    return path


def _read(file: Path):
    try:  # weights_only: plain containers and tensors, no pickled code
        return torch.load(file, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{file}: missing from the checkpoint (the directory is damaged)") from None
    except Exception as exc:  # truncated or foreign file
        raise CheckpointError(f"{file}: cannot read checkpoint ({exc})") from None


class _TensorFiles(Mapping):
    """Logical parameters and masks of a checkpoint, each read from its file when asked for."""

    def __init__(self, root: Path, index: dict[str, dict]):
        self._root, self._index = root, index

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._index:
            raise KeyError(name)
        t = _read(_tensor_dir(self._root, name) / "fp32.pt")
        want = tuple(self._index[name]["shape"])
        if not torch.is_tensor(t) or tuple(t.shape) != want:
            got = tuple(t.shape) if torch.is_tensor(t) else type(t).__name__
            raise CheckpointError(f"{self._root}: tensor {name} is {got}, the index says {want}")
        return t

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)


class _MomentFiles(Mapping):
    """Logical AdamW state by parameter name, read from the tensor directories when asked for."""

    def __init__(self, root: Path, index: dict[str, dict]):
        self._root = root
        self._entries = {n: e["optimizer"] for n, e in index.items() if e.get("optimizer") is not None}

    def __getitem__(self, name: str) -> dict:
        entry = self._entries[name]
        d = _tensor_dir(self._root, name)
        st = {"step": entry["step"], "max_offset": entry["max_offset"], "step_offset": None}
        for key in entry["keys"]:
            st[key] = _read(d / f"{key}.pt")
        return st

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


class Checkpoint(NamedTuple):
    """An opened checkpoint: ``state`` in memory; ``model`` / ``optimizer`` read per tensor on access."""
    path: Path
    state: dict                          # step, stage_index, model_config, masked, ramp, config, ...
    model: Mapping[str, torch.Tensor]    # logical parameters and masks by name
    optimizer: Mapping[str, dict]        # logical AdamW state by parameter name


def open_checkpoint(path: Path) -> Checkpoint:
    """Open a checkpoint directory (or a first-format ``state.pt``) without reading its tensors."""
    path = Path(path)
    root = path if path.is_dir() else path.parent
    file = root / "state.pt"
    state = _read(file)
    fmt = state.get("format") if isinstance(state, dict) else type(state).__name__
    if fmt == LEGACY_FORMAT:  # everything in state.pt
        state = dict(state)
        return Checkpoint(root, state, state.pop("model"), state.pop("optimizer"))
    if fmt != FORMAT:
        raise CheckpointError(f"{file}: not a megatron_msg checkpoint (format {fmt!r}, "
                              f"expected {FORMAT!r} or {LEGACY_FORMAT!r})")
    state = dict(state)
    index = state.pop("tensors")
    return Checkpoint(root, state, _TensorFiles(root, index), _MomentFiles(root, index))
