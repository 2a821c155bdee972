"""Atomic file writes: a reader never sees a half-written file.

Everything is first written to a temp file in the destination directory (same filesystem, so
``os.replace`` is an atomic rename) and renamed over the final name only when complete.  Two
ranks building the same cache file at once simply race to rename identical content.
"""
from __future__ import annotations

import json
import os
import uuid
from typing import Any

import numpy as np


def temp_path_for(path: str) -> str:
    """A fresh, unique temp file next to ``path`` (the caller renames or deletes it)."""
    directory = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(directory, exist_ok=True)
    # Not tempfile.mkstemp: its files are mode 0600, and the renamed result should get the
    # usual permissions (umask), like any other file the user writes.
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp")
    open(tmp, "xb").close()
    return tmp


def remove_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def atomic_write_bytes(path: str, data: bytes) -> None:
    tmp = temp_path_for(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        remove_quietly(tmp)
        raise


def atomic_write_json(path: str, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8"))


def atomic_save_npy(path: str, array: np.ndarray) -> None:
    tmp = temp_path_for(path)
    try:
        with open(tmp, "wb") as f:
            np.save(f, array, allow_pickle=False)
        os.replace(tmp, path)
    except BaseException:
        remove_quietly(tmp)
        raise
