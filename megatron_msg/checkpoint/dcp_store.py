"""Tensors stored as boxes with ``torch.distributed.checkpoint`` (DCP), every read checksummed.

DCP is the engine Megatron-core's dist-checkpointing and torchtitan use for
sharded checkpoints: every rank writes the chunks it holds into its own file, in
parallel, the coordinator writes one ``.metadata`` (every chunk's place in its
global tensor and in the files), and a load on any layout asks each rank's
chunks by box, so a rank reads only the stored chunks that overlap what it needs
(load-time resharding).  We reuse all of that: planning, de-duplication of
replicated chunks across ranks (balanced over the ranks that hold them), the
coverage check of a save, the file format.  What we add is small:

* :class:`Boxes`: a rank's piece of one tensor as several chunks.  DCP's own
  sharded types (DTensor, one box per rank on a device mesh) cannot say "entries
  [a, b) of a TP block": a ZeRO fragment is up to seven boxes (boxes.py).  DCP's
  planners find chunks through the ``__create_write_items__`` /
  ``__create_chunk_list__`` hooks, and the two planner subclasses here find the
  chunk tensors by offset.
* :class:`VerifyingReader`: DCP's file reader with every stored chunk checked
  against its CRC-32 (from our manifest) before it is deserialised, and the
  ``.metadata`` file too; chunks are read by byte range, never whole files.
* :class:`_StreamingWriter`: DCP's file writer with a data loop that checksums each chunk as
  it goes out and keeps none of them (the stock loop holds every written tensor until the file
  is closed).

The checkpoint directory, manifest, atomic commit and integrity rules stay in
io.py; which pieces a rank holds is in rank_state.py.
"""
from __future__ import annotations

import io
import os
import warnings
import zlib
from contextlib import contextmanager
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import _StorageInfo  # DCP's per-chunk location record
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, Metadata, MetadataIndex,
                                                   TensorProperties, TensorStorageMetadata)
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from megatron_msg.checkpoint.errors import CheckpointError, ChecksumStream, file_crc32

METADATA = ".metadata"  # DCP's index file name


class Boxes:
    """Chunks of one global tensor held by this rank: ``(offsets, tensor)`` pairs.

    For a save the tensors are views of the rank's state (DCP copies each one to the
    CPU as it writes it); for a load they are views of buffers the reads fill.
    """

    def __init__(self, size: tuple[int, ...], chunks: Iterable[tuple[tuple[int, ...], torch.Tensor]]):
        self._size = torch.Size(size)
        self.chunks = {torch.Size(off): t for off, t in chunks}
        if not self.chunks:
            raise ValueError("Boxes: no chunks (leave the tensor out instead)")

    def size(self) -> torch.Size:  # DCP compares it with the stored tensor's size at load
        return self._size

    def _metadata(self) -> list[tuple[torch.Size, torch.Size, torch.dtype]]:
        return [(off, t.size(), t.dtype) for off, t in self.chunks.items()]

    def __create_write_items__(self, fqn: str, obj) -> list[WriteItem]:
        return [WriteItem(index=MetadataIndex(fqn, off), type=WriteItemType.SHARD,
                          tensor_data=TensorWriteData(chunk=ChunkStorageMetadata(offsets=off, sizes=sizes),
                                                      properties=TensorProperties(dtype=dtype), size=self._size))
                for off, sizes, dtype in self._metadata()]

    def __create_chunk_list__(self) -> list[ChunkStorageMetadata]:
        return [ChunkStorageMetadata(offsets=off, sizes=sizes) for off, sizes, _ in self._metadata()]

    def chunk_at(self, offsets) -> torch.Tensor:
        return self.chunks[torch.Size(offsets)]


class LazyBoxes(Boxes):
    """Chunks declared by box, their data produced only when DCP writes them (``resolve(offsets, sizes)``).

    DCP's file writer asks for the chunks one at a time, in the order of the state dict
    and of each value's chunks, so an offline writer can read its source tensor by tensor.
    """

    def __init__(self, size: tuple[int, ...], boxes: Iterable[tuple[tuple[int, ...], tuple[int, ...]]],
                 resolve, dtype: torch.dtype = torch.float32):
        self._size = torch.Size(size)
        self.boxes = {torch.Size(off): torch.Size(sizes) for off, sizes in boxes}
        if not self.boxes:
            raise ValueError("LazyBoxes: no chunks")
        self._resolve, self._dtype = resolve, dtype

    def _metadata(self) -> list[tuple[torch.Size, torch.Size, torch.dtype]]:
        return [(off, sizes, self._dtype) for off, sizes in self.boxes.items()]

    def chunk_at(self, offsets) -> torch.Tensor:
        off = torch.Size(offsets)
        return self._resolve(tuple(off), tuple(self.boxes[off]))


class _SavePlanner(DefaultSavePlanner):
    def __init__(self):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)

    def lookup_object(self, index: MetadataIndex):
        obj = self.state_dict[index.fqn]
        return obj.chunk_at(index.offset) if isinstance(obj, Boxes) else super().lookup_object(index)


