"""Atomic, streamed checkpoint files of the logical training state, and opening any checkpoint.

Two formats share this module's directory, commit and integrity rules: the *sharded* one
(``megatron_msg.sharded/1``, every rank writes its own pieces into a DCP store: sharded.py) and
the per-tensor *logical* one below.  ``open_checkpoint`` reads both (and the older ones) as
the same lazy logical view.

A logical checkpoint is a directory ``<out>/checkpoints/step_XXXXXXXX``::

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

Integrity.  Every file is checksummed (CRC-32) as it is written and fsynced; the
last file written is ``manifest.json`` (every file's size and checksum), then the
directory is fsynced and renamed into place from its temporary name, and
``latest`` (a one-line file) is replaced atomically.  So a kill at any moment
leaves the previous checkpoints and at most a ``.tmp-*`` directory, which the next
run removes, never a torn checkpoint under a final name.  A checkpoint counts as
complete when its manifest is there and every file has its size (cheap:
``checkpoint_damage``); every file read is checked against its checksum, and a
mismatch names the file.  The newest complete checkpoint is the one to resume
(``find_latest``): a damaged newer one is reported by name and skipped, a missing
``latest`` is no reason to start over, and a run directory whose checkpoints are
all damaged is an error, never a silent restart from step 0.  A step is never
saved twice.

Checkpoints of the first format (``megatron_msg.logical/1``: every tensor in one
``state.pt``) and those written before manifests are still read (without checksums).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch

from megatron_msg.checkpoint.boxes import unit_view_shape
from megatron_msg.checkpoint.dcp_store import VerifyingReader, check_coverage, load_boxes
from megatron_msg.checkpoint.errors import CheckpointError, ChecksumStream, file_crc32
from megatron_msg.config import ModelConfig

FORMAT = "megatron_msg.logical/2"
SHARDED_FORMAT = "megatron_msg.sharded/1"
STORE_DIR = "dcp"  # a sharded checkpoint's DCP store, inside its directory
LEGACY_FORMAT = "megatron_msg.logical/1"
MOMENT_KEYS = ("exp_avg", "exp_avg_sq", "step_offset")
MANIFEST = "manifest.json"
STEP_DIR = re.compile(r"^step_(\d{8,})$")


class LogicalTensor(NamedTuple):
    """One entry of the stream a checkpoint is written from."""
    name: str
    value: torch.Tensor               # the logical parameter or mask (fp32, CPU)
    optimizer: dict | None            # its logical AdamW state (step, max_offset, moments), if any


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _save_file(obj, path: Path) -> dict:
    """``torch.save`` to a new file, fsynced; returns its manifest entry (size and CRC-32)."""
    with open(path, "xb") as f:
        out = ChecksumStream(f)
        torch.save(obj, out)
        f.flush()
        os.fsync(f.fileno())
    return {"bytes": out.bytes, "crc32": out.crc}


def _write_bytes(data: bytes, path: Path) -> dict:
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return {"bytes": len(data), "crc32": zlib.crc32(data)}


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _tensor_dir(root: Path, name: str) -> Path:
    if not name or "/" in name or name.startswith("."):
        raise CheckpointError(f"tensor name {name!r} cannot be a checkpoint file name")
    return root / "tensors" / name


def _write_tensors(root: Path, tensors: Iterable[LogicalTensor], files: dict[str, dict]) -> dict[str, dict]:
    """Write each tensor (and its moments) as it arrives; returns the index for state.pt and adds
    every file written to ``files`` (the manifest: relative path -> size and checksum)."""
    index: dict[str, dict] = {}
    for name, value, opt in tensors:
        if name in index:
            raise CheckpointError(f"tensor {name!r} appears twice in the checkpoint stream")
        d = _tensor_dir(root, name)
        d.mkdir(parents=True)
        files[f"tensors/{name}/fp32.pt"] = _save_file(value.detach().contiguous(), d / "fp32.pt")
        entry: dict = {"shape": list(value.shape), "optimizer": None}
        if opt is not None:
            keys = [k for k in MOMENT_KEYS if opt.get(k) is not None]
            for k in keys:
                files[f"tensors/{name}/{k}.pt"] = _save_file(opt[k].detach().contiguous(), d / f"{k}.pt")
            entry["optimizer"] = {"step": int(opt["step"]), "max_offset": int(opt.get("max_offset", 0)),
                                  "keys": keys}
        index[name] = entry
        fsync_dir(d)
    return index


def save_checkpoint(out_dir: Path, step: int, state: dict, meta: dict, keep: int,
                    tensors: Iterable[LogicalTensor]) -> Path:
    """Write ``state`` (small, picklable) and the streamed ``tensors``; returns the final directory.

    ``tensors`` is consumed lazily, one logical tensor at a time (under
    parallelism each item is produced by collectives, see Trainer.save).  A complete
    checkpoint of the same step is never written over (CheckpointError); a damaged one
    (``checkpoint_damage``) is replaced.
    """
    tmp, final = begin_save(out_dir, step)
    files: dict[str, dict] = {}
    index = _write_tensors(tmp, tensors, files)
    return commit_save(tmp, final, step, {**state, "tensors": index}, meta, files, keep)


def begin_save(out_dir: Path, step: int) -> tuple[Path, Path]:
    """(temporary directory, final directory) of a new checkpoint of ``step``; the temporary one is created.

    Refuses (CheckpointError) a step whose complete checkpoint exists: a step is never saved twice.
    """
    root = Path(out_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    if final.exists() and checkpoint_damage(final) is None:
        raise CheckpointError(f"{final} already exists and is complete: a step is never saved twice")
    tmp = root / f".tmp-step_{step:08d}.{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp, final


def commit_save(tmp: Path, final: Path, step: int, state: dict, meta: dict, files: dict[str, dict], keep: int,
                fmt: str = FORMAT, chunks: dict[str, list] | None = None) -> Path:
    """Finish the checkpoint written under ``tmp`` (its data ``files`` listed): state.pt, meta.json and the
    manifest last, fsync, rename to ``final``, point ``latest`` at it, prune to ``keep``.

    ``chunks``: per data file, the CRC-32 of each stored chunk (sharded checkpoints, whose
    files are read by byte range).  A damaged checkpoint already at ``final`` is replaced.
    """
    root = final.parent
    files = dict(files)
    files["state.pt"] = _save_file({"format": fmt, **state, "manifest": MANIFEST}, tmp / "state.pt")
    files["meta.json"] = _write_bytes(json.dumps({"format": fmt, "step": step, **meta}, indent=2).encode(),
                                      tmp / "meta.json")
    # Written last: a directory with a manifest has every file it lists.
    manifest = {"format": fmt, "step": step, "files": files, **({"chunks": chunks} if chunks is not None else {})}
    _write_bytes(json.dumps(manifest).encode(), tmp / MANIFEST)
    fsync_dir(tmp)
    if final.exists():  # damaged (checked by begin_save): set aside, removed once the new one is in place
        aside = root / f".damaged-{final.name}.{os.getpid()}"
        os.replace(final, aside)
        os.replace(tmp, final)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(tmp, final)
    fsync_dir(root)
    _atomic_write_text(root / "latest", final.name + "\n")
    _prune(root, keep)
    return final


def _step_dirs(root: Path) -> list[Path]:
    """``step_*`` checkpoint directories, newest first."""
    found = [p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name)] if root.is_dir() else []
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)), reverse=True)


def _prune(root: Path, keep: int) -> None:
    """Keep the newest ``keep`` complete checkpoints; remove older ones, and damaged ones older
    than the newest complete one (a damaged one is never counted as kept)."""
    complete = 0
    for path in _step_dirs(root):
        if checkpoint_damage(path) is None:
            complete += 1
            if complete > keep:
                shutil.rmtree(path, ignore_errors=True)
        elif complete:
            shutil.rmtree(path, ignore_errors=True)


def remove_stale_temporaries(out_dir: Path) -> list[str]:
    """Remove what killed saves left (``.tmp-*`` and ``.damaged-*`` directories); returns their names.

    Only for a run directory no process is writing to (the trainer calls it on rank 0 at start).
    """
    root = Path(out_dir) / "checkpoints"
    removed = []
    if root.is_dir():
        for p in sorted(root.iterdir()):
            if p.is_dir() and (p.name.startswith(".tmp-") or p.name.startswith(".damaged-")):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p.name)
    return removed


def remove_checkpoints(out_dir: Path) -> list[str]:
    """Remove every checkpoint of a run directory (a run started over with ``--no-resume``)."""
    root = Path(out_dir) / "checkpoints"
    removed = [p.name for p in _step_dirs(root)]
    for name in removed:
        shutil.rmtree(root / name, ignore_errors=True)
    if (root / "latest").is_file():
        (root / "latest").unlink()
    return removed


def _load_manifest(path: Path) -> dict | None:
    """The manifest of a checkpoint directory; None for one written before manifests."""
    file = path / MANIFEST
    if not file.exists():
        return None
    try:
        manifest = json.loads(file.read_text())
        if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
            raise ValueError("no files table")
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{file}: unreadable manifest ({exc})") from None
    return manifest


def checkpoint_damage(path: Path) -> str | None:
    """Why the checkpoint directory ``path`` is not complete, or None when it is.

    Complete: its manifest lists the step of its name and every file it lists is there with
    its size (contents are checked against the checksums when read).  A directory written
    before manifests is complete when it has its state.pt.
    """
    path = Path(path)
    try:
        manifest = _load_manifest(path)
    except CheckpointError as exc:
        return str(exc).split(": ", 1)[1]
    return _damage(path, manifest)


def _damage(path: Path, manifest: dict | None) -> str | None:
    """``checkpoint_damage`` given the directory's manifest (already read)."""
    if manifest is None:
        if not (path / "state.pt").is_file():
            return "no state.pt and no manifest.json (an unfinished save?)"
        try:  # mmap: a first-format state.pt holds every tensor; only its keys are looked at
            state = torch.load(path / "state.pt", map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # noqa: BLE001 - unreadable is damaged, whatever the reason
            return "state.pt is unreadable and there is no manifest.json"
        if isinstance(state, dict) and state.get("manifest"):
            return f"{MANIFEST} is missing"  # written by a version that writes one
        return None  # written before manifests: nothing more to check
    m = STEP_DIR.match(path.name)
    if m and manifest.get("step") != int(m.group(1)):
        return f"its manifest is for step {manifest.get('step')}, not {int(m.group(1))}"
    for rel, entry in manifest["files"].items():
        f = path / rel
        if not f.is_file():
            return f"{rel} is missing"
        size = f.stat().st_size
        if size != entry.get("bytes"):
            return f"{rel} is {size} bytes, the manifest says {entry.get('bytes')} (truncated or overwritten)"
    return None


@dataclass
class LatestCheckpoint:
    """The newest complete checkpoint of a run directory (None: the run has none) and the newer
    ones skipped as damaged, as (directory name, reason)."""
    path: Path | None
    damaged: list[tuple[str, str]] = field(default_factory=list)

    def warnings(self) -> list[str]:
        taken = self.path.name if self.path is not None else "none"
        return [f"checkpoint {name} is damaged ({why}); resuming from the newest complete one, {taken}"
                for name, why in self.damaged]


def find_latest(out_dir: Path) -> LatestCheckpoint:
    """The checkpoint a run directory resumes from: its newest complete one.

    Raises CheckpointError when the directory has checkpoints (or a ``latest`` pointer) but
    none is complete: starting over from step 0 is never silent (``--no-resume`` does it).
    """
    root = Path(out_dir) / "checkpoints"
    damaged = []
    for path in _step_dirs(root):
        why = checkpoint_damage(path)
        if why is None:
            return LatestCheckpoint(path, damaged)
        damaged.append((path.name, why))
    pointer = root / "latest"
    if damaged or pointer.is_file():
        named = pointer.read_text().strip() if pointer.is_file() else None
        detail = "; ".join(f"{n}: {w}" for n, w in damaged) or f"{pointer} names {named}, which does not exist"
        raise CheckpointError(f"{out_dir} has checkpoints but none is complete ({detail}); start over with "
                              f"--no-resume, or resume a copy with --resume-from CHECKPOINT")
    return LatestCheckpoint(None)


def previous_complete(out_dir: Path, before: Path) -> Path | None:
    """The newest complete checkpoint of ``out_dir`` older than the checkpoint ``before``."""
    m = STEP_DIR.match(Path(before).name)
    limit = int(m.group(1)) if m else None
    for path in _step_dirs(Path(out_dir) / "checkpoints"):
        step = int(STEP_DIR.match(path.name).group(1))
        if (limit is None or step < limit) and checkpoint_damage(path) is None:
            return path
    return None


def _stderr(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def latest_checkpoint(out_dir: Path, report: Callable[[str], None] | None = _stderr) -> Path | None:
    """The newest complete checkpoint of ``out_dir`` (None when it has none); each damaged newer one
    is passed to ``report`` (default: a warning on stderr).  See ``find_latest``."""
    found = find_latest(out_dir)
    if report is not None:
        for message in found.warnings():
            report(message)
    return found.path


def _read(file: Path, expect: dict | None = None):
    """``torch.load`` a checkpoint file, first checking its size and CRC-32 against ``expect``
    (its manifest entry; None for a checkpoint written before manifests)."""
    try:
        if expect is not None:
            size = file.stat().st_size
            if size != expect["bytes"]:
                raise CheckpointError(f"{file}: {size} bytes, the manifest says {expect['bytes']} (truncated or "
                                      f"overwritten)")
            # A checksum pass, then torch.load: the file is read twice (the second read from the page
            # cache) rather than held twice in memory, as bytes and as its tensor.
            crc = file_crc32(file)
            if crc != expect["crc32"]:
                raise CheckpointError(f"{file}: checksum mismatch (crc32 {crc:08x}, the manifest says "
                                      f"{expect['crc32']:08x}): the file is damaged")
        # weights_only: plain containers and tensors, no pickled code
        return torch.load(file, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{file}: missing from the checkpoint (the directory is damaged)") from None
    except CheckpointError:
        raise
    except Exception as exc:  # truncated or foreign file
        raise CheckpointError(f"{file}: cannot read checkpoint ({' '.join(str(exc).split())})") from None


class _TensorFiles(Mapping):
    """Logical parameters and masks of a checkpoint, each read from its file when asked for."""

    def __init__(self, root: Path, index: dict[str, dict], files: dict[str, dict] | None):
        self._root, self._index, self._files = root, index, files

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._index:
            raise KeyError(name)
        t = _read(_tensor_dir(self._root, name) / "fp32.pt", _entry(self._files, f"tensors/{name}/fp32.pt"))
        want = tuple(self._index[name]["shape"])
        if not torch.is_tensor(t) or tuple(t.shape) != want:
            got = tuple(t.shape) if torch.is_tensor(t) else type(t).__name__
            raise CheckpointError(f"{self._root}: tensor {name} is {got}, the index says {want}")
        return t

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)


def _entry(files: dict[str, dict] | None, rel: str) -> dict | None:
    """The manifest entry of ``rel``; a checkpoint with a manifest lists every file it has."""
    if files is None:
        return None
    if rel not in files:
        raise CheckpointError(f"{rel}: not in the checkpoint's manifest (the index and the manifest disagree)")
    return files[rel]


class _MomentFiles(Mapping):
    """Logical AdamW state by parameter name, read from the tensor directories when asked for."""

    def __init__(self, root: Path, index: dict[str, dict], files: dict[str, dict] | None):
        self._root, self._files = root, files
        self._entries = {n: e["optimizer"] for n, e in index.items() if e.get("optimizer") is not None}

    def __getitem__(self, name: str) -> dict:
        entry = self._entries[name]
        d = _tensor_dir(self._root, name)
        st = {"step": entry["step"], "max_offset": entry["max_offset"], "step_offset": None}
        for key in entry["keys"]:
            st[key] = _read(d / f"{key}.pt", _entry(self._files, f"tensors/{name}/{key}.pt"))
        return st

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


class _StoredTensors(Mapping):
    """Logical parameters and masks of a sharded checkpoint, each assembled from its stored chunks when
    asked for (one process, whatever layout wrote it)."""

    def __init__(self, store: VerifyingReader, index: dict[str, dict], cfg: ModelConfig):
        self._store, self._index, self._cfg = store, index, cfg

    def _load(self, name: str, part: str) -> torch.Tensor:
        return self._load_parts(name, [part])[part]

    def _load_parts(self, name: str, parts: list[str]) -> dict[str, torch.Tensor]:
        """Several parts of one tensor (value, moments) in one read of the store."""
        shape = tuple(self._index[name]["shape"])
        out = {p: torch.empty(unit_view_shape(name, shape, self._cfg), dtype=torch.float32) for p in parts}
        load_boxes(self._store, {f"{name}/{p}": t for p, t in out.items()}, no_dist=True)
        return {p: t.reshape(shape) for p, t in out.items()}

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._index:
            raise KeyError(name)
        return self._load(name, "fp32")

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)


class _StoredMoments(Mapping):
    """Logical AdamW state of a sharded checkpoint by parameter name, assembled when asked for."""

    def __init__(self, tensors: _StoredTensors, index: dict[str, dict]):
        self._tensors = tensors
        self._entries = {n: e["optimizer"] for n, e in index.items() if e.get("optimizer") is not None}

    def __getitem__(self, name: str) -> dict:
        entry = self._entries[name]
        st = {"step": entry["step"], "max_offset": entry["max_offset"], "step_offset": None}
        for key in entry["keys"]:
            st[key] = self._tensors._load(name, key)
        return st

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


def _open_store(root: Path, manifest: dict | None, index: dict[str, dict], cfg: ModelConfig) -> VerifyingReader:
    """The DCP store of a sharded checkpoint, its metadata checked against the index (and the manifest)."""
    prefix = STORE_DIR + "/"
    checksums = metadata_crc = None
    if manifest is not None:
        checksums = {rel[len(prefix):]: rows for rel, rows in manifest.get("chunks", {}).items()
                     if rel.startswith(prefix)}
        metadata_crc = _entry(manifest["files"], prefix + ".metadata")["crc32"]
    store = VerifyingReader(root / STORE_DIR, checksums, metadata_crc)
    metadata = store.read_metadata()
    check_coverage(metadata)
    stored = metadata.state_dict_metadata
    for name, entry in index.items():
        want = unit_view_shape(name, tuple(entry["shape"]), cfg)
        parts = ["fp32"] + (entry["optimizer"]["keys"] if entry.get("optimizer") else [])
        for part in parts:
            md = stored.get(f"{name}/{part}")
            if md is None or tuple(getattr(md, "size", ())) != want:
                got = "missing" if md is None else f"of shape {tuple(getattr(md, 'size', ()))}"
                raise CheckpointError(f"{root}: stored tensor {name}/{part} is {got}, the index says "
                                      f"{want} (metadata and index disagree)")
    return store


class Checkpoint(NamedTuple):
    """An opened checkpoint: ``state`` in memory; ``model`` / ``optimizer`` read per tensor on access."""
    path: Path
    state: dict                          # step, stage_index, model_config, masked, ramp, config, ...
    model: Mapping[str, torch.Tensor]    # logical parameters and masks by name
    optimizer: Mapping[str, dict]        # logical AdamW state by parameter name
    store: VerifyingReader | None = None  # a sharded checkpoint's chunks, for loading by box (rank_state.py)
    index: dict[str, dict] | None = None  # its tensors' shapes and Adam counts (step, max_offset, keys)

    def read_part(self, name: str, part: str) -> torch.Tensor:
        """One logical tensor: ``part`` "fp32" (the value) or a moment key ("exp_avg", ...)."""
        return self.read_parts(name, [part])[part]

    def read_parts(self, name: str, parts: list[str]) -> dict[str, torch.Tensor]:
        """Several logical tensors of ``name`` (see read_part); a sharded store reads them in one pass."""
        if isinstance(self.model, _StoredTensors):  # only those parts' chunks are read
            return self.model._load_parts(name, parts)
        moments = self.optimizer[name] if any(p != "fp32" for p in parts) else {}  # read once: one file each
        return {p: self.model[name] if p == "fp32" else moments[p] for p in parts}


def open_checkpoint(path: Path) -> Checkpoint:
    """Open a checkpoint directory (or a first-format ``state.pt``) without reading its tensors."""
    path = Path(path)
    root = path if path.is_dir() else path.parent
    file = root / "state.pt"
    manifest = _load_manifest(root)
    why = _damage(root, manifest) if manifest is not None else None
    if why is not None:
        raise CheckpointError(f"{root}: damaged checkpoint: {why}")
    files = None if manifest is None else manifest["files"]
    state = _read(file, _entry(files, "state.pt"))
    fmt = state.get("format") if isinstance(state, dict) else type(state).__name__
    if fmt == LEGACY_FORMAT:  # everything in state.pt
        state = dict(state)
        model, optimizer = state.pop("model"), state.pop("optimizer")
        index = {n: {"shape": list(t.shape), "optimizer": None if (st := optimizer.get(n)) is None else {
            "step": int(st["step"]), "max_offset": int(st.get("max_offset", 0)),
            "keys": [k for k in MOMENT_KEYS if st.get(k) is not None]}} for n, t in model.items()}
        return Checkpoint(root, state, model, optimizer, None, index)
    if fmt not in (FORMAT, SHARDED_FORMAT):
        raise CheckpointError(f"{file}: not a megatron_msg checkpoint (format {fmt!r}, "
                              f"expected {SHARDED_FORMAT!r}, {FORMAT!r} or {LEGACY_FORMAT!r})")
    state = dict(state)
    index = state.pop("tensors")
    state.pop("manifest", None)
    if manifest is not None and manifest.get("step") != state.get("step"):
        raise CheckpointError(f"{root}: state.pt is for step {state.get('step')}, the manifest for step "
                              f"{manifest.get('step')} (files from two checkpoints)")
    if fmt == SHARDED_FORMAT:
        cfg = ModelConfig(**state["model_config"])
        store = _open_store(root, manifest, index, cfg)
        tensors = _StoredTensors(store, index, cfg)
        return Checkpoint(root, state, tensors, _StoredMoments(tensors, index), store, index)
    return Checkpoint(root, state, _TensorFiles(root, index, files), _MomentFiles(root, index, files), None, index)
