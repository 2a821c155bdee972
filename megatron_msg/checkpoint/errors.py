"""What every checkpoint module shares: the error users see, and checksums of files and streams."""
from __future__ import annotations

import zlib
from pathlib import Path

_CHUNK = 16 << 20  # bytes read at a time when checksumming a file


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or written as asked (damaged, mismatched, refused); one line."""


def file_crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


class ChecksumStream:
    """A write-only file wrapper that counts and CRC-32s what ``torch.save`` streams through it."""

    def __init__(self, f):
        self._f, self.bytes, self.crc = f, 0, 0

    def write(self, data) -> int:
        self.crc = zlib.crc32(data, self.crc)
        self.bytes += len(data)
        return self._f.write(data)

    def flush(self) -> None:
        self._f.flush()
