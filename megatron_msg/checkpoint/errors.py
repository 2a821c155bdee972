"""What every checkpoint module shares: the error users see, and the checksum of a file."""
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
