"""Megatron-LM's mmap indexed dataset format (``.bin`` + ``.idx``), written and read.

Layout of ``<prefix>.idx`` (all integers little endian), as documented by Megatron-LM's
``megatron/core/datasets/indexed_dataset.py``::

    9 bytes   magic  b"MMIDIDX\\x00\\x00"
    8 bytes   version, uint64, always 1
    1 byte    dtype code of the tokens in .bin (1 uint8, 2 int8, 3 int16, 4 int32,
              5 int64, 6 float64, 7 float32, 8 uint16)
    8 bytes   S = number of sequences, uint64
    8 bytes   D = number of entries of the document index, uint64 (= documents + 1)
    4*S bytes sequence lengths, int32 (in tokens)
    8*S bytes sequence pointers, int64 (byte offset of each sequence in .bin)
    8*D bytes document index, int64: document k is sequences [doc[k], doc[k+1])
   (1*S bytes sequence modes, int8 -- multimodal datasets only; we read past them)

``<prefix>.bin`` is the concatenation of all sequences' tokens in the dtype above.
Without sentence splitting a document is one sequence; with it, each sentence is one.

Both files are written to temp files and renamed at the end, so a failed run leaves nothing.
The reader checks every size and offset, so a truncated or mismatched pair fails loudly at
open time instead of yielding garbage tokens mid-training.
"""
from __future__ import annotations

import os
import struct
from typing import Dict, List, Optional, Sequence, Tuple, Type

import numpy as np

from .errors import IndexedFormatError
from .fileio import atomic_write_json, remove_quietly, temp_path_for

INDEX_MAGIC = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
HEADER_SIZE = len(INDEX_MAGIC) + 8 + 1 + 8 + 8  # 34 bytes

DTYPE_BY_CODE: Dict[int, Type[np.number]] = {
    1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32,
    5: np.int64, 6: np.float64, 7: np.float32, 8: np.uint16,
}
CODE_BY_DTYPE: Dict[np.dtype, int] = {np.dtype(t): c for c, t in DTYPE_BY_CODE.items()}

# Megatron-LM picks uint16 below this vocabulary size (not 65536: its choice, kept so that our
# .bin files are byte-identical to preprocess_data.py's).
UINT16_VOCAB_LIMIT = 65500


def token_dtype_for_vocab(vocab_size: int) -> Type[np.number]:
    """uint16 when every id fits (as Megatron-LM decides), int32 otherwise."""
    return np.uint16 if vocab_size < UINT16_VOCAB_LIMIT else np.int32


def data_paths(prefix: str) -> Tuple[str, str]:
    return prefix + ".bin", prefix + ".idx"


def metadata_path(prefix: str) -> str:
    """Sidecar JSON we write next to .bin/.idx (tokenizer fingerprint etc.; Megatron ignores it)."""
    return prefix + ".meta.json"


def encode_index(dtype: Type[np.number], sequence_lengths: np.ndarray,
                 document_index: np.ndarray) -> bytes:
    """The complete .idx file for the given sequences and documents."""
    lengths = np.asarray(sequence_lengths, dtype=np.int32)
    docs = np.asarray(document_index, dtype=np.int64)
    itemsize = np.dtype(dtype).itemsize
    pointers = np.zeros(len(lengths), dtype=np.int64)
    if len(lengths) > 1:
        np.cumsum(lengths[:-1].astype(np.int64) * itemsize, out=pointers[1:])
    header = (INDEX_MAGIC + struct.pack("<Q", INDEX_VERSION) + struct.pack("<B", CODE_BY_DTYPE[np.dtype(dtype)])
              + struct.pack("<Q", len(lengths)) + struct.pack("<Q", len(docs)))
    return b"".join([header, lengths.tobytes(), pointers.tobytes(), docs.tobytes()])


