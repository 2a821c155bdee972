"""Atomic checkpoint files of the logical training state.

A checkpoint is a directory ``<out>/checkpoints/step_XXXXXXXX`` holding
``state.pt`` (named, unsharded tensors: model parameters and masks, optimizer
moments keyed by parameter name, ramp, schedule/data position, RNG) and a
human-readable ``meta.json``.  It is written under a temporary name and renamed
into place, then ``latest`` (a one-line file) is replaced atomically, so a kill
at any moment leaves either the previous or the new checkpoint, never a torn one.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

FORMAT = "megatron_msg.logical/1"


class CheckpointError(RuntimeError):
    pass


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(out_dir: Path, step: int, state: dict, meta: dict, keep: int) -> Path:
    root = Path(out_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp-step_{step:08d}.{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    torch.save({"format": FORMAT, **state}, tmp / "state.pt")
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


def load_checkpoint(path: Path) -> dict:
    file = Path(path) / "state.pt" if Path(path).is_dir() else Path(path)
    try:
        state = torch.load(file, map_location="cpu", weights_only=False)
    except Exception as exc:  # truncated or foreign file
        raise CheckpointError(f"{file}: cannot read checkpoint ({exc})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{file}: not a megatron_msg checkpoint (format "
                              f"{state.get('format') if isinstance(state, dict) else type(state).__name__!r}, "
                              f"expected {FORMAT!r})")
    return state