class _LoadPlanner(DefaultLoadPlanner):
    def __init__(self):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)

    def set_up_planner(self, state_dict, metadata=None, is_coordinator: bool = False) -> None:
        # DefaultLoadPlanner first "initialises meta tensors" with a walk over the state dict
        # that replaces every value of a type it does not know (our Boxes) by None.  Nothing
        # here is on the meta device, and nothing needs flattening: keep the values.
        self.original_state_dict = self.state_dict = state_dict
        self.metadata, self.is_coordinator = metadata, is_coordinator

    def lookup_tensor(self, index: MetadataIndex) -> torch.Tensor:
        obj = self.state_dict[index.fqn]
        return obj.chunk_at(index.offset) if isinstance(obj, Boxes) else super().lookup_tensor(index)


class _StreamingWriter(FileSystemWriter):
    """DCP's file writer with its data loop replaced: one file per rank, each chunk's CRC-32 taken as
    it is written, and no chunk kept once written.

    Why not the stock loop: in torch 2.13 it keeps every tensor it has written in a dict (for its
    safetensors option) until the file is closed, so a rank's save holds a copy of its whole state,
    and an offline writer of a large model all of it; and its bytes can only be checksummed by
    reading the file back.  Planning, metadata and ``finish`` stay DCP's.
    """

    def __init__(self, path: Path):
        super().__init__(path, single_file_per_rank=True, sync_files=True, thread_count=1, overwrite=True)
        self._dir = Path(path)
        self.checksums: dict[str, list[list[int]]] = {}

    def write_data(self, plan, planner) -> Future:
        name = f"{plan.storage_data.prefix}0.distcp"
        results, rows = [], []
        with open(self._dir / name, "wb") as f:
            out = ChecksumStream(f)
            for item in plan.items:
                if item.type == WriteItemType.BYTE_IO:
                    raise CheckpointError(f"{item.index.fqn}: only tensors are stored here")
                t = planner.resolve_data(item).detach().cpu()
                if t.untyped_storage().nbytes() != t.nbytes or not t.is_contiguous():
                    t = t.clone()  # a view: store the piece, not its whole storage
                offset, out.crc = out.bytes, 0
                torch.save(t, out)
                length = out.bytes - offset
                rows.append([offset, length, out.crc])
                results.append(WriteResult(index=item.index, size_in_bytes=length,
                                           storage_data=_StorageInfo(name, offset, length)))
                del t
            f.flush()
            os.fsync(f.fileno())
        self.checksums = {name: rows}
        fut: Future = Future()
        fut.set_result(results)
        return fut


def save_boxes(path: Path, state_dict: dict, no_dist: bool = False) -> tuple[Metadata, dict[str, list[list[int]]]]:
    """Write every rank's ``state_dict`` (names -> Boxes or tensors) under ``path``; collective unless ``no_dist``.

    Each rank writes one file (``__<rank>_0.distcp``), fsynced; the coordinator writes
    ``.metadata`` once all are written.  Returns the global metadata and this rank's chunk
    checksums: relative path -> [[offset, length, crc32], ...].
    """
    writer = _StreamingWriter(path)
    try:
        with _quiet(no_dist):
            metadata = dcp.save(state_dict, storage_writer=writer, planner=_SavePlanner(), no_dist=no_dist)
    except (Exception, CheckpointException) as exc:  # e.g. a full disk on one rank, reported on every rank
        raise CheckpointError(_one_line(exc, f"{path}: cannot save")) from None
    return metadata, writer.checksums


@contextmanager
def _quiet(no_dist: bool):
    """DCP warns at every single-process call that it assumes one process: that is the intent here."""
    with warnings.catch_warnings():
        if no_dist:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