class IndexedDatasetWriter:
    """Streams documents into ``<prefix>.bin`` and writes ``<prefix>.idx`` at the end.

    Use as a context manager: on normal exit the files are committed (renamed into place), on
    an exception the temp files are deleted and nothing is left behind::

        with IndexedDatasetWriter(prefix, np.uint16, metadata={...}) as w:
            w.add_document(tokens, sequence_lengths=[len(tokens)])
    """

    def __init__(self, prefix: str, dtype: Type[np.number], metadata: Optional[dict] = None) -> None:
        if np.dtype(dtype) not in CODE_BY_DTYPE:
            raise ValueError(f"dtype {dtype} has no Megatron dtype code; use one of {sorted(map(str, CODE_BY_DTYPE))}")
        self.prefix = prefix
        self.dtype = np.dtype(dtype)
        self.metadata = metadata
        self._lengths: List[int] = []
        self._document_index: List[int] = [0]
        self._num_tokens = 0
        self._bin_tmp: Optional[str] = None
        self._bin = None

    def __enter__(self) -> "IndexedDatasetWriter":
        bin_path, _ = data_paths(self.prefix)
        self._bin_tmp = temp_path_for(bin_path)
        self._bin = open(self._bin_tmp, "wb")
        return self

    def add_document(self, tokens: np.ndarray, sequence_lengths: Optional[Sequence[int]] = None) -> None:
        """Append one document: ``tokens`` is all its tokens, split into sequences by
        ``sequence_lengths`` (default: the whole document is one sequence)."""
        if self._bin is None:
            raise RuntimeError("IndexedDatasetWriter must be used as a context manager")
        tokens = np.asarray(tokens)
        if sequence_lengths is None:
            sequence_lengths = [len(tokens)]
        if sum(sequence_lengths) != len(tokens):
            raise ValueError(f"sequence lengths sum to {sum(sequence_lengths)} but the document has {len(tokens)} tokens")
        if len(tokens) and self.dtype.kind in "iu":
            info = np.iinfo(self.dtype)
            lo, hi = int(tokens.min()), int(tokens.max())
            if lo < info.min or hi > info.max:
                raise ValueError(f"token id {hi if hi > info.max else lo} does not fit {self.dtype}")
        self._bin.write(tokens.astype(self.dtype, copy=False).tobytes())
        self._lengths.extend(int(n) for n in sequence_lengths)
        self._document_index.append(len(self._lengths))
        self._num_tokens += len(tokens)

    @property
    def num_documents(self) -> int:
        return len(self._document_index) - 1

    @property
    def num_tokens(self) -> int:
        return self._num_tokens

    def __exit__(self, exc_type, exc, tb) -> None:
        self._bin.close()
        self._bin = None
        if exc_type is not None:
            remove_quietly(self._bin_tmp)
            return
        bin_path, idx_path = data_paths(self.prefix)
        idx_tmp = temp_path_for(idx_path)
        try:
            with open(idx_tmp, "wb") as f:
                f.write(encode_index(self.dtype.type, np.array(self._lengths, dtype=np.int64),
                                     np.array(self._document_index, dtype=np.int64)))
            if self.metadata is not None:
                meta = dict(self.metadata, num_documents=self.num_documents, num_sequences=len(self._lengths),
                            num_tokens=self._num_tokens, dtype=self.dtype.name)
                atomic_write_json(metadata_path(self.prefix), meta)
            else:
                remove_quietly(metadata_path(self.prefix))  # a stale sidecar would describe other data
            os.replace(self._bin_tmp, bin_path)
            os.replace(idx_tmp, idx_path)
        except BaseException:
            remove_quietly(self._bin_tmp)
            remove_quietly(idx_tmp)
            raise


class IndexedDataset:
    """Read-only, memory-mapped view of ``<prefix>.bin`` / ``<prefix>.idx``.

    ``ds[i]`` is sequence ``i`` as a numpy array in the file's dtype (a view into the mmap);
    ``ds.get(i, offset, length)`` a slice of it.  Pickling sends only the prefix, so a
    DataLoader worker re-opens the files instead of copying them.
    """

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self._open()

    def _open(self) -> None:
        bin_path, idx_path = data_paths(self.prefix)
        for path in (idx_path, bin_path):
            if not os.path.isfile(path):
                raise IndexedFormatError(f"{path}: file not found (expected a .bin/.idx pair with prefix {self.prefix!r})")
        self.dtype, seq_count, doc_count, offset, multimodal = _read_header(idx_path)
        self._idx = np.memmap(idx_path, mode="r", dtype=np.uint8)
        self.sequence_lengths = np.frombuffer(self._idx, dtype=np.int32, count=seq_count, offset=offset)
        offset += 4 * seq_count
        self.sequence_pointers = np.frombuffer(self._idx, dtype=np.int64, count=seq_count, offset=offset)
        offset += 8 * seq_count
        self.document_indices = np.frombuffer(self._idx, dtype=np.int64, count=doc_count, offset=offset)
        self.multimodal = multimodal
        _check_index(idx_path, self.sequence_lengths, self.sequence_pointers, self.document_indices,
                     np.dtype(self.dtype).itemsize)
        expected_bin = int(self.sequence_lengths.astype(np.int64).sum()) * np.dtype(self.dtype).itemsize
        actual_bin = os.path.getsize(bin_path)
        if actual_bin != expected_bin:
            raise IndexedFormatError(
                f"{bin_path}: {actual_bin} bytes, but {idx_path} describes {expected_bin} bytes "
                f"({'truncated' if actual_bin < expected_bin else 'extra data'}; the .bin and .idx do not belong together "
                f"or one of them was cut short)")
        # np.memmap cannot map an empty file; an all-empty dataset has no tokens to read anyway.
        self._bin = (np.memmap(bin_path, mode="r", dtype=self.dtype) if expected_bin
                     else np.zeros(0, dtype=self.dtype))

    def __getstate__(self) -> dict:
        return {"prefix": self.prefix}

    def __setstate__(self, state: dict) -> None:
        self.prefix = state["prefix"]
        self._open()

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    @property
    def num_documents(self) -> int:
        return len(self.document_indices) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.sequence_lengths.astype(np.int64).sum())

    def _start(self, i: int) -> int:
        return int(self.sequence_pointers[i]) // np.dtype(self.dtype).itemsize

    def __getitem__(self, i: int) -> np.ndarray:
        start = self._start(i)
        return self._bin[start:start + int(self.sequence_lengths[i])]

    def get(self, i: int, offset: int = 0, length: Optional[int] = None) -> np.ndarray:
        """Tokens ``[offset, offset+length)`` of sequence ``i`` (to its end when length is None)."""
        size = int(self.sequence_lengths[i])
        if length is None:
            length = size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(f"slice [{offset}, {offset + length}) is outside sequence {i} of length {size}")
        start = self._start(i) + offset
        return self._bin[start:start + length]

    def document(self, k: int) -> np.ndarray:
        """All tokens of document ``k`` (its sequences concatenated)."""
        first, last = int(self.document_indices[k]), int(self.document_indices[k + 1])
        if first == last:
            return np.zeros(0, dtype=self.dtype)
        start = self._start(first)
        return self._bin[start:start + int(self.sequence_lengths[first:last].astype(np.int64).sum())]

    def max_token_id(self) -> int:
        """Largest token id in the data (a full scan of .bin)."""
        return int(self._bin.max()) if len(self._bin) else -1


