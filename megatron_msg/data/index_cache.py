"""On-disk cache of dataset indices (document/sample/shuffle/blending arrays).

Entries are keyed by a hash of a JSON description of everything the arrays depend on; the
description is stored next to them for humans.  Every file is written atomically (temp file +
rename), so concurrent builders and crashed runs never leave a half-written entry.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import numpy as np

from .fileio import atomic_save_npy, atomic_write_json

logger = logging.getLogger(__name__)

# Bump when the meaning of a cached array changes, so stale caches are ignored.
CACHE_FORMAT_VERSION = 1


@dataclass(frozen=True)
class IndexCache:
    """``directory=None`` disables caching (arrays are built in memory each time)."""

    directory: Optional[str]

    def load_or_build(self, kind: str, description: dict,
                      build: Callable[[], Dict[str, np.ndarray]]) -> Dict[str, np.ndarray]:
        """Return the cached arrays for ``description``, building and saving them on a miss."""
        full = dict(description, kind=kind, cache_format=CACHE_FORMAT_VERSION)
        text = json.dumps(full, sort_keys=True)
        key = f"{kind}-{hashlib.sha256(text.encode()).hexdigest()[:20]}"
        if self.directory is None:
            return build()
        done_marker = os.path.join(self.directory, f"{key}-description.json")
        if os.path.isfile(done_marker):
            try:
                with open(done_marker) as f:
                    names = json.load(f)["arrays"]
                paths = self._paths(key, names)
                return {name: np.load(path, mmap_mode="r", allow_pickle=False) for name, path in paths.items()}
            except (OSError, ValueError, KeyError) as exc:
                # Deleted or damaged by hand: not worth failing a run for; rebuild and overwrite.
                logger.warning("ignoring unreadable index cache entry %s (%s); rebuilding", done_marker, exc)
        arrays = build()
        try:
            os.makedirs(self.directory, exist_ok=True)
            for name, path in self._paths(key, list(arrays)).items():
                atomic_save_npy(path, arrays[name])
            # Written last: its presence means every array above is complete.
            atomic_write_json(done_marker, dict(full, arrays=sorted(arrays)))
        except OSError as exc:
            logger.warning("could not cache dataset indices in %s (%s); they will be rebuilt next time",
                           self.directory, exc)
        return arrays

    def _paths(self, key: str, names) -> Dict[str, str]:
        return {name: os.path.join(self.directory, f"{key}-{name}.npy") for name in names}