class VerifyingReader(FileSystemReader):
    """DCP's file reader that checks every chunk (and ``.metadata``) against the manifest's CRC-32.

    ``checksums``: relative path -> [[offset, length, crc], ...] (what save_boxes returned on
    every rank) and ``metadata_crc``; None for both skips the checks.  The metadata is read
    once and kept, so one reader serves many loads of single tensors.
    """

    def __init__(self, path: Path, checksums: dict[str, list] | None, metadata_crc: int | None):
        super().__init__(path)
        self._dir = Path(path)
        self._crc = None if checksums is None else {
            (rel, off): (length, crc) for rel, rows in checksums.items() for off, length, crc in rows}
        self._metadata_crc = metadata_crc
        self._metadata: Metadata | None = None

    def read_metadata(self, *args, **kwargs) -> Metadata:
        if self._metadata is None:
            file = self._dir / METADATA
            if not file.is_file():
                raise CheckpointError(f"{file}: missing from the checkpoint (the directory is damaged)")
            if self._metadata_crc is not None and file_crc32(file) != self._metadata_crc:
                raise CheckpointError(f"{file}: checksum mismatch: the file is damaged")
            try:
                self._metadata = super().read_metadata(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - a truncated or foreign pickle
                raise CheckpointError(f"{file}: cannot read ({' '.join(str(exc).split())})") from None
        return self._metadata

    def _chunk_bytes(self, rel: str, offset: int, length: int) -> bytes:
        file = self._dir / rel
        try:
            with open(file, "rb") as f:
                f.seek(offset)
                data = f.read(length)
        except FileNotFoundError:
            raise CheckpointError(f"{file}: missing from the checkpoint (the directory is damaged)") from None
        if len(data) != length:
            raise CheckpointError(f"{file}: truncated (a chunk at byte {offset} needs {length} bytes, "
                                  f"{len(data)} are there)")
        if self._crc is not None:
            expect = self._crc.get((rel, offset))
            if expect is None or expect[0] != length:
                raise CheckpointError(f"{file}: the chunk at byte {offset} is not in the manifest "
                                      f"(metadata and manifest disagree)")
            crc = zlib.crc32(data)
            if crc != expect[1]:
                raise CheckpointError(f"{file}: checksum mismatch in the chunk at byte {offset} (crc32 {crc:08x}, "
                                      f"the manifest says {expect[1]:08x}): the file is damaged")
        return data

    def read_data(self, plan, planner) -> Future:
        # In file order, each stored chunk read and checked once however many requests it serves.
        by_chunk: dict[tuple[str, int, int], list] = {}
        for req in plan.items:
            info = self.storage_data[req.storage_index]
            if info.transform_descriptors:
                raise CheckpointError(f"{self._dir}: chunk of {req.storage_index.fqn} uses storage transforms "
                                      f"{info.transform_descriptors}, which this reader does not apply")
            by_chunk.setdefault((info.relative_path, info.offset, info.length), []).append(req)
        for (rel, offset, length), reqs in sorted(by_chunk.items()):
            data = self._chunk_bytes(rel, offset, length)
            try:
                stored = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
            except Exception as exc:  # noqa: BLE001
                raise CheckpointError(f"{self._dir / rel}: cannot read the chunk at byte {offset} "
                                      f"({' '.join(str(exc).split())})") from None
            for req in reqs:
                piece = stored
                for dim, (start, size) in enumerate(zip(req.storage_offsets, req.lengths)):
                    piece = piece.narrow(dim, start, size)
                target = planner.resolve_tensor(req).detach()
                if target.size() != piece.size():
                    raise CheckpointError(f"{self._dir}: chunk of {req.storage_index.fqn} has shape "
                                          f"{tuple(piece.shape)} where {tuple(target.shape)} was expected")
                target.copy_(piece)
                planner.commit_tensor(req, target)
        fut: Future = Future()
        fut.set_result(None)
        return fut


def check_coverage(metadata: Metadata) -> None:
    """Every stored tensor's chunks lie inside it and add up to it (what a load then relies on)."""
    for key, md in metadata.state_dict_metadata.items():
        if not isinstance(md, TensorStorageMetadata):
            continue
        volume = 0
        for c in md.chunks:
            if any(o < 0 or o + s > n for o, s, n in zip(c.offsets, c.sizes, md.size)):
                raise CheckpointError(f"stored tensor {key}: chunk at {tuple(c.offsets)} of size {tuple(c.sizes)} "
                                      f"lies outside its shape {tuple(md.size)}")
            volume += _prod(c.sizes)
        if volume != _prod(md.size):
            raise CheckpointError(f"stored tensor {key}: its chunks hold {volume} entries, its shape "
                                  f"{tuple(md.size)} has {_prod(md.size)} (metadata damaged)")


def _prod(sizes) -> int:
    n = 1
    for s in sizes:
        n *= s
    return n


def load_boxes(reader: VerifyingReader, state_dict: dict, no_dist: bool = False) -> None:
    """Fill ``state_dict`` (names -> Boxes or tensors) from the store; collective unless ``no_dist``.

    Every rank of the default process group must call it (with its own, possibly empty,
    state_dict) when ``no_dist`` is False.
    """
    try:
        with _quiet(no_dist):
            dcp.load(state_dict, storage_reader=reader, planner=_LoadPlanner(), no_dist=no_dist)
    except CheckpointError:
        raise
    # DCP reports any rank's failure as a CheckpointException (a BaseException) holding every rank's error
    except (Exception, CheckpointException) as exc:
        raise CheckpointError(_one_line(exc, f"{reader._dir}: cannot load")) from None


def _one_line(exc: BaseException, context: str) -> str:
    """The first CheckpointError behind ``exc`` (raised on any rank), else ``exc`` on one line."""
    for cause in _causes(exc):
        if isinstance(cause, CheckpointError):
            return str(cause)
    last = list(_causes(exc))[-1]
    return f"{context} ({type(last).__name__}: {' '.join(str(last).split())[:300]})"


def _causes(exc: BaseException):
    """``exc`` and what is behind it: every rank's error of a CheckpointException, chained causes."""
    if isinstance(exc, CheckpointException):
        for err, _trace in exc.failures.values():
            yield from _causes(err)
        return
    yield exc
    if exc.__cause__ is not None:
        yield from _causes(exc.__cause__)


def distcp_files(path: Path) -> list[str]:
    return sorted(p.name for p in Path(path).iterdir() if p.suffix == ".distcp")