def _read_header(idx_path: str) -> Tuple[Type[np.number], int, int, int, bool]:
    size = os.path.getsize(idx_path)
    with open(idx_path, "rb") as f:
        header = f.read(HEADER_SIZE)
    if len(header) < HEADER_SIZE:
        raise IndexedFormatError(f"{idx_path}: {size} bytes, shorter than the {HEADER_SIZE}-byte header (truncated?)")
    if header[:9] != INDEX_MAGIC:
        raise IndexedFormatError(f"{idx_path}: bad magic {header[:9]!r}, expected {INDEX_MAGIC!r} "
                                 "(not a Megatron mmap indexed dataset)")
    (version,) = struct.unpack("<Q", header[9:17])
    if version != INDEX_VERSION:
        raise IndexedFormatError(f"{idx_path}: version {version}, only version {INDEX_VERSION} is supported")
    code = header[17]
    if code not in DTYPE_BY_CODE:
        raise IndexedFormatError(f"{idx_path}: unknown dtype code {code} (known: {sorted(DTYPE_BY_CODE)})")
    seq_count, doc_count = struct.unpack("<QQ", header[18:34])
    body = 4 * seq_count + 8 * seq_count + 8 * doc_count
    if size == HEADER_SIZE + body:
        multimodal = False
    elif size == HEADER_SIZE + body + seq_count:
        multimodal = True  # trailing int8 sequence modes of Megatron's multimodal datasets
    else:
        raise IndexedFormatError(
            f"{idx_path}: {size} bytes, but its header promises {seq_count} sequences and {doc_count} "
            f"document-index entries ({HEADER_SIZE + body} bytes); the file is truncated or corrupt")
    return DTYPE_BY_CODE[code], int(seq_count), int(doc_count), HEADER_SIZE, multimodal


def _check_index(idx_path: str, lengths: np.ndarray, pointers: np.ndarray, docs: np.ndarray, itemsize: int) -> None:
    if len(docs) == 0 or docs[0] != 0 or docs[-1] != len(lengths):
        raise IndexedFormatError(f"{idx_path}: document index must start at 0 and end at the number of "
                                 f"sequences ({len(lengths)}); got {docs[:1].tolist()}..{docs[-1:].tolist()}")
    if np.any(np.diff(docs) < 0):
        raise IndexedFormatError(f"{idx_path}: document index is not non-decreasing")
    if len(lengths) and lengths.min() < 0:
        raise IndexedFormatError(f"{idx_path}: negative sequence length at sequence {int(np.argmin(lengths))}")
    if len(lengths):
        expected = np.zeros(len(lengths), dtype=np.int64)
        np.cumsum(lengths[:-1].astype(np.int64) * itemsize, out=expected[1:])
        bad = np.flatnonzero(expected != pointers)
        if len(bad):
            raise IndexedFormatError(f"{idx_path}: sequence pointer {int(bad[0])} is {int(pointers[bad[0]])}, "
                                     f"expected {int(expected[bad[0]])} (sequences must be contiguous)")
